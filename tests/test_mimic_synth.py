"""The synthetic MIMIC-shaped generator: deterministic by seed, and its output passes the same pipeline."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from cleansepsis.mimic.pipeline import MimicArgs, run
from cleansepsis.mimic.synth import SynthArgs, generate
from cleansepsis.replay import load_replay


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.csv.gz"))}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    small = {"stays": 12, "chart_scale": 0.02, "quiet": True}
    generate(SynthArgs(out=tmp_path / "a", seed=3, **small))
    generate(SynthArgs(out=tmp_path / "b", seed=3, **small))
    generate(SynthArgs(out=tmp_path / "c", seed=4, **small))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a")["chartevents.csv.gz"] != digests(tmp_path / "c")["chartevents.csv.gz"]


def test_volumes_per_stay_match_mimic_iv(tmp_path):
    counts = generate(SynthArgs(out=tmp_path / "s", stays=40, seed=1, quiet=True))
    per_stay_chart = counts["icu/chartevents"] / 40
    per_stay_lab = counts["hosp/labevents"] / 40
    assert 2_500 < per_stay_chart < 8_000  # MIMIC-IV v3.1: 433e6 / 94e3 = 4,600
    assert 900 < per_stay_lab < 3_000  # 158e6 / 94e3 = 1,680


def test_synthetic_data_passes_the_pipeline(tmp_path):
    generate(SynthArgs(out=tmp_path / "s", stays=60, seed=2, chart_scale=0.1, quiet=True))
    summary = run(MimicArgs(mimic_dir=tmp_path / "s", out=tmp_path / "out", quiet=True))
    counts = summary["cohort_counts"]
    assert counts["icu_stays"] == 60
    assert 10 <= counts["sepsis3"] <= counts["suspected_infection"] < 60
    replay = load_replay(tmp_path / "out" / "replay.parquet")
    assert replay.data.obs.shape[1] == replay.meta["obs_dim"]
    # the septic synthetic stays get vasopressors: more than one vasopressor level is used
    assert len(np.unique(np.asarray(replay.data.action) % 5)) >= 3
    cohort = pl.read_parquet(tmp_path / "out" / "cohort.parquet")
    assert cohort.height == counts["with_a_step_in_icu"]
