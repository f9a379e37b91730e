"""`data_prep.py synth`: MIMIC-IV-shaped synthetic tables for tests and scale benchmarks.

Volumes per ICU stay follow full MIMIC-IV v3.1 (about 94,000 ICU stays, 433 million chartevents rows and
158 million labevents rows, i.e. ~4,600 chart rows and ~1,700 lab rows per stay); most rows are of itemids the
pipeline does not use, as in the real tables. Column names, column order and the types polars infers from the
CSV files are those of the MIMIC-IV demo 2.2 (checked by tests/test_mimic_synth.py against the demo).

The data are built to give a pipeline the work real data give it (the cost and the logic), not to look
like any patient:
- patients with several ICU stays and hospital admissions (ICU readmission within an admission, later
  readmissions, earlier admissions without ICU stay), diagnoses_icd with comorbidity codes (ICD-9 and -10);
- suspected infection in about 60% of the stays, several antibiotic orders and cultures each (some cultures
  date-only: charttime empty, chartdate at 00:00; some antibiotics topical or eye drops), and organ
  dysfunction (SOFA >= 2) around it in about half of them; non-infected stays with prophylactic antibiotics,
  screening swabs and organ dysfunction of their own;
- charting gaps, GCS components missing at some charting times, arterial and cuff blood pressure at the same
  timestamp with different values, a few same-item rows at one timestamp with different values;
- ventilator settings, oxygen device and flow (FiO2 charted only on the ventilator or high-flow devices),
  weights, CVP, glucose;
- labs with `storetime` after `charttime` (minutes for gases, about an hour for chemistry), blood gases whose
  specimen type (labevents 52033: ART., VEN., MIX., CENTRAL VENOUS.) shares their specimen_id, labs of other
  visits (hadm_id empty, or an earlier admission) in the 48 h before the ICU;
- inputevents with maintenance infusions split at rate changes, boluses, antibiotic carriers, sodium
  bicarbonate in mEq, mannitol in grams, blood products, five vasopressors; urine by Foley or void, GU
  irrigation; ventilation in procedureevents for most (not all) ventilated stays.
Everything is deterministic by seed. Nothing here is real patient data.
"""

from __future__ import annotations

import gzip
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from cleansepsis.io import atomic_dir

CHART_ROWS_PER_STAY = 433_000_000 / 94_000
LAB_ROWS_PER_STAY = 158_000_000 / 94_000
MEAN_LOS_H = 82.0  # mean ICU length of stay generated below (lognormal, median 55 h; MIMIC-IV: 3.6 days)
BASE = np.datetime64("2150-01-01T00:00:00", "s")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
HOUR, DAY = 3600, 86400
INF = np.iinfo(np.int64).max // 4

# Column names and types of each table, in the demo's order. Types: i integer, f float, s text,
# t timestamp, d date (what polars infers from the demo's CSV; timestamps and dates are text there).
COLUMNS: dict[str, str] = {
    "hosp/patients": "subject_id:i gender:s anchor_age:i anchor_year:i anchor_year_group:s dod:d",
    "hosp/admissions": "subject_id:i hadm_id:i admittime:t dischtime:t deathtime:t admission_type:s "
    "admit_provider_id:s admission_location:s discharge_location:s insurance:s language:s marital_status:s "
    "race:s edregtime:t edouttime:t hospital_expire_flag:i",
    "hosp/diagnoses_icd": "subject_id:i hadm_id:i seq_num:i icd_code:s icd_version:i",
    "icu/icustays": "subject_id:i hadm_id:i stay_id:i first_careunit:s last_careunit:s intime:t outtime:t los:f",
    "icu/chartevents": "subject_id:i hadm_id:i stay_id:i caregiver_id:i charttime:t storetime:t itemid:i "
    "value:s valuenum:f valueuom:s warning:i",
    "hosp/labevents": "labevent_id:i subject_id:i hadm_id:i specimen_id:i itemid:i order_provider_id:s "
    "charttime:t storetime:t value:s valuenum:f valueuom:s ref_range_lower:f ref_range_upper:f flag:s "
    "priority:s comments:s",
    "icu/inputevents": "subject_id:i hadm_id:i stay_id:i caregiver_id:i starttime:t endtime:t storetime:t "
    "itemid:i amount:f amountuom:s rate:f rateuom:s orderid:i linkorderid:i ordercategoryname:s "
    "secondaryordercategoryname:s ordercomponenttypedescription:s ordercategorydescription:s "
    "patientweight:f totalamount:f totalamountuom:s isopenbag:i continueinnextdept:i statusdescription:s "
    "originalamount:f originalrate:f",
    "icu/outputevents": "subject_id:i hadm_id:i stay_id:i caregiver_id:i charttime:t storetime:t itemid:i "
    "value:i valueuom:s",
    "icu/procedureevents": "subject_id:i hadm_id:i stay_id:i caregiver_id:i starttime:t endtime:t storetime:t "
    "itemid:i value:f valueuom:s location:s locationcategory:s orderid:i linkorderid:i ordercategoryname:s "
    "ordercategorydescription:s patientweight:f isopenbag:i continueinnextdept:i statusdescription:s "
    "ORIGINALAMOUNT:f ORIGINALRATE:i",
    "hosp/prescriptions": "subject_id:i hadm_id:i pharmacy_id:i poe_id:s poe_seq:i order_provider_id:s "
    "starttime:t stoptime:t drug_type:s drug:s formulary_drug_cd:s gsn:s ndc:i prod_strength:s form_rx:s "
    "dose_val_rx:s dose_unit_rx:s form_val_disp:s form_unit_disp:s doses_per_24_hrs:i route:s",
    "hosp/microbiologyevents": "microevent_id:i subject_id:i hadm_id:i micro_specimen_id:i "
    "order_provider_id:s chartdate:t charttime:t spec_itemid:i spec_type_desc:s test_seq:i storedate:t "
    "storetime:t test_itemid:i test_name:s org_itemid:i org_name:s isolate_num:i quantity:s ab_itemid:i "
    "ab_name:s dilution_text:s dilution_comparison:s dilution_value:f interpretation:s comments:s",
}
DTYPES = {"i": pl.Int64, "f": pl.Float64, "s": pl.String, "t": pl.Datetime("us"), "d": pl.Date}

# ---------------------------------------------------------------------------------------------------------------
# Items (itemids and labels from the MIMIC-IV demo's d_items / d_labitems)

# chartevents: itemid -> valueuom (None: no unit, as in the demo)
CHART_UOM: dict[int, str | None] = {
    220045: "bpm", 220050: "mmHg", 220051: "mmHg", 220052: "mmHg", 220179: "mmHg", 220180: "mmHg",
    220181: "mmHg", 220210: "insp/min", 224690: "insp/min", 220277: "%", 223761: "°F", 223762: "°C",
    220074: "mmHg", 223835: None, 220339: "cmH2O", 224700: "cmH2O", 226512: "kg", 224639: "kg",
    220739: None, 223900: None, 223901: None, 225664: None, 220621: "mg/dL", 223849: None, 226732: None,
    223834: "L/min", 224684: "mL", 224685: "mL", 224688: "insp/min", 224695: "cmH2O", 224696: "cmH2O",
    223848: None,
}  # fmt: skip
GCS_EYE = {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "None"}
GCS_VERBAL = {
    5: "Oriented",
    4: "Confused",
    3: "Inappropriate Words",
    2: "Incomprehensible sounds",
    1: "No Response",
}
GCS_MOTOR = {
    6: "Obeys Commands", 5: "Localizes Pain", 4: "Flex-withdraws", 3: "Abnormal Flexion",
    2: "Abnormal extension", 1: "No response",
}  # fmt: skip
ETT = "No Response-ETT"  # verbal score of an intubated patient (valuenum 1 in the demo)
# O2 delivery devices (226732 text); the ones after index 3 carry a charted FiO2
DEVICES = ("None", "Nasal cannula", "Face tent", "Non-rebreather", "High flow nasal cannula", "Bipap mask ",
           "Endotracheal tube", "Tracheostomy tube")  # fmt: skip
NONE_DEV, NASAL, FACE_TENT, NRB, HFNC, BIPAP, ETT_DEV, TRACH = range(len(DEVICES))
VENT_MODES = (
    ("CMV/ASSIST/AutoFlow", 49.0),
    ("CPAP/PSV", 11.0),
    ("CMV/ASSIST", 2.0),
    ("MMV/PSV/AutoFlow", 51.0),
)
TEXT_VALUES = ("Yes", "No", "Normal", "Intact", "Clean", "Dry", "Present", "None", "Within Normal Limits")
# chart text values by code (value column); numeric rows have code -1 and print their valuenum
CHART_TEXT = (
    *TEXT_VALUES, *GCS_EYE.values(), *GCS_VERBAL.values(), ETT, *GCS_MOTOR.values(), *DEVICES,
    *(mode for mode, _ in VENT_MODES), "Drager",
)  # fmt: skip
CODE = {text: i for i, text in enumerate(CHART_TEXT)}
FILLER_CHART_IDS = np.arange(223000, 223000 + 400)  # documentation items no pipeline reads (no ids above)

# labevents: itemid -> (mean, sd, valueuom, ref_range_lower, ref_range_upper); storage lag group
LABS: dict[int, tuple[float, float, str | None, float | None, float | None]] = {
    50971: (4.1, 0.5, "mEq/L", 3.3, 5.1), 50983: (139, 4, "mEq/L", 133, 145), 50902: (104, 5, "mEq/L", 96, 108),
    50931: (130, 35, "mg/dL", 70, 100), 51006: (22, 12, "mg/dL", 6, 20), 50912: (0.85, 0.15, "mg/dL", 0.5, 1.2),
    50960: (2.0, 0.3, "mg/dL", 1.6, 2.6), 50893: (8.5, 0.6, "mg/dL", 8.4, 10.3),
    50882: (24, 4, "mEq/L", 22, 32),
    51222: (10.5, 1.8, "g/dL", 13.7, 17.5), 51221: (32, 5, "%", 40, 51), 51301: (11, 5, "K/uL", 4, 10),
    51265: (240, 60, "K/uL", 150, 400),
    51274: (14, 3, "sec", 9.4, 12.5), 51275: (32, 8, "sec", 25, 36.5), 51237: (1.3, 0.3, None, 0.9, 1.1),
    50878: (45, 40, "IU/L", 0, 40), 50861: (40, 35, "IU/L", 0, 40), 50885: (0.6, 0.2, "mg/dL", 0, 1.5),
    50862: (3.2, 0.5, "g/dL", 3.5, 5.2),
    # blood gas specimen (52033 is its specimen type, a text row)
    52033: (0, 0, None, None, None), 50820: (7.38, 0.05, "units", 7.35, 7.45), 50821: (0, 0, "mm Hg", 85, 105),
    50818: (40, 5, "mm Hg", 35, 45), 50802: (-1, 3, "mEq/L", None, None), 50804: (24, 3, "mEq/L", 21, 30),
    50813: (1.3, 0.4, "mmol/L", 0.5, 2.0), 50808: (1.12, 0.08, "mmol/L", 1.12, 1.32),
    50822: (4.1, 0.5, "mEq/L", 3.3, 5.1), 50809: (130, 35, "mg/dL", 70, 105), 50816: (0, 0, "%", None, None),
    50811: (10.5, 1.8, "g/dL", 14, 18), 50824: (139, 4, "mEq/L", 133, 145), 50806: (104, 5, "mEq/L", 96, 108),
}  # fmt: skip
CHEM = (50971, 50983, 50902, 50931, 51006, 50912, 50960, 50893, 50882)
CBC = (51222, 51221, 51301, 51265)
COAG = (51274, 51275, 51237)
LFT = (50878, 50861, 50885, 50862)
GAS_ALWAYS = (52033, 50820, 50821, 50818, 50802, 50804)
GAS_SOMETIMES = ((50813, 0.7), (50808, 0.5), (50822, 0.3), (50809, 0.25), (50811, 0.15), (50824, 0.15),
                 (50806, 0.1))  # fmt: skip
SPECIMEN_TYPE = 52033
SPECIMENS = ("ART.", "VEN.", "MIX.", "CENTRAL VENOUS.")
FILLER_LAB_IDS = np.array([i for i in range(51462, 51530) if i not in LABS])  # urine and other tests

# inputevents
FLUID_CARRIERS = (225158, 225943)
VASO_UNITS = {221906: "mcg/kg/min", 221749: "mcg/kg/min", 221289: "mcg/kg/min", 221662: "mcg/kg/min",
              221653: "mcg/kg/min", 222315: "units/hour"}  # fmt: skip
OTHER_DRIPS = ((222168, "mg", "mcg/kg/min", 30.0), (221744, "mcg", "mcg/hour", 75.0),
               (223258, "units", "units/hour", 4.0), (225152, "units", "units/hour", 900.0))  # fmt: skip
# ordercategoryname, secondaryordercategoryname, ordercomponenttypedescription, ordercategorydescription
ORDER_KIND = {
    "drip": ("01-Drips", "02-Fluids (Crystalloids)", "Main order parameter", "Continuous Med"),
    "crystalloid": ("02-Fluids (Crystalloids)", None, "Main order parameter", "Continuous IV"),
    "bolus": ("03-IV Fluid Bolus", None, "Main order parameter", "Bolus"),
    "colloid": ("04-Fluids (Colloids)", None, "Main order parameter", "Continuous IV"),
    "medbolus": ("05-Med Bolus", None, "Main order parameter", "Drug Push"),
    "blood": ("07-Blood Products", None, "Main order parameter", "Continuous IV"),
    "abx": ("08-Antibiotics (IV)", "02-Fluids (Crystalloids)", "Mixed solution", "Drug Push"),
}
KINDS = tuple(ORDER_KIND)
STATUSES = ("FinishedRunning", "ChangeDose/Rate", "Stopped", "Paused")

URINE_FOLEY, URINE_VOID, GU_IRRIGANT_IN, GU_IRRIGANT_OUT = 226559, 226560, 227488, 227489
OTHER_OUTPUTS = (
    (226588, 4, 0.10, 60.0),
    (226599, 8, 0.10, 40.0),
    (227510, 4, 0.15, 30.0),
)  # id, every h, share
INVASIVE_VENT, NONINVASIVE_VENT = 225792, 225794

# prescriptions: (drug, formulary_drug_cd, gsn, route, prod_strength, dose, unit, doses per 24 h)
ANTIBIOTIC_ORDERS = (
    ("Vancomycin", "VANC1F", "043952 009331", "IV", "1g Frozen Bag", "1000", "mg", 2),
    ("Piperacillin-Tazobactam", "PIPT4I", "063485", "IV", "4.5 g Vial", "4.5", "g", 3),
    ("CefePIME", "CEFE2I", "024095", "IV", "2g Vial", "2", "g", 2),
    ("Meropenem", "MERO1I", "026489", "IV", "1g Vial", "1", "g", 3),
    ("CeftriaXONE", "CEFR1I", "009164", "IV", "1gm Vial", "1", "gm", 1),
    ("MetroNIDAZOLE", "METR500PM", "008269", "PO/NG", "500mg Tablet", "500", "mg", 3),
    ("Azithromycin", "AZIT500I", "026721", "IV", "500 mg Vial", "500", "mg", 1),
    ("Levofloxacin", "LEVO750PM", "027838", "PO", "750mg Tablet", "750", "mg", 1),
)
PROPHYLAXIS = ("CeFAZolin", "CEFA2I", "009133", "IV", "2 g Vial", "2", "g", 3)
NOT_SYSTEMIC = (  # antibiotic names mimic-code excludes by route (eye, ear, topical)
    ("Erythromycin 0.5% Ophth Oint", "ERYT35O", "007069", "OU"),
    ("Bacitracin Ointment", "BACI1T", "009427", "TP"),
    ("Ciprofloxacin 0.3% Ophth Soln", "CIPR3OS", "018617", "OS"),
    ("Neomycin-Polymyxin-Bacitracin Ophth Oint", "NEOP1O", "007157", "OD"),
)
OTHER_DRUGS = ("Heparin", "Insulin", "Acetaminophen", "Pantoprazole", "Docusate Sodium", "Furosemide",
               "Fentanyl Citrate", "Propofol", "Potassium Chloride", "Magnesium Sulfate")  # fmt: skip
BASE_DRUGS = ("0.9% Sodium Chloride", "5% Dextrose", "Iso-Osmotic Dextrose")

# microbiology: (spec_type_desc, spec_itemid, test_itemid, test_name)
CULTURES = (
    ("BLOOD CULTURE", 70012, 90201, "Blood Culture, Routine"),
    ("URINE", 70079, 90039, "URINE CULTURE"),
    ("SPUTUM", 70062, 90033, "RESPIRATORY CULTURE"),
    ("MRSA SCREEN", 70091, 90089, "MRSA SCREEN"),
    ("SWAB", 70070, 90115, "R/O VANCOMYCIN RESISTANT ENTEROCOCCUS"),
)
ORGANISMS = ((80002, "ESCHERICHIA COLI"), (80023, "STAPH AUREUS COAG +"), (80026, "PSEUDOMONAS AERUGINOSA"),
             (80053, "ENTEROCOCCUS SP."))  # fmt: skip
SUSCEPTIBILITY = ((90015, "VANCOMYCIN", "<=1", "<=", 1.0), (90005, "CEFTRIAXONE", "<=1", "<=", 1.0),
                  (90016, "GENTAMICIN", "<=1", "<=", 1.0))  # fmt: skip

# diagnoses_icd: (ICD-10, ICD-9, share of admissions); comorbidities of the Charlson / Elixhauser lists first
DIAGNOSES = (
    ("I509", "4280", 0.18), ("I214", "41071", 0.06), ("I739", "4439", 0.05), ("I639", "43491", 0.04),
    ("F0390", "2900", 0.04), ("J449", "496", 0.14), ("M069", "7140", 0.02), ("K7030", "5712", 0.03),
    ("E119", "25000", 0.22), ("E1122", "25040", 0.07), ("G8190", "3429", 0.02), ("N186", "5856", 0.05),
    ("N183", "5853", 0.08), ("C3490", "1629", 0.04), ("C787", "1977", 0.03), ("K7290", "5722", 0.02),
    ("B20", "042", 0.01),
    ("I10", "4019", 0.35), ("E785", "2724", 0.25), ("E039", "2449", 0.10), ("Z794", "V5867", 0.08),
    ("Z87891", "V1582", 0.15), ("I4891", "42731", 0.20), ("I2510", "41401", 0.18), ("N179", "5849", 0.20),
    ("J9601", "51881", 0.12), ("E872", "2762", 0.10), ("D649", "2859", 0.15),
)  # fmt: skip
SEPSIS_CODES = (("A419", "0389"), ("R6520", "99592"), ("J189", "486"), ("N390", "5990"))

CAREUNITS = ("Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
             "Cardiac Vascular Intensive Care Unit (CVICU)", "Medical/Surgical Intensive Care Unit (MICU/SICU)",
             "Trauma SICU (TSICU)", "Coronary Care Unit (CCU)", "Neuro Surgical Intensive Care Unit (Neuro SICU)")  # fmt: skip
ADMISSION_TYPES = ("EW EMER.", "URGENT", "DIRECT EMER.", "SURGICAL SAME DAY ADMISSION", "ELECTIVE")
ADMISSION_LOCATIONS = ("EMERGENCY ROOM", "TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL", "CLINIC REFERRAL",
                       "PROCEDURE SITE")  # fmt: skip
DISCHARGE_LOCATIONS = ("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB")
INSURANCE = ("Medicare", "Medicaid", "Other")
MARITAL = ("MARRIED", "SINGLE", "WIDOWED", "DIVORCED")
RACES = ("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "OTHER", "UNKNOWN")
YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")
ORGANS = ("resp", "coag", "liver", "cv", "cns", "renal")
ORGAN_WEIGHT = np.array([1.0, 0.5, 0.35, 1.0, 0.5, 0.8])  # how often each organ is the failing one
NEVER = 1e9  # hours: an organ that never fails has its window at [NEVER, -NEVER)


@dataclass(frozen=True)
class SynthArgs:
    """Write synthetic MIMIC-IV-shaped tables (hosp/ and icu/) for tests and benchmarks."""

    out: Path
    """Output folder; gets hosp/ and icu/ subfolders in the MIMIC-IV layout."""
    stays: int = 200
    """Number of ICU stays."""
    seed: int = 0
    """Random seed; the same seed gives the same files."""
    format: Literal["csv.gz", "csv", "parquet"] = "csv.gz"
    """File format of the tables (PhysioNet ships csv.gz)."""
    chart_scale: float = 1.0
    """Multiplier on the chartevents/labevents volume per stay (1.0 = full MIMIC-IV v3.1 volume)."""
    overwrite: bool = False
    """Replace the output folder if it exists."""
    quiet: bool = False
    """Do not print progress to stderr."""


def _times(seconds: np.ndarray, present: np.ndarray | None = None) -> pl.Series:
    """Timestamps BASE + seconds; null where `present` is False."""
    stamps = (BASE + np.asarray(seconds).astype("timedelta64[s]")).astype("datetime64[us]")
    if present is not None:
        stamps = np.where(present, stamps, np.datetime64("NaT"))
    return pl.Series(stamps)


def _frame(key: str, n: int, columns: dict[str, object]) -> pl.DataFrame:
    """The table in the demo's column order and types. Timestamps are given as seconds after BASE (negative =
    empty), dates as days after BASE; columns not given are empty."""
    out = []
    for spec in COLUMNS[key].split():
        name, code = spec.split(":")
        dtype = DTYPES[code]
        value = columns.get(name)
        if value is None:
            out.append(pl.Series(name, dtype=dtype).extend_constant(None, n))
        elif code == "t":
            seconds = np.asarray(value, np.int64)
            out.append(_times(np.maximum(seconds, 0), seconds >= 0).alias(name))
        elif code == "d":
            days = np.asarray(value, np.int64)
            dates = (BASE.astype("datetime64[D]") + np.maximum(days, 0).astype("timedelta64[D]")).astype(
                "datetime64[D]"
            )
            out.append(pl.Series(name, np.where(days >= 0, dates, np.datetime64("NaT"))).cast(pl.Date))
        elif isinstance(value, pl.Series):
            out.append(value.alias(name).cast(dtype))
        elif np.isscalar(value) or isinstance(value, str):
            out.append(pl.Series(name, [value], dtype=dtype).extend_constant(value, n - 1))
        else:
            series = pl.Series(name, value)
            if dtype == pl.Float64:
                series = series.cast(pl.Float64).fill_nan(None)
            out.append(series.cast(dtype))
    frame = pl.DataFrame(out)
    if frame.height != n:
        raise AssertionError(f"{key}: {frame.height} rows, expected {n}")
    return frame


def _pick(choices: tuple, codes: np.ndarray) -> pl.Series:
    """Text of each code (an index into `choices`; -1 = empty)."""
    codes = np.asarray(codes, np.int64)
    series = pl.Series(list(choices), dtype=pl.String).gather(np.maximum(codes, 0))
    return series.scatter(np.flatnonzero(codes < 0), None) if (codes < 0).any() else series


def _number_text(values: np.ndarray) -> pl.Series:
    """valuenum as MIMIC's value column writes it: whole numbers without a decimal point."""
    v = pl.Series(np.asarray(values, np.float64)).fill_nan(None)
    whole = v.round(0) == v
    return (
        pl.select(pl.when(whole).then(v.cast(pl.Int64).cast(pl.String)).otherwise(v.round(2).cast(pl.String)))
        .to_series()
        .alias("value")
    )


def _caregiver(stay: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """One nurse per stay and 12 h shift (a pseudo-random id, so that the column compresses as real data)."""
    shift = (seconds + 7 * HOUR) // (12 * HOUR)
    return 1000 + (stay * 7919 + shift * 104729) % 98_000


def _lookup(keys: pl.Series, mapping: dict, dtype: pl.DataType) -> pl.Series:
    """mapping[key] per row (empty for keys not in it)."""
    old = pl.Series(list(mapping), dtype=keys.dtype)
    new = pl.Series(list(mapping.values()), dtype=dtype, strict=False)
    return keys.replace_strict(old, new, default=None, return_dtype=dtype)


def _minute(seconds: np.ndarray) -> np.ndarray:
    return seconds - seconds % 60


def _span(rng: np.random.Generator, owner: np.ndarray, start: np.ndarray, end: np.ndarray, every_h: float):
    """Regular times (jittered) every `every_h` hours in [start, end) per owner -> (owner index, time)."""
    count = np.maximum(np.floor((end - start) / (every_h * HOUR)).astype(np.int64), 0)
    idx = np.repeat(np.arange(owner.size), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    t = (
        start[idx]
        + (k * every_h * HOUR).astype(np.int64)
        + rng.integers(0, int(every_h * HOUR * 0.5) + 1, k.size)
    )
    keep = t < end[idx]
    return owner[idx[keep]], t[keep]


class Rows:
    """Column pieces of one table, concatenated once."""

    def __init__(self, *names: str):
        self.names, self.parts = names, {name: [] for name in names}

    def add(self, *columns) -> None:
        arrays = [np.size(c) for c in columns if np.ndim(c) > 0]
        size = max(arrays) if arrays else 1
        for name, column in zip(self.names, columns, strict=True):
            self.parts[name].append(np.broadcast_to(np.asarray(column), (size,)))

    def get(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}


# ---------------------------------------------------------------------------------------------------------------
# People, admissions, ICU stays and the clinical course


def _people(rng: np.random.Generator, first: int, n: int) -> dict[str, np.ndarray]:
    """Subjects with one or more ICU stays; stays of a subject follow each other, in the same admission (ICU
    readmission) or a later one. Times are seconds after BASE."""
    new_subject = rng.random(n) < 0.69  # MIMIC-IV v3.1: 65,366 patients for 94,458 ICU stays
    new_subject[0] = True
    same_hadm = ~new_subject & (rng.random(n) < 0.3)
    los_h = np.clip(rng.lognormal(np.log(55), 0.9, n), 4.0, 40 * 24.0)
    first_admit = rng.integers(730 * DAY, 40 * 365 * DAY, n)
    to_icu = np.where(
        rng.random(n) < 0.6, rng.integers(HOUR, 14 * HOUR, n), rng.integers(14 * HOUR, 8 * DAY, n)
    )
    after_icu = rng.integers(6 * HOUR, 12 * DAY, n)
    icu_gap = rng.integers(8 * HOUR, 6 * DAY, n)
    readmit_gap = np.where(
        rng.random(n) < 0.35, rng.integers(2 * DAY, 30 * DAY, n), rng.integers(30 * DAY, 700 * DAY, n)
    )
    subject_of, hadm_of = np.zeros(n, np.int64), np.zeros(n, np.int64)
    admit, intime, outtime = (np.zeros(n, np.int64) for _ in range(3))
    for i in range(n):
        if new_subject[i]:
            subject_of[i], hadm_of[i] = i, i
            admit[i] = first_admit[i]
            intime[i] = admit[i] + to_icu[i]
        elif same_hadm[i]:
            subject_of[i], hadm_of[i] = subject_of[i - 1], hadm_of[i - 1]
            admit[i] = admit[i - 1]
            intime[i] = outtime[i - 1] + icu_gap[i]
        else:
            subject_of[i], hadm_of[i] = subject_of[i - 1], i
            admit[i] = outtime[i - 1] + after_icu[i - 1] + readmit_gap[i]
            intime[i] = admit[i] + to_icu[i]
        outtime[i] = intime[i] + int(los_h[i] * HOUR)
    last_of_hadm = np.append(hadm_of[1:] != hadm_of[:-1], True)
    last_of_subject = np.append(subject_of[1:] != subject_of[:-1], True)
    disch_of_hadm = {}
    for i in np.flatnonzero(last_of_hadm):
        disch_of_hadm[hadm_of[i]] = outtime[i] + after_icu[i]
    disch = np.array([disch_of_hadm[h] for h in hadm_of], np.int64)
    first_of_hadm = np.insert(hadm_of[1:] != hadm_of[:-1], 0, True)
    return {
        "subject": 10_000_000 + first + subject_of,
        "hadm": 20_000_000 + first + hadm_of,
        "stay": 30_000_000 + first + np.arange(n),
        "new_subject": new_subject,
        "first_of_hadm": first_of_hadm,
        "last_of_hadm": last_of_hadm,
        "last_of_subject": last_of_subject,
        "admit": admit,
        "intime": intime,
        "outtime": outtime,
        "disch": disch,
        "los_h": los_h,
    }


def _course(rng: np.random.Generator, n: int, los_h: np.ndarray) -> dict[str, np.ndarray]:
    """Infection, organ dysfunction windows (hours since ICU admission), ventilation and lines per stay."""
    infected = rng.random(n) < 0.60
    abx0_h = -12.0 + 60.0 * rng.beta(1.2, 3.0, n)  # first antibiotic, often in the ED or on the ward
    sick = np.where(infected, rng.random(n) < 0.5, rng.random(n) < 0.3)
    # one failing organ alone is already 2 SOFA points: the others have none (a point from a low cuff pressure
    # or a confused patient may still add up to 2, as in real data)
    n_failing = np.where(sick, rng.integers(2, 6, n), 0)
    anchor = np.where(infected, abx0_h, rng.uniform(0, 0.5, n) * los_h)
    anchor = anchor + np.where(sick & infected & (rng.random(n) < 0.08), rng.uniform(30, 60, n), 0.0)  # late
    race = -np.log(rng.random((n, 6))) / ORGAN_WEIGHT  # exponential race: the first n_failing organs fail
    rank = np.argsort(np.argsort(race, axis=1), axis=1)
    failing = rank < n_failing[:, None]
    start = anchor[:, None] + rng.normal(0, 6, (n, 6))
    end = start + rng.uniform(12, 120, (n, 6))
    d_start = np.where(failing, start, NEVER)
    d_end = np.where(failing, end, -NEVER)
    resp, cv, cns = failing[:, 0], failing[:, 3], failing[:, 4]
    vent_kind = np.where(
        resp, 1, np.where(cns & (rng.random(n) < 0.6), 2, np.where(rng.random(n) < 0.12, 3, 0))
    )
    vent_start = np.select(
        [vent_kind == 1, vent_kind == 2, vent_kind == 3],
        [d_start[:, 0] - rng.uniform(0, 4, n), d_start[:, 4], np.full(n, 0.2)],
        NEVER,
    )
    vent_end = np.select(
        [vent_kind == 1, vent_kind == 2, vent_kind == 3],
        [d_end[:, 0] + rng.uniform(0, 24, n), d_end[:, 4], rng.uniform(4, 20, n)],
        -NEVER,
    )
    vent_start = np.clip(vent_start, 0.2, None)
    vent_end = np.minimum(vent_end, los_h - 0.5)
    art = rng.random(n) < np.where(resp | cv, 0.85, 0.3)
    gaps_start = np.where(rng.random((n, 3)) < 0.6, rng.uniform(0, 1, (n, 3)) * los_h[:, None], NEVER)
    return {
        "infected": infected,
        "abx0_h": abx0_h,
        "failing": failing,
        "n_failing": n_failing,
        "d_start": d_start,
        "d_end": d_end,
        "vent_start": vent_start,
        "vent_end": vent_end,
        "vent_recorded": rng.random(n) < 0.85,  # the rest: ventilation only in the charted settings
        "art": art,
        "art_start": rng.uniform(0, 3, n),
        "art_end": los_h - rng.uniform(0, 12, n),
        "central": rng.random(n) < np.where(cv, 0.8, 0.3),
        "gaps_start": gaps_start,
        "gaps_end": gaps_start + rng.uniform(2, 8, (n, 3)),
        "foley": rng.random(n) < 0.85,
        "celsius": rng.random(n) < 0.15,
        "weight": np.round(rng.normal(80, 18, n).clip(40, 200), 1),
        "room_air_share": rng.random(n),
        "acidotic": sick & (rng.random(n) < 0.25),
        "mannitol": cns & (rng.random(n) < 0.3),
        "confused": rng.random(n) < 0.1,
        "severity": np.clip(n_failing / 4 + rng.uniform(0, 0.3, n), 0, 1.2),
    }


def _in_window(h: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return (h >= start) & (h < end)


class TableWriter:
    """Appends polars frames to one table file in chunks (csv / csv.gz), or writes parquet at the end."""

    def __init__(self, folder: Path, key: str, fmt: str):
        module, name = key.split("/")
        (folder / module).mkdir(parents=True, exist_ok=True)
        self.path = folder / module / f"{name}.{fmt}"
        self.fmt, self.parts, self.header = fmt, [], True
        self.handle = None
        if fmt == "csv.gz":
            self.handle = gzip.GzipFile(
                self.path, "wb", compresslevel=1, mtime=0
            )  # mtime 0: same seed, same bytes
        elif fmt == "csv":
            self.handle = open(self.path, "wb")

    def write(self, frame: pl.DataFrame) -> None:
        if self.handle is None:
            self.parts.append(frame)
            return
        self.handle.write(frame.write_csv(include_header=self.header, datetime_format=TIME_FORMAT).encode())
        self.header = False

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        else:
            pl.concat(self.parts, how="vertical_relaxed").write_parquet(self.path)


def write_tables(folder: Path, frames: dict[str, pl.DataFrame], fmt: str = "csv.gz") -> None:
    """Write whole tables (used by tests to build constructed patients)."""
    for key, frame in frames.items():
        writer = TableWriter(Path(folder), key, fmt)
        writer.write(frame)
        writer.close()


def _chunk(rng: np.random.Generator, first_stay: int, n: int, scale: float) -> dict[str, pl.DataFrame]:
    """Tables for ICU stays first_stay .. first_stay + n - 1 (and their patients and admissions)."""
    p = _people(rng, first_stay, n)
    c = _course(rng, n, p["los_h"])
    intime, outtime, los_h = p["intime"], p["outtime"], p["los_h"]
    subject, hadm, stay = p["subject"], p["hadm"], p["stay"]
    tables: dict[str, pl.DataFrame] = {}

    # --- deaths: only at a subject's last stay; sicker courses die more often
    p_death = 0.05 + 0.06 * c["n_failing"]
    died = p["last_of_subject"] & (rng.random(n) < p_death)
    in_icu = rng.random(n) < 0.7
    deathtime = np.where(died, np.where(in_icu, outtime - rng.integers(0, 1800, n), p["disch"]), -1)
    outtime = np.where(died & in_icu, deathtime, outtime)
    disch = np.where(died, deathtime, p["disch"])
    later_death = p["last_of_subject"] & ~died & (rng.random(n) < 0.08)  # state records after discharge
    dod_s = np.where(died, deathtime, np.where(later_death, disch + rng.integers(5 * DAY, 300 * DAY, n), -1))
    # an admission's discharge is that of its last stay
    hadm_disch = dict(zip(hadm[p["last_of_hadm"]], disch[p["last_of_hadm"]], strict=True))
    disch = np.array([hadm_disch[h] for h in hadm], np.int64)

    # --- earlier admissions without an ICU stay (some end within 48 h of this admission: labs of another visit)
    prior = np.flatnonzero(p["new_subject"] & (rng.random(n) < 0.3))
    close = rng.random(prior.size) < 0.25
    prior_disch = p["admit"][prior] - np.where(
        close, rng.integers(4 * HOUR, 40 * HOUR, prior.size), rng.integers(3 * DAY, 600 * DAY, prior.size)
    )
    prior_admit = prior_disch - rng.integers(DAY, 8 * DAY, prior.size)
    prior_hadm = 25_000_000 + first_stay + prior

    # --- patients, admissions, icustays, diagnoses
    firsts = np.flatnonzero(p["new_subject"])
    age = rng.integers(18, 91, n)
    anchor_year = 2150 + p["admit"] // (365 * DAY)
    last_stay_of = {s: i for i, s in enumerate(subject)}  # later stays overwrite: the subject's last
    dod_days = np.array([dod_s[last_stay_of[s]] for s in subject[firsts]], np.int64)
    tables["hosp/patients"] = _frame(
        "hosp/patients",
        firsts.size,
        {
            "subject_id": subject[firsts],
            "gender": np.where(rng.random(firsts.size) < 0.44, "F", "M"),
            "anchor_age": age[firsts],
            "anchor_year": anchor_year[firsts],
            "anchor_year_group": _pick(YEAR_GROUPS, rng.integers(0, len(YEAR_GROUPS), firsts.size)),
            "dod": np.where(dod_days >= 0, dod_days // DAY, -1),
        },
    )
    h_idx = np.flatnonzero(p["first_of_hadm"])
    a_subject = np.concatenate([subject[h_idx], subject[prior]])
    a_hadm = np.concatenate([hadm[h_idx], prior_hadm])
    a_admit = np.concatenate([p["admit"][h_idx], prior_admit])
    a_disch = np.concatenate([disch[h_idx], prior_disch])
    dead_hadm = dict(zip(hadm[died], deathtime[died], strict=True))
    a_death = np.array([dead_hadm.get(h, -1) for h in a_hadm], np.int64)
    m = a_hadm.size
    a_type = rng.integers(0, len(ADMISSION_TYPES), m)
    emergency = a_type == 0
    ed_reg = np.where(emergency, a_admit - rng.integers(2 * HOUR, 10 * HOUR, m), -1)
    tables["hosp/admissions"] = _frame(
        "hosp/admissions",
        m,
        {
            "subject_id": a_subject,
            "hadm_id": a_hadm,
            "admittime": _minute(a_admit),
            "dischtime": _minute(a_disch),
            "deathtime": np.where(a_death >= 0, _minute(a_death), -1),
            "admission_type": _pick(ADMISSION_TYPES, a_type),
            "admit_provider_id": _pick(tuple(f"P{i:05d}" for i in range(50)), rng.integers(0, 50, m)),
            "admission_location": _pick(ADMISSION_LOCATIONS, np.where(emergency, 0, rng.integers(1, 5, m))),
            "discharge_location": pl.Series(np.where(a_death >= 0, "DIED", ""))
            .replace("", None)
            .fill_null(_pick(DISCHARGE_LOCATIONS, rng.integers(0, len(DISCHARGE_LOCATIONS), m))),
            "insurance": _pick(INSURANCE, rng.integers(0, 3, m)),
            "language": np.where(rng.random(m) < 0.9, "ENGLISH", "?"),
            "marital_status": _pick(MARITAL, np.where(rng.random(m) < 0.1, -1, rng.integers(0, 4, m))),
            "race": _pick(RACES, rng.integers(0, len(RACES), m)),
            "edregtime": ed_reg,
            "edouttime": np.where(emergency, a_admit + rng.integers(0, HOUR, m), -1),
            "hospital_expire_flag": (a_death >= 0).astype(np.int64),
        },
    )
    unit = rng.integers(0, len(CAREUNITS), n)
    tables["icu/icustays"] = _frame(
        "icu/icustays",
        n,
        {
            "subject_id": subject,
            "hadm_id": hadm,
            "stay_id": stay,
            "first_careunit": _pick(CAREUNITS, unit),
            "last_careunit": _pick(CAREUNITS, np.where(rng.random(n) < 0.85, unit, rng.integers(0, 7, n))),
            "intime": intime,
            "outtime": outtime,
            "los": (outtime - intime) / DAY,
        },
    )
    infected_hadm = dict(zip(hadm, c["infected"], strict=True))
    a_infected = np.array([infected_hadm.get(h, False) for h in a_hadm])
    dx = Rows("hadm", "code", "version", "sepsis")
    icd10 = rng.random(m) < 0.55
    share = np.array([d[2] for d in DIAGNOSES])
    has = rng.random((m, share.size)) < share
    a_row, d_col = np.nonzero(has)
    dx.add(a_row, d_col, icd10[a_row], False)
    sick_rows = np.flatnonzero(a_infected & (rng.random(m) < 0.7))
    dx.add(sick_rows, rng.integers(0, len(SEPSIS_CODES), sick_rows.size), icd10[sick_rows], True)
    d = dx.get()
    order = np.lexsort((d["sepsis"] == 0, d["hadm"]))  # sepsis codes first, as principal diagnosis
    d = {k: v[order] for k, v in d.items()}
    seq = np.arange(order.size) - np.searchsorted(d["hadm"], d["hadm"], side="left") + 1
    code10 = np.where(d["sepsis"], [SEPSIS_CODES[i % len(SEPSIS_CODES)][0] for i in d["code"]],
                      [DIAGNOSES[i % len(DIAGNOSES)][0] for i in d["code"]])  # fmt: skip
    code9 = np.where(d["sepsis"], [SEPSIS_CODES[i % len(SEPSIS_CODES)][1] for i in d["code"]],
                     [DIAGNOSES[i % len(DIAGNOSES)][1] for i in d["code"]])  # fmt: skip
    tables["hosp/diagnoses_icd"] = _frame(
        "hosp/diagnoses_icd",
        seq.size,
        {
            "subject_id": a_subject[d["hadm"]],
            "hadm_id": a_hadm[d["hadm"]],
            "seq_num": seq,
            "icd_code": np.where(d["version"], code10, code9),
            "icd_version": np.where(d["version"], 10, 9),
        },
    )

    # --- the hourly course: one row per stay-hour in the ICU
    hours = np.ceil(los_h).astype(np.int64)
    s_h = np.repeat(np.arange(n), hours)
    hour = np.arange(hours.sum()) - np.repeat(np.cumsum(hours) - hours, hours)
    t_h = _minute(intime[s_h] + hour * HOUR + rng.integers(0, HOUR, hour.size))
    keep = t_h < outtime[s_h]
    s_h, hour, t_h = s_h[keep], hour[keep], t_h[keep]
    h_f = (t_h - intime[s_h]) / HOUR
    fail_h = _in_window(h_f[:, None], c["d_start"][s_h], c["d_end"][s_h])  # (hours, 6)
    gap = _in_window(h_f[:, None], c["gaps_start"][s_h], c["gaps_end"][s_h]).any(axis=1)
    vent = _in_window(h_f, c["vent_start"][s_h], c["vent_end"][s_h])
    art = c["art"][s_h] & _in_window(h_f, c["art_start"][s_h], c["art_end"][s_h])
    charted = ~gap
    N = hour.size
    ch = Rows("s", "t", "item", "num", "text")

    def chart(mask, item, num, text=-1, dt=0):
        ch.add(s_h[mask], t_h[mask] + dt, item, num[mask] if np.ndim(num) else num,
               text[mask] if np.ndim(text) else text)  # fmt: skip

    chart(charted, 220045, np.round(rng.normal(85 + 20 * fail_h[:, 3], 12)))
    chart(charted, 220210, np.round(rng.normal(18 + 6 * fail_h[:, 0], 4).clip(4, 60)))
    chart(charted, 220277, np.round(rng.normal(97 - 3 * fail_h[:, 0], 1.5).clip(70, 100)))
    true_map = np.where(fail_h[:, 3], rng.normal(62, 7, N), np.maximum(rng.normal(84, 7, N), 75))
    true_sbp = true_map + np.maximum(rng.normal(40, 8, N), 12)
    true_dbp = (3 * true_map - true_sbp) / 2
    with_art = charted & art
    for itemid, value in ((220050, true_sbp), (220051, true_dbp), (220052, true_map)):
        chart(with_art, itemid, np.round(value + rng.normal(0, 2, N)))
    # cuff pressure hourly without an arterial line, every 4 h beside it: same timestamp, another value
    cuff = charted & (~art | (hour % 4 == 0))
    cuff_offset = rng.normal(3, 6, N)
    for itemid, value in ((220179, true_sbp), (220180, true_dbp), (220181, true_map)):
        chart(cuff, itemid, np.round(value + cuff_offset))
    duplicate = charted & (rng.random(N) < 0.005)  # the same item twice at one time, two values
    chart(duplicate, 220045, np.round(rng.normal(90, 20, N)))
    chart(charted & c["central"][s_h], 220074, np.round(rng.normal(10, 4, N)))
    every4 = charted & (hour % 4 == 0)
    inflamed = c["infected"][s_h] & (np.abs(h_f - c["abx0_h"][s_h]) < 24)
    fahrenheit = rng.normal(98.6 + 1.8 * inflamed, 0.9).round(1)
    chart(every4 & ~c["celsius"][s_h], 223761, fahrenheit, dt=120)
    chart(every4 & c["celsius"][s_h], 223762, np.round((fahrenheit - 32) / 1.8, 1), dt=120)
    chart(charted & (hour % 6 == 3), 225664, np.round(rng.normal(140, 35, N).clip(40, 500)))
    chart(charted & (hour % 24 == 5), 220621, np.round(rng.normal(130, 30, N).clip(40, 500)))
    # GCS every 4 h; a component is sometimes not charted; an intubated patient's verbal score is 'ETT'
    gcs_time = charted & (hour % 4 == 2)
    cns = fail_h[:, 4]
    confused = c["confused"][s_h] & (rng.random(N) < 0.5)
    eye = np.where(cns, rng.integers(1, 4, N), 4)
    verbal = np.where(cns, rng.integers(1, 4, N), np.where(confused, 4, 5))
    motor = np.where(cns, rng.integers(1, 6, N), 6)
    for itemid, score, names in (
        (220739, eye, GCS_EYE),
        (223900, verbal, GCS_VERBAL),
        (223901, motor, GCS_MOTOR),
    ):
        text = np.array([CODE[names[k]] for k in range(1, len(names) + 1)])[score - 1]
        if itemid == 223900:
            text = np.where(vent, CODE[ETT], text)
            score = np.where(vent, 1, score)
        chart(gcs_time & (rng.random(N) > 0.08), itemid, score.astype(np.float64), text, dt=300)
    # oxygen: device every 4 h, flow for cannulas and masks, FiO2 only where the device sets it
    resp = fail_h[:, 0]
    stay_device = np.where(
        c["room_air_share"][s_h] < 0.35, NONE_DEV, np.where(c["room_air_share"][s_h] < 0.9, NASAL, FACE_TENT)
    )
    sick_device = np.array([HFNC, NRB, BIPAP])[rng.integers(0, 3, N)]
    device = np.where(
        vent,
        np.where(c["room_air_share"][s_h] < 0.1, TRACH, ETT_DEV),
        np.where(resp, sick_device, stay_device),
    )
    block = np.arange(N) - (hour % 4)  # the hour that starts each 4 h block (hours of a stay are contiguous)
    device = device[np.maximum(block, 0)]
    flow = np.select([device == NASAL, device == HFNC, device == NRB, device == FACE_TENT],
                     [rng.integers(1, 7, N), rng.integers(30, 61, N), 15, 10], 0).astype(np.float64)[np.maximum(block, 0)]  # fmt: skip
    fio2 = np.round(np.where(resp, rng.uniform(40, 90, N), rng.uniform(30, 50, N)) / 5) * 5
    fio2 = fio2[np.maximum(block, 0)]
    sets_fio2 = device >= HFNC
    fio2_breathed = np.where(sets_fio2, fio2, 21 + 4 * flow * (device == NASAL) + 20 * (device >= FACE_TENT))
    o2_time = charted & (hour % 4 == 1)
    chart(o2_time, 226732, np.nan, np.array([CODE[d] for d in DEVICES])[device], dt=60)
    chart(o2_time & (flow > 0), 223834, flow, dt=60)
    fraction = rng.random(N) < 0.03  # some FiO2 charted as a fraction
    chart(o2_time & sets_fio2, 223835, np.where(fraction, fio2 / 100, fio2), dt=60)
    vent_time = o2_time & vent
    mode = rng.integers(0, len(VENT_MODES), N)
    chart(vent_time, 223849, np.array([v for _, v in VENT_MODES])[mode], np.array([CODE[m] for m, _ in VENT_MODES])[mode], dt=90)  # fmt: skip
    chart(vent_time, 223848, 1.0, CODE["Drager"], dt=90)
    tidal = np.round(rng.normal(450, 50, N) / 10) * 10
    peep = np.round(np.where(resp, rng.uniform(8, 16, N), rng.uniform(5, 8, N)))
    for itemid, value in ((224684, tidal), (224685, np.round(tidal + rng.normal(0, 25, N))),
                          (224688, np.round(rng.uniform(12, 24, N))), (224690, np.round(rng.uniform(14, 28, N))),
                          (220339, peep), (224700, np.round(peep + rng.uniform(0, 2, N), 1)),
                          (224695, np.round(peep + rng.uniform(10, 25, N))), (224696, np.round(peep + rng.uniform(8, 18, N)))):  # fmt: skip
        chart(vent_time, itemid, value, dt=90)
    ch.add(np.arange(n), _minute(intime + rng.integers(600, 7200, n)), 226512, c["weight"], -1)
    daily = charted & (hour % 24 == 6)
    chart(daily, 224639, np.round(c["weight"][s_h] + rng.normal(0, 1.5, N), 1))
    used = sum(part.size for part in ch.parts["s"])
    rows_per_stay = np.maximum((CHART_ROWS_PER_STAY * scale * los_h / MEAN_LOS_H).astype(np.int64), 20)
    n_filler = max(int(rows_per_stay.sum()) - used, 0)
    f_stay = rng.choice(n, n_filler, p=rows_per_stay / rows_per_stay.sum())
    f_t = _minute(intime[f_stay] + (rng.random(n_filler) * (outtime - intime)[f_stay]).astype(np.int64))
    # documentation items are mostly text (no valuenum) or small counts, as in MIMIC-IV
    f_text = np.where(rng.random(n_filler) < 0.6, rng.integers(0, len(TEXT_VALUES), n_filler), -1)
    ch.add(f_stay, f_t, rng.choice(FILLER_CHART_IDS, n_filler), np.where(f_text >= 0, np.nan, rng.integers(0, 20, n_filler)), f_text)  # fmt: skip
    e = ch.get()
    order = np.lexsort((e["item"], e["t"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    rows = order.size
    num_text = _number_text(e["num"])
    text = _pick(CHART_TEXT, e["text"])
    tables["icu/chartevents"] = _frame(
        "icu/chartevents",
        rows,
        {
            "subject_id": subject[e["s"]],
            "hadm_id": hadm[e["s"]],
            "stay_id": stay[e["s"]],
            "caregiver_id": _caregiver(p["stay"][e["s"]], e["t"]),
            "charttime": e["t"],
            "storetime": e["t"] + 60 * np.where(rng.random(rows) < 0.6, 0, rng.integers(1, 45, rows)),
            "itemid": e["item"],
            "value": text.fill_null(num_text),
            "valuenum": e["num"],
            "valueuom": _lookup(pl.Series(e["item"]), CHART_UOM, pl.String),
            "warning": np.zeros(rows, np.int64),
        },
    )

    # --- labevents
    tables["hosp/labevents"] = _labs(rng, first_stay, p, c, disch, prior, prior_admit, prior_disch, prior_hadm,
                                     s_h, t_h, fail_h, art, fio2_breathed, scale)  # fmt: skip
    # --- inputevents, outputevents, procedureevents
    tables["icu/inputevents"] = _inputs(rng, p, c, outtime)
    tables["icu/outputevents"] = _outputs(rng, p, c, s_h, hour, t_h, charted, fail_h)
    tables["icu/procedureevents"] = _procedures(rng, p, c, outtime)
    # --- prescriptions and cultures
    tables["hosp/prescriptions"] = _prescriptions(rng, p, c, disch)
    tables["hosp/microbiologyevents"] = _cultures(rng, p, c)
    return tables


def _labs(rng, first_stay, p, c, disch, prior, prior_admit, prior_disch, prior_hadm, s_h, t_h, fail_h, art,
          fio2_breathed, scale) -> pl.DataFrame:  # fmt: skip
    """Panels (chemistry, blood count, coagulation, liver) in and around the stay, blood gases with their
    specimen type, labs of other visits, and filler tests; storetime after charttime."""
    n = p["stay"].size
    intime, outtime, admit = p["intime"], p["outtime"], p["admit"]
    idx = np.arange(n)
    sick = c["n_failing"] >= 2
    panels = Rows("s", "t", "hadm", "other")
    ed = idx[p["first_of_hadm"] & (rng.random(n) < 0.6)]
    panels.add(ed, admit[ed] - rng.integers(HOUR // 2, 2 * HOUR, ed.size), p["hadm"][ed], False)
    ward = idx[p["first_of_hadm"]]
    o, t = _span(rng, ward, admit[ward] + 12 * HOUR, intime[ward], 24)
    panels.add(o, t, p["hadm"][o], False)
    for mask, every in ((sick, 8), (~sick, 12)):
        o, t = _span(
            rng, idx[mask], intime[mask] + rng.integers(0, 2 * HOUR, mask.sum()), outtime[mask], every
        )
        panels.add(o, t, p["hadm"][o], False)
    after = idx[p["last_of_hadm"]]
    o, t = _span(
        rng, after, outtime[after] + 12 * HOUR, np.minimum(disch[after], outtime[after] + 5 * DAY), 24
    )
    panels.add(o, t, p["hadm"][o], False)
    outpatient = idx[rng.random(n) < 0.10]  # a visit without admission in the two days before (hadm_id empty)
    panels.add(outpatient, admit[outpatient] - rng.integers(2 * HOUR, 40 * HOUR, outpatient.size), -1, True)
    o, t = _span(rng, prior, prior_admit, prior_disch, 24)  # an earlier admission's labs
    hadm_of_prior = dict(zip(prior, prior_hadm, strict=True))
    panels.add(o, t, np.array([hadm_of_prior[i] for i in o], np.int64), True)
    panels.add(prior, prior_disch - rng.integers(HOUR, 6 * HOUR, prior.size), prior_hadm, True)
    pan = panels.get()
    n_pan = pan["s"].size
    lab = Rows("s", "t", "lag", "hadm", "item", "num", "text", "specimen")
    next_specimen = [first_stay * 200_000]

    def specimens(count):
        start = next_specimen[0]
        next_specimen[0] += count
        return start + np.arange(count)

    h_pan = (pan["t"] - intime[pan["s"]]) / HOUR
    fail_pan = _in_window(h_pan[:, None], c["d_start"][pan["s"]], c["d_end"][pan["s"]])
    other = pan["other"]
    override = {
        50912: np.where(fail_pan[:, 5], rng.normal(2.6, 0.9, n_pan).clip(1.3, 12), rng.normal(0.85, 0.15, n_pan).clip(0.4, 1.1)),
        50885: np.where(fail_pan[:, 2], rng.normal(3.5, 2.0, n_pan).clip(1.3, 30), rng.normal(0.6, 0.2, n_pan).clip(0.2, 1.1)),
        51265: np.where(fail_pan[:, 1], rng.normal(70, 30, n_pan).clip(10, 145), rng.normal(240, 60, n_pan).clip(155, 600)),
    }  # fmt: skip
    # another visit's labs are often abnormal (that is why the patient came): they must not count for this stay
    override[50912] = np.where(other, rng.normal(1.9, 0.6, n_pan).clip(0.5, 8), override[50912])
    override[50885] = np.where(other, rng.normal(1.6, 0.8, n_pan).clip(0.2, 8), override[50885])
    override[51265] = np.where(other, rng.normal(130, 50, n_pan).clip(10, 600), override[51265])
    for group, share, lag_min in ((CHEM, 1.0, 60), (CBC, 1.0, 35), (COAG, 0.5, 50), (LFT, 0.35, 80)):
        chosen = np.flatnonzero(rng.random(n_pan) < share)
        spec = specimens(chosen.size)
        lag = 60 * np.round(rng.lognormal(np.log(lag_min), 0.5, chosen.size)).astype(np.int64)
        for item in group:
            mean, sd = LABS[item][:2]
            value = override[item][chosen] if item in override else np.abs(rng.normal(mean, sd, chosen.size))
            lab.add(
                pan["s"][chosen],
                pan["t"][chosen],
                lag,
                pan["hadm"][chosen],
                item,
                np.round(value, 2),
                -1,
                spec,
            )

    # blood gases: every few hours on the ventilator, now and then with an arterial line, venous in the ED
    on_vent = _in_window((t_h - intime[s_h]) / HOUR, c["vent_start"][s_h], c["vent_end"][s_h])
    u = rng.random(s_h.size)
    drawn = (on_vent & (u < 0.2)) | (art & (u < 0.04)) | (u < 0.008)
    g_s, g_t = s_h[drawn], t_h[drawn] + 60 * rng.integers(0, 40, drawn.sum())
    g_art = art[drawn] & (rng.random(g_s.size) < 0.95)
    kind = np.where(g_art, 0, np.select([rng.random(g_s.size) < 0.85, rng.random(g_s.size) < 0.5], [1, 2], 3))
    pf = np.where(fail_h[drawn, 0], rng.uniform(80, 290, g_s.size), rng.uniform(410, 520, g_s.size))
    fio2_gas = fio2_breathed[drawn]
    vented_gas = on_vent[drawn]
    ed_gas = idx[p["first_of_hadm"] & (rng.random(n) < 0.2)]
    g_s = np.concatenate([g_s, ed_gas])
    g_t = np.concatenate([g_t, admit[ed_gas] - HOUR])
    kind = np.concatenate([kind, np.ones(ed_gas.size, np.int64)])
    pf = np.concatenate([pf, rng.uniform(300, 500, ed_gas.size)])
    fio2_gas = np.concatenate([fio2_gas, np.full(ed_gas.size, 21.0)])
    vented_gas = np.concatenate([vented_gas, np.zeros(ed_gas.size, bool)])
    n_gas = g_s.size
    arterial = kind == 0
    g_h = (g_t - intime[g_s]) / HOUR
    cv_now = _in_window(g_h, c["d_start"][g_s, 3], c["d_end"][g_s, 3])
    gas_values = {
        50820: rng.normal(7.40 - 0.08 * cv_now - 0.03 * ~arterial, 0.04),
        50821: np.where(arterial, pf * fio2_gas / 100, rng.normal(40, 6, n_gas).clip(15, 80)),
        50818: np.where(arterial, rng.normal(40, 5, n_gas), rng.normal(46, 5, n_gas)),
        50802: rng.normal(-1 - 5 * cv_now, 3),
        50804: rng.normal(24 - 4 * cv_now, 3),
        50813: np.maximum(rng.normal(1.2 + 2.5 * cv_now, 0.5), 0.3),
        50816: fio2_gas,
    }
    spec = specimens(n_gas)
    lag = 60 * np.round(rng.lognormal(np.log(12), 0.5, n_gas)).astype(np.int64)
    g_hadm = p["hadm"][g_s]
    for item in GAS_ALWAYS:
        if item == SPECIMEN_TYPE:
            lab.add(g_s, g_t, lag, g_hadm, item, np.nan, kind, spec)
        else:
            lab.add(g_s, g_t, lag, g_hadm, item, np.round(gas_values[item], 2), -1, spec)
    for item, share in (*GAS_SOMETIMES, (50816, 0.3)):
        chosen = np.flatnonzero((rng.random(n_gas) < share) & (vented_gas if item == 50816 else True))
        mean, sd = LABS[item][:2]
        value = gas_values[item][chosen] if item in gas_values else np.abs(rng.normal(mean, sd, chosen.size))
        lab.add(
            g_s[chosen], g_t[chosen], lag[chosen], g_hadm[chosen], item, np.round(value, 2), -1, spec[chosen]
        )

    used = sum(part.size for part in lab.parts["s"])
    span_h = (outtime - intime) / HOUR + 24
    lab_rows = (LAB_ROWS_PER_STAY * scale * span_h / (MEAN_LOS_H + 24)).astype(np.int64)
    n_filler = max(int(lab_rows.sum()) - used, 0)
    f_s = rng.choice(n, n_filler, p=lab_rows / lab_rows.sum())
    f_t = intime[f_s] - 24 * HOUR + (rng.random(n_filler) * span_h[f_s] * HOUR).astype(np.int64)
    lab.add(f_s, f_t, 60 * rng.integers(20, 240, n_filler), p["hadm"][f_s], rng.choice(FILLER_LAB_IDS, n_filler),
            np.round(rng.gamma(2.0, 5.0, n_filler), 1), -1, specimens(n_filler))  # fmt: skip
    e = lab.get()
    e["t"] = _minute(e["t"])
    order = np.lexsort((e["item"], e["specimen"], e["t"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    rows = order.size
    items = pl.Series(e["item"])
    info = {item: LABS.get(item, (0, 0, None, None, None)) for item in np.unique(e["item"]).tolist()}
    low = _lookup(items, {k: v[3] for k, v in info.items()}, pl.Float64)
    high = _lookup(items, {k: v[4] for k, v in info.items()}, pl.Float64)
    num = pl.Series(e["num"]).fill_nan(None)
    flag = pl.select(pl.when((num < low) | (num > high)).then(pl.lit("abnormal"))).to_series()
    is_gas = np.isin(e["item"], [*GAS_ALWAYS, *(i for i, _ in GAS_SOMETIMES), 50816])
    priority = np.where(
        is_gas, -1, np.where(rng.random(rows) < 0.6, 0, np.where(rng.random(rows) < 0.8, 1, -1))
    )
    return _frame(
        "hosp/labevents",
        rows,
        {
            "labevent_id": first_stay * 200_000 + np.arange(rows),
            "subject_id": p["subject"][e["s"]],
            "hadm_id": pl.Series(e["hadm"]).replace(-1, None),
            "specimen_id": e["specimen"],
            "itemid": e["item"],
            "charttime": e["t"],
            "storetime": e["t"] + e["lag"],
            "value": _pick(SPECIMENS, e["text"]).fill_null(_number_text(e["num"])),
            "valuenum": e["num"],
            "valueuom": items.replace_strict(
                {k: v[2] for k, v in info.items()}, default=None, return_dtype=pl.String
            ),
            "ref_range_lower": low,
            "ref_range_upper": high,
            "flag": flag,
            "priority": _pick(("STAT", "ROUTINE"), priority),
        },
    )


def _segments(rng, owner: np.ndarray, start: np.ndarray, end: np.ndarray, every_h: float):
    """Split intervals into consecutive pieces of about `every_h` hours -> (owner index, start, end, last)."""
    count = np.maximum(np.round((end - start) / (every_h * HOUR)).astype(np.int64), 1)
    idx = np.repeat(np.arange(owner.size), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    length = (end - start)[idx] / count[idx]
    seg_start = _minute(start[idx] + (k * length).astype(np.int64))
    seg_end = _minute(start[idx] + ((k + 1) * length).astype(np.int64))
    return owner[idx], seg_start, np.maximum(seg_end, seg_start + 60), k == count[idx] - 1


def _inputs(rng, p, c, outtime) -> pl.DataFrame:
    n = p["stay"].size
    intime, los_h = p["intime"], p["los_h"]
    idx = np.arange(n)
    weight = c["weight"]
    rows = Rows(
        "s",
        "start",
        "end",
        "item",
        "amount",
        "amountuom",
        "rate",
        "rateuom",
        "kind",
        "status",
        "total",
        "order",
    )
    order_counter = [0]

    def orders(count):
        order_counter[0] += count
        return np.arange(order_counter[0] - count, order_counter[0])

    def infusion(stays, start, end, every_h, items, rate, unit_of_rate, kind, total):
        """Infusion orders split at rate changes; rate (per piece) is a function of the piece's owner."""
        order = orders(stays.size)
        o_idx, s0, s1, last = _segments(rng, np.arange(stays.size), start, end, every_h)
        s = stays[o_idx]
        r = rate(o_idx, s)
        hours = (s1 - s0) / HOUR
        item = items[o_idx]
        if unit_of_rate == "mL/hour":
            amount, amount_uom = r * hours, "ml"
        else:
            per_kg = np.array([VASO_UNITS.get(int(i), "") == "mcg/kg/min" for i in item])
            amount = np.where(per_kg, r * weight[s] * hours * 60 / 1000, r * hours)
            amount_uom = np.where(per_kg, "mg", "units")
        paused = (rng.random(s.size) < 0.03) & ~last
        status = np.where(last, np.where(rng.random(s.size) < 0.8, 0, 2), np.where(paused, 3, 1))
        rate_uom = (
            np.array([VASO_UNITS.get(int(i), unit_of_rate) for i in item])
            if unit_of_rate != "mL/hour"
            else unit_of_rate
        )
        rows.add(s, s0, s1, item, np.round(amount, 4), amount_uom, np.round(r, 4), rate_uom, KINDS.index(kind),
                 status, total, order[o_idx])  # fmt: skip

    def single(stays, start, minutes, item, amount, amount_uom, kind, total, rate=np.nan, rate_uom=""):
        end = start + 60 * np.asarray(minutes, np.int64)
        rows.add(stays, _minute(start), _minute(end), item, amount, amount_uom, rate, rate_uom, KINDS.index(kind), 0,
                 total, orders(stays.size))  # fmt: skip

    # maintenance crystalloid, split every few hours at rate changes
    mt = idx[rng.random(n) < 0.7]
    mt_start = intime[mt] + rng.integers(0, 6 * HOUR, mt.size)
    mt_end = np.minimum(mt_start + (rng.uniform(12, 72, mt.size) * HOUR).astype(np.int64), outtime[mt])
    ok = mt_end > mt_start + HOUR
    mt_items = np.array([225158, 225828, 225823])[rng.integers(0, 3, mt.size)]
    infusion(mt[ok], mt_start[ok], mt_end[ok], 4.0, mt_items[ok], lambda o, s: rng.uniform(50, 150, o.size),
             "mL/hour", "crystalloid", 1000.0)  # fmt: skip
    # boluses, more when the circulation fails
    cv_fail = c["failing"][:, 3]
    n_bolus = rng.poisson(los_h / 24 * (0.5 + 2 * cv_fail))
    b = np.repeat(idx, n_bolus)
    b_start = intime[b] + (rng.random(b.size) * (outtime - intime)[b] * 0.9).astype(np.int64)
    b_amount = rng.choice([250.0, 500.0, 1000.0], b.size)
    single(b, b_start, rng.integers(15, 60, b.size), np.array([225158, 225828])[rng.integers(0, 2, b.size)], b_amount,
           "ml", "bolus", b_amount)  # fmt: skip
    # antibiotic carriers every 8 h from the first antibiotic on
    inf = idx[c["infected"]]
    o, t = _span(
        rng,
        inf,
        np.maximum(intime[inf], intime[inf] + (c["abx0_h"][inf] * HOUR).astype(np.int64)),
        outtime[inf],
        8,
    )
    single(o, t, 30, np.array(FLUID_CARRIERS)[rng.integers(0, 2, o.size)], rng.choice([50.0, 100.0], o.size), "ml",
           "abx", 100.0)  # fmt: skip
    # albumin, blood products
    alb = idx[cv_fail & (rng.random(n) < 0.3)]
    alb_item = np.array([220862, 220864])[rng.integers(0, 2, alb.size)]
    single(alb, intime[alb] + (rng.random(alb.size) * (outtime - intime)[alb] * 0.8).astype(np.int64), 30, alb_item,
           np.where(alb_item == 220862, 100.0, 500.0), "ml", "colloid", np.where(alb_item == 220862, 100.0, 500.0))  # fmt: skip
    for item, share, volume in ((225168, 0.15, 350.0), (220970, 0.05, 300.0)):
        bp = idx[rng.random(n) < share]
        single(bp, intime[bp] + (rng.random(bp.size) * (outtime - intime)[bp] * 0.8).astype(np.int64), 120, item,
               volume, "ml", "blood", volume)  # fmt: skip
    # sodium bicarbonate (mEq; amps in mL) for acidosis, mannitol (grams) for raised intracranial pressure
    bic = idx[c["acidotic"]]
    bic_start = intime[bic] + (rng.random(bic.size) * (outtime - intime)[bic] * 0.5).astype(np.int64)
    single(bic, bic_start, rng.integers(240, 600, bic.size), 220995, np.round(rng.uniform(50, 150, bic.size), 2),
           "mEq", "crystalloid", 1000.0)  # fmt: skip
    amp = bic[rng.random(bic.size) < 0.5]
    single(amp, intime[amp] + HOUR, 1, 227533, 50.0, "ml", "medbolus", 50.0)
    man = np.repeat(idx[c["mannitol"]], rng.integers(1, 5, c["mannitol"].sum()))
    man_amount = rng.choice([25.0, 50.0], man.size)
    single(man, intime[man] + (rng.random(man.size) * (outtime - intime)[man] * 0.8).astype(np.int64), 16, 227531,
           man_amount, "grams", "drip", 250.0, man_amount / 16, "grams/min")  # fmt: skip
    # vasopressors while the circulation fails: norepinephrine, sometimes a second agent, rarely dobutamine
    vp = idx[cv_fail & (rng.random(n) < 0.8)]
    vp_start = intime[vp] + (
        np.clip(c["d_start"][vp, 3] + rng.uniform(0, 2, vp.size), 0, None) * HOUR
    ).astype(np.int64)
    vp_end = np.minimum(intime[vp] + (c["d_end"][vp, 3] * HOUR).astype(np.int64), outtime[vp])
    ok = vp_end > vp_start + 1800
    vp, vp_start, vp_end = vp[ok], vp_start[ok], vp_end[ok]
    level = rng.uniform(0.03, 0.3, vp.size) * (0.5 + c["severity"][vp])
    infusion(vp, vp_start, vp_end, 2.0, np.full(vp.size, 221906),
             lambda o, s: np.round(level[o] * np.exp(rng.normal(0, 0.3, o.size)), 3), "mcg/kg/min", "drip", 250.0)  # fmt: skip
    second = rng.random(vp.size) < 0.35
    agent = np.array([222315, 221749, 221289, 221662])[rng.integers(0, 4, vp.size)]
    typical = {
        222315: (1.2, 3.6),
        221749: (0.5, 3.0),
        221289: (0.02, 0.2),
        221662: (3.0, 15.0),
        221653: (2.5, 10.0),
    }
    lo = np.array([typical[int(a)][0] for a in agent])
    hi = np.array([typical[int(a)][1] for a in agent])
    sv = np.flatnonzero(second)
    infusion(vp[sv], vp_start[sv] + HOUR, vp_end[sv], 3.0, agent[sv],
             lambda o, s: np.round(rng.uniform(lo[sv][o], hi[sv][o]), 3), "mcg/kg/min", "drip", 100.0)  # fmt: skip
    dob = idx[cv_fail & (rng.random(n) < 0.05)]
    infusion(dob, intime[dob] + HOUR, np.maximum(outtime[dob] - HOUR, intime[dob] + 2 * HOUR), 4.0,
             np.full(dob.size, 221653), lambda o, s: rng.uniform(2.5, 10.0, o.size), "mcg/kg/min", "drip", 250.0)  # fmt: skip
    # other drips (sedation, insulin, heparin): not read by the pipeline, there for the volume (~115 rows per stay)
    used = sum(part.size for part in rows.parts["s"])
    target = int((115 * los_h / MEAN_LOS_H).sum())
    extra = max(target - used, 0) // 3
    od = rng.choice(n, extra, p=los_h / los_h.sum())
    od_start = intime[od] + (rng.random(extra) * (outtime - intime)[od] * 0.8).astype(np.int64)
    which = rng.integers(0, len(OTHER_DRIPS), extra)
    for k, (item, amount_uom, rate_uom, typical_rate) in enumerate(OTHER_DRIPS):
        sel = np.flatnonzero(which == k)
        seg = _segments(rng, np.arange(sel.size), od_start[sel], od_start[sel] + 8 * HOUR, 3.0)
        r = np.round(typical_rate * rng.uniform(0.5, 1.5, seg[0].size), 2)
        hours = (seg[2] - seg[1]) / HOUR
        status = np.where(seg[3], 0, 1)
        rows.add(od[sel][seg[0]], seg[1], seg[2], item, np.round(r * hours, 2), amount_uom, r, rate_uom,
                 KINDS.index("drip"), status, 250.0, orders(sel.size)[seg[0]])  # fmt: skip
    e = rows.get()
    order = np.lexsort((e["item"], e["start"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    size = order.size
    s = e["s"]
    kind = e["kind"]
    amount = e["amount"].astype(np.float64)
    return _frame(
        "icu/inputevents",
        size,
        {
            "subject_id": p["subject"][s],
            "hadm_id": p["hadm"][s],
            "stay_id": p["stay"][s],
            "caregiver_id": _caregiver(p["stay"][s], e["start"]),
            "starttime": e["start"],
            "endtime": e["end"],
            "storetime": e["end"] + 60 * rng.integers(-30, 60, size),
            "itemid": e["item"],
            "amount": amount,
            "amountuom": e["amountuom"],
            "rate": e["rate"].astype(np.float64),
            "rateuom": pl.Series(e["rateuom"]).replace("", None),
            "orderid": 1_000_000 + p["stay"][s] * 1000 % 9_000_000 + np.arange(size),
            "linkorderid": 1_000_000 + p["stay"][s] * 1000 % 9_000_000 + e["order"],
            "ordercategoryname": _pick(tuple(v[0] for v in ORDER_KIND.values()), kind),
            "secondaryordercategoryname": _pick(tuple(v[1] or "" for v in ORDER_KIND.values()), kind).replace(
                "", None
            ),
            "ordercomponenttypedescription": _pick(tuple(v[2] for v in ORDER_KIND.values()), kind),
            "ordercategorydescription": _pick(tuple(v[3] for v in ORDER_KIND.values()), kind),
            "patientweight": c["weight"][s],
            "totalamount": e["total"].astype(np.float64),
            "totalamountuom": "ml",
            "isopenbag": (kind == KINDS.index("drip")).astype(np.int64),
            "continueinnextdept": np.zeros(size, np.int64),
            "statusdescription": _pick(STATUSES, e["status"]),
            "originalamount": amount,
            "originalrate": np.where(
                np.isnan(e["rate"].astype(np.float64)), amount, e["rate"].astype(np.float64)
            ),
        },
    )


def _outputs(rng, p, c, s_h, hour, t_h, charted, fail_h) -> pl.DataFrame:
    N = s_h.size
    rows = Rows("s", "t", "item", "value")
    foley = c["foley"][s_h]
    renal = fail_h[:, 5]
    urine = np.where(renal, rng.uniform(5, 25, N), rng.uniform(30, 150, N))
    measured = charted & (rng.random(N) > 0.08)
    hourly = measured & foley
    rows.add(s_h[hourly], t_h[hourly], URINE_FOLEY, np.round(urine[hourly]))
    void = measured & ~foley & (hour % 4 == 0)
    rows.add(s_h[void], t_h[void], URINE_VOID, np.round(urine[void] * 4))
    irrigated = hourly & (np.isin(s_h, np.flatnonzero(rng.random(p["stay"].size) < 0.03)))
    irrigant = np.round(rng.uniform(200, 400, N))
    rows.add(s_h[irrigated], t_h[irrigated], GU_IRRIGANT_IN, irrigant[irrigated])
    rows.add(
        s_h[irrigated], t_h[irrigated], GU_IRRIGANT_OUT, irrigant[irrigated] + np.round(urine[irrigated])
    )
    for item, every, share, mean in OTHER_OUTPUTS:
        has = np.isin(s_h, np.flatnonzero(rng.random(p["stay"].size) < share)) & charted & (hour % every == 1)
        rows.add(s_h[has], t_h[has], item, np.round(rng.exponential(mean, has.sum())))
    e = rows.get()
    order = np.lexsort((e["item"], e["t"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    size = order.size
    return _frame(
        "icu/outputevents",
        size,
        {
            "subject_id": p["subject"][e["s"]],
            "hadm_id": p["hadm"][e["s"]],
            "stay_id": p["stay"][e["s"]],
            "caregiver_id": _caregiver(p["stay"][e["s"]], e["t"]),
            "charttime": e["t"],
            "storetime": e["t"] + 60 * rng.integers(-20, 40, size),
            "itemid": e["item"],
            "value": e["value"].astype(np.int64),
            "valueuom": "ml",
        },
    )


def _procedures(rng, p, c, outtime) -> pl.DataFrame:
    n = p["stay"].size
    intime = p["intime"]
    idx = np.arange(n)
    rows = Rows("s", "start", "end", "item", "category", "task")
    vented = idx[(c["vent_start"] < c["vent_end"]) & c["vent_recorded"]]
    rows.add(vented, intime[vented] + (c["vent_start"][vented] * HOUR).astype(np.int64),
             intime[vented] + (c["vent_end"][vented] * HOUR).astype(np.int64), INVASIVE_VENT, "Ventilation", False)  # fmt: skip
    niv = idx[rng.random(n) < 0.05]
    rows.add(niv, intime[niv] + HOUR, intime[niv] + HOUR + rng.integers(2 * HOUR, 12 * HOUR, niv.size),
             NONINVASIVE_VENT, "Ventilation", False)  # fmt: skip
    pivc = idx[rng.random(n) < 0.8]
    rows.add(
        pivc,
        intime[pivc] - rng.integers(0, 12 * HOUR, pivc.size),
        outtime[pivc],
        224275,
        "Peripheral Lines",
        False,
    )
    cvc = idx[c["central"]]
    rows.add(cvc, intime[cvc] + HOUR, outtime[cvc], 224263, "Invasive Lines", False)
    al = idx[c["art"]]
    rows.add(al, intime[al] + (c["art_start"][al] * HOUR).astype(np.int64),
             intime[al] + (np.maximum(c["art_end"][al], c["art_start"][al] + 1) * HOUR).astype(np.int64), 225752,
             "Arterial Line", False)  # fmt: skip
    imaging = idx[rng.random(n) < 0.5]
    o, t = _span(rng, imaging, intime[imaging], outtime[imaging], 24)
    rows.add(o, t, t, 225459, "Imaging", True)
    e = rows.get()
    e["start"], e["end"] = _minute(e["start"]), _minute(np.maximum(e["end"], e["start"]))
    order = np.lexsort((e["item"], e["start"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    size = order.size
    minutes = ((e["end"] - e["start"]) // 60).astype(np.float64)
    task = e["task"].astype(bool)
    return _frame(
        "icu/procedureevents",
        size,
        {
            "subject_id": p["subject"][e["s"]],
            "hadm_id": p["hadm"][e["s"]],
            "stay_id": p["stay"][e["s"]],
            "caregiver_id": _caregiver(p["stay"][e["s"]], e["start"]),
            "starttime": e["start"],
            "endtime": e["end"],
            "storetime": e["end"] + 60 * rng.integers(0, 120, size),
            "itemid": e["item"],
            "value": np.where(task, 1.0, minutes),
            "valueuom": np.where(task, "None", "min"),
            "orderid": 2_000_000 + np.arange(size) + p["stay"][0] % 1_000_000 * 50,
            "linkorderid": 2_000_000 + np.arange(size) + p["stay"][0] % 1_000_000 * 50,
            "ordercategoryname": e["category"],
            "ordercategorydescription": np.where(task, "Task", "ContinuousProcess"),
            "patientweight": c["weight"][e["s"]],
            "isopenbag": np.where(task, 0, 1),
            "continueinnextdept": np.zeros(size, np.int64),
            "statusdescription": "FinishedRunning",
            "ORIGINALAMOUNT": np.where(task, 1.0, minutes),
            "ORIGINALRATE": np.where(task, 0, 1),
        },
    )


def _prescriptions(rng, p, c, disch) -> pl.DataFrame:
    """Antibiotic orders (several per infected stay, the first often before the ICU), prophylaxis, eye and skin
    antibiotics, diluents (drug_type BASE) and other drugs."""
    n = p["stay"].size
    intime = p["intime"]
    idx = np.arange(n)
    rows = Rows("s", "start", "drug", "base")
    inf = idx[c["infected"]]
    n_abx = rng.integers(2, 7, inf.size)
    a = np.repeat(inf, n_abx)
    first = intime[a] + (c["abx0_h"][a] * HOUR).astype(np.int64)
    k = np.arange(a.size) - np.repeat(np.cumsum(n_abx) - n_abx, n_abx)
    a_start = first + np.where(k == 0, 0, rng.integers(0, 96 * HOUR, a.size))
    a_drug = rng.integers(0, len(ANTIBIOTIC_ORDERS), a.size)
    rows.add(a, a_start, a_drug, False)
    diluted = rng.random(a.size) < 0.5
    rows.add(a[diluted], a_start[diluted], rng.integers(0, len(BASE_DRUGS), diluted.sum()), True)
    pro = idx[~c["infected"] & (rng.random(n) < 0.3)]
    doses = rng.integers(1, 4, pro.size)
    pr = np.repeat(pro, doses)
    kk = np.arange(pr.size) - np.repeat(np.cumsum(doses) - doses, doses)
    rows.add(pr, intime[pr] - rng.integers(0, 6 * HOUR, pr.size) + kk * 8 * HOUR, -1, False)
    eye = idx[rng.random(n) < 0.08]
    rows.add(eye, intime[eye] + (rng.random(eye.size) * (p["outtime"] - intime)[eye]).astype(np.int64),
             -2 - rng.integers(0, len(NOT_SYSTEMIC), eye.size), False)  # fmt: skip
    o = np.repeat(idx, 10)
    rows.add(
        o,
        p["admit"][o] + rng.integers(0, 48 * HOUR, o.size),
        100 + rng.integers(0, len(OTHER_DRUGS), o.size),
        False,
    )
    e = rows.get()
    order = np.lexsort((e["drug"], e["start"], e["s"]))
    e = {k: v[order] for k, v in e.items()}
    size = order.size
    drug, base = e["drug"], e["base"].astype(bool)

    def field(position, other_value):
        out = []
        for d_i, b_i in zip(drug.tolist(), base.tolist(), strict=True):
            if b_i:
                out.append(BASE_DRUGS[d_i] if position == 0 else other_value)
            elif d_i >= 100:
                out.append(OTHER_DRUGS[d_i - 100] if position == 0 else other_value)
            elif d_i == -1:
                out.append(PROPHYLAXIS[position])
            elif d_i <= -2:
                row = NOT_SYSTEMIC[-2 - d_i]
                out.append(row[position] if position < len(row) else other_value)
            else:
                out.append(ANTIBIOTIC_ORDERS[d_i][position])
        return out

    start = _minute(e["start"])
    start_missing = (drug >= 100) & (rng.random(size) < 0.003)
    subject = p["subject"][e["s"]]
    seq = np.arange(size) % 5000
    return _frame(
        "hosp/prescriptions",
        size,
        {
            "subject_id": subject,
            "hadm_id": p["hadm"][e["s"]],
            "pharmacy_id": 50_000_000 + p["stay"][e["s"]] % 1_000_000 * 100 + np.arange(size) % 100,
            "poe_id": pl.Series(subject.astype(str)) + "-" + pl.Series(seq.astype(str)),
            "poe_seq": seq,
            "starttime": np.where(start_missing, -1, start),
            "stoptime": np.where(start_missing, -1, start + rng.integers(DAY, 7 * DAY, size)),
            "drug_type": np.where(base, "BASE", "MAIN"),
            "drug": field(0, None),
            "formulary_drug_cd": field(1, "NACLFLUSH"),
            "gsn": field(2, None),
            "ndc": rng.integers(0, 99_999_999_999, size),
            "prod_strength": field(4, None),
            "dose_val_rx": field(5, "1-2"),
            "dose_unit_rx": field(6, "mg"),
            "form_val_disp": np.where(rng.random(size) < 0.1, "0.5-1", "1"),
            "form_unit_disp": "VIAL",
            "doses_per_24_hrs": pl.Series(field(7, 1), dtype=pl.Int64),
            "route": field(3, "IV"),
        },
    )


def _cultures(rng, p, c) -> pl.DataFrame:
    """Cultures around the first antibiotic of infected stays (a fifth after it, a few days before it), more
    cultures later, screening swabs in others; some date-only; positive ones with organism and
    susceptibility rows."""
    n = p["stay"].size
    intime = p["intime"]
    idx = np.arange(n)
    inf = idx[c["infected"]]
    n_spec = rng.integers(1, 5, inf.size)
    s = np.repeat(inf, n_spec)
    k = np.arange(s.size) - np.repeat(np.cumsum(n_spec) - n_spec, n_spec)
    abx = intime[s] + (c["abx0_h"][s] * HOUR).astype(np.int64)
    u = rng.random(s.size)
    first_time = np.where(u < 0.75, abx - rng.integers(0, 24 * HOUR, s.size),
                          np.where(u < 0.95, abx + rng.integers(0, 24 * HOUR, s.size), abx - rng.integers(80 * HOUR, 120 * HOUR, s.size)))  # fmt: skip
    t = np.where(k == 0, first_time, abx + rng.integers(-24 * HOUR, 72 * HOUR, s.size))
    spec_kind = np.where(k == 0, 0, rng.choice([0, 1, 2], s.size, p=[0.5, 0.3, 0.2]))
    screen = idx[~c["infected"] & (rng.random(n) < 0.4)]
    urine = idx[~c["infected"] & (rng.random(n) < 0.1)]
    s = np.concatenate([s, screen, urine])
    t = np.concatenate([t, intime[screen] + rng.integers(0, 4 * HOUR, screen.size),
                        intime[urine] + (rng.random(urine.size) * (p["outtime"] - intime)[urine]).astype(np.int64)])  # fmt: skip
    spec_kind = np.concatenate([spec_kind, np.full(screen.size, 3), np.full(urine.size, 1)])
    positive = c["infected"][s] & (spec_kind < 3) & (rng.random(s.size) < 0.3)
    specimen = 40_000_000 + p["stay"][s] % 10_000_000 * 10 + np.arange(s.size) % 10
    # rows: one result row per specimen; a positive one adds its organism with three susceptibilities
    per = np.where(positive, 1 + len(SUSCEPTIBILITY), 1)
    r_spec = np.repeat(np.arange(s.size), per)
    r_k = np.arange(r_spec.size) - np.repeat(np.cumsum(per) - per, per)
    r_org = np.where(positive[r_spec], rng.integers(0, len(ORGANISMS), s.size)[r_spec], -1)
    with_ab = r_k >= 1
    ab = np.where(with_ab, r_k - 1, -1)
    date_only = (rng.random(s.size) < 0.07)[r_spec]
    t_r = _minute(t[r_spec])
    day = t_r - t_r % DAY
    size = r_spec.size
    hadm = np.where(rng.random(s.size) < 0.05, -1, p["hadm"][s])[r_spec]
    org_code = np.where(r_org >= 0, r_org, 0)
    return _frame(
        "hosp/microbiologyevents",
        size,
        {
            "microevent_id": p["stay"][0] % 10_000_000 * 100 + np.arange(size),
            "subject_id": p["subject"][s][r_spec],
            "hadm_id": pl.Series(hadm).replace(-1, None),
            "micro_specimen_id": specimen[r_spec],
            "chartdate": day,
            "charttime": np.where(date_only, -1, t_r),
            "spec_itemid": np.array([x[1] for x in CULTURES])[spec_kind[r_spec]],
            "spec_type_desc": _pick(tuple(x[0] for x in CULTURES), spec_kind[r_spec]),
            "test_seq": np.ones(size, np.int64),
            "storedate": day + 2 * DAY,
            "storetime": t_r + 2 * DAY + 60 * rng.integers(0, 600, size),
            "test_itemid": np.array([x[2] for x in CULTURES])[spec_kind[r_spec]],
            "test_name": _pick(tuple(x[3] for x in CULTURES), spec_kind[r_spec]),
            "org_itemid": pl.Series(
                np.where(r_org >= 0, np.array([o[0] for o in ORGANISMS])[org_code], -1)
            ).replace(-1, None),
            "org_name": _pick(tuple(o[1] for o in ORGANISMS), r_org),
            "isolate_num": pl.Series(np.where(r_org >= 0, 1, -1)).replace(-1, None),
            "ab_itemid": pl.Series(
                np.where(ab >= 0, np.array([x[0] for x in SUSCEPTIBILITY])[np.maximum(ab, 0)], -1)
            ).replace(-1, None),
            "ab_name": _pick(tuple(x[1] for x in SUSCEPTIBILITY), ab),
            "dilution_text": _pick(tuple(x[2] for x in SUSCEPTIBILITY), ab),
            "dilution_comparison": _pick(tuple(x[3] for x in SUSCEPTIBILITY), ab),
            "dilution_value": np.where(ab >= 0, 1.0, np.nan),
            "interpretation": _pick(
                ("S", "R"), np.where(ab >= 0, (rng.random(size) < 0.2).astype(np.int64), -1)
            ),
        },
    )


def generate(args: SynthArgs) -> dict[str, int]:
    """Write the tables chunk by chunk (bounded memory); returns row counts per table."""
    if args.stays < 1:
        raise ValueError(f"--stays {args.stays}: expected at least 1")
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    counts: dict[str, int] = {}
    chunk = 500
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        writers: dict[str, TableWriter] = {}
        for first in range(0, args.stays, chunk):
            n = min(chunk, args.stays - first)
            tables = _chunk(np.random.default_rng(rng.integers(2**63)), first, n, args.chart_scale)
            for key, frame in tables.items():
                if key not in writers:
                    writers[key] = TableWriter(tmp, key, args.format)
                writers[key].write(frame)
                counts[key] = counts.get(key, 0) + frame.height
            if not args.quiet:
                done = first + n
                print(
                    f"[synth {time.perf_counter() - start:7.1f}s] {done}/{args.stays} stays, "
                    f"{counts['icu/chartevents']:,} chartevents rows",
                    file=sys.stderr,
                    flush=True,
                )
        for writer in writers.values():
            writer.close()
    return counts
