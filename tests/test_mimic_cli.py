"""`data_prep.py mimic` and `data_prep.py synth` as a user runs them: exit codes, one-line errors, --help.

In-process through data_prep.main (a subprocess would pay the JAX and polars imports again); main returns
the exit status the script passes to sys.exit, and an uncaught exception (a traceback) fails the test."""

from __future__ import annotations

import runpy
import signal
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from mimic_cases import Case, septic_patient

import data_prep


def test_synth_then_mimic_end_to_end(tmp_path, capsys):
    synth = data_prep.main(
        ["synth", "--stays", "30", "--chart-scale", "0.05", "--seed", "5", "--out", str(tmp_path / "s")]
    )
    err = capsys.readouterr().err
    assert synth == 0, err
    assert "30/30 stays" in err  # progress on stderr
    done = data_prep.main(
        ["mimic", "--mimic-dir", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--step-hours", "1"]
    )
    err = capsys.readouterr().err
    assert done == 0, err
    assert "[mimic" in err and "chartevents" in err  # progress per stage
    frame = pl.read_parquet(tmp_path / "out" / "replay.parquet")
    assert frame.height > 0 and {
        "vaso_ne_eq",
        "fluid_ml",
        "map_mmhg",
        "cvp_mmhg",
        "cum_balance_ml",
        "sofa",
    } <= set(frame.columns)


def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    """Through the script's own `__main__` block (runpy, in-process: its imports are already loaded), so the
    status is what `python data_prep.py ...` exits with."""
    folder = septic_patient(Case(), 1).write(tmp_path / "mimic")
    (folder / "icu" / "chartevents.csv.gz").unlink()
    script = Path(data_prep.__file__)
    monkeypatch.setattr(sys, "argv", [str(script), "mimic", "--mimic-dir", str(folder), "--out", str(tmp_path / "out")])
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as status:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, previous_sigint)  # the script installs its Ctrl-C handler for good
    code = status.value.code
    err = capsys.readouterr().err
    assert code != 0 and code is not None
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "table 'chartevents' not found" in errors[0]
    assert not (tmp_path / "out").exists()


def _help(*argv: str, capsys) -> str:
    """The --help text of a subcommand: tyro prints it to stdout and exits with status 0."""
    with pytest.raises(SystemExit) as status:
        data_prep.main([*argv, "--help"])
    assert status.value.code == 0
    return capsys.readouterr().out


def test_help_explains_every_option(capsys):
    text = _help("mimic", capsys=capsys)
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
    assert "--stays" in _help("synth", capsys=capsys)
