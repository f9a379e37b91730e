"""`data_prep.py mimic` and `data_prep.py synth` as a user runs them: exit codes, one-line errors, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from mimic_cases import Case, septic_patient

REPO = Path(__file__).resolve().parents[1]


def data_prep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data_prep.py"), *argv], capture_output=True, text=True, timeout=300
    )


def test_synth_then_mimic_end_to_end(tmp_path):
    synth = data_prep(
        "synth", "--stays", "30", "--chart-scale", "0.05", "--seed", "5", "--out", str(tmp_path / "s")
    )
    assert synth.returncode == 0, synth.stderr
    assert "30/30 stays" in synth.stderr  # progress on stderr
    done = data_prep(
        "mimic", "--mimic-dir", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--step-hours", "1"
    )
    assert done.returncode == 0, done.stderr
    assert "[mimic" in done.stderr and "chartevents" in done.stderr  # progress per stage
    frame = pl.read_parquet(tmp_path / "out" / "replay.parquet")
    assert frame.height > 0 and {
        "vaso_ne_eq",
        "fluid_ml",
        "map_mmhg",
        "cvp_mmhg",
        "cum_balance_ml",
        "sofa",
    } <= set(frame.columns)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    folder = septic_patient(Case(), 1).write(tmp_path / "mimic")
    (folder / "icu" / "chartevents.csv.gz").unlink()
    result = data_prep("mimic", "--mimic-dir", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "table 'chartevents' not found" in errors[0]
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option():
    text = data_prep("mimic", "--help").stdout
    for flag in (
        "--mimic-dir",
        "--out",
        "--step-hours",
        "--window-start-hours",
        "--reward",
        "--split-seed",
        "--first-stay-only",
    ):
        assert flag in text
    assert "raghu" in text and "90-day" in text
    assert "--stays" in data_prep("synth", "--help").stdout
