"""The synthetic MIMIC-shaped generator: deterministic by seed, and its output passes the same pipeline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cleansepsis.mimic.pipeline import MimicArgs, run
from cleansepsis.mimic.synth import COLUMNS, SynthArgs, generate
from cleansepsis.replay import load_replay


def demo_dir() -> Path:
    env = os.environ.get("CLEANSEPSIS_MIMIC_DEMO")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "mimic-iv-demo-2.2"
    if not (path / "icu" / "icustays.csv.gz").exists():
        pytest.skip(f"MIMIC-IV demo not found at {path}; set CLEANSEPSIS_MIMIC_DEMO to its folder")
    return path


@pytest.fixture(scope="module")
def synth_tables(tmp_path_factory) -> dict[str, pl.DataFrame]:
    """120 stays at 2% of the filler volume, every table read as text-inferred CSV (as from PhysioNet)."""
    out = tmp_path_factory.mktemp("synth") / "s"
    generate(SynthArgs(out=out, stays=120, seed=7, chart_scale=0.02, quiet=True))
    return {key: _read(out / f"{key}.csv.gz") for key in COLUMNS}


def _read(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema_length=None, schema_overrides={"icd_code": pl.String})


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


def test_tables_have_the_demo_columns_and_types(synth_tables):
    """Same tables, same column names in the same order, and the same types polars infers from the CSV text
    (for every column that has values in both) as the MIMIC-IV demo 2.2."""
    demo = demo_dir()
    for key, frame in synth_tables.items():
        # the first 100,000 rows settle every type (chartevents has 668,862; the rest fewer)
        real = pl.read_csv(
            demo / f"{key}.csv.gz",
            n_rows=100_000,
            infer_schema_length=None,
            schema_overrides={"icd_code": pl.String},
        )
        assert frame.columns == real.columns, key
        for name in real.columns:
            if (
                real.get_column(name).null_count() < real.height
                and frame.get_column(name).null_count() < frame.height
            ):
                assert frame.schema[name] == real.schema[name], f"{key}.{name}"


def test_cohort_logic_has_real_data_difficulties(synth_tables):
    t = synth_tables
    stays = t["icu/icustays"]
    # patients with several ICU stays, in the same and in later admissions; stays longer than a 72 h window
    per_subject = stays.group_by("subject_id").agg(pl.len(), pl.col("hadm_id").n_unique().alias("hadms"))
    assert per_subject.filter(pl.col("len") > 1).height >= 5
    assert per_subject.filter(pl.col("hadms") > 1).height >= 3
    assert (stays.get_column("los") > 3).sum() >= 10
    assert t["hosp/admissions"].height > stays.get_column("hadm_id").n_unique()  # admissions without ICU
    # several antibiotics and cultures per infected stay; date-only cultures at 00:00; eye/skin routes
    rx = t["hosp/prescriptions"].filter(pl.col("drug_type") == "MAIN")
    abx = rx.filter(pl.col("drug").str.contains("(?i)vancomycin|cefepime|meropenem|piperacillin|ceftriaxone"))
    assert abx.group_by("hadm_id").len().get_column("len").median() >= 2
    assert {"OU", "TP", "OS", "OD"} & set(rx.get_column("route").unique().to_list())
    assert (t["hosp/prescriptions"].get_column("drug_type") == "BASE").sum() > 0
    micro = t["hosp/microbiologyevents"]
    assert (
        micro.group_by("subject_id")
        .agg(pl.col("micro_specimen_id").n_unique())
        .get_column("micro_specimen_id")
        .max()
        >= 3
    )
    date_only = micro.filter(pl.col("charttime").is_null())
    assert date_only.height > 0 and date_only.get_column("chartdate").str.ends_with("00:00:00").all()
    # arterial and cuff pressure at the same timestamp with different values; missing GCS components
    chart = t["icu/chartevents"]
    maps = chart.filter(pl.col("itemid").is_in([220052, 220181])).pivot(
        on="itemid", index=["stay_id", "charttime"], values="valuenum", aggregate_function="first"
    )
    both = maps.drop_nulls()
    assert both.height > 50 and (both.get_column("220052") != both.get_column("220181")).mean() > 0.5
    gcs = (
        chart.filter(pl.col("itemid").is_in([220739, 223900, 223901])).group_by("stay_id", "charttime").len()
    )
    assert (gcs.get_column("len") < 3).sum() > 0
    assert chart.filter((pl.col("itemid") == 223900) & (pl.col("value") == "No Response-ETT")).height > 0
    # ventilator settings, oxygen device and flow; FiO2 missing where only a cannula is charted
    items = set(chart.get_column("itemid").unique().to_list())
    assert {223849, 220339, 224684, 226732, 223834, 223835} <= items
    # labs: storetime after charttime, arterial and venous gases on shared specimen ids, other visits' labs
    labs = t["hosp/labevents"].with_columns(pl.col("charttime", "storetime").str.to_datetime())
    lag = (labs.get_column("storetime") - labs.get_column("charttime")).dt.total_minutes()
    assert (lag >= 0).all() and (lag > 0).mean() > 0.95
    kinds = labs.filter(pl.col("itemid") == 52033).select("specimen_id", "value")
    assert {"ART.", "VEN."} <= set(kinds.get_column("value").to_list())
    po2 = labs.filter(pl.col("itemid") == 50821).join(kinds, on="specimen_id", how="left")
    assert po2.get_column("value_right").null_count() == 0
    assert po2.filter(pl.col("value_right") == "VEN.").get_column("valuenum").median() < 60
    assert labs.get_column("hadm_id").null_count() > 0
    other = labs.join(
        stays.select("subject_id", pl.col("hadm_id").alias("stay_hadm"), "intime"), on="subject_id"
    )
    other = other.filter(
        (pl.col("hadm_id").is_null() | (pl.col("hadm_id") != pl.col("stay_hadm")))
        & (pl.col("charttime") < pl.col("intime").str.to_datetime())
        & (pl.col("charttime") > pl.col("intime").str.to_datetime() - pl.duration(hours=48))
    )
    assert (
        other.get_column("subject_id").n_unique() >= 3
    )  # labs of another visit in the 48 h before an ICU stay
    # fluids the pipeline must convert: sodium bicarbonate in mEq, mannitol in grams; vasopressors
    inputs = t["icu/inputevents"]
    units = set(inputs.select(pl.concat_str("itemid", "amountuom", separator=" ")).to_series().to_list())
    assert {"220995 mEq", "227531 grams", "221906 mg", "222315 units"} <= units
    assert inputs.group_by("linkorderid").len().get_column("len").max() > 1  # infusions split at rate changes
    # comorbidities in ICD-9 and ICD-10
    assert set(t["hosp/diagnoses_icd"].get_column("icd_version").unique().to_list()) == {9, 10}
