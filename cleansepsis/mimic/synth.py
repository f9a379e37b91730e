"""`data_prep.py synth`: MIMIC-IV-shaped synthetic tables for tests and scale benchmarks.

Volumes per ICU stay follow full MIMIC-IV v3.1 (about 94,000 ICU stays, 433 million chartevents rows and
158 million labevents rows, i.e. ~4,600 chart rows and ~1,700 lab rows per stay); most rows are of itemids the
pipeline does not use, as in the real tables. Values and timestamps are plausible, about half of the stays get
an antibiotic with a culture (suspected infection) and a sicker course, and everything is deterministic by
seed. Nothing here is real patient data.
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
from cleansepsis.mimic import actions as act

CHART_ROWS_PER_STAY = 433_000_000 / 94_000
LAB_ROWS_PER_STAY = 158_000_000 / 94_000
MEAN_LOS_H = 82.0  # mean of the generated ICU length of stay (lognormal, median 60 h)
BASE = np.datetime64("2150-01-01T00:00:00", "s")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# (itemid, mean, sd) of the charted vitals the generator writes every hour (septic stays shift some)
HOURLY_VITALS = (
    (220045, 88, 15),
    (220179, 118, 18),
    (220180, 62, 10),
    (220181, 80, 12),
    (220210, 19, 4),
    (220277, 97, 2),
)
LAB_PANEL = (
    (50971, 4.1, 0.5), (50983, 139, 4), (50902, 104, 5), (50931, 130, 35), (51006, 22, 12), (50912, 1.1, 0.6),
    (50960, 2.0, 0.3), (50893, 8.5, 0.6), (50804, 24, 4), (50878, 45, 40), (50861, 40, 35), (50885, 0.9, 0.8),
    (50862, 3.2, 0.5), (51222, 10.5, 1.8), (51301, 11, 5), (51265, 210, 90), (51275, 32, 8), (51237, 1.3, 0.3),
    (50820, 7.38, 0.06), (50821, 110, 40), (50818, 40, 7), (50802, -1, 4), (50813, 1.8, 1.2), (50882, 24, 4),
    (50808, 1.12, 0.08),
)  # fmt: skip
FILLER_CHART_IDS = np.arange(223000, 223000 + 400)  # documentation items the pipeline never reads
FILLER_LAB_IDS = np.arange(52000, 52080)  # not a lab id the pipeline reads
TEXT_VALUES = ("Yes", "No", "Normal", "Intact", "Clean", "Dry", "Present", "None", "Within Normal Limits")
ANTIBIOTICS = ("Vancomycin", "Piperacillin-Tazobactam", "CefePIME", "Meropenem", "CeftriaXONE")
OTHER_DRUGS = ("Heparin", "Insulin", "Acetaminophen", "Pantoprazole", "Docusate Sodium", "Furosemide")


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
    """Tables for stays first_stay .. first_stay + n - 1 (one stay per admission, one subject per stay)."""
    idx = np.arange(first_stay, first_stay + n)
    subject = 10_000_000 + idx
    hadm = 20_000_000 + idx
    stay = 30_000_000 + idx
    septic = rng.random(n) < 0.5
    admit = rng.integers(0, 40 * 365 * 86400, n)  # seconds after BASE
    intime = admit + rng.integers(0, 48 * 3600, n)
    los_h = np.clip(rng.lognormal(np.log(60), 0.8, n), 12, 30 * 24)
    outtime = intime + (los_h * 3600).astype(np.int64)
    dischtime = outtime + rng.integers(3600, 10 * 86400, n)
    died = rng.random(n) < np.where(septic, 0.25, 0.08)
    death = np.where(died, outtime - rng.integers(0, 3600, n), 0)
    age = rng.integers(18, 92, n)
    anchor_year = 2150 + admit // (365 * 86400)
    tables: dict[str, pl.DataFrame] = {}
    tables["hosp/patients"] = pl.DataFrame(
        {
            "subject_id": subject,
            "gender": np.where(rng.random(n) < 0.45, "F", "M"),
            "anchor_age": age,
            "anchor_year": anchor_year,
            "anchor_year_group": ["2014 - 2016"] * n,
            "dod": _times(death, died).dt.date(),
        }
    )
    tables["hosp/admissions"] = pl.DataFrame(
        {
            "subject_id": subject,
            "hadm_id": hadm,
            "admittime": _times(admit),
            "dischtime": _times(np.where(died, death, dischtime)),
            "deathtime": _times(death, died),
            "admission_type": ["EW EMER."] * n,
            "hospital_expire_flag": died.astype(np.int64),
        }
    )
    tables["icu/icustays"] = pl.DataFrame(
        {
            "subject_id": subject,
            "hadm_id": hadm,
            "stay_id": stay,
            "first_careunit": ["Medical Intensive Care Unit (MICU)"] * n,
            "last_careunit": ["Medical Intensive Care Unit (MICU)"] * n,
            "intime": _times(intime),
            "outtime": _times(outtime),
            "los": los_h / 24.0,
        }
    )
    hours = np.ceil(los_h).astype(np.int64)
    severity = np.where(septic, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.3, n))

    # --- chartevents: hourly vitals, 4-hourly GCS/temp/FiO2, weight, filler documentation rows
    rows_per_stay = np.maximum((CHART_ROWS_PER_STAY * scale * los_h / MEAN_LOS_H).astype(np.int64), 20)
    stay_of_hour = np.repeat(np.arange(n), hours)
    hour = np.arange(hours.sum()) - np.repeat(np.cumsum(hours) - hours, hours)
    t_hour = intime[stay_of_hour] + hour * 3600 + rng.integers(0, 3600, hour.size)
    parts = []
    for itemid, mean, sd in HOURLY_VITALS:
        shift = -15 * severity[stay_of_hour] if itemid in (220179, 220180, 220181) else 0.0
        values = np.round(rng.normal(mean + shift, sd, hour.size), 0)
        parts.append((stay_of_hour, t_hour, np.full(hour.size, itemid), values))
    every4 = hour % 4 == 0
    s4, t4 = stay_of_hour[every4], t_hour[every4] + 60
    parts.append(
        (s4, t4, np.full(s4.size, 223761), np.round(rng.normal(98.8, 1.2, s4.size) + severity[s4], 1))
    )
    for itemid, best in ((220739, 4), (223900, 5), (223901, 6)):  # GCS eye, verbal, motor
        score = np.round(best - (best - 1) * severity[s4] * rng.random(s4.size))
        parts.append((s4, t4, np.full(s4.size, itemid), np.clip(score, 1, best)))
    parts.append(
        (
            s4,
            t4,
            np.full(s4.size, 223835),
            np.round(np.clip(21 + 60 * severity[s4] * rng.random(s4.size), 21, 100)),
        )
    )
    parts.append(
        (np.arange(n), intime + 600, np.full(n, 226512), np.round(rng.normal(80, 18, n).clip(40, 200), 1))
    )
    used = sum(p[0].size for p in parts)
    n_filler = max(int(rows_per_stay.sum()) - used, 0)
    filler_stay = rng.choice(n, n_filler, p=rows_per_stay / rows_per_stay.sum())
    filler_t = intime[filler_stay] + (rng.random(n_filler) * los_h[filler_stay] * 3600).astype(np.int64)
    parts.append(
        (
            filler_stay,
            filler_t,
            rng.choice(FILLER_CHART_IDS, n_filler),
            # documentation items are mostly text (no valuenum) or small counts, as in MIMIC-IV
            np.where(rng.random(n_filler) < 0.6, np.nan, rng.integers(0, 20, n_filler)),
        )
    )
    s = np.concatenate([p[0] for p in parts])
    t = np.concatenate([p[1] for p in parts])
    t = t - t % 60  # charted to the minute
    order = np.lexsort((t, s))
    s, t = s[order], t[order]
    itemid = np.concatenate([p[2] for p in parts])[order]
    valuenum = np.concatenate([p[3] for p in parts]).astype(np.float64)[order]
    tables["icu/chartevents"] = pl.DataFrame(
        {
            "subject_id": subject[s],
            "hadm_id": hadm[s],
            "stay_id": stay[s],
            "caregiver_id": pl.Series([None] * s.size, dtype=pl.Int64),
            "charttime": _times(t),
            "storetime": _times(t + 300),
            "itemid": itemid,
            "value": pl.Series(valuenum, nan_to_null=True)
            .cast(pl.String)
            .fill_null(pl.Series(rng.choice(TEXT_VALUES, s.size))),
            "valuenum": pl.Series(valuenum, nan_to_null=True),
            "valueuom": pl.select(
                pl.when(pl.lit(pl.Series(~np.isnan(valuenum)))).then(pl.lit("unit"))
            ).to_series(),
            "warning": pl.Series([0] * s.size, dtype=pl.Int64),
        }
    )

    # --- labevents: a panel every 8 h from 24 h before ICU to discharge, plus filler tests
    lab_span = (los_h + 24).astype(np.int64)
    panels = np.maximum(lab_span // 8, 1)
    p_stay = np.repeat(np.arange(n), panels)
    p_idx = np.arange(panels.sum()) - np.repeat(np.cumsum(panels) - panels, panels)
    p_time = intime[p_stay] - 24 * 3600 + p_idx * 8 * 3600 + rng.integers(0, 3600, p_idx.size)
    lab_parts = []
    for lab_id, mean, sd in LAB_PANEL:
        bump = {50912: 1.5, 50885: 2.0, 50813: 2.5}.get(lab_id, 0.0) * severity[p_stay]
        drop = 120 * severity[p_stay] if lab_id == 51265 else 0.0
        values = np.abs(rng.normal(mean + bump - drop, sd, p_stay.size))
        if lab_id == 50820:
            values = rng.normal(mean, sd, p_stay.size)
        lab_parts.append((p_stay, p_time, np.full(p_stay.size, lab_id), np.round(values, 2)))
    used = sum(p[0].size for p in lab_parts)
    lab_rows = (LAB_ROWS_PER_STAY * scale * lab_span / (MEAN_LOS_H + 24)).astype(np.int64)
    n_lab_filler = max(int(lab_rows.sum()) - used, 0)
    lf_stay = rng.choice(n, n_lab_filler, p=lab_rows / lab_rows.sum())
    lf_t = (
        intime[lf_stay] - 24 * 3600 + (rng.random(n_lab_filler) * lab_span[lf_stay] * 3600).astype(np.int64)
    )
    lab_parts.append(
        (
            lf_stay,
            lf_t,
            rng.choice(FILLER_LAB_IDS, n_lab_filler),
            np.round(rng.gamma(2.0, 5.0, n_lab_filler), 1),
        )
    )
    ls = np.concatenate([p[0] for p in lab_parts])
    lt = np.concatenate([p[1] for p in lab_parts])
    lt = lt - lt % 60
    lorder = np.lexsort((lt, ls))
    ls, lt = ls[lorder], lt[lorder]
    lvalue = np.concatenate([p[3] for p in lab_parts]).astype(np.float64)[lorder]
    tables["hosp/labevents"] = pl.DataFrame(
        {
            "labevent_id": np.arange(ls.size) + first_stay * 10_000,
            "subject_id": subject[ls],
            "hadm_id": hadm[ls],
            "specimen_id": np.arange(ls.size) + first_stay * 10_000,
            "itemid": np.concatenate([p[2] for p in lab_parts])[lorder],
            "charttime": _times(lt),
            "storetime": _times(lt + 3600),
            "value": pl.Series(lvalue).cast(pl.String),
            "valuenum": lvalue,
            "valueuom": ["unit"] * ls.size,
            "flag": pl.Series([None] * ls.size, dtype=pl.String),
        }
    )

    # --- inputevents: crystalloid boluses/infusions for everyone, vasopressor infusions when septic
    n_fluid = np.maximum((los_h / 6).astype(np.int64), 1)
    f_stay = np.repeat(np.arange(n), n_fluid)
    f_start = intime[f_stay] + (rng.random(f_stay.size) * los_h[f_stay] * 3600).astype(np.int64)
    f_dur = np.where(rng.random(f_stay.size) < 0.5, 60, rng.integers(1, 8, f_stay.size) * 3600)
    f_amount = np.round(rng.choice([250.0, 500.0, 1000.0], f_stay.size) * (0.5 + severity[f_stay]), 0)
    f_item = rng.choice([225158, 225828, 220862, 225168], f_stay.size, p=[0.55, 0.3, 0.05, 0.1])
    v_stay_mask = septic & (rng.random(n) < 0.7)
    v_stays = np.flatnonzero(v_stay_mask)
    n_vaso = np.maximum((los_h[v_stays] / 8).astype(np.int64), 1)
    v_stay = np.repeat(v_stays, n_vaso)
    v_start = intime[v_stay] + (rng.random(v_stay.size) * los_h[v_stay] * 3600 * 0.6).astype(np.int64)
    v_dur = rng.integers(1, 6, v_stay.size) * 3600
    v_item = rng.choice([221906, 221749, 222315, 221289], v_stay.size, p=[0.6, 0.25, 0.1, 0.05])
    v_rate = np.where(
        v_item == 222315,
        2.4,
        np.where(v_item == 221749, rng.uniform(0.3, 2.0, v_stay.size), rng.uniform(0.02, 0.5, v_stay.size)),
    )
    i_stay = np.concatenate([f_stay, v_stay])
    i_start = np.concatenate([f_start, v_start])
    i_end = i_start + np.concatenate([f_dur, v_dur])
    i_item = np.concatenate([f_item, v_item])
    i_rate = np.concatenate([np.full(f_stay.size, np.nan), np.round(v_rate, 3)])
    weight = np.round(rng.normal(80, 18, n).clip(40, 200), 1)
    tables["icu/inputevents"] = pl.DataFrame(
        {
            "subject_id": subject[i_stay],
            "hadm_id": hadm[i_stay],
            "stay_id": stay[i_stay],
            "starttime": _times(i_start),
            "endtime": _times(i_end),
            "itemid": i_item,
            "amount": np.concatenate([f_amount, np.round(v_rate * v_dur / 60 * 0.08, 3)]),
            "amountuom": ["ml"] * f_stay.size + ["mg"] * v_stay.size,
            "rate": i_rate,
            "rateuom": [None] * f_stay.size + ["units/hour" if i == 222315 else "mcg/kg/min" for i in v_item],
            "patientweight": weight[i_stay],
            "statusdescription": ["FinishedRunning"] * i_stay.size,
        }
    )
    # --- outputevents: urine every 2 h (less when septic); procedureevents: ventilation for the sickest
    o_mask = hour % 2 == 0
    o_stay, o_time = stay_of_hour[o_mask], t_hour[o_mask]
    urine = np.round(np.clip(rng.normal(120 - 90 * severity[o_stay], 40), 0, None), 0)
    tables["icu/outputevents"] = pl.DataFrame(
        {
            "subject_id": subject[o_stay],
            "hadm_id": hadm[o_stay],
            "stay_id": stay[o_stay],
            "charttime": _times(o_time),
            "itemid": np.full(o_stay.size, act.URINE_IDS[0]),
            "value": urine,
            "valueuom": ["ml"] * o_stay.size,
        }
    )
    vented = np.flatnonzero(severity > 0.6)
    tables["icu/procedureevents"] = pl.DataFrame(
        {
            "subject_id": subject[vented],
            "hadm_id": hadm[vented],
            "stay_id": stay[vented],
            "starttime": _times(intime[vented] + 1800),
            "endtime": _times(intime[vented] + (los_h[vented] * 3600 * 0.7).astype(np.int64)),
            "itemid": np.full(vented.size, act.INVASIVE_VENT_ID),
            "value": np.round(los_h[vented] * 60 * 0.7, 0),
        }
    )
    # --- prescriptions and cultures: suspected infection early in septic stays
    inf = np.flatnonzero(septic)
    abx_time = intime[inf] + rng.integers(0, 12 * 3600, inf.size)
    culture_time = abx_time - rng.integers(0, 24 * 3600, inf.size)
    n_other = 10
    o_idx = np.repeat(np.arange(n), n_other)
    rx_stay = np.concatenate([inf, o_idx])
    rx_start = np.concatenate([abx_time, admit[o_idx] + rng.integers(0, 48 * 3600, o_idx.size)])
    tables["hosp/prescriptions"] = pl.DataFrame(
        {
            "subject_id": subject[rx_stay],
            "hadm_id": hadm[rx_stay],
            "starttime": _times(rx_start),
            "stoptime": _times(rx_start + 3 * 86400),
            "drug_type": ["MAIN"] * rx_stay.size,
            "drug": list(rng.choice(ANTIBIOTICS, inf.size)) + list(rng.choice(OTHER_DRUGS, o_idx.size)),
            "route": ["IV"] * rx_stay.size,
        }
    )
    tables["hosp/microbiologyevents"] = pl.DataFrame(
        {
            "microevent_id": inf + first_stay,
            "subject_id": subject[inf],
            "hadm_id": hadm[inf],
            "micro_specimen_id": 40_000_000 + idx[inf],
            "chartdate": _times(culture_time - culture_time % 86400),
            "charttime": _times(culture_time),
            "spec_type_desc": ["BLOOD CULTURE"] * inf.size,
        }
    )
    return tables


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
