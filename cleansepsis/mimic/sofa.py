"""Hourly SOFA as mimic-code `score/sofa.sql` computes it: the worst value of each measure in the hour, a
component score per hour, then the maximum over the last 24 hours; a missing component counts 0.

Component thresholds: /work/shared/docs/mimic-iv-reference.md §3. The grid is built twice (see events.py):
with mimic-code's (h, h+1] charttime hours for the Sepsis-3 cohort, and with [h, h+1) hours of result
availability for the state's SOFA. Deviations from mimic-code are listed in docs/mimic.md.
"""

from __future__ import annotations

import polars as pl

from cleansepsis.mimic import features as feat

COMPONENTS = ("sofa_resp", "sofa_coag", "sofa_liver", "sofa_cv", "sofa_cns", "sofa_renal")
HOURS_BEFORE_ICU = 24  # the hourly grid starts 24 h before ICU admission, as mimic-code `icustay_hourly`


def _steps(value: pl.Expr, cuts: list[tuple[pl.Expr, int]]) -> pl.Expr:
    """First matching (condition, score) from the worst score down; null when the value is unknown."""
    expr = pl.when(value.is_null()).then(None)
    for condition, score in cuts:
        expr = expr.when(condition).then(score)
    return expr.otherwise(0).cast(pl.Int8)


def respiration(pf_vent: pl.Expr, pf_novent: pl.Expr) -> pl.Expr:
    """mimic-code: the worst ventilated and non-ventilated P/F of the hour; 3-4 need ventilation."""
    v, n = pf_vent, pf_novent
    return (
        pl.when(v < 100)
        .then(4)
        .when(v < 200)
        .then(3)
        .when((n < 300) | (v < 300))
        .then(2)
        .when((n < 400) | (v < 400))
        .then(1)
        .when(v.is_null() & n.is_null())
        .then(None)
        .otherwise(0)
        .cast(pl.Int8)
    )


def coagulation(platelets: pl.Expr) -> pl.Expr:
    p = platelets
    return _steps(p, [(p < 20, 4), (p < 50, 3), (p < 100, 2), (p < 150, 1)])


def liver(bilirubin: pl.Expr) -> pl.Expr:
    b = bilirubin
    return _steps(b, [(b >= 12, 4), (b >= 6, 3), (b >= 2, 2), (b >= 1.2, 1)])


def cardiovascular(map_min: pl.Expr, dopamine, dobutamine, epinephrine, norepinephrine) -> pl.Expr:
    """mimic-code `sofa`: a rate is null when no infusion of the agent runs at the hour's end; an epinephrine or
    norepinephrine infusion running at any rate <= 0.1 ug/kg/min scores 3 (SQL `rate <= 0.1`)."""
    dopa, dobu, epi, ne = dopamine, dobutamine, epinephrine, norepinephrine
    known = pl.any_horizontal(x.is_not_null() for x in (map_min, dopa, dobu, epi, ne))
    score = (
        pl.when((dopa > 15) | (epi > 0.1) | (ne > 0.1))
        .then(4)
        .when((dopa > 5) | (epi <= 0.1) | (ne <= 0.1))
        .then(3)
        .when((dopa > 0) | (dobu > 0))
        .then(2)
        .when(map_min < 70)
        .then(1)
        .otherwise(0)
    )
    return pl.when(known).then(score).otherwise(None).cast(pl.Int8)


def central_nervous(gcs: pl.Expr) -> pl.Expr:
    g = gcs
    return _steps(g, [(g < 6, 4), (g < 10, 3), (g < 13, 2), (g < 15, 1)])


def renal(creatinine: pl.Expr, urine_24h: pl.Expr) -> pl.Expr:
    cr, uo = creatinine, urine_24h
    known = cr.is_not_null() | uo.is_not_null()
    cr0, uo0 = cr.fill_null(0.0), uo.fill_null(1e9)
    score = (
        pl.when((cr0 >= 5) | (uo0 < 200))
        .then(4)
        .when((cr0 >= 3.5) | (uo0 < 500))
        .then(3)
        .when(cr0 >= 2)
        .then(2)
        .when(cr0 >= 1.2)
        .then(1)
        .otherwise(0)
    )
    return pl.when(known).then(score).otherwise(None).cast(pl.Int8)


def hourly_grid(
    stays: pl.DataFrame,
    measured: pl.DataFrame,
    pf: pl.DataFrame,
    inputs: pl.DataFrame,
    urine: pl.DataFrame,
    vent: pl.DataFrame,
) -> pl.DataFrame:
    """Dense (stay_id, hour) grid from 24 h before ICU admission to discharge, with the hourly worst values,
    treatments, cumulative fluids, the six SOFA components (24 h max) and `sofa`. `measured`, `pf` and
    `urine` are already binned into hours (events.bin_*), which fixes the hour convention."""
    grid = (
        stays.select(
            "stay_id",
            pl.int_ranges(-HOURS_BEFORE_ICU, pl.col("out_h").ceil().cast(pl.Int32) + 1, dtype=pl.Int32).alias(
                "hour"
            ),
        )
        .explode("hour")
        .sort("stay_id", "hour")
    )
    code = feat.FEATURE_CODE
    worst = {
        "platelets": ("min", "platelets_min"),
        "bilirubin": ("max", "bilirubin_max"),
        "map": ("min", "map_min"),
        "creatinine": ("max", "creatinine_max"),
        "gcs": ("min", "gcs_min"),
    }
    for name, (stat, column) in worst.items():
        part = measured.filter(pl.col("feature") == code[name]).select(
            "stay_id", "hour", pl.col(stat).alias(column)
        )
        grid = grid.join(part, on=["stay_id", "hour"], how="left")
    grid = (
        grid.join(pf, on=["stay_id", "hour"], how="left")
        .join(inputs, on=["stay_id", "hour"], how="left")
        .join(urine, on=["stay_id", "hour"], how="left")
        .join(vent, on=["stay_id", "hour"], how="left")
        .sort("stay_id", "hour")
    )
    by_stay = "stay_id"
    grid = grid.with_columns(
        pl.col("vent").fill_null(0).cast(pl.Boolean).alias("vent"),
        ((pl.col("fluid_raw").fill_null(0.0) - pl.col("urine").fill_null(0.0)) * (pl.col("hour") >= 0))
        .cum_sum()
        .over(by_stay)
        .cast(pl.Float32)
        .alias("cum_balance"),
        (pl.col("fluid_tev").fill_null(0.0) * (pl.col("hour") >= 0))
        .cum_sum()
        .over(by_stay)
        .cast(pl.Float32)
        .alias("input_total"),
        (pl.col("urine").fill_null(0.0) * (pl.col("hour") >= 0))
        .cum_sum()
        .over(by_stay)
        .cast(pl.Float32)
        .alias("output_total"),
    )
    grid = grid.with_columns(
        respiration(pl.col("pf_vent"), pl.col("pf_novent")).alias("sofa_resp"),
        coagulation(pl.col("platelets_min")).alias("sofa_coag"),
        liver(pl.col("bilirubin_max")).alias("sofa_liver"),
        cardiovascular(
            pl.col("map_min"),
            pl.col("dopamine_at_end"),
            pl.col("dobutamine_at_end"),
            pl.col("epinephrine_at_end"),
            pl.col("norepinephrine_at_end"),
        ).alias("sofa_cv"),
        central_nervous(pl.col("gcs_min")).alias("sofa_cns"),
        renal(pl.col("creatinine_max"), pl.col("uo_24h")).alias("sofa_renal"),
    )
    grid = grid.with_columns(
        pl.col(c).rolling_max(window_size=24, min_samples=1).over(by_stay).fill_null(0).cast(pl.Int8).alias(c)
        for c in COMPONENTS
    ).with_columns(pl.sum_horizontal(COMPONENTS).cast(pl.Int8).alias("sofa"))
    keep = [
        "stay_id",
        "hour",
        "fluid_tev",
        "fluid_raw",
        "urine",
        "ne_eq",
        "vent",
        "cum_balance",
        "input_total",
        "output_total",
        "sofa",
        *COMPONENTS,
    ]
    return grid.select(keep).with_columns(
        pl.col("fluid_tev", "fluid_raw").fill_null(0.0), pl.col("ne_eq").fill_null(0.0)
    )
