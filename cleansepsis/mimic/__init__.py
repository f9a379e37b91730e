"""MIMIC-IV -> offline-RL replay pipeline (`data_prep.py mimic`) and a MIMIC-shaped synthetic generator
(`data_prep.py synth`). See docs/mimic.md."""
