"""`data_prep.py mimic`: MIMIC-IV (v2.2 / v3.x, .csv.gz / .csv / .parquet) -> an offline-RL replay.

Stages: small tables and checks -> suspected infection -> one streaming pass over each event table,
restricted to stays with suspected infection -> hourly SOFA -> Sepsis-3 onset -> step grid around onset ->
states, actions, rewards -> normalisation and bins fitted on the train split -> replay, cohort table, report.

Alignment (no look-ahead): step k has the action window [w_k, w_k + step) with w_k = max(onset + window_start,
ICU admission) + k * step (hours since the admission hour). obs_k holds only what was known strictly before
w_k: charted values by charttime, lab results by storetime (each variable's last value within its hold limit;
SOFA over the 24 h ending at w_k from results known by then; fluids, urine and vasopressor over the previous
window; totals up to w_k; comorbidities from earlier admissions). No state feature depends on the onset time
(which is fixed by antibiotics and cultures up to a day later): the onset only places the window.
action_k is what was given inside the window. next_obs_k = obs_{k+1}.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from cleansepsis.io import atomic_dir
from cleansepsis.mimic import actions as act
from cleansepsis.mimic import cohort as coh
from cleansepsis.mimic import comorbidity, events
from cleansepsis.mimic import features as feat
from cleansepsis.mimic import rewards as rew
from cleansepsis.mimic.sofa import COMPONENTS, hourly_grid
from cleansepsis.mimic.tables import MimicInputError, Table, collect, open_tables
from cleansepsis.replay import write_replay

ALIGNMENT = (
    "step k acts over [w_k, w_k + step_hours) with w_k = max(onset + window_start_hours, ICU admission hour) "
    "+ k * step_hours; obs_k uses only data known strictly before w_k (chart values by charttime, lab results "
    "by storetime; last value within each variable's hold limit, SOFA of the 24 h ending at w_k from results "
    "known by then, fluids/urine/vasopressor of the previous window, totals up to w_k, comorbidities of earlier "
    "admissions; no feature depends on the onset time); the action is the maximum NE-equivalent rate and the "
    "tonicity-adjusted fluid volume given inside the window; next_obs_k = obs_{k+1}"
)


RULES = {
    "ties": (
        "rows of one variable charted at the same time: the value of the preferred item (the order of its "
        "itemids in cleansepsis/mimic/features.py: arterial line before cuff), then the higher value; hourly "
        "minima/maxima use the mean of a timestamp's chart rows (mimic-code vitalsign) and every lab row"
    ),
    "lab_availability": (
        "a lab result enters the state from its labevents.storetime (none: never); SOFA for the Sepsis-3 "
        "cohort uses charttime, as mimic-code"
    ),
    "labs": "attached by hadm_id (labs without one are not used), blood gases from arterial specimens only",
    "hours": "cohort SOFA hours (h, h+1] by charttime (mimic-code); state hours [h, h+1) by availability",
    "comorbidity": "Charlson index of admissions discharged before the stay; the current one's codes excluded",
}


@dataclass(frozen=True)
class MimicArgs:
    """Build an offline-RL replay of Sepsis-3 ICU stays from MIMIC-IV."""

    mimic_dir: Path
    """Folder holding MIMIC-IV's hosp/ and icu/ tables (.csv.gz, .csv or .parquet; v2.2 or v3.x layout)."""
    out: Path
    """Output folder: replay.parquet, cohort.parquet, report.md, report.json, action_heatmap.png."""
    step_hours: int = 4
    """Length of one decision step (action window), hours. 1 and 4 are the usual choices."""
    window_start_hours: int = -24
    """Start of the data window relative to Sepsis-3 onset, hours (negative = before onset)."""
    window_end_hours: int = 48
    """End of the data window relative to onset, hours. Episodes also end at ICU discharge or death."""
    reward: Literal["mortality", "sofa", "raghu"] = "mortality"
    """mortality: +-1 at the end by 90-day survival; sofa: +-15 plus -0.025 per SOFA point of change;
    raghu: Raghu et al.'s SOFA-and-lactate shaping with +-15 at the end."""
    train_fraction: float = 0.7
    """Share of patients in the train split."""
    val_fraction: float = 0.15
    """Share of patients in the validation split; the rest is the test split."""
    split_seed: int = 0
    """Seed of the patient-level split."""
    first_stay_only: bool = True
    """Keep only each patient's first ICU stay (otherwise every stay is an episode)."""
    min_age: int = 18
    """Minimum age at ICU admission, years."""
    overwrite: bool = False
    """Replace the output folder if it exists."""
    quiet: bool = False
    """Do not print progress to stderr."""


class Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[mimic {time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _fail_if_empty(table: Table, frame: pl.DataFrame) -> None:
    if frame.height == 0:
        raise MimicInputError(f"{table.path}: has no rows; expected a non-empty MIMIC-IV table")


def _check_unique(table: Table, frame: pl.DataFrame, key: str) -> None:
    dup = frame.filter(pl.col(key).is_duplicated())
    if dup.height:
        raise MimicInputError(
            f"{table.path}: column {key!r} has duplicated value {dup.get_column(key)[0]} "
            f"({dup.height} rows); expected one row per {key}"
        )


def _check_not_null(table: Table, frame: pl.DataFrame, columns: list[str]) -> None:
    for name in columns:
        nulls = frame.get_column(name).null_count()
        if nulls:
            raise MimicInputError(f"{table.path}: column {name!r} has {nulls} empty value(s); expected none")


def load_stays(tables: dict[str, Table]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(ICU stays with demographics, `t0` (admission truncated to the hour), `out_h` (discharge, h) and
    `readmission` (an earlier ICU stay of the patient), admissions)."""
    icu, pat, adm = tables["icu/icustays"], tables["hosp/patients"], tables["hosp/admissions"]
    stays = collect(icu, icu.scan(), streaming=False)
    patients = collect(pat, pat.scan(), streaming=False)
    admissions = collect(adm, adm.scan(), streaming=False)
    for table, frame, key in (
        (icu, stays, "stay_id"),
        (pat, patients, "subject_id"),
        (adm, admissions, "hadm_id"),
    ):
        _fail_if_empty(table, frame)
        _check_unique(table, frame, key)
    _check_not_null(icu, stays, ["subject_id", "hadm_id", "stay_id", "intime", "outtime"])
    _check_not_null(pat, patients, ["subject_id", "anchor_age", "anchor_year"])
    backwards = stays.filter(pl.col("outtime") < pl.col("intime"))
    if backwards.height:
        row = backwards.row(0, named=True)
        raise MimicInputError(
            f"{icu.path}: stay_id {row['stay_id']} has outtime {row['outtime']} before intime {row['intime']}; "
            "timestamps out of order"
        )
    bad_age = patients.filter((pl.col("anchor_age") < 0) | (pl.col("anchor_age") > 120))
    if bad_age.height:
        row = bad_age.row(0, named=True)
        raise MimicInputError(
            f"{pat.path}: column 'anchor_age' has value {row['anchor_age']} (subject_id {row['subject_id']}); "
            "expected an age between 0 and 120"
        )
    bad_gender = patients.filter(~pl.col("gender").is_in(["F", "M"]))
    if bad_gender.height:
        raise MimicInputError(
            f"{pat.path}: column 'gender' has value {bad_gender.get_column('gender')[0]!r}; expected 'F' or 'M'"
        )
    stays = stays.join(patients, on="subject_id", how="left")
    orphans = stays.filter(pl.col("anchor_age").is_null())
    if orphans.height:
        raise MimicInputError(
            f"{pat.path}: subject_id {orphans.get_column('subject_id')[0]} of {icu.path.name} is missing; "
            "expected every ICU patient in patients"
        )
    stays = stays.join(admissions.select("hadm_id", "deathtime"), on="hadm_id", how="left")
    # dod is a date: a death on that day is placed at its end, so an episode is never cut before the death
    death = pl.min_horizontal(
        pl.col("deathtime"),
        (pl.col("dod").cast(pl.Datetime("us")) + pl.duration(days=1) - pl.duration(seconds=1)),
    )
    t0 = pl.col("intime").dt.truncate("1h")
    earlier_stay = pl.col("intime") > pl.col("intime").min().over("subject_id")
    stays = (
        stays.with_columns(
            t0.alias("t0"), death.alias("death_time"), earlier_stay.cast(pl.Float32).alias("readmission")
        )
        .with_columns(
            (pl.col("anchor_age") + pl.col("intime").dt.year() - pl.col("anchor_year"))
            .cast(pl.Float32)
            .alias("age"),
            ((pl.col("outtime") - pl.col("t0")).dt.total_seconds(fractional=True) / 3600.0).alias("out_h"),
            ((pl.col("death_time") - pl.col("t0")).dt.total_seconds(fractional=True) / 3600.0).alias(
                "death_h"
            ),
            (
                pl.col("death_time").is_not_null()
                & ((pl.col("death_time") - pl.col("intime")) <= pl.duration(days=90))
            ).alias("died_90d"),
            (pl.col("gender") == "F").cast(pl.Float32).alias("female"),
        )
        .sort("stay_id")
    )
    return stays, admissions


def split_patients(subject_ids: np.ndarray, train: float, val: float, seed: int) -> dict[int, str]:
    """Patient-level split fixed by seed: the sorted ids are permuted, then cut by the fractions."""
    if not (0 < train < 1 and 0 <= val < 1 and train + val <= 1):
        raise MimicInputError(
            f"split fractions train={train}, val={val} must be in (0, 1) and sum to at most 1"
        )
    ids = np.sort(np.unique(subject_ids))
    order = np.random.default_rng(seed).permutation(ids.size)
    n_train = max(1, round(train * ids.size))
    n_val = round(val * ids.size)
    names = np.array(["test"] * ids.size, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_val]] = "val"
    return dict(zip(ids.tolist(), names.tolist(), strict=True))


def _hours_between(a: str, b: str) -> pl.Expr:
    return (pl.col(a) - pl.col(b)).dt.total_seconds(fractional=True) / 3600.0


def _asof_last(left: pl.DataFrame, right: pl.DataFrame, value: str, hold: float) -> pl.DataFrame:
    """Per left row (stay_id, k, ws): the right row's `value` most recently available strictly before ws
    (`t_avail` < ws), if it was measured (`t_last`) at most `hold` hours before ws; else null."""
    right = (
        right.sort("stay_id", "t_avail", "t_last", value)
        .group_by("stay_id", "t_avail", maintain_order=True)
        .last()
        .sort("t_avail")
    )
    joined = left.join_asof(
        right,
        left_on="ws",
        right_on="t_avail",
        by="stay_id",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,  # sorted by ws / t_avail; polars cannot check with by-groups
    )
    held = pl.when(pl.col("ws") - pl.col("t_last") <= hold).then(pl.col(value)).otherwise(None)
    return joined.select("stay_id", "k", held.cast(pl.Float32).alias(value))


def measured_states(states: pl.DataFrame, measured: pl.DataFrame) -> pl.DataFrame:
    """For every (stay_id, k, ws) add each measured variable's last value available strictly before ws, if
    measured within the variable's hold limit (sample-and-hold); else null."""
    left = states.select("stay_id", "k", "ws").sort("ws")
    out = states.sort("stay_id", "k")
    known = measured.filter(pl.col("t_avail") < events.NEVER)
    by_feature = known.select("feature", "stay_id", "t_avail", "t_last", "last").partition_by(
        "feature", as_dict=True
    )
    empty = known.select("stay_id", "t_avail", "t_last", "last").clear()
    for m in feat.MEASURED:
        part = by_feature.get((feat.FEATURE_CODE[m.name],))
        right = empty if part is None else part.drop("feature")
        column = _asof_last(left, right, "last", m.hold_hours).rename({"last": m.name})
        out = out.join(column, on=["stay_id", "k"], how="left")
    return out


# FiO2 (%) estimated from the O2 device and flow (L/min) where no FiO2 was charted within its hold limit.
# Nasal cannula (or a flow with no device): 21% + 4% per L/min up to 6 L (44%); simple face masks 40% up to
# 5 L/min, 50% up to 7, 60% above (conversion table of the MEDUSA study, as used by ClarityNLP's o2 finder);
# non-rebreather 80%, 90% from 10 L/min (textbook 80-95%); room air ("None") 21%. Ventilators, CPAP/BiPAP and
# high-flow cannulas set FiO2 on the device, so they are not estimated.
MASK_DEVICES = ("Face tent", "Aerosol-cool", "Venti mask", "Medium conc mask", "High flow neb", "Ultrasonic neb",
                "Vapomist", "Oxymizer")  # fmt: skip
O2_SUPPORT_HOLD_H = 12.0


def estimate_fio2(device: pl.Expr, flow: pl.Expr) -> pl.Expr:
    cannula = pl.min_horizontal(21.0 + 4.0 * flow.clip(0.0, None), 44.0)
    mask = pl.when(flow <= 5).then(40.0).when(flow <= 7).then(50.0).otherwise(60.0)
    return (
        pl.when(device == "None")
        .then(21.0)
        .when(((device == "Nasal cannula") | device.is_null()) & flow.is_not_null())
        .then(cannula)
        .when(device.is_in(MASK_DEVICES) & flow.is_not_null())
        .then(mask)
        .when(device == "Non-rebreather")
        .then(pl.when(flow >= 10).then(90.0).otherwise(80.0))
        .otherwise(None)
    )


def build_states(
    episodes: pl.DataFrame,
    measured: pl.DataFrame,
    pf: pl.DataFrame,
    support: pl.DataFrame,
    grid: pl.DataFrame,
    step: int,
) -> pl.DataFrame:
    """One row per (stay_id, k) for k = 0..n_steps (the last one is only a next state), raw units, plus the
    action window's doses `vaso_ne_eq` and `fluid_ml` for k < n_steps."""
    states = (
        episodes.select(
            "stay_id",
            "start_h",
            "age",
            "female",
            "readmission",
            "charlson",
            pl.int_ranges(0, pl.col("n_steps") + 1, dtype=pl.Int32).alias("k"),
        )
        .explode("k")
        .with_columns((pl.col("start_h") + pl.col("k") * step).cast(pl.Float64).alias("ws"))
    )
    states = measured_states(states, measured)
    left = states.select("stay_id", "k", "ws").sort("ws")
    pf_right = pf.filter(pl.col("avail") < events.NEVER).select(
        "stay_id",
        pl.col("avail").alias("t_avail"),
        pl.col("t").alias("t_last"),
        pl.col("pf").alias("pf_ratio"),
    )
    pf_hold = feat.MEASURED_BY_NAME["pao2"].hold_hours
    states = states.join(_asof_last(left, pf_right, "pf_ratio", pf_hold), on=["stay_id", "k"], how="left")
    for name in ("device", "flow"):
        rows = support.filter(pl.col(name).is_not_null()).select(
            "stay_id", pl.col("t").alias("t_avail"), pl.col("t").alias("t_last"), name
        )
        if name == "device":  # a text value: joined as-of without the float cast of _asof_last
            rows = rows.sort("t_avail")
            joined = left.join_asof(
                rows, left_on="ws", right_on="t_avail", by="stay_id", strategy="backward",
                allow_exact_matches=False, check_sortedness=False,
            )  # fmt: skip
            fresh = pl.col("ws") - pl.col("t_last") <= O2_SUPPORT_HOLD_H
            column = joined.select("stay_id", "k", pl.when(fresh).then(pl.col(name)).alias(name))
        else:
            column = _asof_last(left, rows, name, O2_SUPPORT_HOLD_H)
        states = states.join(column, on=["stay_id", "k"], how="left")
    # SOFA, ventilation and totals of the last grid hour ending at or before ws (the hour [ws - 1, ws) when
    # the grid reaches it; a next state past discharge keeps the last in-ICU hour)
    hour_before = grid.select(
        "stay_id",
        (pl.col("hour") + 1).cast(pl.Float64).alias("end"),
        "sofa",
        *COMPONENTS,
        pl.col("vent").cast(pl.Float32).alias("mech_vent"),
        "cum_balance",
        "input_total",
        "output_total",
    ).sort("end")
    states = states.sort("ws").join_asof(
        hour_before, left_on="ws", right_on="end", by="stay_id", strategy="backward", check_sortedness=False
    )
    # treatment per window: window j = floor((hour - start_h) / step); window -1 is the one before the first
    windows = (
        grid.join(episodes.select("stay_id", "start_h", "n_steps"), on="stay_id", how="inner")
        .with_columns(((pl.col("hour") - pl.col("start_h")) // step).cast(pl.Int32).alias("k"))
        .filter((pl.col("k") >= -1) & (pl.col("k") < pl.col("n_steps")))
        .group_by("stay_id", "k")
        .agg(
            pl.col("fluid_tev").sort().sum().cast(pl.Float32).alias("fluid_ml"),
            # missing urine stays missing: no charted output in the window gives null, not 0 mL
            pl.when(pl.col("urine").is_not_null().any())
            .then(pl.col("urine").drop_nulls().sort().sum())
            .cast(pl.Float32)
            .alias("urine_ml"),
            pl.col("ne_eq").max().cast(pl.Float32).alias("vaso_ne_eq"),
        )
    )
    previous = windows.select(
        "stay_id",
        (pl.col("k") + 1).alias("k"),
        pl.col("fluid_ml").alias("fluid_prev_step"),
        pl.col("urine_ml").alias("urine_prev_step"),
        pl.col("vaso_ne_eq").alias("vaso_prev_step"),
    )
    states = (
        states.join(previous, on=["stay_id", "k"], how="left")
        .join(windows.select("stay_id", "k", "fluid_ml", "vaso_ne_eq"), on=["stay_id", "k"], how="left")
        .with_columns(pl.col("fluid_prev_step", "vaso_prev_step").fill_null(0.0))
    )
    # SIRS criteria (Bone et al. 1992; band forms are not used): a criterion without its values is not met
    sirs = (
        ((pl.col("temp") > 38) | (pl.col("temp") < 36)).fill_null(False).cast(pl.Int8)
        + (pl.col("hr") > 90).fill_null(False).cast(pl.Int8)
        + ((pl.col("rr") > 20) | (pl.col("paco2") < 32)).fill_null(False).cast(pl.Int8)
        + ((pl.col("wbc") > 12) | (pl.col("wbc") < 4)).fill_null(False).cast(pl.Int8)
    )
    return states.with_columns(
        (pl.col("hr") / pl.col("sbp")).cast(pl.Float32).alias("shock_index"),
        sirs.cast(pl.Float32).alias("sirs"),
        pl.coalesce(pl.col("fio2"), estimate_fio2(pl.col("device"), pl.col("flow")))
        .cast(pl.Float32)
        .alias("fio2_imputed"),
        pl.col("ws").cast(pl.Float32).alias("hours_since_icu_admission"),
        pl.col("sofa", *COMPONENTS).cast(pl.Float32),
    ).sort("stay_id", "k")


def fit_normalisation(train: pl.DataFrame) -> dict[str, dict]:
    """Per state value: kind (z / log-z / none), fill median, mean and std, all from train-split obs rows."""
    stats = {}
    for name in feat.STATE_VALUES:
        kind = feat.scale_of(name)
        values = train.get_column(name).cast(pl.Float64).to_numpy()
        known = values[np.isfinite(values)]
        median = float(np.median(known)) if known.size else 0.0
        filled = np.where(np.isfinite(values), values, median)
        if kind == "log-z":
            filled = np.log(0.1 + np.maximum(filled, 0.0))
        mean, std = (float(filled.mean()), float(filled.std())) if kind != "none" else (0.0, 1.0)
        if not np.isfinite(std) or std < 1e-6:
            std = 1.0
        stats[name] = {"kind": kind, "fill_median": median, "mean": mean, "std": std}
    return stats


def normalise(states: pl.DataFrame, stats: dict[str, dict]) -> np.ndarray:
    """(rows, obs_dim) float32: normalised values then missingness flags (1 = not charted within hold)."""
    columns = []
    for name in feat.STATE_VALUES:
        s = stats[name]
        values = states.get_column(name).cast(pl.Float64).to_numpy()
        values = np.where(np.isfinite(values), values, s["fill_median"])
        if s["kind"] == "log-z":
            values = np.log(0.1 + np.maximum(values, 0.0))
        columns.append((values - s["mean"]) / s["std"])
    for name in feat.FLAGGED:
        values = states.get_column(name).cast(pl.Float64).to_numpy()
        columns.append((~np.isfinite(values)).astype(np.float64))
    return np.stack(columns, axis=1).astype(np.float32)


def feature_names() -> list[str]:
    return [*feat.STATE_VALUES, *(f"{name}_missing" for name in feat.FLAGGED)]


def run(args: MimicArgs) -> dict:
    """Run the whole pipeline; returns the summary written to report.json."""
    say = Progress(args.quiet)
    step = int(args.step_hours)
    if step < 1 or step > 24:
        raise MimicInputError(f"--step-hours {step}: expected a whole number of hours between 1 and 24")
    if args.window_end_hours <= args.window_start_hours:
        raise MimicInputError(
            f"--window-end-hours {args.window_end_hours} must be after --window-start-hours {args.window_start_hours}"
        )
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MimicInputError(f"{out}: already exists; pass --overwrite to replace it")
    tables = open_tables(Path(args.mimic_dir))
    say("tables found: " + ", ".join(f"{k}={t.path.name}" for k, t in tables.items()))

    stays, admissions = load_stays(tables)
    counts = {"icu_stays": stays.height}
    stays = stays.filter(pl.col("age") >= args.min_age)
    counts[f"age_at_least_{args.min_age}"] = stays.height
    if args.first_stay_only:
        stays = (
            stays.sort("intime", "stay_id")
            .group_by("subject_id", maintain_order=True)
            .first()
            .sort("stay_id")
        )
        counts["first_icu_stay"] = stays.height
    say(f"{stays.height} stays after age and first-stay filters")

    rx, micro = tables["hosp/prescriptions"], tables["hosp/microbiologyevents"]
    subjects = stays.get_column("subject_id").unique().implode()
    prescriptions = collect(
        rx,
        rx.scan()
        .filter(pl.col("subject_id").is_in(subjects))
        .filter(coh.is_antibiotic(pl.col("drug"), pl.col("route"), pl.col("drug_type"))),
    )
    cultures = coh.cultures(collect(micro, micro.scan().filter(pl.col("subject_id").is_in(subjects))))
    si = coh.suspected_infection(coh.antibiotics_in_stays(prescriptions, stays), cultures)
    candidates = stays.filter(pl.col("stay_id").is_in(si.get_column("stay_id").unique().implode()))
    counts["suspected_infection"] = candidates.height
    say(f"{candidates.height} stays with suspected infection ({prescriptions.height} antibiotic orders)")
    if candidates.height == 0:
        raise MimicInputError(f"{args.mimic_dir}: cohort is empty: no ICU stay has suspected infection")

    chart, gcs_raw, oxygen = events.chart_pass(tables["icu/chartevents"], candidates)
    gcs = events.gcs_aggregates(gcs_raw)
    say(
        f"chartevents: {chart.height} stay-hour-variable aggregates, {gcs.height} GCS hours, {oxygen.height} O2 rows"
    )
    labs, gases = events.lab_pass(tables["hosp/labevents"], candidates)
    say(f"labevents: {labs.height} stay-hour-variable aggregates, {gases.height} blood gas specimens")
    if chart.height + labs.height == 0:
        raise MimicInputError(
            f"{tables['icu/chartevents'].path}, {tables['hosp/labevents'].path}: no rows with the needed "
            "itemids for any stay with suspected infection; expected vitals and labs"
        )
    measured = pl.concat([chart, gcs, labs]).sort(events.KEYS)
    del chart, gcs, labs, gcs_raw
    inputs = events.input_hourly(tables["icu/inputevents"], candidates)
    # mimic-code's ICU hours start at the first heart rate (`icustay_times`), rounded up to the hour
    first_hr = (
        measured.filter(pl.col("feature") == feat.FEATURE_CODE["hr"])
        .group_by("stay_id")
        .agg(pl.col("t_first").min().alias("first_hr_t"))
    )
    candidates = (
        candidates.join(first_hr, on="stay_id", how="left")
        .with_columns(pl.col("first_hr_t").ceil().fill_null(1.0).alias("first_hour_end"))
        .sort("stay_id")
    )
    urine = events.urine_24h(events.urine_events(tables["icu/outputevents"], candidates), first_hr)
    procedures = events.procedure_vent_intervals(tables["icu/procedureevents"], candidates)
    charted_vent = events.charted_vent_intervals(oxygen)
    vent = events.vent_hourly(pl.concat([procedures, charted_vent]).sort("stay_id", "start_h", "end_h"))
    status = events.ventilation_status(oxygen)
    # the cohort's P/F ventilation flag: mimic-code `ventilation` episodes (charted settings) only
    pf = events.gas_pf(gases, events.chart_fio2(oxygen), charted_vent, status, procedures)
    support = events.oxygen_support(oxygen)
    say(f"inputevents/outputevents/ventilation: {inputs.height}/{urine.height}/{vent.height} stay-hours")
    # the cohort's SOFA: mimic-code's hours (h, h+1] by charttime
    cohort_grid = hourly_grid(
        candidates,
        events.bin_measured(measured, "chart"),
        events.bin_pf(pf, "chart"),
        inputs,
        events.bin_urine(urine, "chart"),
        vent,
    )
    onset = coh.sepsis_onset(si, cohort_grid, candidates)
    counts["sepsis3"] = onset.height
    say(f"{onset.height} stays meet Sepsis-3; hourly grid {cohort_grid.height} rows")
    del cohort_grid

    episodes = (
        candidates.join(onset, on="stay_id", how="inner")
        .with_columns(
            pl.max_horizontal(pl.col("onset_h") + args.window_start_hours, 0).cast(pl.Int32).alias("start_h")
        )
        .with_columns(
            pl.min_horizontal(
                pl.col("onset_h").cast(pl.Float64) + args.window_end_hours,
                "out_h",
                pl.col("death_h").fill_null(1e12),
            ).alias("end_h")
        )
        .with_columns(((pl.col("end_h") - pl.col("start_h")) / step).ceil().cast(pl.Int32).alias("n_steps"))
        .filter(pl.col("n_steps") >= 1)
    )
    counts["with_a_step_in_icu"] = episodes.height
    if episodes.height == 0:
        raise MimicInputError(
            f"{args.mimic_dir}: cohort is empty after the Sepsis-3 step ({counts}); nothing to write"
        )
    dx = tables["hosp/diagnoses_icd"]
    diagnoses = collect(
        dx, dx.scan().filter(pl.col("subject_id").is_in(episodes.get_column("subject_id").implode()))
    )
    episodes = episodes.join(
        comorbidity.charlson_before_stay(diagnoses, admissions, episodes), on="stay_id", how="left"
    ).sort("stay_id")
    splits = split_patients(
        episodes.get_column("subject_id").to_numpy(), args.train_fraction, args.val_fraction, args.split_seed
    )
    episodes = episodes.with_columns(
        pl.col("subject_id").replace_strict(splits, return_dtype=pl.String).alias("split")
    )

    in_cohort = episodes.get_column("stay_id").implode()
    measured = measured.filter(pl.col("stay_id").is_in(in_cohort))
    pf = pf.filter(pl.col("stay_id").is_in(in_cohort))
    # the state's SOFA and totals: hours [h, h+1) of the time each result was known
    grid = hourly_grid(
        candidates.filter(pl.col("stay_id").is_in(in_cohort)),
        events.bin_measured(measured, "avail"),
        events.bin_pf(pf, "avail"),
        inputs.filter(pl.col("stay_id").is_in(in_cohort)),
        events.bin_urine(urine.filter(pl.col("stay_id").is_in(in_cohort)), "avail"),
        events.vent_known_hourly(oxygen, procedures, candidates.filter(pl.col("stay_id").is_in(in_cohort))),
    )
    states = build_states(episodes, measured, pf, support, grid, step)
    # sorted again after the join: obs_rows and next_rows below pair up row by row
    states = states.join(episodes.select("stay_id", "n_steps", "split", "died_90d"), on="stay_id").sort(
        "stay_id", "k"
    )
    say(f"{states.height} states built for {episodes.height} episodes")

    obs_rows = states.filter(pl.col("k") < pl.col("n_steps"))
    next_rows = states.filter(pl.col("k") >= 1)
    train_obs = obs_rows.filter(pl.col("split") == "train")
    stats = fit_normalisation(train_obs)
    vaso_edges = act.quartile_edges(train_obs.get_column("vaso_ne_eq").to_numpy())
    fluid_edges = act.quartile_edges(train_obs.get_column("fluid_ml").to_numpy())
    vaso_level = act.dose_level(obs_rows.get_column("vaso_ne_eq").to_numpy(), vaso_edges)
    fluid_level = act.dose_level(obs_rows.get_column("fluid_ml").to_numpy(), fluid_edges)
    action = act.encode_action(fluid_level, vaso_level)
    last_step = (obs_rows.get_column("k") == obs_rows.get_column("n_steps") - 1).to_numpy()
    reward = rew.rewards(
        args.reward,
        obs_rows.get_column("sofa").to_numpy(),
        next_rows.get_column("sofa").to_numpy(),
        obs_rows.get_column("lactate").to_numpy(),
        next_rows.get_column("lactate").to_numpy(),
        last_step,
        obs_rows.get_column("died_90d").to_numpy(),
    )
    obs = normalise(obs_rows, stats)
    next_obs = normalise(next_rows, stats)
    names = feature_names()
    frame = pl.DataFrame(
        {
            "episode_id": obs_rows.get_column("stay_id").cast(pl.Int64),
            "t": obs_rows.get_column("k").cast(pl.Int32),
            "obs": pl.Series("obs", obs, dtype=pl.Array(pl.Float32, len(names))),
            "action": pl.Series("action", action, dtype=pl.Int32),
            "reward": pl.Series("reward", reward, dtype=pl.Float32),
            "next_obs": pl.Series("next_obs", next_obs, dtype=pl.Array(pl.Float32, len(names))),
            "terminated": pl.Series("terminated", last_step, dtype=pl.Boolean),
            "truncated": pl.Series("truncated", np.zeros(obs_rows.height, bool), dtype=pl.Boolean),
            "split": obs_rows.get_column("split"),
            "vaso_ne_eq": obs_rows.get_column("vaso_ne_eq").fill_null(0.0).cast(pl.Float32),
            "fluid_ml": obs_rows.get_column("fluid_ml").fill_null(0.0).cast(pl.Float32),
            "map_mmhg": obs_rows.get_column("map").cast(pl.Float32).fill_null(float("nan")),
            "cvp_mmhg": obs_rows.get_column("cvp").cast(pl.Float32).fill_null(float("nan")),
            "cum_balance_ml": obs_rows.get_column("cum_balance").cast(pl.Float32).fill_null(float("nan")),
            "sofa": obs_rows.get_column("sofa").cast(pl.Float32).fill_null(float("nan")),
        }
    )
    unit_of = feat.units()
    meta = {
        "obs_dim": len(names),
        "n_actions": 25,
        "feature_names": names,
        "feature_units": {n: "0/1" if n.endswith("_missing") else unit_of[n] for n in names},
        "normalisation": {
            **stats,
            **{f"{n}_missing": {"kind": "none", "mean": 0.0, "std": 1.0} for n in feat.FLAGGED},
        },
        "source": f"MIMIC-IV at {Path(args.mimic_dir).resolve()}",
        "env_id": "mimic-iv-sepsis3",
        "reward": {
            "name": args.reward,
            "formula": rew.DEFINITIONS[args.reward]["formula"],
            "outcome": rew.OUTCOME,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "step_hours": step,
        "window_hours": [args.window_start_hours, args.window_end_hours],
        "action_bins": {
            "vaso_edges": vaso_edges,
            "fluid_edges": fluid_edges,
            "vaso_unit": "ug/kg/min",
            "fluid_unit": "mL per step",
            "levels": "0 = none; 1-4 = quartiles of non-zero doses on the train split",
        },
        "cohort_counts": counts,
        "cohort_steps": list(counts),  # the order of the exclusion steps (JSON objects keep no order)
        "alignment": ALIGNMENT,
        "rules": RULES,
        "hold_hours": {m.name: m.hold_hours for m in feat.MEASURED},
        "extras": {
            "vaso_ne_eq": "max NE-equivalent rate in the action window, ug/kg/min",
            "fluid_ml": "tonicity-adjusted IV fluid given in the action window, mL",
            "map_mmhg": "last MAP charted before the window (within hold), mmHg",
            "cvp_mmhg": "last CVP charted before the window (within hold), mmHg",
            "cum_balance_ml": "IV fluid in minus urine out from ICU admission to the window start, mL",
            "sofa": "SOFA of the state (24 h ending at the window start)",
        },
    }
    cohort_table = episodes.select(
        "stay_id",
        "subject_id",
        "hadm_id",
        "intime",
        "onset_time",
        "si_time",
        "abx_time",
        "culture_time",
        "sofa_at_onset",
        "died_90d",
        "n_steps",
        "split",
    ).sort("stay_id")
    from cleansepsis.mimic import report

    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        written = write_replay(tmp / "replay.parquet", frame, meta)
        cohort_table.write_parquet(tmp / "cohort.parquet")
        summary = report.write_report(tmp, written, frame, obs_rows, fluid_level, vaso_level)
    say(f"wrote {out} ({frame.height} transitions, {episodes.height} episodes)")
    return summary
