"""One constructed patient per defect of issue #12 ("MIMIC-IV replay you can trust"); each test fails on the
pipeline before the fix. Times are hours after ICU admission (08:00); `septic_patient` has SI at hour 1 and
platelets 40 (coagulation 3) from hour 0.5, so onset is hour 1 and the 4 h windows start at 0, 4, 8, ..."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from mimic_cases import Case, at, septic_patient

from cleansepsis.mimic import cohort
from cleansepsis.mimic.pipeline import MimicArgs, run
from cleansepsis.replay import load_replay

MAP_ART, MAP_CUFF, FIO2, CREATININE, DEVICE, O2_FLOW = 220052, 220181, 223835, 50912, 226732, 223834
EYE, VERBAL, MOTOR = 220739, 223900, 223901


def run_case(case: Case, tmp_path: Path, name: str = "out", **kwargs) -> tuple[pl.DataFrame, dict]:
    folder = case.write(tmp_path / f"mimic_{name}")
    out = tmp_path / name
    run(MimicArgs(mimic_dir=folder, out=out, quiet=True, train_fraction=0.99, val_fraction=0.0, **kwargs))
    meta = load_replay(out / "replay.parquet").meta
    return pl.read_parquet(out / "replay.parquet").sort("episode_id", "t"), meta


def raw(frame: pl.DataFrame, meta: dict, name: str) -> np.ndarray:
    """A state value back in its own unit (NaN where its missing flag is set), undoing the normalisation."""
    names = meta["feature_names"]
    obs = np.stack(frame["obs"].to_numpy()).astype(np.float64)
    stats = meta["normalisation"][name]
    values = obs[:, names.index(name)] * stats["std"] + stats["mean"]
    if stats["kind"] == "log-z":
        values = np.exp(values) - 0.1
    if f"{name}_missing" in names:
        values = np.where(obs[:, names.index(f"{name}_missing")] == 1.0, np.nan, values)
    return values


# 1. ties at one timestamp -------------------------------------------------------------------------------


@pytest.mark.parametrize("cuff_first", [True, False])
def test_same_time_map_prefers_the_arterial_line(tmp_path, cuff_first):
    """Arterial 60 and cuff 80 charted at the same minute: the state shows the arterial 60 whatever the row
    order in the file (the old code took whichever row came last)."""
    case = septic_patient(Case(), 1, los_h=8.0)
    rows = [(MAP_CUFF, 80.0), (MAP_ART, 60.0)] if cuff_first else [(MAP_ART, 60.0), (MAP_CUFF, 80.0)]
    for itemid, value in rows:
        case.chart(1, 2.5, itemid, value)
    frame, _ = run_case(case, tmp_path)
    assert frame["map_mmhg"][1] == 60.0


# 2. every reward kind at every step length ---------------------------------------------------------------


@pytest.mark.parametrize("reward", ["mortality", "sofa", "raghu"])
@pytest.mark.parametrize("step", [1, 4])
def test_every_reward_runs_at_every_step(tmp_path, reward, step):
    """Discharge at 9.5 h: at 4 h steps the last next state starts at 12 h, past the hourly grid (the old
    code's SOFA there was null and the reward NaN, so the run stopped)."""
    case = septic_patient(Case(), 1, los_h=9.5)
    case.lab(1, 6.0, 50813, 3.0)  # a lactate, for the Raghu reward
    frame, _ = run_case(case, tmp_path, step_hours=step, reward=reward)
    assert np.isfinite(frame["reward"].to_numpy()).all()
    assert frame.height == (3 if step == 4 else 10)


# 3. no look-ahead ------------------------------------------------------------------------------------


def test_onset_time_does_not_enter_the_state(tmp_path):
    """Two patients with the same charted course; one has its infection suspected at hour 1, the other at
    hour 60 (onset at hour 1 and 12). Both episodes start at hour 0; their states must be the same while both
    last. The old `hours_from_onset` told each state when sepsis would be diagnosed."""
    case = Case()
    for n, (abx_h, culture_h) in ((1, (2.0, 1.0)), (2, (61.0, 60.0))):
        case.stay(n, los_h=100.0).infection(n, abx_h=abx_h, culture_h=culture_h)
        case.lab(n, 0.5, 51265, 40.0).chart(n, 3.0, MAP_ART, 64.0).lab(n, 5.0, CREATININE, 1.4)
    frame, meta = run_case(case, tmp_path)
    assert "hours_from_onset" not in meta["feature_names"]
    first, second = (frame.filter(pl.col("episode_id") == s) for s in (301, 302))
    shared = min(first.height, second.height)
    assert shared >= 3
    np.testing.assert_array_equal(
        np.stack(first["obs"].to_numpy())[:shared], np.stack(second["obs"].to_numpy())[:shared]
    )


def leaky_patient() -> Case:
    """Labs whose result comes after the next window start, FiO2 charted after the gas in the same hour,
    an infusion and a GCS at the very start of a window."""
    case = septic_patient(Case(), 1, los_h=16.0)
    case.lab(
        1, -1.0, 51265, 40.0
    )  # platelets before admission: onset stays at hour 1 when later rows are cut
    case.lab(1, 3.5, CREATININE, 5.5, store_h=4.5)  # drawn before 4 h, known only at 4.5 h
    # charted ventilation: mimic-code's episode runs to the next charting (9 h), which a state at 4 h cannot know
    case.chart(1, 2.0, DEVICE, None, "Endotracheal tube").chart(1, 3.0, DEVICE, None, "Endotracheal tube")
    case.chart(1, 9.0, DEVICE, None, "Nasal cannula").chart(1, 9.0, O2_FLOW, 3.0)
    case.gas(1, 2.5, po2=60.0)  # arterial gas without its own FiO2 ...
    case.chart(1, 2.75, FIO2, 100.0)  # ... FiO2 charted after it: not its FiO2
    case.chart(1, 8.0, MAP_ART, 50.0)  # exactly at a window start: belongs to the next state
    case.chart(1, 8.0, EYE, 1.0).chart(1, 8.0, VERBAL, 1.0).chart(1, 8.0, MOTOR, 1.0)
    case.gas(1, 6.0, po2=70.0, store_h=8.5)  # result after the window start
    case.chart(1, 5.5, FIO2, 50.0)
    return case


def known_before(case: Case, hours: float) -> Case:
    """The same patient with every row that was not known before `hours` removed (chart by charttime,
    labs by storetime, output by charttime, infusions by start); antibiotics and cultures are kept (they
    place the window, they are not state features)."""
    cut = at(hours)
    trimmed = Case()
    for key, rows in case.rows.items():
        time_of = {
            "icu/chartevents": "charttime",
            "hosp/labevents": "storetime",
            "icu/outputevents": "charttime",
            "icu/inputevents": "starttime",
            "icu/procedureevents": "starttime",
        }.get(key)
        trimmed.rows[key] = [r for r in rows if time_of is None or r[time_of] < cut]
    return trimmed


def test_no_state_feature_sees_its_own_steps_future(tmp_path):
    """For each window start w, rebuild the replay from only what was known before w: the state at w must be
    the same value by value (and each missing flag the same). Any feature that reads a lab before its
    storetime, a FiO2 charted after its gas, a value charted at w itself or the onset time breaks it."""
    case = leaky_patient()
    full, meta = run_case(case, tmp_path, "full")
    names = [n for n in meta["feature_names"] if not n.endswith("_missing")]
    for k, start in enumerate((0.0, 4.0, 8.0, 12.0)):
        cut, cut_meta = run_case(known_before(case, start), tmp_path, f"cut{k}")
        assert cut.height >= k + 1
        for name in names:
            a = raw(full, meta, name)[k]
            b = raw(cut, cut_meta, name)[k]
            if np.isnan(a) or np.isnan(b):
                assert np.isnan(a) and np.isnan(b), (start, name, a, b)
            else:
                assert a == pytest.approx(b, rel=1e-4, abs=1e-4), (start, name, a, b)


def test_lab_enters_the_state_when_its_result_is_stored(tmp_path):
    frame, meta = run_case(leaky_patient(), tmp_path)
    creatinine = raw(frame, meta, "creatinine")
    assert np.isnan(creatinine[1])  # drawn at 3.5 h, stored at 4.5 h: unknown at 4 h
    assert creatinine[2] == pytest.approx(5.5, rel=1e-4)
    sofa = frame["sofa"].to_numpy()
    assert sofa[1] == 3 and sofa[2] >= 3 + 4  # renal 4 only once the result exists


# 4. arterial gases only ------------------------------------------------------------------------------


def test_venous_gas_is_not_a_pao2(tmp_path):
    case = septic_patient(Case(), 1, los_h=8.0)
    case.chart(1, 1.0, FIO2, 50.0).gas(1, 2.0, po2=40.0, specimen_type="VEN.")
    frame, meta = run_case(case, tmp_path)
    assert np.isnan(raw(frame, meta, "pao2")[1])
    assert np.isnan(raw(frame, meta, "pf_ratio")[1])
    assert frame["sofa"][1] == 3  # coagulation only: a venous P/F of 80 is not respiratory failure


# 5. FiO2 from the 4 h before the gas -----------------------------------------------------------------


def test_gas_pairs_only_with_fio2_of_the_four_hours_before(tmp_path):
    """Gas at 1.5 h with FiO2 charted 15 min after it: no P/F. Gas at 9.5 h with FiO2 from 5.5 h (4 h
    before): P/F 60 / 0.5 = 120. Gas at 14.5 h (pO2 30), last FiO2 at 10 h (4.5 h before): no P/F, so the
    state at 16 h still shows the 9.5 h ratio (held 8 h), not 30 / 0.4 = 75."""
    case = septic_patient(Case(), 1, los_h=17.0)
    case.lab(1, 12.5, 51265, 40.0)
    case.gas(1, 1.5, po2=60.0).chart(1, 1.75, FIO2, 50.0)
    case.chart(1, 5.5, FIO2, 50.0).gas(1, 9.5, po2=60.0)
    case.chart(1, 10.0, FIO2, 40.0).gas(1, 14.5, po2=30.0)
    frame, meta = run_case(case, tmp_path)
    pf = raw(frame, meta, "pf_ratio")
    assert np.isnan(pf[1]) and np.isnan(pf[2])
    assert pf[3] == pytest.approx(120.0, rel=1e-4)
    assert pf[4] == pytest.approx(120.0, rel=1e-4)
    # respiratory SOFA 2 (P/F < 300, not ventilated) only from the 9.5 h gas on
    np.testing.assert_array_equal(frame["sofa"].to_numpy(), [0, 3, 3, 5, 5])


# 6. missing urine stays missing ----------------------------------------------------------------------


def platelets_every_12_hours(case: Case) -> Case:
    for hours in (12.5, 24.5, 36.5):
        case.lab(1, hours, 51265, 40.0)  # coagulation 3 all along
    return case


def test_no_charted_urine_is_not_anuria(tmp_path):
    case = platelets_every_12_hours(septic_patient(Case(), 1, los_h=40.0))
    frame, meta = run_case(case, tmp_path)
    assert (frame["sofa"].to_numpy()[1:] == 3).all()  # coagulation only; the old code added renal 4 at 24 h
    assert np.isnan(raw(frame, meta, "urine_prev_step")[1:]).all()


def test_urine_counts_once_observed_for_22_hours(tmp_path):
    """10 mL every hour from hour 0: 24 h output 240 mL < 500 -> renal 3 once 22 h are observed (the state
    at 24 h is the first to see it; at 20 h only 20 h were observed)."""
    case = platelets_every_12_hours(septic_patient(Case(), 1, los_h=40.0))
    for hour in range(0, 40):
        case.urine(1, hour + 0.5, 10.0)
    frame, meta = run_case(case, tmp_path)
    sofa = frame["sofa"].to_numpy()
    np.testing.assert_array_equal(sofa, [0, 3, 3, 3, 3, 3, 6, 6, 6, 6])
    np.testing.assert_allclose(raw(frame, meta, "urine_prev_step")[1:], 40.0, rtol=1e-4)


# 7. labs by admission --------------------------------------------------------------------------------


def test_labs_of_another_visit_do_not_count(tmp_path):
    """Creatinine 6 drawn 2 h before the ICU in the emergency department (no hadm_id) and bilirubin 13 of
    another admission: mimic-code joins labs by hadm_id, so neither enters SOFA or the state."""
    case = septic_patient(Case(), 1, los_h=8.0)
    case.lab(1, -2.0, CREATININE, 6.0, hadm=None).lab(1, 0.25, 50885, 13.0, hadm=999)
    frame, meta = run_case(case, tmp_path)
    assert np.isnan(raw(frame, meta, "creatinine")[0]) and np.isnan(raw(frame, meta, "bilirubin")[1])
    np.testing.assert_array_equal(frame["sofa"].to_numpy(), [0, 3])


# 8. hour convention, cultures, antibiotics -----------------------------------------------------------


def test_hour_bins_end_inclusive_as_mimic_code(tmp_path):
    """Platelets 120 (coagulation 1) at 0.5 h and MAP 65 (cardiovascular 1) at exactly 5:00 after admission:
    mimic-code counts the MAP in the hour (4 h, 5 h], so SOFA reaches 2 and onset is at 5 h (old: 6 h)."""
    case = Case().stay(1, los_h=20.0).infection(1, abx_h=2.0, culture_h=1.0)
    case.lab(1, 0.5, 51265, 120.0).chart(1, 5.0, MAP_ART, 65.0)
    case.write(tmp_path / "m")
    run(
        MimicArgs(
            mimic_dir=tmp_path / "m", out=tmp_path / "o", quiet=True, train_fraction=0.99, val_fraction=0
        )
    )
    onset = pl.read_parquet(tmp_path / "o" / "cohort.parquet")["onset_time"][0]
    assert onset == at(5.0)


def _si(abx: datetime, cultures: list[tuple[datetime | None, datetime]]) -> pl.DataFrame:
    abx_frame = pl.DataFrame({"stay_id": [1], "subject_id": [7], "abx_time": [abx]}).with_columns(
        pl.col("abx_time").cast(pl.Datetime("us"))
    )
    cult = pl.DataFrame(
        {
            "micro_specimen_id": list(range(len(cultures))),
            "subject_id": [7] * len(cultures),
            "culture_time": [c[0] for c in cultures],
            "culture_date": [c[1].date() for c in cultures],
        },
        schema={
            "micro_specimen_id": pl.Int64,
            "subject_id": pl.Int64,
            "culture_time": pl.Datetime("us"),
            "culture_date": pl.Date,
        },
    )
    return cohort.suspected_infection(abx_frame, cult)


def test_timed_culture_beats_a_date_only_culture_of_the_same_day():
    """mimic-code orders the cultures before an antibiotic by chartdate, then charttime with nulls last: the
    timed 09:00 culture is the first, not the date-only one read as 00:00."""
    day = datetime(2150, 3, 1)
    si = _si(datetime(2150, 3, 1, 10), [(None, day), (datetime(2150, 3, 1, 9), day)])
    assert si["si_time"][0] == datetime(2150, 3, 1, 9)


def test_antibiotic_list_and_routes_follow_mimic_code():
    frame = pl.DataFrame(
        {
            "drug": ["Tigecycline", "Vancomycin", "Ciprofloxacin 0.3% Ophth Soln", "Vancomycin", "Cefepime"],
            "route": ["IV", None, "LEFT EYE", "BOTH EARS", "IV"],
            "drug_type": ["MAIN", "MAIN", "MAIN", "MAIN", None],
        }
    )
    keep = frame.select(
        cohort.is_antibiotic(pl.col("drug"), pl.col("route"), pl.col("drug_type"))
    ).to_series()
    # tigecycline is not on mimic-code's list; a null route or drug_type never passes its NOT IN filter
    assert keep.to_list() == [False, False, False, False, False]


# 9. fluids charted in mEq and grams ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("itemid", "amount", "unit", "tev"),
    [(220995, 50.0, "mEq", 50.0 * 6.66), (227531, 25.0, "grams", 125.0 * 2.75)],
)
def test_bicarbonate_and_mannitol_are_converted(tmp_path, itemid, amount, unit, tev):
    case = septic_patient(Case(), 1, los_h=8.0)
    case.infuse(1, 1.0, 1.5, itemid, amount, unit)
    frame, _ = run_case(case, tmp_path)
    assert frame["fluid_ml"][0] == pytest.approx(tev, rel=1e-5)


# 10. GCS ---------------------------------------------------------------------------------------------


def test_gcs_carries_components_and_takes_the_worst_of_the_hour(tmp_path):
    """Hour [1, 2): GCS 3 at 1.25 h, then 15 at 1.75 h -> the hour's worst is 3 (CNS 4; the old code took the
    last, 15). At 5 h only the motor score (3) is charted: eye and verbal carry forward from 1.75 h (4 + 5)
    -> GCS 12 (the old code had no total when a component was not charted at the same time)."""
    case = septic_patient(Case(), 1, los_h=12.0)
    for hours, (e, v, m) in ((1.25, (1, 1, 1)), (1.75, (4, 5, 6))):
        case.chart(1, hours, EYE, e).chart(1, hours, VERBAL, v).chart(1, hours, MOTOR, m)
    case.chart(1, 5.0, MOTOR, 3.0)
    frame, meta = run_case(case, tmp_path)
    assert frame["sofa"][1] == 3 + 4
    gcs = raw(frame, meta, "gcs")
    assert gcs[1] == pytest.approx(15.0) and gcs[2] == pytest.approx(12.0)


# mimic-code details the fidelity depends on -----------------------------------------------------------


def test_icu_hours_start_at_the_first_heart_rate(tmp_path):
    """mimic-code's hour 0 ends at the first heart rate rounded up to the hour (`icustay_times`): with the
    first HR at 1.5 h, a SOFA of 3 from admission gives onset at 2 h, not 1 h."""
    case = septic_patient(Case(), 1).chart(1, 1.5, 220045, 90.0)
    case.write(tmp_path / "m")
    run(
        MimicArgs(
            mimic_dir=tmp_path / "m", out=tmp_path / "o", quiet=True, train_fraction=0.99, val_fraction=0
        )
    )
    assert pl.read_parquet(tmp_path / "o" / "cohort.parquet")["onset_time"][0] == at(2.0)


def test_urine_24h_is_scaled_by_the_time_it_covers():
    """mimic-code `urine_output_rate`: 40 mL every 2 h from 1 h, first heart rate at 0 h. At 23 h the 23 h
    window holds 12 chartings covering 1 + 11 x 2 = 23 h: 480 / 23 x 24 mL. At 21 h they cover 21 h < 22 h:
    unknown (the old code summed a fixed 24 h grid and read no charting as 0 mL)."""
    from cleansepsis.mimic.events import urine_24h

    urine = pl.DataFrame({"stay_id": [1] * 14, "t": [1.0 + 2 * i for i in range(14)], "urine": [40.0] * 14})
    rates = urine_24h(urine, pl.DataFrame({"stay_id": [1], "first_hr_t": [0.0]}))
    by_t = dict(zip(rates["t"].to_list(), rates["uo_24h"].to_list(), strict=True))
    assert by_t[21.0] is None
    assert by_t[23.0] == pytest.approx(480 / 23 * 24)
    assert by_t[25.0] == pytest.approx(480 / 24 * 24)  # 3..25 h: twelve chartings of 2 h each


# state features added for #12 --------------------------------------------------------------------------


def test_charlson_uses_only_earlier_admissions(tmp_path):
    """An admission discharged before the ICU stay coded heart failure (ICD-10 I509, 1 point), a metastasis
    (C787, 6) and diabetes with complications (ICD-9 25040, 2): Charlson 9. The current admission's own
    myocardial infarction (I214) is coded at discharge, after the states: not counted."""
    case = septic_patient(Case(), 1, los_h=8.0)
    case.admission(1, 150, admit_h=-400.0, disch_h=-300.0)
    case.diagnosis(1, 150, "I509").diagnosis(1, 150, "C787").diagnosis(1, 150, "25040", version=9)
    case.diagnosis(1, 201, "I214")  # the current admission (hadm 201)
    frame, meta = run_case(case, tmp_path)
    assert raw(frame, meta, "charlson")[0] == pytest.approx(9.0)
    assert meta["feature_units"]["charlson"] == "points"


def test_sirs_counts_the_states_own_values(tmp_path):
    """Temperature 38.5, heart rate 110, respiratory rate 25 and WBC 15 before 4 h: SIRS 4 at 4 h, 0 before."""
    case = septic_patient(Case(), 1, los_h=8.0)
    case.chart(1, 3.0, 223762, 38.5).chart(1, 3.0, 220045, 110.0).chart(1, 3.0, 220210, 25.0)
    case.lab(1, 2.0, 51301, 15.0)
    frame, meta = run_case(case, tmp_path)
    np.testing.assert_allclose(raw(frame, meta, "sirs"), [0.0, 4.0], atol=1e-4)


def test_fio2_is_estimated_from_device_and_flow(tmp_path):
    """No FiO2 charted; nasal cannula at 3 L/min charted at 2 h -> 33% in the state at 4 h (21 + 4 x 3)."""
    case = septic_patient(Case(), 1, los_h=8.0)
    case.chart(1, 2.0, DEVICE, None, "Nasal cannula").chart(1, 2.0, O2_FLOW, 3.0)
    frame, meta = run_case(case, tmp_path)
    assert np.isnan(raw(frame, meta, "fio2")[1])
    assert raw(frame, meta, "fio2_imputed")[1] == pytest.approx(33.0, rel=1e-4)
