"""Constructed patients for each rule of the MIMIC-IV pipeline: the no-look-ahead alignment, hold limits,
infection windows, SOFA components, NE-equivalent conversions, tonicity and bin edges."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from mimic_cases import Case, septic_patient

from cleansepsis.mimic import actions as act
from cleansepsis.mimic import cohort, sofa
from cleansepsis.mimic.pipeline import MimicArgs, run
from cleansepsis.replay import load_replay

MAP_ID, NACL, ALBUMIN_25 = 220052, 225158, 220862


def run_case(case: Case, tmp_path: Path, **kwargs) -> tuple[pl.DataFrame, dict]:
    folder = case.write(tmp_path / "mimic")
    out = tmp_path / "out"
    run(MimicArgs(mimic_dir=folder, out=out, quiet=True, train_fraction=0.99, val_fraction=0.0, **kwargs))
    replay = load_replay(out / "replay.parquet")
    frame = pl.read_parquet(out / "replay.parquet").sort("episode_id", "t")
    return frame, replay.meta


def test_no_look_ahead_alignment(tmp_path):
    """Step 4 h; onset at hour 1, so windows are [0,4), [4,8), [8,12), [12,16), [16,20).
    A value charted exactly at a window start belongs to the next state, not this one; a dose started exactly
    at a window start belongs to this window's action. A one-step shift either way breaks the assertions."""
    case = septic_patient(Case(), 1)
    case.chart(1, 3.99, MAP_ID, 61.0).chart(1, 4.0, MAP_ID, 99.0).chart(1, 7.5, MAP_ID, 77.0)
    case.infuse(1, 4.0, 4.0 + 1 / 60, NACL, 500.0)  # a bolus at exactly the start of window 1
    case.infuse(1, 9.0, 9.5, ALBUMIN_25, 100.0)  # 25% albumin: tonicity x5 -> 500 mL equivalent
    case.infuse(1, 12.0, 14.0, act.NOREPINEPHRINE, 1.0, "mg", rate=0.2, rateuom="mcg/kg/min")
    case.urine(1, 2.0, 150.0)
    frame, meta = run_case(case, tmp_path)
    assert frame.height == 5
    map_seen = frame["map_mmhg"].to_list()
    assert np.isnan(map_seen[0])  # nothing charted before hour 0
    assert map_seen[1] == 61.0  # charted at 3.99 h; the 99 at exactly 4.0 h is in the window, not before it
    assert map_seen[2] == 77.0  # charted at 7.5 h, the last before 8 h
    np.testing.assert_allclose(frame["fluid_ml"].to_numpy(), [0, 500, 500, 0, 0], atol=1e-3)
    np.testing.assert_allclose(frame["vaso_ne_eq"].to_numpy(), [0, 0, 0, 0.2, 0], atol=1e-6)
    # balance before each window: raw volumes in (the albumin counts 100 mL) minus urine out
    np.testing.assert_allclose(frame["cum_balance_ml"].to_numpy(), [0, -150, 350, 450, 450], atol=1e-3)
    # SOFA of the 24 h ending at the window start: coag 3 from hour 0, CV 1 from the MAP of 61 in hour 3,
    # CV 4 once norepinephrine > 0.1 runs (hours 12-13)
    np.testing.assert_array_equal(frame["sofa"].to_numpy(), [0, 4, 4, 4, 7])
    actions = frame["action"].to_numpy()
    assert list(actions % 5 == 0) == [True, True, True, False, True]  # vasopressor only in window 3
    assert list(actions // 5 == 0) == [True, False, False, True, True]  # fluid only in windows 1 and 2
    assert meta["alignment"].startswith("step k acts over")


def test_hold_limits(tmp_path):
    """MAP is held 2 h, lactate 8 h: a value older than its hold limit is missing, not carried forward."""
    case = septic_patient(Case(), 1, los_h=12.0)
    case.chart(1, 1.5, MAP_ID, 65.0)  # window 1 starts at 4: 2.5 h old > 2 h hold -> missing
    case.chart(1, 6.5, MAP_ID, 70.0)  # window 2 starts at 8: 1.5 h old -> held
    frame, meta = run_case(case, tmp_path)
    map_seen = frame["map_mmhg"].to_numpy()
    assert np.isnan(map_seen[1]) and map_seen[2] == 70.0
    names = meta["feature_names"]
    missing = np.stack(frame["obs"].to_numpy())[:, names.index("map_missing")]
    np.testing.assert_array_equal(missing, [1.0, 1.0, 0.0])


def test_one_hour_steps_and_outcome(tmp_path):
    case = septic_patient(Case(), 1, los_h=6.0, died_h=5.5)
    frame, meta = run_case(case, tmp_path, step_hours=1, reward="sofa")
    assert meta["step_hours"] == 1
    assert frame.height == 6  # hours 0..5, cut at death (5.5 h)
    assert frame["terminated"].to_list() == [False] * 5 + [True]
    assert frame["reward"][-1] < -14  # -15 terminal for a death within 90 days


def _si(abx_h: float, culture_h: float | None, culture_date: datetime | None = None) -> pl.DataFrame:
    t0 = datetime(2150, 3, 1, 8)
    abx = pl.DataFrame(
        {"stay_id": [1], "subject_id": [7], "abx_time": [t0 + pl.duration(hours=0).to_physical()]}
    )
    abx = (
        pl.DataFrame({"stay_id": [1], "subject_id": [7]})
        .with_columns(pl.lit(t0).cast(pl.Datetime("us")).alias("abx_time"))
        .with_columns(pl.col("abx_time") + pl.duration(minutes=int(abx_h * 60)))
    )
    culture_time = None if culture_h is None else t0
    cultures = pl.DataFrame(
        {"micro_specimen_id": [1], "subject_id": [7]},
    ).with_columns(
        pl.lit(culture_time).cast(pl.Datetime("us")).alias("culture_time"),
        pl.lit(culture_date if culture_date else t0).cast(pl.Date).alias("culture_date"),
    )
    if culture_h is not None:
        cultures = cultures.with_columns(pl.col("culture_time") + pl.duration(minutes=int(culture_h * 60)))
    return cohort.suspected_infection(abx, cultures)


@pytest.mark.parametrize(
    ("abx_h", "culture_h", "si_is"),
    [
        # mimic-code `suspicion_of_infection`: culture in [abx - 72 h, abx) or in (abx, abx + 24 h]
        (71.0, 0.0, "culture"),  # culture 71 h before the antibiotic
        (72.0, 0.0, "culture"),  # exactly 72 h before: still inside
        (73.0, 0.0, None),  # 73 h before: outside
        (0.0, 0.0, None),  # the same minute: neither before nor after (mimic-code's strict inequalities)
        (0.0, 23.0, "abx"),  # culture 23 h after the antibiotic
        (0.0, 24.0, "abx"),  # exactly 24 h after: inside (the old code excluded it)
        (0.0, 25.0, None),  # 25 h after: outside
    ],
)
def test_infection_windows(abx_h, culture_h, si_is):
    si = _si(abx_h, culture_h)
    if si_is is None:
        assert si.height == 0
        return
    assert si.height == 1
    row = si.row(0, named=True)
    assert row["si_time"] == (row["culture_time"] if si_is == "culture" else row["abx_time"])


def test_culture_without_charttime_uses_dates():
    # culture dated 2 days before an antibiotic given at 08:00 on 3 March: within 3 days -> SI = culture date
    si = _si(48.0, None, culture_date=datetime(2150, 3, 1))
    assert si.height == 1
    assert si["si_time"][0] == datetime(2150, 3, 1)


def test_antibiotic_filter():
    frame = pl.DataFrame(
        {
            "drug": ["Vancomycin", "Vancomycin", "Bacitracin Ophth Oint", "Heparin", "Cefepime", "Cefepime"],
            "route": ["IV", "IV", "OU", "IV", "IV", "TP"],
            "drug_type": ["MAIN", "BASE", "MAIN", "MAIN", "MAIN", "MAIN"],
        }
    )
    keep = frame.select(
        cohort.is_antibiotic(pl.col("drug"), pl.col("route"), pl.col("drug_type"))
    ).to_series()
    assert keep.to_list() == [True, False, False, False, True, False]


def _score(expr: pl.Expr, **columns) -> list:
    return pl.DataFrame(columns).select(expr).to_series().to_list()


def test_sofa_components_at_thresholds():
    c = pl.col
    plt = [None, 150, 149, 100, 99, 50, 49, 20, 19]
    assert _score(sofa.coagulation(c("p")), p=plt) == [None, 0, 1, 1, 2, 2, 3, 3, 4]
    bili = [1.1, 1.2, 1.9, 2.0, 5.9, 6.0, 11.9, 12.0]
    assert _score(sofa.liver(c("b")), b=bili) == [0, 1, 1, 2, 2, 3, 3, 4]
    gcs = [15.0, 14.0, 13.0, 12.0, 10.0, 9.0, 6.0, 5.0, 3.0]
    assert _score(sofa.central_nervous(c("g")), g=gcs) == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    # worst ventilated and non-ventilated P/F of the hour (mimic-code): 3 and 4 need ventilation
    pf_vent = [None, None, None, None, 199.0, None, 99.0, 250.0, None]
    pf_novent = [450.0, 399.0, 299.0, 199.0, None, 99.0, None, 90.0, None]
    assert _score(sofa.respiration(c("v"), c("n")), v=pf_vent, n=pf_novent) == [0, 1, 2, 2, 3, 2, 4, 2, None]
    cr = [1.1, 1.2, 2.0, 3.5, 5.0, None, None, None]
    uo = [None, None, None, None, None, 600.0, 499.0, 199.0]
    assert _score(sofa.renal(c("cr"), c("uo")), cr=cr, uo=uo) == [0, 1, 2, 3, 4, 0, 3, 4]
    # a null rate = no infusion of the agent running at the hour's end (mimic-code)
    none = [None] * 7
    cv = sofa.cardiovascular(c("map"), c("dopa"), c("dobu"), c("epi"), c("ne"))
    assert _score(
        cv,
        map=[75.0, 69.0, 80.0, 80.0, 80.0, 80.0, None],
        dopa=[None, None, 3.0, 6.0, 16.0, None, None],
        dobu=none,
        epi=[None, None, None, None, None, None, 0.0],
        ne=[None, None, None, None, None, 0.11, None],
    ) == [0, 1, 2, 3, 4, 4, 3]
    assert _score(cv, map=[None], dopa=[None], dobu=[None], epi=[None], ne=[None]) == [None]


@pytest.mark.parametrize(
    ("itemid", "rate", "unit", "weight", "expected"),
    [
        (act.NOREPINEPHRINE, 0.3, "mcg/kg/min", 70.0, 0.3),
        (act.NOREPINEPHRINE, 8.0, "mcg/min", 80.0, 0.1),  # divided by the patient's weight
        (act.EPINEPHRINE, 0.05, "mcg/kg/min", 70.0, 0.05),
        (act.PHENYLEPHRINE, 2.0, "mcg/kg/min", 70.0, 0.2),  # / 10
        (act.DOPAMINE, 10.0, "mcg/kg/min", 70.0, 0.1),  # / 100
        (act.VASOPRESSIN, 2.4, "units/hour", 70.0, 0.1),  # 0.04 U/min x 2.5
        (act.DOBUTAMINE, 5.0, "mcg/kg/min", 70.0, 0.0),  # not a vasopressor for the NE equivalent
    ],
)
def test_norepinephrine_equivalents(tmp_path, itemid, rate, unit, weight, expected):
    case = septic_patient(Case(), 1, los_h=8.0)
    case.infuse(1, 0.5, 2.0, itemid, 1.0, "mg", rate=rate, rateuom=unit, weight=weight)
    frame, _ = run_case(case, tmp_path)
    np.testing.assert_allclose(frame["vaso_ne_eq"][0], expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("itemid", "factor"),
    [
        (225158, 1.0),
        (225159, 0.5),
        (225161, 3.0),
        (220862, 5.0),
        (227531, 2.75),
        (220995, 6.66),
        (228341, 8.0),
    ],
)
def test_tonicity(itemid, factor, tmp_path):
    case = septic_patient(Case(), 1, los_h=8.0)
    case.infuse(1, 1.0, 3.0, itemid, 100.0)
    case.infuse(1, 3.0, 5.0, NACL, 200.0)  # half of it in window 0 (ends at 4 h), half in window 1
    frame, _ = run_case(case, tmp_path)
    np.testing.assert_allclose(frame["fluid_ml"].to_numpy(), [100 * factor + 100, 100], rtol=1e-5)


def test_dose_levels_and_edges():
    edges = act.quartile_edges(np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, np.nan]))
    assert edges == [2.0, 3.0, 4.0]  # zeros and NaN are not doses
    levels = act.dose_level(np.array([0.0, np.nan, 0.5, 2.0, 2.5, 3.0, 4.0, 4.1]), edges)
    assert levels.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert act.encode_action(np.array([4, 0]), np.array([0, 3])).tolist() == [20, 3]


def test_same_input_same_replay(tmp_path):
    case = septic_patient(Case(), 1, los_h=12.0)
    septic_patient(case, 2, los_h=10.0).chart(2, 3.0, MAP_ID, 64.0)
    folder = case.write(tmp_path / "mimic")
    hashes = []
    for name in ("a", "b"):
        run(MimicArgs(mimic_dir=folder, out=tmp_path / name, quiet=True))
        hashes.append(load_replay(tmp_path / name / "replay.parquet").content_hash)
    assert hashes[0] == hashes[1]
