"""`data_prep.py vancomycin`: a continuous-dose replay of IV vancomycin courses in MIMIC-IV ICU stays.

Cohort: adult ICU stays with at least one IV vancomycin administration charted in the ICU (inputevents 225798,
not the "Non IV" order category, not "Rewritten"), every administration with a dose in mg (see DOSE_RULES).
One episode per stay, on a fixed 12 h grid from the stay's first IV dose: w_k = first dose + 12 k h, through
the window holding the last ICU dose. See docs/vancomycin_mimic.md.

No look-ahead: obs_k holds only what was known strictly before w_k (lab results by storetime, charted
weights and dialysis by charttime, doses by administration time); action_k is the mg given in
[w_k, w_k + 12 h), clipped to [0, 3000]; reward_k scores the levels drawn in (w_k, w_k+1] against 10-20 mg/L
and subtracts 3 for a new KDIGO creatinine AKI found by a creatinine drawn in that interval. The observation
is the simulator's `OBS_FEATURES` (cleansepsis/vancomycin.py), in the same order and units.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from cleansepsis import vancomycin as sim
from cleansepsis.io import atomic_dir
from cleansepsis.mimic.pipeline import load_stays, split_patients
from cleansepsis.mimic.tables import (
    DATE,
    FLOAT,
    INT,
    STR,
    TIME,
    MimicInputError,
    Table,
    check_gzip_complete,
    collect,
    find_table,
    header_columns,
)
from cleansepsis.replay import write_replay

VANCOMYCIN_ITEM = 225798  # inputevents "Vancomycin" (d_items unit "dose")
LEVEL_ITEM = 51009  # labevents "Vancomycin", ug/mL
CREATININE_ITEM = 50912  # labevents "Creatinine", mg/dL
WEIGHT_ITEMS = (226512, 224639)  # chartevents admission weight, daily weight (kg)
WEIGHT_RANGE_KG = (20.0, 300.0)  # AIC removes weights above 300 kg
LEVEL_RANGE = (0.0, 200.0)  # mg/L; outside: a charting error, dropped
CREATININE_RANGE = (0.0, 150.0)  # mg/dL, mimic-code keeps <= 150
# Units a level / creatinine may carry, lower case, with the factor to mg/L / mg/dL. Anything else stops the run.
LEVEL_UNITS = {"ug/ml": 1.0, "mcg/ml": 1.0, "µg/ml": 1.0, "μg/ml": 1.0, "mg/l": 1.0}
CREATININE_UNITS = {"mg/dl": 1.0, "umol/l": 1.0 / 88.42, "µmol/l": 1.0 / 88.42, "μmol/l": 1.0 / 88.42}
DOSE_UNITS = {"mg": 1.0, "g": 1000.0, "gm": 1000.0, "gram": 1000.0, "grams": 1000.0}
IV_ROUTES = ("IV", "IV DRIP", "IV BOLUS", "IVPB")  # prescriptions.route of an IV order (demo: "IV")
EMAR_GIVEN = ("Administered", "Delayed Administered", "Started", "Delayed Started", "Restarted")
# mimic-code `treatment/rrt.sql`, the rows it marks dialysis_active: chartevents items charted while a
# dialysis runs, 225965 (PD catheter status) only when 'In use'; procedureevents dialysis processes;
# inputevents CRRT additives with an amount
DIALYSIS_CHART_ITEMS = (226499, 224154, 225183, 227438, 224191, 225806, 225807, 228004, 228005, 228006, 224144,
                        224145, 224153, 226457)  # fmt: skip
PD_CATHETER_STATUS_ITEM = 225965
DIALYSIS_PROCEDURE_ITEMS = (225441, 225802, 225803, 225805, 225809, 225955)
DIALYSIS_INPUT_ITEMS = (227536, 227525)
LEVEL_TARGET = (10.0, 20.0)  # mg/L, the usual trough target (levels here are drawn at any time)
AKI_PENALTY = 3.0  # the simulator's default `aki_penalty`
COURSE_END_HOURS = 36.0
ADMIN_BEFORE_ICU_HOURS = 6.0  # doses charted under the stay this long before intime (mimic-code first-day window)  # no further ICU dose for this long while alive in the ICU: the course ended

# What each table must provide (other columns are ignored)
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "icu/icustays": {"subject_id": INT, "hadm_id": INT, "stay_id": INT, "intime": TIME, "outtime": TIME},
    "hosp/patients": {"subject_id": INT, "gender": STR, "anchor_age": INT, "anchor_year": INT, "dod": DATE},
    "hosp/admissions": {
        "subject_id": INT, "hadm_id": INT, "admittime": TIME, "dischtime": TIME, "deathtime": TIME,
    },
    "icu/inputevents": {
        "stay_id": INT, "starttime": TIME, "itemid": INT, "amount": FLOAT, "amountuom": STR,
        "ordercategoryname": STR, "patientweight": FLOAT, "statusdescription": STR,
    },
    "hosp/prescriptions": {
        "subject_id": INT, "hadm_id": INT, "pharmacy_id": INT, "starttime": TIME, "stoptime": TIME,
        "drug_type": STR, "drug": STR, "route": STR, "dose_val_rx": STR, "dose_unit_rx": STR,
    },
    "hosp/emar": {
        "subject_id": INT, "hadm_id": INT, "emar_id": STR, "pharmacy_id": INT, "charttime": TIME,
        "medication": STR, "event_txt": STR,
    },
    "hosp/emar_detail": {"emar_id": STR, "dose_given": STR, "dose_given_unit": STR},
    "hosp/labevents": {
        "subject_id": INT, "hadm_id": INT, "itemid": INT, "charttime": TIME, "storetime": TIME,
        "valuenum": FLOAT, "valueuom": STR,
    },
    "icu/chartevents": {"stay_id": INT, "charttime": TIME, "itemid": INT, "value": STR, "valuenum": FLOAT},
    "icu/procedureevents": {"stay_id": INT, "starttime": TIME, "itemid": INT},
}  # fmt: skip

DOSE_RULES = {
    "administrations": (
        "inputevents itemid 225798 whose ordercategoryname does not contain 'Non IV' (oral vancomycin is charted "
        "under the same item), statusdescription not 'Rewritten', starttime from 6 h before intime to outtime "
        "(charted under the stay; mimic-code's first-day window); rows of one stay at one starttime are one "
        "administration"
    ),
    "mg_dose": (
        "first of: (1) inputevents amount when amountuom is a mass unit; (2) the eMAR administration of the same "
        "hadm_id (event_txt in EMAR_GIVEN, medication containing 'vanco', its pharmacy_id an IV prescription) "
        "nearest in time within +-emar_window_hours, each eMAR row used once (nearest administration wins), dose "
        "= the largest dose_given of its emar_detail rows in mg (the detail repeats the dose per component); "
        "(3) the IV vancomycin prescription of the same hadm_id whose [starttime - slack, stoptime + slack] "
        "holds the administration, the most recently started one, dose_val_rx in mg; (4) the dose of the "
        "stay's previous dosed administration, else its next one ('carried'). Zero or unparseable doses "
        "count as missing; a negative or non-finite one stops the run"
    ),
}


@dataclass(frozen=True)
class VancomycinArgs:
    """Build a continuous-dose replay of IV vancomycin courses in MIMIC-IV ICU stays."""

    mimic_dir: Path
    """Folder holding MIMIC-IV's hosp/ and icu/ tables (.csv.gz, .csv or .parquet; v2.2 or v3.x layout)."""
    out: Path
    """Output folder: replay.parquet, cohort.parquet, report.json."""
    step_hours: int = 12
    """Length of one decision step, hours (12: the simulator's interval and the usual maintenance interval)."""
    emar_window_hours: float = 1.0
    """An eMAR administration this close to an ICU administration gives its mg dose."""
    prescription_slack_hours: float = 2.0
    """An administration this long before an order's start or after its stop still takes its dose."""
    tail_hours: float = 24.0
    """Steps without a dose continue this long after the last ICU dose (while in the ICU and alive)."""
    train_fraction: float = 0.7
    """Share of patients in the train split."""
    val_fraction: float = 0.15
    """Share of patients in the validation split; the rest is the test split."""
    split_seed: int = 0
    """Seed of the patient-level split."""
    min_age: int = 18
    """Minimum age at ICU admission, years."""
    overwrite: bool = False
    """Replace the output folder if it exists."""
    quiet: bool = False
    """Do not print progress to stderr."""


@dataclass(frozen=True)
class SchemaTable(Table):
    """A located table read with this module's columns (cleansepsis.mimic.tables reads the sepsis ones)."""

    wanted: dict[str, pl.DataType] = field(default_factory=dict, hash=False, compare=False)

    @property
    def columns(self) -> dict[str, pl.DataType]:
        return self.wanted


def open_tables(mimic_dir: Path) -> dict[str, Table]:
    """Locate every table this pipeline reads and check its header has the needed columns."""
    mimic_dir = Path(mimic_dir)
    if not mimic_dir.is_dir():
        raise MimicInputError(f"{mimic_dir}: --mimic-dir not found or not a folder")
    tables: dict[str, Table] = {}
    for key, wanted in SCHEMAS.items():
        found = find_table(mimic_dir, key)
        table = SchemaTable(key, found.path, wanted)
        check_gzip_complete(table.path)
        present = set(header_columns(table))
        missing = [c for c in wanted if c not in present]
        if missing:
            raise MimicInputError(
                f"{table.path}: missing column(s) {missing}; expected at least {list(wanted)}"
            )
        tables[key] = table
    return tables


class Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(
                f"[vancomycin {time.perf_counter() - self.start:7.1f}s] {message}",
                file=sys.stderr,
                flush=True,
            )


# ---------------------------------------------------------------------------------------------------------
# Doses
# ---------------------------------------------------------------------------------------------------------

_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NON_FINITE = r"(?i)^[+-]?(nan|inf|infinity)$"


def parse_dose(text: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(number or null, is-bad) for a dose written as text: a plain number (thousands commas allowed) parses;
    a range or a word gives null; a negative, NaN or infinite number is bad."""
    clean = text.str.strip_chars().str.replace_all(",", "", literal=True)
    number = pl.when(clean.str.contains(_NUMBER)).then(clean.cast(pl.Float64, strict=False))
    bad = (
        clean.str.contains(_NON_FINITE).fill_null(False)
        | (number < 0).fill_null(False)
        | number.is_infinite()
    )
    return number, bad.fill_null(False)


def unit_factor(unit: pl.Expr, units: dict[str, float]) -> pl.Expr:
    return (
        unit.str.strip_chars().str.to_lowercase().replace_strict(units, default=None, return_dtype=pl.Float64)
    )


def _fail_bad_dose(table: Table, frame: pl.DataFrame, column: str, bad: str, where: list[str]) -> None:
    rows = frame.filter(pl.col(bad))
    if rows.height:
        row = rows.row(0, named=True)
        at = ", ".join(f"{name} {row[name]}" for name in where)
        raise MimicInputError(
            f"{table.path}: column {column!r} has value {row[column]!r} ({at}; {rows.height} such row(s)); "
            "a vancomycin dose must be a finite number >= 0"
        )


def administrations(table: Table, stays: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """(IV vancomycin administrations in the ICU stays: stay_id, t, dose_mg from inputevents or null,
    patientweight; dialysis infusion starts: stay_id, t; counts)."""
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("itemid").is_in([VANCOMYCIN_ITEM, *DIALYSIS_INPUT_ITEMS]))
        .join(stays.lazy().select("stay_id", "intime", "outtime"), on="stay_id", how="inner"),
    )
    dialysis = rows.filter(pl.col("itemid").is_in(DIALYSIS_INPUT_ITEMS) & (pl.col("amount") > 0)).select(
        "stay_id", pl.col("starttime").alias("t")
    )
    vanco = rows.filter(pl.col("itemid") == VANCOMYCIN_ITEM)
    counts = {"inputevents_vancomycin_rows": vanco.height}
    vanco = vanco.filter(
        ~pl.col("ordercategoryname").fill_null("").str.to_lowercase().str.contains("non iv", literal=True)
        & (pl.col("statusdescription").fill_null("") != "Rewritten")
    )
    counts["iv_rows"] = vanco.height
    amount = pl.col("amount")
    vanco = vanco.with_columns(
        ((amount < 0) | amount.is_nan() | amount.is_infinite()).fill_null(False).alias("bad")
    )
    _fail_bad_dose(table, vanco, "amount", "bad", ["stay_id", "starttime"])
    early = pl.col("intime") - pl.duration(seconds=round(ADMIN_BEFORE_ICU_HOURS * 3600))
    inside = (pl.col("starttime") >= early) & (pl.col("starttime") <= pl.col("outtime"))
    counts["iv_rows_outside_stay"] = vanco.filter(~inside).height
    mass = unit_factor(pl.col("amountuom"), DOSE_UNITS)
    doses = (
        vanco.filter(inside)
        .with_columns(pl.when(amount > 0).then(amount * mass).alias("dose_mg"))
        .group_by("stay_id", "starttime")
        .agg(pl.col("dose_mg").max(), pl.col("patientweight").filter(pl.col("patientweight") > 0).max())
        .rename({"starttime": "t"})
        .sort("stay_id", "t")
    )
    return doses, dialysis, counts


def emar_doses(emar: Table, detail: Table, iv_pharmacy: pl.DataFrame, hadm_ids: pl.Series) -> pl.DataFrame:
    """eMAR administrations of IV vancomycin with their mg dose: (hadm_id, emar_id, emar_time, emar_mg)."""
    given = collect(
        emar,
        emar.scan()
        .filter(pl.col("hadm_id").is_in(hadm_ids.implode()))
        .filter(pl.col("medication").str.to_lowercase().str.contains("vanco", literal=True))
        .filter(pl.col("event_txt").str.strip_chars().is_in(EMAR_GIVEN))
        .join(iv_pharmacy.lazy(), on="pharmacy_id", how="semi"),
    )
    rows = collect(
        detail, detail.scan().filter(pl.col("emar_id").is_in(given.get_column("emar_id").implode()))
    )
    number, bad = parse_dose(pl.col("dose_given"))
    rows = rows.with_columns(number.alias("number"), bad.alias("bad"))
    _fail_bad_dose(detail, rows, "dose_given", "bad", ["emar_id"])
    mg = rows.with_columns(
        (pl.col("number") * unit_factor(pl.col("dose_given_unit"), DOSE_UNITS)).alias("mg")
    )
    per_row = mg.filter(pl.col("mg") > 0).group_by("emar_id").agg(pl.col("mg").max().alias("emar_mg"))
    return given.join(per_row, on="emar_id", how="inner").select(
        "hadm_id", "emar_id", pl.col("charttime").alias("emar_time"), "emar_mg"
    )


def iv_prescriptions(table: Table, hadm_ids: pl.Series) -> pl.DataFrame:
    """IV vancomycin orders of the admissions: (hadm_id, pharmacy_id, rx_start, rx_stop, rx_mg or null)."""
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("hadm_id").is_in(hadm_ids.implode()))
        .filter(pl.col("drug").str.to_lowercase().str.contains("vanco", literal=True))
        .filter(pl.col("route").str.strip_chars().str.to_uppercase().is_in(IV_ROUTES))
        .filter(pl.col("drug_type").fill_null("") != "BASE"),
    )
    number, bad = parse_dose(pl.col("dose_val_rx"))
    rows = rows.with_columns(number.alias("number"), bad.alias("bad"))
    _fail_bad_dose(table, rows, "dose_val_rx", "bad", ["hadm_id", "pharmacy_id"])
    mg = pl.col("number") * unit_factor(pl.col("dose_unit_rx"), DOSE_UNITS)
    return rows.select(
        "hadm_id",
        "pharmacy_id",
        pl.col("starttime").alias("rx_start"),
        pl.col("stoptime").alias("rx_stop"),
        pl.when(mg > 0).then(mg).alias("rx_mg"),
    )


def assign_doses(
    doses: pl.DataFrame, stays: pl.DataFrame, emar: pl.DataFrame, rx: pl.DataFrame, args: VancomycinArgs
) -> pl.DataFrame:
    """Every administration's mg dose and its source (DOSE_RULES['mg_dose'])."""
    admin = doses.join(stays.select("stay_id", "hadm_id"), on="stay_id").with_row_index("admin")
    window = pl.duration(seconds=round(args.emar_window_hours * 3600))
    pairs = (
        admin.select("admin", "hadm_id", "t")
        .join(emar, on="hadm_id", how="inner")
        .with_columns((pl.col("emar_time") - pl.col("t")).abs().alias("gap"))
        .filter(pl.col("gap") <= window)
        .sort("gap", "admin", "emar_time", "emar_id")
    )
    # each administration its nearest eMAR row; an eMAR row claimed twice goes to the nearer administration
    from_emar = (
        pairs.group_by("admin", maintain_order=True).first().group_by("emar_id", maintain_order=True).first()
    )
    slack = pl.duration(seconds=round(args.prescription_slack_hours * 3600))
    from_rx = (
        admin.select("admin", "hadm_id", "t")
        .join(rx.filter(pl.col("rx_mg").is_not_null()), on="hadm_id", how="inner")
        .filter(
            (pl.col("t") >= pl.col("rx_start") - slack)
            & (pl.col("rx_stop").is_null() | (pl.col("t") <= pl.col("rx_stop") + slack))
        )
        .sort("admin", "rx_start", "pharmacy_id", descending=[False, True, True])
        .group_by("admin", maintain_order=True)
        .first()
    )
    admin = (
        admin.join(from_emar.select("admin", "emar_mg"), on="admin", how="left")
        .join(from_rx.select("admin", "rx_mg"), on="admin", how="left")
        .with_columns(
            pl.when(pl.col("dose_mg").is_not_null())
            .then(pl.lit("inputevents"))
            .when(pl.col("emar_mg").is_not_null())
            .then(pl.lit("emar"))
            .when(pl.col("rx_mg").is_not_null())
            .then(pl.lit("prescription"))
            .otherwise(pl.lit("carried"))
            .alias("dose_source"),
            pl.coalesce("dose_mg", "emar_mg", "rx_mg").alias("dose_mg"),
        )
        .sort("stay_id", "t")
    )
    carried = pl.coalesce(
        pl.col("dose_mg"),
        pl.col("dose_mg").forward_fill().over("stay_id"),
        pl.col("dose_mg").backward_fill().over("stay_id"),
    )
    return admin.with_columns(carried.alias("dose_mg")).select(
        "stay_id", "t", "dose_mg", "dose_source", "patientweight"
    )


# ---------------------------------------------------------------------------------------------------------
# Labs, weights, dialysis
# ---------------------------------------------------------------------------------------------------------


def labs(table: Table, stays: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Vancomycin levels (mg/L) and creatinine (mg/dL) of the stays' admissions, per stay: (stay_id, t drawn,
    avail = storetime or null, value). Units are checked; values outside the plausible range are dropped."""
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("itemid").is_in([LEVEL_ITEM, CREATININE_ITEM]) & pl.col("valuenum").is_not_null())
        .join(stays.lazy().select("hadm_id").unique(), on="hadm_id", how="semi"),
    )
    counts = {}
    out = []
    for itemid, units, (low, high), name in (
        (LEVEL_ITEM, LEVEL_UNITS, LEVEL_RANGE, "vancomycin level"),
        (CREATININE_ITEM, CREATININE_UNITS, CREATININE_RANGE, "creatinine"),
    ):
        part = rows.filter(pl.col("itemid") == itemid).with_columns(
            unit_factor(pl.col("valueuom"), units).alias("factor")
        )
        unknown = part.filter(pl.col("factor").is_null())
        if unknown.height:
            row = unknown.row(0, named=True)
            raise MimicInputError(
                f"{table.path}: column 'valueuom' has value {row['valueuom']!r} for itemid {itemid} ({name}; "
                f"subject_id {row['subject_id']}, charttime {row['charttime']}; {unknown.height} such row(s)); "
                f"expected one of {sorted(units)}"
            )
        value = pl.col("valuenum") * pl.col("factor")
        kept = part.with_columns(value.alias("value")).filter(
            pl.col("value").is_between(low, high, closed="right")
        )
        counts[f"{name.replace(' ', '_')}_rows_out_of_range"] = part.height - kept.height
        per_stay = kept.join(stays.select("stay_id", "hadm_id"), on="hadm_id").select(
            "stay_id", pl.col("charttime").alias("t"), pl.col("storetime").alias("avail"), "value"
        )
        # one result per draw time (a repeated row is one measurement)
        out.append(
            per_stay.group_by("stay_id", "t").agg(pl.col("avail").max(), pl.col("value").sort().last())
        )
    levels, creatinine = (frame.sort("stay_id", "t") for frame in out)
    return levels, creatinine, counts


def chart_rows(table: Table, stays: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(charted weights: stay_id, t, weight; dialysis evidence: stay_id, t) from one chartevents scan."""
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("itemid").is_in([*WEIGHT_ITEMS, *DIALYSIS_CHART_ITEMS, PD_CATHETER_STATUS_ITEM]))
        .join(stays.lazy().select("stay_id"), on="stay_id", how="semi"),
    )
    low, high = WEIGHT_RANGE_KG
    weights = rows.filter(
        pl.col("itemid").is_in(WEIGHT_ITEMS) & pl.col("valuenum").is_between(low, high)
    ).select("stay_id", pl.col("charttime").alias("t"), pl.col("valuenum").alias("weight"))
    active = pl.col("itemid").is_in(DIALYSIS_CHART_ITEMS) & pl.col("value").is_not_null()
    in_use = (pl.col("itemid") == PD_CATHETER_STATUS_ITEM) & (pl.col("value").str.strip_chars() == "In use")
    dialysis = rows.filter(active | in_use).select("stay_id", pl.col("charttime").alias("t"))
    return weights.sort("stay_id", "t", "weight"), dialysis


def procedure_dialysis(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("itemid").is_in(DIALYSIS_PROCEDURE_ITEMS))
        .join(stays.lazy().select("stay_id"), on="stay_id", how="semi"),
    )
    return rows.select("stay_id", pl.col("starttime").alias("t"))


# ---------------------------------------------------------------------------------------------------------
# Steps, states, rewards
# ---------------------------------------------------------------------------------------------------------


def _hours(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return (a - b).dt.total_seconds(fractional=True) / 3600.0


def _last_before(grid: pl.DataFrame, events: pl.DataFrame, time_col: str, columns: list[str]) -> pl.DataFrame:
    """For each grid row (stay_id, k, w): the event with the latest `time_col` strictly before w (ties: the
    last row in (time_col, columns) order), as columns of the grid; null when none."""
    right = (
        events.filter(pl.col(time_col).is_not_null())
        .sort("stay_id", time_col, *columns)
        .group_by("stay_id", time_col, maintain_order=True)
        .last()
        .sort(time_col)
        .rename({time_col: "_at"})
    )
    joined = (
        grid.select("stay_id", "k", "w")
        .sort("w")
        .join_asof(
            right,
            left_on="w",
            right_on="_at",
            by="stay_id",
            strategy="backward",
            allow_exact_matches=False,
            check_sortedness=False,
        )
    )
    return joined.select("stay_id", "k", *columns)


def level_score(level: np.ndarray) -> np.ndarray:
    """The simulator's target reward carried to a level (mg/L): 1 inside 10-20; 0.1 less per mg/L below
    (at least -1), 0.2 less per mg/L above (at least -2): the AUC slopes (1/200 below, 1/100 above per
    mg*h/L) at 20 mg*h/L per mg/L, the AUC-to-trough ratio of the two targets (400-600 vs 10-20)."""
    low, high = LEVEL_TARGET
    below = np.maximum(1.0 - (low - level) / 10.0, -1.0)
    above = np.maximum(1.0 - (level - high) / 5.0, -2.0)
    return np.where(level < low, below, np.where(level > high, above, 1.0))


def aki_events(creatinine: pl.DataFrame) -> pl.DataFrame:
    """New KDIGO creatinine AKI per stay: a creatinine >= 0.3 mg/dL above the lowest of the previous 48 h or
    >= 1.5 times the lowest of the previous 7 days, where the stay's previous creatinine did not meet it.
    Rows: (stay_id, t)."""
    rows = creatinine.select("stay_id", "t", "value").sort("stay_id", "t")
    low48 = rows.rolling(index_column="t", period="48h", closed="left", group_by="stay_id").agg(
        pl.col("value").min().alias("low48")
    )
    low7d = rows.rolling(index_column="t", period="7d", closed="left", group_by="stay_id").agg(
        pl.col("value").min().alias("low7d")
    )
    flagged = (
        rows.join(low48, on=["stay_id", "t"], how="left", maintain_order="left")
        .join(low7d, on=["stay_id", "t"], how="left", maintain_order="left")
        .with_columns(
            ((pl.col("value") >= pl.col("low48") + 0.3) | (pl.col("value") >= 1.5 * pl.col("low7d")))
            .fill_null(False)
            .alias("aki")
        )
        .with_columns(pl.col("aki").shift(1).over("stay_id").fill_null(False).alias("was"))
    )
    return flagged.filter(pl.col("aki") & ~pl.col("was")).select("stay_id", "t")


def _step_of(times: pl.Expr, start: pl.Expr, step_seconds: int) -> pl.Expr:
    """Index k of the interval (w_k, w_k+1] holding each time (-1 or less: at or before the first decision)."""
    seconds = (times - start).dt.total_seconds()
    return pl.when(seconds > 0).then((seconds + step_seconds - 1) // step_seconds - 1).otherwise(-1)


@dataclass
class Built:
    frame: pl.DataFrame
    cohort: pl.DataFrame
    counts: dict[str, int]
    fill: dict[str, float]
    dose_sources: dict[str, int]
    clipped: int


def build(args: VancomycinArgs, say=lambda _: None) -> Built:
    step = int(args.step_hours)
    if not 1 <= step <= 24:
        raise MimicInputError(f"--step-hours {step}: expected a whole number of hours between 1 and 24")
    for name in ("emar_window_hours", "prescription_slack_hours", "tail_hours"):
        value = getattr(args, name)
        if not (np.isfinite(value) and 0 <= value <= 48):
            raise MimicInputError(f"--{name.replace('_', '-')} {value}: expected hours between 0 and 48")
    tables = open_tables(Path(args.mimic_dir))
    stays, _ = load_stays(tables)
    counts = {"icu_stays": stays.height}
    stays = stays.filter(pl.col("age") >= args.min_age)
    counts[f"age_at_least_{args.min_age}"] = stays.height

    doses, dialysis_inputs, dose_counts = administrations(tables["icu/inputevents"], stays)
    stays = stays.filter(pl.col("stay_id").is_in(doses.get_column("stay_id").unique().implode()))
    counts["with_iv_vancomycin"] = stays.height
    say(f"{stays.height} adult ICU stays with IV vancomycin ({doses.height} administrations)")
    if stays.height == 0:
        raise MimicInputError(
            f"{tables['icu/inputevents'].path}: no adult ICU stay has an IV vancomycin administration "
            f"(itemid {VANCOMYCIN_ITEM}); the cohort is empty"
        )
    hadm_ids = stays.get_column("hadm_id").unique()
    rx = iv_prescriptions(tables["hosp/prescriptions"], hadm_ids)
    iv_pharmacy = rx.select("pharmacy_id").unique()
    emar = emar_doses(tables["hosp/emar"], tables["hosp/emar_detail"], iv_pharmacy, hadm_ids)
    admin = assign_doses(doses, stays, emar, rx, args)
    undosed = admin.filter(pl.col("dose_mg").is_null()).get_column("stay_id").unique()
    stays = stays.filter(~pl.col("stay_id").is_in(undosed.implode()))
    admin = admin.filter(pl.col("stay_id").is_in(stays.get_column("stay_id").implode()))
    counts["with_mg_doses"] = stays.height
    sources = dict(sorted(admin.group_by("dose_source").len().iter_rows()))
    say(f"doses by source: {sources}")
    if stays.height == 0:
        raise MimicInputError(
            f"{tables['hosp/prescriptions'].path}, {tables['hosp/emar'].path}: no IV vancomycin administration "
            "of the cohort has a mg dose in eMAR or prescriptions; the cohort is empty"
        )

    levels, creatinine, lab_counts = labs(tables["hosp/labevents"], stays)
    weights, chart_dialysis = chart_rows(tables["icu/chartevents"], stays)
    dialysis = pl.concat(
        [chart_dialysis, procedure_dialysis(tables["icu/procedureevents"], stays), dialysis_inputs]
    ).filter(pl.col("stay_id").is_in(stays.get_column("stay_id").implode()))

    # the grid: w_k = first dose + k * step, k = 0..n_steps (the last one is only a next state)
    step_s = step * 3600
    course = admin.group_by("stay_id").agg(
        pl.col("t").min().alias("w0"), pl.col("t").max().alias("last_dose")
    )
    stays = stays.join(course, on="stay_id")
    # a dose at exactly w_k belongs to step k: its window is [w_k, w_k+1)
    seconds = (pl.col("t") - pl.col("w0")).dt.total_seconds()
    admin = admin.join(stays.select("stay_id", "w0"), on="stay_id").with_columns(
        (seconds // step_s).cast(pl.Int32).alias("k")
    )
    # steps go on (no dose) while w_k < min(last dose + tail_hours, ICU discharge, death): a level drawn after
    # the last dose scores it, and not dosing is a decision too
    end = pl.min_horizontal(
        pl.col("last_dose") + pl.duration(seconds=round(args.tail_hours * 3600)),
        pl.col("outtime"),
        pl.col("death_time").fill_null(pl.col("outtime")),
    )
    tail_steps = ((end - pl.col("w0")).dt.total_seconds() + step_s - 1) // step_s
    stays = stays.join(
        admin.group_by("stay_id").agg(pl.col("k").max().alias("last_k")), on="stay_id"
    ).with_columns(pl.max_horizontal(pl.col("last_k") + 1, tail_steps).cast(pl.Int32).alias("n_steps"))
    grid = (
        stays.select("stay_id", "w0", pl.int_ranges(0, pl.col("n_steps") + 1, dtype=pl.Int32).alias("k"))
        .explode("k")
        .with_columns((pl.col("w0") + pl.duration(seconds=pl.col("k").cast(pl.Int64) * step_s)).alias("w"))
        .sort("stay_id", "k")
    )

    # what was known strictly before each w_k
    state = grid.join(stays.select("stay_id", "age", "female", "subject_id"), on="stay_id")
    cumulative = admin.sort("stay_id", "t").with_columns(
        pl.col("dose_mg").cum_sum().over("stay_id").alias("total"),
        pl.int_range(1, pl.len() + 1).over("stay_id").alias("count"),
        pl.col("t").alias("dose_t"),
    )
    for frame, time_col, columns in (
        (creatinine.rename({"value": "creatinine"}), "avail", ["creatinine"]),
        (levels.rename({"value": "last_level", "t": "level_t"}), "avail", ["last_level", "level_t"]),
        (weights, "t", ["weight"]),
        (dialysis.with_columns(pl.lit(1.0).alias("dialysis")), "t", ["dialysis"]),
        (cumulative.rename({"dose_mg": "last_dose"}), "t", ["last_dose", "total", "count", "dose_t"]),
    ):
        state = state.join(_last_before(grid, frame, time_col, columns), on=["stay_id", "k"], how="left")
    first_creatinine = (
        creatinine.filter(pl.col("avail").is_not_null())
        .sort("stay_id", "avail", "t", "value")
        .group_by("stay_id", maintain_order=True)
        .first()
        .select("stay_id", pl.col("avail").alias("first_avail"), pl.col("value").alias("first_creatinine"))
    )
    admin_weight = admin.group_by("stay_id").agg(pl.col("patientweight").sort_by("t").drop_nulls().first())
    state = (
        state.join(first_creatinine, on="stay_id", how="left")
        .join(admin_weight, on="stay_id", how="left")
        .with_columns(
            pl.when(pl.col("first_avail") < pl.col("w"))
            .then(pl.col("first_creatinine"))
            .alias("admission_creatinine"),
            pl.coalesce("weight", "patientweight").alias("weight"),
        )
        .sort("stay_id", "k")
    )

    # episodes, splits, fill values (train-split medians of what was known)
    splits = split_patients(
        stays.get_column("subject_id").to_numpy(), args.train_fraction, args.val_fraction, args.split_seed
    )
    stays = stays.with_columns(
        pl.col("subject_id").replace_strict(splits, return_dtype=pl.String).alias("split")
    )
    state = state.join(stays.select("stay_id", "split", "n_steps"), on="stay_id")
    train = state.filter((pl.col("split") == "train") & (pl.col("k") < pl.col("n_steps")))
    fill = {}
    for name, default in (
        ("creatinine", sim.VancoParams().creatinine_median),
        ("weight", sim.VancoParams().weight_median),
    ):
        known = train.get_column(name).drop_nulls()
        fill[name] = float(np.median(known.to_numpy())) if known.len() else float(default)
    state = state.with_columns(
        pl.col("creatinine").is_not_null().alias("creatinine_known"),
        pl.col("weight").is_not_null().alias("weight_known"),
        pl.col("creatinine").fill_null(fill["creatinine"]),
        pl.col("admission_creatinine").fill_null(pl.col("creatinine")).fill_null(fill["creatinine"]),
        pl.col("weight").fill_null(fill["weight"]),
        pl.col("dialysis").fill_null(0.0),
        pl.col("count").fill_null(0).cast(pl.Float64).alias("doses_given"),
        pl.col("last_dose").fill_null(0.0),
        pl.col("total").fill_null(0.0).alias("total_dose"),
        pl.when(pl.col("dose_t").is_not_null()).then(_hours(pl.col("w"), pl.col("dose_t"))).otherwise(0.0)
        .alias("hours_since_last_dose"),
        pl.col("last_level").fill_null(0.0),
        pl.when(pl.col("level_t").is_not_null())
        .then(_hours(pl.col("w"), pl.col("level_t")).clip(None, sim.NO_LEVEL_HOURS))
        .otherwise(sim.NO_LEVEL_HOURS)
        .alias("hours_since_last_level"),
        _hours(pl.col("w"), pl.col("w0")).alias("hours_since_start"),
    )  # fmt: skip
    crcl = np.asarray(
        sim.cockcroft_gault(
            state.get_column("age").to_numpy().astype(np.float32),
            state.get_column("weight").to_numpy().astype(np.float32),
            state.get_column("female").to_numpy().astype(np.float32),
            state.get_column("creatinine").to_numpy().astype(np.float32),
        ),
        np.float32,
    )
    state = state.with_columns(pl.Series("crcl_cockcroft_gault", crcl))
    names = [name for name, _ in sim.OBS_FEATURES]
    obs_all = np.stack([state.get_column(n).cast(pl.Float32).to_numpy() for n in names], axis=1)

    # actions: mg given in [w_k, w_k+1)
    per_step = admin.group_by("stay_id", "k").agg(
        pl.col("dose_mg").sort().sum().alias("dose_raw"), pl.len().cast(pl.Int32).alias("doses_in_step")
    )
    # rewards: levels and new AKI drawn in (w_k, w_k+1]
    timed = stays.select("stay_id", "w0")
    level_steps = levels.join(timed, on="stay_id").with_columns(
        _step_of(pl.col("t"), pl.col("w0"), step_s).cast(pl.Int32).alias("k")
    )
    level_steps = level_steps.with_columns(
        pl.Series("score", level_score(level_steps.get_column("value").to_numpy()))
    )
    level_reward = level_steps.group_by("stay_id", "k").agg(
        pl.col("score").sort().mean().alias("level_reward"),
        pl.col("value").sort().mean().cast(pl.Float32).alias("level_in_step"),
    )
    # a new AKI counts unless dialysis was known before the creatinine was drawn (the simulator: no AKI on dialysis)
    aki = (
        aki_events(creatinine)
        .join(timed, on="stay_id")
        .with_columns(_step_of(pl.col("t"), pl.col("w0"), step_s).cast(pl.Int32).alias("step"))
        .with_columns(pl.int_range(pl.len()).cast(pl.Int32).alias("k"), pl.col("t").alias("w"))
    )
    known = _last_before(aki, dialysis.with_columns(pl.lit(True).alias("on")), "t", ["on"])
    aki = (
        aki.join(known, on=["stay_id", "k"], how="left")
        .filter(pl.col("on").is_null())
        .group_by("stay_id", pl.col("step").alias("k"))
        .agg(pl.lit(True).alias("aki_in_step"))
    )

    # how each episode ends
    after = pl.col("last_dose") + pl.duration(seconds=round(COURSE_END_HOURS * 3600))
    ends = stays.with_columns(
        pl.when(pl.col("death_time").is_not_null() & (pl.col("death_time") <= after))
        .then(pl.lit("died"))
        .when(pl.col("outtime") >= after)
        .then(pl.lit("course_ended"))
        .otherwise(pl.lit("left_icu_on_course"))
        .alias("end_reason")
    )
    rows = (
        state.filter(pl.col("k") < pl.col("n_steps"))
        .join(per_step, on=["stay_id", "k"], how="left")
        .join(level_reward, on=["stay_id", "k"], how="left")
        .join(aki, on=["stay_id", "k"], how="left")
        .join(ends.select("stay_id", "end_reason"), on="stay_id")
        .sort("stay_id", "k")
    )
    obs_index = state.with_row_index("row").select("stay_id", "k", "row")
    here = rows.join(obs_index, on=["stay_id", "k"], maintain_order="left").get_column("row").to_numpy()
    nxt = (
        rows.select("stay_id", pl.col("k") + 1)
        .join(obs_index, on=["stay_id", "k"], maintain_order="left")
        .get_column("row")
        .to_numpy()
    )
    dose_raw = rows.get_column("dose_raw").fill_null(0.0).to_numpy()
    action = np.clip(dose_raw, 0.0, sim.DOSE_MAX_MG).astype(np.float32)
    aki_step = rows.get_column("aki_in_step").fill_null(False).to_numpy()
    reward = rows.get_column("level_reward").fill_null(0.0).to_numpy() - AKI_PENALTY * aki_step

    last = (rows.get_column("k") == rows.get_column("n_steps") - 1).to_numpy()
    truncated = last & (rows.get_column("end_reason") == "left_icu_on_course").to_numpy()
    frame = pl.DataFrame(
        [
            pl.Series("episode_id", rows.get_column("stay_id").to_numpy(), pl.Int64),
            pl.Series("t", rows.get_column("k").to_numpy(), pl.Int32),
            pl.Series("obs", obs_all[here], pl.Array(pl.Float32, len(names))),
            pl.Series("action", action, pl.Float32),
            pl.Series("reward", reward.astype(np.float32), pl.Float32),
            pl.Series("next_obs", obs_all[nxt], pl.Array(pl.Float32, len(names))),
            pl.Series("terminated", last & ~truncated, pl.Boolean),
            pl.Series("truncated", truncated, pl.Boolean),
            pl.Series("split", rows.get_column("split").to_numpy(), pl.String),
            pl.Series("dose_mg_unclipped", dose_raw.astype(np.float32), pl.Float32),
            pl.Series("doses_in_step", rows.get_column("doses_in_step").fill_null(0).to_numpy(), pl.Int32),
            pl.Series(
                "level_in_step",
                rows.get_column("level_in_step").fill_null(float("nan")).to_numpy(),
                pl.Float32,
            ),
            pl.Series("aki_in_step", aki_step, pl.Boolean),
            pl.Series("creatinine_known", rows.get_column("creatinine_known").to_numpy(), pl.Boolean),
            pl.Series("weight_known", rows.get_column("weight_known").to_numpy(), pl.Boolean),
        ]
    )
    in_episode = level_steps.join(stays.select("stay_id", "n_steps"), on="stay_id").filter(
        pl.col("k").is_between(0, pl.col("n_steps") - 1)
    )
    level_stays = in_episode.get_column("stay_id").unique()
    counts["with_level_in_admission"] = levels.get_column("stay_id").n_unique()
    in_stay = levels.join(stays.select("stay_id", "intime", "outtime"), on="stay_id").filter(
        pl.col("t").is_between(pl.col("intime"), pl.col("outtime"))
    )
    counts["with_level_during_icu_stay"] = in_stay.get_column("stay_id").n_unique()
    counts["with_level_during_episode"] = level_stays.len()
    if level_stays.len() == 0:
        raise MimicInputError(
            f"{tables['hosp/labevents'].path}: none of the {stays.height} stays with IV vancomycin has a "
            f"vancomycin level (itemid {LEVEL_ITEM}) drawn during its course; the level-based reward needs levels"
        )
    cohort = (
        ends.join(
            admin.group_by("stay_id").agg(
                pl.len().alias("n_doses"),
                (pl.col("dose_source") == "carried").sum().alias("n_carried_doses"),
            ),
            on="stay_id",
        )
        .join(in_episode.group_by("stay_id").agg(pl.len().alias("n_levels")), on="stay_id", how="left")
        .select(
            "stay_id", "subject_id", "hadm_id", pl.col("w0").alias("first_dose_time"), "last_dose",
            "n_steps", "n_doses", "n_carried_doses", pl.col("n_levels").fill_null(0).cast(pl.UInt32),
            "end_reason", "split",
        )
        .sort("stay_id")
    )  # fmt: skip
    counts.update({f"dose_{k}": v for k, v in dose_counts.items()})
    counts.update(lab_counts)
    return Built(frame, cohort, counts, fill, sources, int((dose_raw > sim.DOSE_MAX_MG).sum()))


def run(args: VancomycinArgs) -> dict:
    """Build and write the replay; returns the summary written to report.json."""
    say = Progress(args.quiet)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MimicInputError(f"{out}: already exists; pass --overwrite to replace it")
    built = build(args, say)
    names = [name for name, _ in sim.OBS_FEATURES]
    meta = {
        "obs_dim": len(names),
        "n_actions": 0,
        "action_encoding": "continuous",
        "action_space": {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0,
                         "high": float(sim.DOSE_MAX_MG)},
        "feature_names": names,
        "feature_units": [unit for _, unit in sim.OBS_FEATURES],  # as the simulator replay
        "normalisation": "none: physical units (cleansepsis.vancomycin.OBS_FEATURES)",
        "fill_values": {
            **built.fill,
            "rule": "creatinine and weight unknown before a decision: the train split's median of the known "
            "values (flags creatinine_known / weight_known); admission creatinine unknown: the creatinine",
        },
        "source": "mimic-iv",
        "env_id": None,
        "reward": {
            "name": "level_target_aki",
            "formula": (
                "per step: mean over the vancomycin levels drawn in (w_k, w_k+1] of 1 inside 10-20 mg/L, "
                "max(1 - (10 - level) / 10, -1) below, max(1 - (level - 20) / 5, -2) above (0 when no level was "
                "drawn); minus 3 when a creatinine drawn in the step shows a new KDIGO AKI (>= 0.3 mg/dL over "
                "the 48 h minimum or >= 1.5x the 7-day minimum) and the patient was not on dialysis"
            ),
            "not_observed": "AUC24 (the simulator's target) is not measured; steps without a level score 0",
        },
        # the inputs that shape the rows; where it was written and how verbosely do not (same inputs, same bytes)
        "args": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in asdict(args).items()
            if k not in ("out", "overwrite", "quiet")
        },
        "step_hours": int(args.step_hours),
        "cohort_counts": built.counts,
        "cohort_steps": list(built.counts),
        "dose_sources": built.dose_sources,
        "rules": {
            **DOSE_RULES,
            "grid": "w_k = the stay's first IV dose + k * step_hours, through the step holding the last ICU dose and "
            "on (no dose) while w_k < min(last dose + tail_hours, ICU discharge, death)",
            "state": "known strictly before w_k: labs by storetime (none: never), weights and dialysis by "
            "charttime / start, doses by administration time; hours since a level count from its draw time",
            "action": "mg given in [w_k, w_k+1), clipped to [0, 3000] (unclipped in dose_mg_unclipped)",
            "end": "terminated when the patient died or stayed >= 36 h in the ICU after the last dose (course "
            "ended); truncated when the ICU stay ended sooner (the course may go on on the ward)",
            "dialysis": "mimic-code rrt.sql dialysis_active evidence before w_k (chartevents, procedureevents, "
            "CRRT inputs); once seen, on for the rest of the stay",
            "weight": "last charted weight (226512, 224639; 20-300 kg) before w_k, else inputevents.patientweight",
        },
        "extras": {
            "dose_mg_unclipped": "mg given in the step before clipping to 3000",
            "doses_in_step": "IV administrations in the step",
            "level_in_step": "mean vancomycin level drawn in (w_k, w_k+1], mg/L (NaN: none)",
            "aki_in_step": "a new KDIGO creatinine AKI (not on dialysis) drawn in (w_k, w_k+1]",
            "creatinine_known": "a creatinine result was available before w_k (else the fill value)",
            "weight_known": "a weight was available before w_k (else the fill value)",
        },
        "actions_clipped": built.clipped,
    }  # fmt: skip
    summary = {
        "cohort_counts": built.counts,
        "dose_sources": built.dose_sources,
        "actions_clipped": built.clipped,
        "episodes": built.cohort.height,
        "transitions": built.frame.height,
        "end_reasons": dict(sorted(built.cohort.group_by("end_reason").len().iter_rows())),
        "splits": dict(sorted(built.cohort.group_by("split").len().iter_rows())),
        "fill_values": built.fill,
    }
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        written = write_replay(tmp / "replay.parquet", built.frame, meta)
        built.cohort.write_parquet(tmp / "cohort.parquet")
        summary["content_hash"] = written["content_hash"]
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    say(f"wrote {out} ({built.frame.height} transitions, {built.cohort.height} episodes)")
    return summary
