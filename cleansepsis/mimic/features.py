"""State variables: which itemids make each one, its unit, physiological range, hold limit and scaling.

Itemids, ranges and hold limits follow /work/shared/docs/mimic-iv-reference.md §2 (mimic-code concepts and the
AI Clinician's reference files, microsoft/mimic_sepsis `sample_and_hold.csv`). Values outside a range are
removed (they are charting errors, not patients); SpO2 between 100 and 150 is set to 100.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """A charted (CE) or lab (LE) variable held forward for at most `hold_hours` after it was charted."""

    name: str
    unit: str
    chart_ids: tuple[int, ...]
    lab_ids: tuple[int, ...]
    low: float  # values below are removed
    high: float  # values above are removed
    hold_hours: float
    scale: str = "z"  # "z" or "log-z" (log(0.1 + x) then z)


# The order of `chart_ids` / `lab_ids` is the tie-break priority when two items of one variable are charted
# at the same timestamp: the first (invasive / arterial line) wins over the later ones (cuff); equal
# priority -> the higher value. See docs/mimic.md "Ties".
MEASURED: tuple[Measured, ...] = (
    Measured("hr", "bpm", (220045,), (), 0, 250, 2),
    Measured("sbp", "mmHg", (220050, 225309, 220179), (), 0, 300, 2),  # arterial, ART BP, then cuff
    Measured("map", "mmHg", (220052, 225312, 220181), (), 1, 200, 2),  # mimic-code keeps 0 < MAP
    Measured("dbp", "mmHg", (220051, 225310, 220180), (), 0, 200, 2),
    Measured("rr", "/min", (220210, 224690), (), 0, 80, 2),
    Measured("spo2", "%", (220277,), (), 0, 150, 2),  # >100 set to 100
    Measured("temp", "degC", (223762, 223761), (), 25, 45, 6),  # 223761 is Fahrenheit, converted
    Measured("cvp", "mmHg", (220074,), (), -10, 50, 4),
    Measured("fio2", "%", (223835,), (50816,), 20, 100, 12),  # fractions <= 1 are multiplied by 100
    Measured("peep", "cmH2O", (220339, 224700), (), 0, 40, 6),
    Measured("weight", "kg", (226512, 224639), (), 20, 300, 72),
    # GCS total per charting time, components carried forward 6 h (see events.gcs_events); 3-15
    Measured("gcs", "points", (), (), 3, 15, 6),
    Measured("glucose", "mg/dL", (220621, 226537, 225664), (50931, 50809), 1, 1000, 14),
    # AIC's sample_and_hold.csv lists 144 h for potassium, almost surely a typo for 14 h; 14 h is used.
    Measured("potassium", "mEq/L", (), (50971, 50822), 1, 15, 14),
    Measured("sodium", "mEq/L", (), (50983, 50824), 95, 178, 14),
    Measured("chloride", "mEq/L", (), (50902, 50806), 70, 150, 14),
    Measured("bun", "mg/dL", (), (51006,), 0, 300, 28, "log-z"),
    Measured("creatinine", "mg/dL", (), (50912,), 0, 150, 28, "log-z"),
    Measured("magnesium", "mg/dL", (), (50960,), 0, 10, 28),
    Measured("calcium", "mg/dL", (), (50893,), 0, 20, 28),
    Measured("ionised_calcium", "mmol/L", (), (50808,), 0, 5, 28),
    Measured("total_co2", "mEq/L", (), (50804,), 0, 120, 28),
    Measured("ast", "U/L", (), (50878,), 0, 10000, 28, "log-z"),
    Measured("alt", "U/L", (), (50861,), 0, 10000, 28, "log-z"),
    Measured("bilirubin", "mg/dL", (), (50885,), 0, 150, 28, "log-z"),
    Measured("albumin", "g/dL", (), (50862,), 0, 10, 28),
    Measured("hemoglobin", "g/dL", (), (51222, 50811), 0, 20, 14),
    Measured("wbc", "10^3/uL", (), (51301, 51300), 0, 500, 28, "log-z"),
    Measured("platelets", "10^3/uL", (), (51265,), 0, 2000, 28, "log-z"),
    Measured("ptt", "s", (), (51275,), 0, 200, 28),
    Measured("pt", "s", (), (51274,), 0, 200, 28, "log-z"),
    Measured("inr", "ratio", (), (51237,), 0, 20, 28, "log-z"),
    # blood gases: arterial specimens only (labevents 52033 'ART.' on the same specimen_id, as mimic-code bg)
    Measured("ph", "pH", (), (50820,), 6.7, 8.0, 8),
    Measured("pao2", "mmHg", (), (50821,), 0, 700, 8),
    Measured("paco2", "mmHg", (), (50818,), 0, 200, 8),
    Measured("base_excess", "mEq/L", (), (50802,), -50, 50, 8),
    Measured("lactate", "mmol/L", (), (50813,), 0, 30, 8, "log-z"),
    Measured("bicarbonate", "mEq/L", (), (50882, 50803), 0, 60, 8),
)
ARTERIAL_ONLY = ("ph", "pao2", "paco2", "base_excess")
SPECIMEN_TYPE_ID = 52033  # labevents "Specimen Type" of a blood gas: ART., VEN., MIX., CENTRAL VENOUS.
ARTERIAL_SPECIMEN = "ART."
MEASURED_BY_NAME = {m.name: m for m in MEASURED}
FEATURE_CODE = {m.name: i for i, m in enumerate(MEASURED)}

FAHRENHEIT_ID = 223761
GCS_EYE_ID, GCS_VERBAL_ID, GCS_MOTOR_ID = 220739, 223900, 223901
GCS_VERBAL_ETT = "No Response-ETT"

# Derived and treatment features of the state (name, unit, scale); all computed from data known before the
# step starts (see docs/mimic.md "What a state may see").
DERIVED: tuple[tuple[str, str, str], ...] = (
    ("pf_ratio", "mmHg", "z"),  # arterial PaO2 / FiO2 (FiO2 of the gas or charted in the 4 h before it)
    ("shock_index", "bpm/mmHg", "z"),  # HR / SBP
    ("sirs", "criteria (0-4)", "z"),  # temp, HR, RR/PaCO2, WBC criteria met by the state's values
    ("fio2_imputed", "%", "z"),  # FiO2; where not charted within 12 h, estimated from O2 device and flow
    ("sofa", "points", "z"),  # SOFA over the 24 h ending at the window start (results known by then)
    ("sofa_resp", "points", "z"),
    ("sofa_coag", "points", "z"),
    ("sofa_liver", "points", "z"),
    ("sofa_cv", "points", "z"),
    ("sofa_cns", "points", "z"),
    ("sofa_renal", "points", "z"),
    ("age", "years", "z"),
    ("female", "0/1", "none"),
    ("readmission", "0/1", "none"),  # the patient had an earlier ICU stay
    ("charlson", "points", "z"),  # Charlson index (no age points) from previous admissions' diagnoses
    ("mech_vent", "0/1", "none"),  # invasive ventilation (procedure or charted settings), hour before
    ("hours_since_icu_admission", "h", "z"),  # window start minus ICU admission hour
    ("fluid_prev_step", "mL", "log-z"),  # tonicity-adjusted IV fluid in the previous window
    ("urine_prev_step", "mL", "log-z"),  # urine output in the previous window (missing if none charted)
    ("input_total", "mL", "log-z"),  # tonicity-adjusted IV fluid, ICU admission to window start
    ("output_total", "mL", "log-z"),  # urine output, ICU admission to window start
    ("cum_balance", "mL", "z"),  # IV fluid in (raw volume) minus urine out, ICU admission to window start
    ("vaso_prev_step", "ug/kg/min", "log-z"),  # max NE-equivalent rate in the previous window
)

# Features whose missingness gets a flag (the measured ones, and those derived from them).
_SHOWN = tuple(m.name for m in MEASURED)
FLAGGED = (*_SHOWN, "pf_ratio", "shock_index", "fio2_imputed", "urine_prev_step")
STATE_VALUES = (*_SHOWN, *(d[0] for d in DERIVED))


def chart_itemids() -> list[int]:
    return sorted({i for m in MEASURED for i in m.chart_ids})


def lab_itemids() -> list[int]:
    return sorted({i for m in MEASURED for i in m.lab_ids})


def itemid_to_feature(kind: str) -> dict[int, int]:
    """itemid -> feature code, for chart ("CE") or lab ("LE") ids."""
    out = {}
    for code, m in enumerate(MEASURED):
        for itemid in m.chart_ids if kind == "CE" else m.lab_ids:
            out[itemid] = code
    return out


def itemid_priority(kind: str) -> dict[int, int]:
    """itemid -> tie-break rank within its variable (0 = preferred), for chart ("CE") or lab ("LE") ids."""
    out = {}
    for m in MEASURED:
        for rank, itemid in enumerate(m.chart_ids if kind == "CE" else m.lab_ids):
            out[itemid] = rank
    return out


def units() -> dict[str, str]:
    out = {m.name: m.unit for m in MEASURED}
    out.update({name: unit for name, unit, _ in DERIVED})
    return out


def scale_of(name: str) -> str:
    if name in MEASURED_BY_NAME:
        return MEASURED_BY_NAME[name].scale
    return {d[0]: d[2] for d in DERIVED}[name]
