"""`data_prep.py vancomycin`: IV vancomycin courses from MIMIC-IV as a continuous-dose replay, on small synthetic
tables (cleansepsis/mimic/vancomycin_synth.py) and on the open demo when it is there."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import data_prep
from cleansepsis import vancomycin as sim
from cleansepsis.mimic import vancomycin as vm
from cleansepsis.mimic.vancomycin_synth import VancomycinSynthArgs, generate, make_tables
from cleansepsis.replay import load_replay

sys.path.insert(0, str(Path(__file__).parent))
from test_mimic_demo import demo_dir  # the demo location and its skip rule, shared

STEP_H = 12


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vanco") / "mimic"
    assert data_prep.main(["vancomycin-synth", "--stays", "40", "--seed", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture
def case_dir(synth_dir, tmp_path) -> Path:
    copy = tmp_path / "mimic"
    shutil.copytree(synth_dir, copy)
    return copy


def main(mimic_dir: Path, out: Path, *extra: str) -> int:
    return data_prep.main(["vancomycin", "--mimic-dir", str(mimic_dir), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def synth_out(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vanco_out") / "replay"
    assert main(synth_dir, out) == 0
    return out


def rewrite_csv(path: Path, edit) -> None:
    frame = pl.read_csv(path, infer_schema=False)
    with gzip.open(path, "wb") as handle:
        handle.write(edit(frame).write_csv().encode())


def run_bad(folder: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    code = main(folder, out)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The replay


def test_replay_is_continuous_mg_with_the_simulators_observation(synth_out):
    replay = load_replay(synth_out / "replay.parquet")
    meta = replay.meta
    assert meta["action_space"] == {
        "kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0, "high": 3000.0,
    }  # fmt: skip
    assert meta["n_actions"] == 0 and meta["action_encoding"] == "continuous"
    assert meta["source"] == "mimic-iv" and meta["env_id"] is None
    assert meta["feature_names"] == [name for name, _ in sim.OBS_FEATURES]
    assert meta["feature_units"] == [unit for _, unit in sim.OBS_FEATURES]
    assert replay.is_continuous and replay.action_space["unit"] == "mg"
    frame = pl.read_parquet(synth_out / "replay.parquet")
    assert frame.schema["action"] == pl.Float32
    action = frame.get_column("action").to_numpy()
    assert action.min() >= 0 and action.max() <= 3000
    unclipped = frame.get_column("dose_mg_unclipped").to_numpy()
    assert (unclipped > 3000).any(), "the synthetic q8h courses put more than 3 g in some 12 h windows"
    np.testing.assert_array_equal(action, np.minimum(unclipped, 3000).astype(np.float32))
    assert meta["actions_clipped"] == int((unclipped > 3000).sum())
    # the first step of every episode gives a dose (the grid starts at the first dose), and nothing is known
    # of the course before it
    first = frame.filter(pl.col("t") == 0)
    assert (first.get_column("action") > 0).all()
    obs0 = np.stack(first.get_column("obs").to_numpy())
    names = meta["feature_names"]
    for name in ("hours_since_start", "doses_given", "last_dose", "hours_since_last_dose", "total_dose"):
        assert (obs0[:, names.index(name)] == 0).all(), name


def test_observation_counts_doses_and_levels_as_the_simulator_does(synth_out):
    frame = pl.read_parquet(synth_out / "replay.parquet").sort("episode_id", "t")
    names = [name for name, _ in sim.OBS_FEATURES]
    obs = np.stack(frame.get_column("obs").to_numpy())
    col = {name: obs[:, i] for i, name in enumerate(names)}
    t = frame.get_column("t").to_numpy()
    np.testing.assert_allclose(col["hours_since_start"], STEP_H * t)
    # doses_given / total_dose at step t+1 = at step t + what step t gave (unclipped), within an episode
    same = frame.get_column("episode_id").to_numpy()[1:] == frame.get_column("episode_id").to_numpy()[:-1]
    doses = frame.get_column("doses_in_step").to_numpy()
    given = frame.get_column("dose_mg_unclipped").to_numpy()
    np.testing.assert_allclose(col["doses_given"][1:][same], (col["doses_given"][:-1] + doses[:-1])[same])
    np.testing.assert_allclose(
        col["total_dose"][1:][same], (col["total_dose"][:-1] + given[:-1])[same], rtol=1e-6
    )
    no_level = col["hours_since_last_level"] == sim.NO_LEVEL_HOURS
    assert (col["last_level"][no_level] == 0).all() and (~no_level).any() and no_level.any()
    crcl = np.asarray(sim.cockcroft_gault(col["age"], col["weight"], col["female"], col["creatinine"]))
    np.testing.assert_allclose(col["crcl_cockcroft_gault"], crcl, rtol=1e-6)
    # dialysis, once seen, stays on for the stay; some synthetic patients are on it
    assert (col["dialysis"][1:][same] >= col["dialysis"][:-1][same]).all() and col["dialysis"].any()


def test_steps_go_on_without_a_dose_for_at_most_a_day_after_the_last(synth_out):
    frame = pl.read_parquet(synth_out / "replay.parquet")
    per_episode = frame.group_by("episode_id").agg(
        pl.col("t").max().alias("last_t"),
        pl.col("t").filter(pl.col("doses_in_step") > 0).max().alias("last_dose_t"),
    )
    trailing = (per_episode.get_column("last_t") - per_episode.get_column("last_dose_t")).to_numpy()
    assert trailing.min() >= 0 and trailing.max() <= 24 // STEP_H and (trailing > 0).any()


def test_splits_are_by_patient_and_every_episode_ends_once(synth_out):
    cohort = pl.read_parquet(synth_out / "cohort.parquet")
    assert cohort.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert cohort.get_column("subject_id").n_unique() < cohort.height  # patients with two stays exist
    frame = pl.read_parquet(synth_out / "replay.parquet")
    ends = frame.group_by("episode_id").agg((pl.col("terminated") | pl.col("truncated")).sum().alias("n"))
    assert (ends.get_column("n") == 1).all()
    truncated = frame.filter(pl.col("truncated")).get_column("episode_id")
    on_course = cohort.filter(pl.col("end_reason") == "left_icu_on_course").get_column("stay_id")
    assert sorted(truncated.to_list()) == sorted(on_course.to_list())


def test_same_inputs_give_the_same_bytes(synth_dir, tmp_path):
    """Twice into one folder (the second with --overwrite) and once elsewhere: the same files, byte for byte."""

    def digests(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    out = tmp_path / "replay"
    assert main(synth_dir, out) == 0
    first = digests(out)
    assert main(synth_dir, out, "--overwrite") == 0
    assert main(synth_dir, tmp_path / "elsewhere") == 0
    assert first == digests(out) == digests(tmp_path / "elsewhere")
    assert set(first) == {"replay.parquet", "cohort.parquet", "report.json"}


def test_synthetic_tables_are_deterministic_and_checked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(VancomycinSynthArgs(out=a, stays=5, seed=3))
    generate(VancomycinSynthArgs(out=b, stays=5, seed=3))
    files = sorted(p.relative_to(a) for p in a.rglob("*.csv.gz"))
    assert len(files) == len(vm.SCHEMAS)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert not make_tables(5, seed=3)["hosp/labevents"].equals(make_tables(5, seed=4)["hosp/labevents"])
    with pytest.raises(ValueError, match="--stays 0"):
        make_tables(0)


def test_report_counts_the_cohort(synth_out):
    report = json.loads((synth_out / "report.json").read_text())
    counts = report["cohort_counts"]
    assert counts["icu_stays"] == 40
    assert counts["with_iv_vancomycin"] == counts["with_mg_doses"] == report["episodes"] == 40
    assert 0 < counts["with_level_during_episode"] < 40  # some synthetic stays have no level
    assert set(report["dose_sources"]) <= {"inputevents", "emar", "prescription", "carried"}
    assert report["dose_sources"]["emar"] > 0 and report["dose_sources"]["prescription"] > 0


# ---------------------------------------------------------------------------------------------------------
# No look-ahead


def test_results_after_a_decision_do_not_change_its_state(case_dir, tmp_path):
    """Change every level and creatinine stored after a cut-off and every dose given after it: the states of
    decisions at or before the cut-off stay the same, later ones change."""
    base_out, changed_out = tmp_path / "base", tmp_path / "changed"
    assert main(case_dir, base_out) == 0
    cohort = pl.read_parquet(base_out / "cohort.parquet").sort("stay_id")
    stay = cohort.filter(pl.col("n_steps") >= 6).row(0, named=True)
    cutoff = stay["first_dose_time"] + timedelta(hours=2 * STEP_H)  # exactly w_2
    stamp = cutoff.strftime("%Y-%m-%d %H:%M:%S")
    # doses: only records beyond the matching reach (eMAR 1 h, prescription slack 2 h) of a dose before w_2
    late = (cutoff + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S")
    labs = case_dir / "hosp" / "labevents.csv.gz"
    later = (pl.col("hadm_id") == str(stay["hadm_id"])) & (pl.col("storetime") >= stamp)
    rewrite_csv(
        labs,
        lambda f: f.with_columns(pl.when(later).then(pl.lit("9.9")).otherwise("valuenum").alias("valuenum")),
    )
    emar_rows = pl.read_csv(case_dir / "hosp" / "emar.csv.gz", infer_schema=False)
    late_ids = emar_rows.filter((pl.col("hadm_id") == str(stay["hadm_id"])) & (pl.col("charttime") >= late))
    rewrite_csv(
        case_dir / "hosp" / "emar_detail.csv.gz",
        lambda f: f.with_columns(
            pl.when(pl.col("emar_id").is_in(late_ids.get_column("emar_id").implode()) & pl.col("dose_given").is_not_null())
            .then(pl.lit("250"))
            .otherwise("dose_given")
            .alias("dose_given")
        ),
    )  # fmt: skip
    rewrite_csv(
        case_dir / "hosp" / "prescriptions.csv.gz",
        lambda f: f.with_columns(
            pl.when((pl.col("hadm_id") == str(stay["hadm_id"])) & (pl.col("starttime") > late))
            .then(pl.lit("250"))
            .otherwise("dose_val_rx")
            .alias("dose_val_rx")
        ),
    )
    assert main(case_dir, changed_out) == 0

    def states(out):
        frame = (
            pl.read_parquet(out / "replay.parquet").filter(pl.col("episode_id") == stay["stay_id"]).sort("t")
        )
        return np.stack(frame.get_column("obs").to_numpy())

    before, after = states(base_out), states(changed_out)
    np.testing.assert_array_equal(before[:3], after[:3])  # w_0, w_1, w_2: known strictly before w_2
    assert not np.array_equal(before[3:], after[3:]), "later states must see the changed results"


def test_a_lab_enters_the_state_when_its_result_is_stored(case_dir, tmp_path):
    """A level drawn before w_1 but stored after it is seen at w_2, not w_1; one stored at exactly w_1 is not
    seen at w_1 (strictly before)."""
    out = tmp_path / "base"
    assert main(case_dir, out) == 0
    labs = case_dir / "hosp" / "labevents.csv.gz"
    fmt = "%Y-%m-%d %H:%M:%S"
    stored = pl.read_csv(labs, infer_schema=False).filter(pl.col("itemid") == "51009")
    cohort = pl.read_parquet(out / "cohort.parquet").sort("stay_id").filter(pl.col("n_steps") >= 3)
    for stay in cohort.iter_rows(named=True):  # a stay with no level of its own stored before w_2
        w1 = stay["first_dose_time"] + timedelta(hours=STEP_H)
        own = stored.filter(pl.col("hadm_id") == str(stay["hadm_id"]))
        if (own.get_column("storetime") > (w1 + timedelta(hours=STEP_H)).strftime(fmt)).all():
            break
    else:
        pytest.fail("no synthetic stay without early levels")
    extra = pl.DataFrame(
        {
            "subject_id": [str(stay["subject_id"])] * 2,
            "hadm_id": [str(stay["hadm_id"])] * 2,
            "itemid": ["51009"] * 2,
            "charttime": [(w1 - timedelta(hours=3)).strftime(fmt), (w1 - timedelta(hours=2)).strftime(fmt)],
            "storetime": [(w1 + timedelta(hours=1)).strftime(fmt), w1.strftime(fmt)],
            "valuenum": ["77.7", "66.6"],
            "valueuom": ["ug/mL", "ug/mL"],
        }
    )
    rewrite_csv(labs, lambda f: pl.concat([f.select(extra.columns), extra]))
    changed = tmp_path / "changed"
    assert main(case_dir, changed) == 0
    frame = (
        pl.read_parquet(changed / "replay.parquet").filter(pl.col("episode_id") == stay["stay_id"]).sort("t")
    )
    names = [name for name, _ in sim.OBS_FEATURES]
    obs = np.stack(frame.get_column("obs").to_numpy())
    level = obs[:, names.index("last_level")]
    assert level[1] not in (np.float32(77.7), np.float32(66.6))
    assert level[2] == np.float32(77.7)  # stored last (w_1 + 1 h), drawn first: the latest result known
    np.testing.assert_allclose(obs[2, names.index("hours_since_last_level")], STEP_H + 3, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Rules


def test_level_score_mirrors_the_simulators_target_reward():
    levels = np.array([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0])
    np.testing.assert_allclose(vm.level_score(levels), [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, -1.0, -2.0])
    # the same shape as the AUC reward at 20 mg*h/L per mg/L
    auc = np.asarray(sim.target_reward(np.asarray(levels * 20 + 200, np.float32)))
    np.testing.assert_allclose(vm.level_score(levels), auc, atol=1e-6)


def test_kdigo_aki_events_are_new_rises_only():
    t0 = datetime(2150, 1, 1)
    creatinine = pl.DataFrame(
        {
            "stay_id": [1] * 6 + [2] * 2,
            "t": [t0 + timedelta(hours=h) for h in (0, 24, 40, 60, 200, 300)]
            + [t0, t0 + timedelta(hours=100)],
            "value": [1.0, 1.1, 1.35, 1.5, 1.0, 1.6, 1.0, 1.29],
        }
    )
    events = vm.aki_events(creatinine)
    # stay 1: 1.35 at 40 h is 0.35 above the 48 h minimum (new); 1.5 at 60 h is still AKI (not new); 1.0 at
    # 200 h recovers; 1.6 at 300 h is 1.6x the 7-day minimum (1.0 at 200 h): new. Stay 2: 1.29 after 100 h is
    # neither 0.3 above a 48 h minimum (none) nor 1.5x the 7-day one.
    assert events.sort("stay_id", "t").rows() == [
        (1, t0 + timedelta(hours=40)),
        (1, t0 + timedelta(hours=300)),
    ]


def test_dose_sources_in_order_of_precedence():
    t0 = datetime(2150, 1, 1, 8)
    at = [t0 + timedelta(hours=12 * i) for i in range(5)]
    doses = pl.DataFrame(
        {"stay_id": [1] * 5, "t": at, "dose_mg": [750.0, None, None, None, None], "patientweight": [80.0] * 5}
    )
    stays = pl.DataFrame({"stay_id": [1], "hadm_id": [9]})
    emar = pl.DataFrame(
        {
            "hadm_id": [9, 9, 9],
            "emar_id": ["a", "b", "c"],
            # a: 10 min from dose 1, b: 50 min from dose 1 (loses to a; out of reach of dose 2), c: 2 h from dose 3
            "emar_time": [
                at[1] + timedelta(minutes=10),
                at[1] - timedelta(minutes=50),
                at[3] + timedelta(hours=2),
            ],
            "emar_mg": [1250.0, 500.0, 999.0],
        }
    )
    rx = pl.DataFrame(
        {
            "hadm_id": [9, 9],
            "pharmacy_id": [1, 2],
            "rx_start": [t0, at[2] - timedelta(hours=1)],  # the newer order holds doses 2 and 3
            "rx_stop": [at[4] + timedelta(hours=1), at[3] + timedelta(hours=1)],
            "rx_mg": [1000.0, 1500.0],
        }
    )
    args = vm.VancomycinArgs(mimic_dir=Path("."), out=Path("."))
    got = vm.assign_doses(doses, stays, emar, rx, args).sort("t")
    assert got.get_column("dose_mg").to_list() == [750.0, 1250.0, 1500.0, 1500.0, 1000.0]
    assert got.get_column("dose_source").to_list() == ["inputevents", "emar", "prescription", "prescription",
                                                      "prescription"]  # fmt: skip
    # nothing matches: the stay's previous dose is carried
    no_rx = rx.with_columns(pl.lit(None, pl.Float64).alias("rx_mg"))
    carried = vm.assign_doses(doses, stays, emar, no_rx, args).sort("t")
    assert carried.get_column("dose_mg").to_list() == [750.0, 1250.0, 1250.0, 1250.0, 1250.0]
    assert carried.get_column("dose_source").to_list()[2:] == ["carried"] * 3


def test_oral_and_rewritten_rows_are_not_iv_doses(case_dir, tmp_path):
    frame = pl.read_csv(case_dir / "icu" / "inputevents.csv.gz", infer_schema=False)
    ignored = frame.filter(
        pl.col("ordercategoryname").str.contains("Non IV") | (pl.col("statusdescription") == "Rewritten")
    )
    assert ignored.height > 0
    out = tmp_path / "out"
    assert main(case_dir, out) == 0
    counts = json.loads((out / "report.json").read_text())["cohort_counts"]
    assert counts["dose_inputevents_vancomycin_rows"] - counts["dose_iv_rows"] == ignored.height


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one clear error each


def test_a_level_with_an_unknown_unit(case_dir, tmp_path, capsys):
    path = case_dir / "hosp" / "labevents.csv.gz"
    rewrite_csv(
        path,
        lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == f["itemid"].eq("51009").arg_true()[0])
            .then(pl.lit("mmol/L"))
            .otherwise("valueuom")
            .alias("valueuom")
        ),
    )  # fmt: skip
    line = run_bad(case_dir, tmp_path, capsys)
    assert str(path) in line and "'valueuom'" in line and "'mmol/L'" in line and "51009" in line


def test_a_cohort_with_no_levels(case_dir, tmp_path, capsys):
    path = case_dir / "hosp" / "labevents.csv.gz"
    rewrite_csv(path, lambda f: f.filter(pl.col("itemid") != "51009"))
    line = run_bad(case_dir, tmp_path, capsys)
    assert str(path) in line and "51009" in line and "level" in line


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("hosp/emar_detail", "dose_given", "-1000"),
        ("hosp/emar_detail", "dose_given", "NaN"),
        ("hosp/prescriptions", "dose_val_rx", "-750"),
        ("hosp/prescriptions", "dose_val_rx", "inf"),
        ("icu/inputevents", "amount", "-1"),
        ("icu/inputevents", "amount", "inf"),
    ],
)
def test_a_negative_or_non_finite_dose_row(case_dir, tmp_path, capsys, table, column, value):
    path = case_dir / f"{table}.csv.gz"
    rewrite_csv(
        path,
        lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == f[column].is_not_null().arg_true()[0])
            .then(pl.lit(value))
            .otherwise(column)
            .alias(column)
        ),
    )
    line = run_bad(case_dir, tmp_path, capsys)
    assert str(path) in line and f"'{column}'" in line and value in line


# ---------------------------------------------------------------------------------------------------------
# The open demo


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("vanco_demo") / "replay"
    summary = vm.run(vm.VancomycinArgs(mimic_dir=demo_dir(), out=out, quiet=True))
    return out, summary


def test_demo_cohort(demo_out):
    out, summary = demo_out
    counts = summary["cohort_counts"]
    # docs/vancomycin_mimic.md explains each figure against the "about 58 stays, 24 with levels"
    assert counts["icu_stays"] == 140
    assert counts["with_iv_vancomycin"] == 58
    assert counts["with_mg_doses"] == 56 == summary["episodes"]
    assert counts["with_level_during_icu_stay"] == 23
    assert counts["with_level_during_episode"] == 24  # 18 without the dose-free steps after the last dose
    assert summary["transitions"] == 359
    replay = load_replay(out / "replay.parquet")
    assert replay.meta["n_episodes"] == 56
    frame = pl.read_parquet(out / "replay.parquet")
    assert frame.get_column("level_in_step").is_not_nan().sum() > 0
    assert frame.get_column("weight_known").all()
