"""Every bad input ends in one clear message naming the file, column or value, exit code 1, no traceback,
no output, and the input files unchanged."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from mimic_cases import Case, septic_patient

import data_prep


@pytest.fixture(scope="module")
def good_case(tmp_path_factory) -> Path:
    case = septic_patient(Case(), 1).chart(1, 2.0, 220052, 70.0)
    septic_patient(case, 2).chart(2, 2.0, 220052, 65.0)
    return case.write(tmp_path_factory.mktemp("good") / "mimic")


@pytest.fixture
def case_dir(good_case, tmp_path) -> Path:
    copy = tmp_path / "mimic"
    shutil.copytree(good_case, copy)
    return copy


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def rewrite_csv(path: Path, edit) -> None:
    """Read a .csv.gz as strings, apply `edit` to the frame, write it back (test set-up only)."""
    frame = pl.read_csv(path, infer_schema=False)
    with gzip.open(path, "wb") as handle:
        handle.write(edit(frame).write_csv().encode())


def main(mimic_dir: Path, out: Path) -> int:
    """The command as a user runs it: `data_prep.py mimic --mimic-dir ... --out ...`."""
    return data_prep.main(["mimic", "--mimic-dir", str(mimic_dir), "--out", str(out), "--quiet"])


def run_bad(folder: Path, tmp_path: Path, capsys) -> str:
    before = digest(folder) if folder.exists() else {}
    out = tmp_path / "out"
    code = main(folder, out)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert "Traceback" not in err
    assert not out.exists()  # no partial output
    assert not list(tmp_path.glob(".out.*"))  # no temporary left behind
    if before:
        assert digest(folder) == before  # inputs never modified
    return err


def test_good_case_runs(case_dir, tmp_path, capsys):
    assert main(case_dir, tmp_path / "out") == 0
    assert (tmp_path / "out" / "replay.parquet").exists()


def test_missing_folder(case_dir, tmp_path, capsys):
    shutil.rmtree(case_dir / "hosp")
    err = run_bad(case_dir, tmp_path, capsys)
    assert "hosp: folder not found" in err


def test_missing_mimic_dir(tmp_path, capsys):
    err = run_bad(tmp_path / "nowhere", tmp_path, capsys)
    assert "nowhere: --mimic-dir not found" in err


def test_missing_table(case_dir, tmp_path, capsys):
    (case_dir / "icu" / "inputevents.csv.gz").unlink()
    err = run_bad(case_dir, tmp_path, capsys)
    assert "table 'inputevents' not found" in err


def test_missing_column(case_dir, tmp_path, capsys):
    rewrite_csv(case_dir / "icu" / "icustays.csv.gz", lambda f: f.drop("outtime"))
    err = run_bad(case_dir, tmp_path, capsys)
    assert "icustays.csv.gz" in err and "missing column(s) ['outtime']" in err


def test_wrong_dtype(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "hosp" / "labevents.csv.gz", lambda f: f.with_columns(pl.lit("high").alias("valuenum"))
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "labevents.csv.gz" in err and "valuenum" in err and "high" in err


def test_bad_timestamp(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "icu" / "chartevents.csv.gz",
        lambda f: f.with_columns(pl.lit("2150-13-45 99:00").alias("charttime")),
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "chartevents.csv.gz" in err and "'charttime'" in err and "2150-13-45 99:00" in err


def test_corrupt_gzip(case_dir, tmp_path, capsys):
    (case_dir / "hosp" / "patients.csv.gz").write_bytes(b"this is not gzip at all" * 10)
    err = run_bad(case_dir, tmp_path, capsys)
    assert "patients.csv.gz: not a gzip file" in err


def test_truncated_gzip(case_dir, tmp_path, capsys):
    path = case_dir / "icu" / "chartevents.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    err = run_bad(case_dir, tmp_path, capsys)
    assert "chartevents.csv.gz" in err and "truncated" in err


def test_truncated_gzip_found_while_streaming(case_dir, tmp_path, capsys):
    """A large file cut short: the header reads fine, the damage is found by the streaming pass."""
    path = case_dir / "icu" / "chartevents.csv.gz"
    frame = pl.read_csv(path, infer_schema=False)
    filler = pl.concat([frame.head(1)] * 200_000).with_columns(pl.lit("999999").alias("stay_id"))
    data = gzip.compress(pl.concat([frame, filler]).write_csv().encode(), compresslevel=1)
    path.write_bytes(data[: len(data) // 2])
    err = run_bad(case_dir, tmp_path, capsys)
    assert "chartevents.csv.gz: corrupt or truncated compressed file" in err


def test_empty_table(case_dir, tmp_path, capsys):
    rewrite_csv(case_dir / "icu" / "outputevents.csv.gz", lambda f: f.head(0))
    err = run_bad(case_dir, tmp_path, capsys)
    assert "outputevents.csv.gz: has a header but no rows" in err


def test_zero_byte_table(case_dir, tmp_path, capsys):
    path = case_dir / "hosp" / "admissions.csv.gz"
    path.unlink()
    (case_dir / "hosp" / "admissions.csv").write_bytes(b"")
    err = run_bad(case_dir, tmp_path, capsys)
    assert "admissions.csv: is empty" in err


def test_duplicated_rows(case_dir, tmp_path, capsys):
    rewrite_csv(case_dir / "icu" / "icustays.csv.gz", lambda f: pl.concat([f, f.head(1)]))
    err = run_bad(case_dir, tmp_path, capsys)
    assert "icustays.csv.gz" in err and "'stay_id' has duplicated value 301" in err


def test_absurd_value(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "hosp" / "patients.csv.gz",
        lambda f: f.with_columns(
            pl.when(pl.col("subject_id") == "101")
            .then(pl.lit("340"))
            .otherwise(pl.col("anchor_age"))
            .alias("anchor_age")
        ),
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "patients.csv.gz" in err and "'anchor_age' has value 340" in err


def test_timestamps_out_of_order(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "icu" / "icustays.csv.gz",
        lambda f: f.with_columns(
            pl.when(pl.col("stay_id") == "302")
            .then(pl.lit("2150-02-01 00:00:00"))
            .otherwise(pl.col("outtime"))
            .alias("outtime")
        ),
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "stay_id 302 has outtime" in err and "out of order" in err


def test_empty_cohort(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "hosp" / "prescriptions.csv.gz", lambda f: f.with_columns(pl.lit("Heparin").alias("drug"))
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "cohort is empty" in err


def test_existing_output_is_kept(case_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(case_dir, out)
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_parquet_and_csv_inputs_give_the_same_replay(good_case, tmp_path):
    frames = {}
    for suffix in ("csv", "parquet"):
        folder = tmp_path / suffix
        for path in good_case.rglob("*.csv.gz"):
            target = folder / path.parent.name / path.name.replace(".csv.gz", f".{suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            frame = pl.read_csv(path, try_parse_dates=True)
            frame.write_parquet(target) if suffix == "parquet" else frame.write_csv(target)
        assert main(folder, tmp_path / f"out_{suffix}") == 0
        frames[suffix] = pl.read_parquet(tmp_path / f"out_{suffix}" / "replay.parquet")
    assert frames["csv"].equals(frames["parquet"])


def test_missing_columns_the_fixes_of_issue_12_need(case_dir, tmp_path, capsys):
    """labevents without storetime (when a result became known) or specimen_id (blood gas type) is refused,
    not read as if results were known at draw time."""
    rewrite_csv(case_dir / "hosp" / "labevents.csv.gz", lambda f: f.drop("storetime", "specimen_id"))
    err = run_bad(case_dir, tmp_path, capsys)
    assert "labevents.csv.gz" in err and "missing column(s) ['specimen_id', 'storetime']" in err


def test_missing_diagnoses_table(case_dir, tmp_path, capsys):
    (case_dir / "hosp" / "diagnoses_icd.csv.gz").unlink()
    err = run_bad(case_dir, tmp_path, capsys)
    assert "table 'diagnoses_icd' not found" in err


def test_bad_storetime(case_dir, tmp_path, capsys):
    rewrite_csv(
        case_dir / "hosp" / "labevents.csv.gz",
        lambda f: f.with_columns(pl.lit("yesterday").alias("storetime")),
    )
    err = run_bad(case_dir, tmp_path, capsys)
    assert "labevents.csv.gz" in err and "'storetime'" in err and "yesterday" in err
