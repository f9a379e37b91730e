"""The MIMIC-IV pipeline end to end on the real open demo (100 patients, 140 ICU stays)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cleansepsis.mimic import features as feat
from cleansepsis.mimic.pipeline import MimicArgs, run
from cleansepsis.replay import load_replay


def demo_dir() -> Path:
    env = os.environ.get("CLEANSEPSIS_MIMIC_DEMO")
    path = (
        Path(env)
        if env
        else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimic-iv-demo-2.2"
    )
    if not (path / "icu" / "icustays.csv.gz").exists():
        pytest.skip(f"MIMIC-IV demo not found at {path}; set CLEANSEPSIS_MIMIC_DEMO to its folder")
    return path


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "replay"
    summary = run(MimicArgs(mimic_dir=demo_dir(), out=out, quiet=True))
    return out, summary


def test_cohort_counts_shrink_step_by_step(demo_out):
    out, summary = demo_out
    counts = summary["cohort_counts"]
    assert counts["icu_stays"] == 140  # the demo's icustays table
    assert counts["first_icu_stay"] == 100  # one first stay per patient
    values = list(counts.values())
    assert values == sorted(values, reverse=True), counts
    assert load_replay(out / "replay.parquet").meta["cohort_steps"] == list(counts)
    assert 10 <= counts["sepsis3"] < counts["suspected_infection"] < counts["first_icu_stay"]


def test_replay_loads_and_is_consistent(demo_out):
    out, summary = demo_out
    replay = load_replay(out / "replay.parquet")
    meta = replay.meta
    assert meta["n_episodes"] == summary["cohort_counts"]["with_a_step_in_icu"]
    assert meta["obs_dim"] == len(meta["feature_names"]) == replay.data.obs.shape[1]
    for key in ("step_hours", "window_hours", "action_bins", "cohort_counts", "alignment", "feature_units"):
        assert key in meta
    assert set(meta["normalisation"]) == set(meta["feature_names"])
    # every episode ends in exactly one terminated step, and its steps are 0..n-1
    frame = pl.read_parquet(out / "replay.parquet")
    per_episode = frame.group_by("episode_id").agg(
        pl.col("terminated").sum().alias("ends"), pl.col("t").max().alias("last"), pl.len().alias("n")
    )
    assert (per_episode["ends"] == 1).all()
    assert (per_episode["last"] + 1 == per_episode["n"]).all()
    # next_obs of step t is obs of step t+1
    ordered = frame.sort("episode_id", "t")
    same_episode = ordered["episode_id"][1:].to_numpy() == ordered["episode_id"][:-1].to_numpy()
    obs, next_obs = np.stack(ordered["obs"].to_numpy()), np.stack(ordered["next_obs"].to_numpy())
    np.testing.assert_array_equal(next_obs[:-1][same_episode], obs[1:][same_episode])
    # mortality reward: +-1 at the end only
    rewards = frame["reward"].to_numpy()
    assert set(np.unique(rewards[frame["terminated"].to_numpy()])) <= {-1.0, 1.0}
    assert (rewards[~frame["terminated"].to_numpy()] == 0).all()


def test_splits_are_by_patient(demo_out):
    out, _ = demo_out
    cohort = pl.read_parquet(out / "cohort.parquet")
    assert cohort.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(cohort["split"]) == {"train", "val", "test"}


def test_feature_ranges_and_missingness_are_sane(demo_out):
    out, _ = demo_out
    report = json.loads((out / "report.json").read_text())
    variables = report["variables"]
    for m in feat.MEASURED:
        if m.name.startswith("gcs_"):
            continue
        v = variables[m.name]
        if v["min"] is not None:
            assert m.low <= v["min"] <= v["max"] <= m.high, (m.name, v)
    # vitals are charted at least hourly in the ICU: few states lack them
    for name in ("hr", "map", "sbp", "rr", "spo2"):
        assert variables[name]["missing_share"] < 0.25, (name, variables[name])
    assert 3 <= variables["gcs"]["min"] and variables["gcs"]["max"] <= 15
    assert 0 <= variables["sofa"]["min"] and variables["sofa"]["max"] <= 24
    assert 18 <= variables["age"]["min"] and variables["age"]["max"] <= 100
    assert (out / "action_heatmap.png").stat().st_size > 1000
    hist = np.array(report["action_histogram_fluid_by_vaso"])
    assert hist.sum() == report["n_transitions"]


def test_extras_are_raw_units(demo_out):
    out, _ = demo_out
    replay = load_replay(out / "replay.parquet")
    extras = replay.extras
    for name in ("vaso_ne_eq", "fluid_ml", "map_mmhg", "cvp_mmhg", "cum_balance_ml", "sofa"):
        assert extras[name].dtype == np.float32, name
    assert np.nanmax(extras["map_mmhg"]) > 60  # mmHg, not z-scores
    assert (extras["vaso_ne_eq"] >= 0).all() and (extras["fluid_ml"] >= 0).all()
    # the action's vasopressor level is 0 exactly when no vasopressor was given in the window
    vaso_level = np.asarray(replay.data.action) % 5
    np.testing.assert_array_equal(vaso_level == 0, extras["vaso_ne_eq"] == 0)


def test_sepsis3_onset_of_hand_worked_stays(demo_out):
    """Worked by hand from the demo's raw rows (t0 = ICU admission truncated to the hour).

    Stay 31494479 (admitted 2141-12-17 10:24): cefazolin IV at 15:00; the MRSA screen at 14:27 lies in
    (abx - 72 h, abx], so SI = 14:27. Hour 13:00-14:00 has platelets 101 (coagulation 1) only: SOFA 1. Hour
    14:00-15:00 adds MAP 51 at 14:27 (cardiovascular 1; phenylephrine is not in SOFA): SOFA 2, so onset =
    15:00. The window clips to the admission hour and ends at discharge (14:16 next day, 28.3 h): 8 steps.

    Stay 30057454 (admitted 2171-11-14 10:06): cefazolin IV at 12:00; the MRSA screen at 10:44 gives SI =
    10:44. Creatinine 1.7 (the day before, within 24 h of the grid) gives renal 1 and MAP 68 at 10:59
    cardiovascular 1: SOFA 2 in the first hour, onset 11:00.
    """
    out, _ = demo_out
    cohort = pl.read_parquet(out / "cohort.parquet")
    first = cohort.filter(pl.col("stay_id") == 31494479).row(0, named=True)
    assert str(first["abx_time"]) == "2141-12-17 15:00:00"
    assert str(first["si_time"]) == "2141-12-17 14:27:00"
    assert str(first["onset_time"]) == "2141-12-17 15:00:00"
    assert first["sofa_at_onset"] == 2 and first["n_steps"] == 8
    second = cohort.filter(pl.col("stay_id") == 30057454).row(0, named=True)
    assert str(second["si_time"]) == "2171-11-14 10:44:00"
    assert str(second["onset_time"]) == "2171-11-14 11:00:00"
    assert second["sofa_at_onset"] == 2


def test_bin_edges_come_from_the_train_split_only(demo_out):
    out, _ = demo_out
    replay = load_replay(out / "replay.parquet")
    bins = replay.meta["action_bins"]
    train = np.asarray(replay.data.split) == 0
    for name, key in (("vaso_ne_eq", "vaso_edges"), ("fluid_ml", "fluid_edges")):
        doses = replay.extras[name]
        train_doses = doses[train & (doses > 0)]
        np.testing.assert_allclose(bins[key], np.quantile(train_doses, [0.25, 0.5, 0.75]), rtol=1e-6)
        all_doses = doses[doses > 0]
        assert not np.allclose(bins[key], np.quantile(all_doses, [0.25, 0.5, 0.75]))


def test_demo_replay_is_the_same_every_run(demo_out, tmp_path):
    """Issue #12: four runs on the demo gave three replays (ties at one timestamp were broken arbitrarily)."""
    out, _ = demo_out
    again = tmp_path / "again"
    run(MimicArgs(mimic_dir=demo_dir(), out=again, quiet=True))
    assert (
        load_replay(again / "replay.parquet").content_hash == load_replay(out / "replay.parquet").content_hash
    )
    assert (again / "cohort.parquet").read_bytes() == (out / "cohort.parquet").read_bytes()


def test_demo_shaped_reward_at_four_hour_steps(tmp_path):
    """Issue #12: `--reward raghu` (and sofa) stopped with NaN rewards at the default 4 h step."""
    run(MimicArgs(mimic_dir=demo_dir(), out=tmp_path / "raghu", quiet=True, reward="raghu"))
    rewards = np.asarray(load_replay(tmp_path / "raghu" / "replay.parquet").data.reward)
    assert np.isfinite(rewards).all() and (np.abs(rewards) > 0).mean() > 0.1


def test_demo_states_have_the_listed_features(demo_out):
    out, _ = demo_out
    meta = load_replay(out / "replay.parquet").meta
    for name in ("sirs", "charlson", "readmission", "pt", "inr", "input_total", "output_total", "mech_vent",
                 "fio2_imputed", "hours_since_icu_admission"):  # fmt: skip
        assert name in meta["feature_names"] and meta["feature_units"][name], name
    assert "hours_from_onset" not in meta["feature_names"]
    report = json.loads((out / "report.json").read_text())["variables"]
    assert report["sirs"]["max"] <= 4 and report["charlson"]["min"] >= 0
    # FiO2 imputed from device and flow fills some states without a charted FiO2
    assert report["fio2_imputed"]["missing_share"] < report["fio2"]["missing_share"]
