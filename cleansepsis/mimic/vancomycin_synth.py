"""Small MIMIC-IV-shaped tables of IV vancomycin courses, for tests and examples of `data_prep.py vancomycin`.

Only the tables and columns that pipeline reads (cleansepsis/mimic/vancomycin.py SCHEMAS), written with the
synthetic generator's table writer, so they go through the real file readers. Deterministic by seed.
Nothing here is real patient data. What each stay gets:
- a weight-based course: 25 mg/kg loading, then 15 mg/kg every 8, 12 or 24 h by Cockcroft-Gault clearance
  (250 mg steps), the first dose sometimes charted up to 3 h before ICU admission; each dose an inputevents
  225798 row of "1 dose"; some stays also get oral vancomycin rows ("09-Antibiotics (Non IV)") and a
  "Rewritten" duplicate, which the pipeline must ignore;
- the mg dose in prescriptions (a loading and a maintenance order) and, for most admissions, in eMAR
  (an "Administered" row within minutes of each dose, its emar_detail repeating the dose; some "Not Given");
- levels (labevents 51009, ug/mL) from a one-compartment model with Goti 2018 typical values, drawn before
  some doses and at random times, stored 1-3 h later; no levels at all in some stays;
- daily creatinine (50912, mg/dL) that rises after a level above 25 mg/L; charted weight (226512) an hour
  after admission; dialysis patients get hemodialysis output charted and a hemodialysis procedure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from cleansepsis.io import atomic_dir
from cleansepsis.mimic.synth import write_tables
from cleansepsis.mimic.vancomycin import SCHEMAS

BASE = datetime(2150, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class VancomycinSynthArgs:
    """Write small synthetic MIMIC-IV-shaped tables of IV vancomycin courses."""

    out: Path
    """Output folder; gets hosp/ and icu/ subfolders in the MIMIC-IV layout."""
    stays: int = 60
    """Number of ICU stays (every fifth patient has two)."""
    seed: int = 0
    """Random seed; the same seed gives the same files."""
    format: Literal["csv.gz", "csv", "parquet"] = "csv.gz"
    """File format of the tables."""
    overwrite: bool = False
    """Replace the output folder if it exists."""


def _round_dose(mg: float, cap: float) -> float:
    return float(min(max(250.0 * round(mg / 250.0), 250.0), cap))


def _crcl(age: float, weight: float, female: bool, creatinine: float) -> float:
    scr = max(creatinine, 1.0) if age > 60 else creatinine
    return float(np.clip((140 - age) * weight / (72 * scr) * (0.85 if female else 1.0), 1.0, 150.0))


def make_tables(n_stays: int, seed: int = 0) -> dict[str, pl.DataFrame]:
    """The tables as frames (columns of the pipeline's SCHEMAS)."""
    if n_stays < 1:
        raise ValueError(f"--stays {n_stays}: expected at least 1")
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {key: [] for key in SCHEMAS}
    subject = 10_000
    emar_seq = 0
    for i in range(n_stays):
        if i % 5 != 1:  # every fifth patient comes back for a second stay
            subject += 1
            age = int(rng.integers(25, 90))
            female = bool(rng.random() < 0.42)
            weight = float(np.clip(80 * np.exp(0.25 * rng.normal()), 45, 180))
            baseline = float(np.clip(np.exp(0.4 * rng.normal()), 0.5, 5.0))
            dialysis = bool(rng.random() < 0.1)
            rows["hosp/patients"].append(
                {"subject_id": subject, "gender": "F" if female else "M", "anchor_age": age, "anchor_year": 2150,
                 "dod": None}
            )  # fmt: skip
        hadm, stay = 20_000 + i, 30_000 + i
        intime = BASE + timedelta(days=40 * i, hours=float(rng.uniform(0, 24)))
        outtime = intime + timedelta(hours=float(rng.uniform(36, 200)))
        died = bool(rng.random() < 0.1)
        rows["hosp/admissions"].append(
            {"subject_id": subject, "hadm_id": hadm, "admittime": intime - timedelta(hours=20),
             "dischtime": outtime + timedelta(days=3), "deathtime": outtime if died else None}
        )  # fmt: skip
        rows["icu/icustays"].append(
            {"subject_id": subject, "hadm_id": hadm, "stay_id": stay, "intime": intime, "outtime": outtime}
        )
        # the course
        crcl = _crcl(age, weight, female, baseline)
        every = 24.0 if (dialysis or crcl < 50) else (12.0 if crcl < 90 else 8.0)
        loading = _round_dose(25 * weight, 3000)
        maintenance = _round_dose(15 * weight * (0.5 if dialysis else 1.0), 2000)
        first = intime + timedelta(hours=float(rng.uniform(-3, 10)))
        stop = min(first + timedelta(hours=float(rng.uniform(30, 150))), outtime)
        times, doses = [], []
        t = first
        while t <= stop:
            times.append(t + timedelta(minutes=float(rng.uniform(-40, 40)) if times else 0.0))
            doses.append(loading if not doses else maintenance)
            t = first + timedelta(hours=every * len(times))
        with_emar = rng.random() < 0.7
        rx_loading, rx_maintenance = 70_000 + 2 * i, 70_001 + 2 * i
        rows["hosp/prescriptions"].append(
            {"subject_id": subject, "hadm_id": hadm, "pharmacy_id": rx_loading, "starttime": first - timedelta(minutes=30),
             "stoptime": first + timedelta(hours=1), "drug_type": "MAIN", "drug": "Vancomycin", "route": "IV",
             "dose_val_rx": f"{loading:g}", "dose_unit_rx": "mg"}
        )  # fmt: skip
        if len(times) > 1:
            rows["hosp/prescriptions"].append(
                {"subject_id": subject, "hadm_id": hadm, "pharmacy_id": rx_maintenance,
                 "starttime": times[1] - timedelta(hours=1), "stoptime": times[-1] + timedelta(hours=2),
                 "drug_type": "MAIN", "drug": "Vancomycin", "route": "IV", "dose_val_rx": f"{maintenance:g}",
                 "dose_unit_rx": "mg"}
            )  # fmt: skip
        for n, (when, mg) in enumerate(zip(times, doses, strict=True)):
            rows["icu/inputevents"].append(
                {"stay_id": stay, "starttime": when, "itemid": 225798, "amount": 1.0, "amountuom": "dose",
                 "ordercategoryname": "08-Antibiotics (IV)", "patientweight": weight,
                 "statusdescription": "FinishedRunning"}
            )  # fmt: skip
            if with_emar:
                emar_seq += 1
                emar_id = f"{subject}-{emar_seq}"
                rows["hosp/emar"].append(
                    {"subject_id": subject, "hadm_id": hadm, "emar_id": emar_id,
                     "pharmacy_id": rx_loading if n == 0 else rx_maintenance,
                     "charttime": when + timedelta(minutes=float(rng.uniform(-20, 20))), "medication": "Vancomycin",
                     "event_txt": "Administered"}
                )  # fmt: skip
                rows["hosp/emar_detail"].append(
                    {"emar_id": emar_id, "dose_given": None, "dose_given_unit": None}
                )
                for _ in range(int(rng.integers(1, 3))):
                    rows["hosp/emar_detail"].append(
                        {"emar_id": emar_id, "dose_given": f"{mg:g}", "dose_given_unit": "mg"}
                    )
        if with_emar and rng.random() < 0.3:  # a refused dose: not an administration
            emar_seq += 1
            rows["hosp/emar"].append(
                {"subject_id": subject, "hadm_id": hadm, "emar_id": f"{subject}-{emar_seq}",
                 "pharmacy_id": rx_maintenance, "charttime": times[-1] + timedelta(hours=every),
                 "medication": "Vancomycin", "event_txt": "Not Given"}
            )  # fmt: skip
        if rng.random() < 0.15:  # oral vancomycin (C. difficile) is charted under the same item
            rows["icu/inputevents"].append(
                {"stay_id": stay, "starttime": first + timedelta(hours=5), "itemid": 225798, "amount": 1.0,
                 "amountuom": "dose", "ordercategoryname": "09-Antibiotics (Non IV)", "patientweight": weight,
                 "statusdescription": "FinishedRunning"}
            )  # fmt: skip
        if rng.random() < 0.1:
            rows["icu/inputevents"].append(
                {"stay_id": stay, "starttime": first + timedelta(hours=3), "itemid": 225798, "amount": 1.0,
                 "amountuom": "dose", "ordercategoryname": "08-Antibiotics (IV)", "patientweight": weight,
                 "statusdescription": "Rewritten"}
            )  # fmt: skip
        # levels from a one-compartment model (Goti 2018 typical CL and total volume), bolus doses
        cl = 4.5 * (crcl / 120) ** 0.8 * (0.7 if dialysis else 1.0) * float(np.exp(0.3 * rng.normal()))
        volume = (58.4 * (0.5 if dialysis else 1.0) + 38.4) * weight / 70
        dose_h = np.array([(x - intime).total_seconds() / 3600 for x in times])
        dose_mg = np.array(doses)

        def concentration(hour: float, dose_h=dose_h, dose_mg=dose_mg, cl=cl, volume=volume) -> float:
            given = dose_h < hour
            return float(np.sum(dose_mg[given] / volume * np.exp(-cl / volume * (hour - dose_h[given]))))

        draws = []
        if rng.random() < 0.75:
            draws = [h - 0.5 for h in dose_h[2::3]] + list(rng.uniform(dose_h[0], dose_h[-1] + 24, 2))
        high_at = np.inf
        for hour in sorted(draws):
            level = max(concentration(hour) * (1 + 0.15 * rng.normal()) + rng.normal(), 0.5)
            if level > 25:
                high_at = min(high_at, hour)
            drawn = intime + timedelta(hours=float(hour))
            rows["hosp/labevents"].append(
                {"subject_id": subject, "hadm_id": hadm, "itemid": 51009, "charttime": drawn,
                 "storetime": drawn + timedelta(hours=float(rng.uniform(1, 3))), "valuenum": round(level, 1),
                 "valueuom": "ug/mL"}
            )  # fmt: skip
        # daily creatinine at 04:00 from the day before admission; up 60% a day after a level above 25
        day = (intime - timedelta(hours=30)).replace(hour=4, minute=0, second=0, microsecond=0)
        while day < outtime:
            hour = (day - intime).total_seconds() / 3600
            value = baseline * (1.6 if hour > high_at + 24 else 1.0) * float(np.exp(0.05 * rng.normal()))
            rows["hosp/labevents"].append(
                {"subject_id": subject, "hadm_id": hadm, "itemid": 50912, "charttime": day,
                 "storetime": day + timedelta(hours=1.5), "valuenum": round(value, 1), "valueuom": "mg/dL"}
            )  # fmt: skip
            day += timedelta(days=1)
        rows["icu/chartevents"].append(
            {"stay_id": stay, "charttime": intime + timedelta(hours=1), "itemid": 226512, "value": f"{weight:.1f}",
             "valuenum": round(weight, 1)}
        )  # fmt: skip
        if dialysis:
            rows["icu/chartevents"].append(
                {"stay_id": stay, "charttime": intime + timedelta(hours=2), "itemid": 226499, "value": "500",
                 "valuenum": 500.0}
            )  # fmt: skip
            rows["icu/procedureevents"].append(
                {"stay_id": stay, "starttime": intime + timedelta(hours=3), "itemid": 225441}
            )
    frames = {}
    for key, schema in SCHEMAS.items():
        # MIMIC has no empty table: an unused one gets one row of an unrelated id
        unused = {
            c: (999_999 if dtype == pl.Int64 else "999999") if c.endswith("_id") else None
            for c, dtype in schema.items()
        }
        table_rows = rows[key] or [unused]
        frames[key] = pl.DataFrame(table_rows, schema=schema, orient="row")
    return frames


def generate(args: VancomycinSynthArgs) -> dict[str, int]:
    """Write the tables; returns row counts per table."""
    frames = make_tables(args.stays, args.seed)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_tables(tmp, frames, args.format)
    return {key: frame.height for key, frame in frames.items()}
