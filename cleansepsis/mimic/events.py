"""The streaming passes over the big event tables, each reduced to per-(stay, hour) aggregates.

Time is measured in hours since `t0`, the ICU admission time truncated to the hour; hour bin h holds
events charted in [t0 + h, t0 + h + 1). Every pass is one lazy query over one table (filtered to the needed
itemids, joined to the small stay table, grouped), collected with the streaming engine.
"""

from __future__ import annotations

import polars as pl

from cleansepsis.mimic import actions as act
from cleansepsis.mimic import features as feat
from cleansepsis.mimic.tables import Table, collect

HOURS_BEFORE_ICU = 48  # labs up to this long before ICU admission may still inform the first state
SECONDS_PER_HOUR = 3600.0


def hours_since(col: str) -> pl.Expr:
    return (pl.col(col) - pl.col("t0")).dt.total_seconds(fractional=True) / SECONDS_PER_HOUR


def _ranges() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "feature": [feat.FEATURE_CODE[m.name] for m in feat.MEASURED],
            "low": [float(m.low) for m in feat.MEASURED],
            "high": [float(m.high) for m in feat.MEASURED],
        },
        schema={"feature": pl.Int16, "low": pl.Float64, "high": pl.Float64},
    )


def _clean(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Unit fixes, then removal of values outside each feature's physiological range."""
    code = pl.col("feature")
    value = pl.col("valuenum")
    fixed = (
        pl.when(pl.col("itemid") == feat.FAHRENHEIT_ID)
        .then((value - 32.0) / 1.8)
        .when((code == feat.FEATURE_CODE["fio2"]) & (value <= 1.0))
        .then(value * 100.0)
        .when((code == feat.FEATURE_CODE["spo2"]) & (value > 100.0))
        .then(pl.lit(100.0))
        .otherwise(value)
    )
    return (
        lf.with_columns(fixed.alias("valuenum"))
        .join(_ranges().lazy(), on="feature", how="inner")
        .filter((pl.col("valuenum") >= pl.col("low")) & (pl.col("valuenum") <= pl.col("high")))
    )


def _hourly(lf: pl.LazyFrame) -> pl.LazyFrame:
    return (
        lf.with_columns(pl.col("t").floor().cast(pl.Int32).alias("hour"))
        .group_by("stay_id", "feature", "hour")
        .agg(
            pl.col("valuenum").sort_by("t").last().cast(pl.Float32).alias("last"),
            pl.col("t").max().cast(pl.Float32).alias("t_last"),
            pl.col("valuenum").min().cast(pl.Float32).alias("min"),
            pl.col("valuenum").max().cast(pl.Float32).alias("max"),
        )
    )


def chart_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """chartevents -> (stay_id, feature, hour, last, t_last, min, max) for the measured chart features."""
    mapping = feat.itemid_to_feature("CE")
    # intubated patients have no verbal score: 'No Response-ETT' becomes 0, read later as GCS 15
    verbal = pl.when(
        (pl.col("itemid") == feat.GCS_VERBAL_ID) & (pl.col("value") == feat.GCS_VERBAL_ETT)
    ).then(pl.lit(0.0))
    lf = (
        table.scan()
        .filter(pl.col("itemid").is_in(list(mapping)))
        .with_columns(verbal.otherwise(pl.col("valuenum")).alias("valuenum"))
        .filter(pl.col("valuenum").is_not_null())
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(
            hours_since("charttime").alias("t"),
            pl.col("itemid").replace_strict(mapping, return_dtype=pl.Int16).alias("feature"),
        )
        .filter(pl.col("t").is_between(-HOURS_BEFORE_ICU, pl.col("out_h")))
    )
    lf = _clean(lf)
    return collect(table, _hourly(lf))


def lab_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """labevents (keyed by subject) -> the same hourly aggregates, attached to every stay of the subject."""
    mapping = feat.itemid_to_feature("LE")
    lf = (
        table.scan()
        .filter(pl.col("itemid").is_in(list(mapping)) & pl.col("valuenum").is_not_null())
        .join(stays.lazy().select("subject_id", "stay_id", "t0", "out_h"), on="subject_id", how="inner")
        .with_columns(
            hours_since("charttime").alias("t"),
            pl.col("itemid").replace_strict(mapping, return_dtype=pl.Int16).alias("feature"),
        )
        .filter(pl.col("t").is_between(-HOURS_BEFORE_ICU, pl.col("out_h")))
    )
    return collect(table, _hourly(_clean(lf)))


def _explode_hours(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per hour bin an interval [start_h, end_h) overlaps, with the overlapped share of it."""
    first = pl.col("start_h").floor().cast(pl.Int32)
    last = pl.max_horizontal(pl.col("end_h").ceil().cast(pl.Int32), first + 1)
    lf = lf.with_columns(pl.int_ranges(first, last, dtype=pl.Int32).alias("hour")).explode("hour")
    duration = pl.col("end_h") - pl.col("start_h")
    overlap = pl.min_horizontal(pl.col("end_h"), pl.col("hour") + 1.0) - pl.max_horizontal(
        pl.col("start_h"), pl.col("hour").cast(pl.Float64)
    )
    share = pl.when(duration > 0).then(overlap / duration).otherwise(1.0)
    return lf.with_columns(share.clip(0.0, 1.0).alias("share"))


def input_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """inputevents -> per (stay_id, hour): tonicity-adjusted and raw IV fluid (mL, prorated over the hours
    the infusion ran), the max rate of each vasopressor agent (ug/kg/min; vasopressin U/min), and the
    NE-equivalent rate (sum over agents of factor x max rate in the hour)."""
    ids = list(act.TONICITY) + [itemid for itemid, _ in act.VASOPRESSORS.values()]
    weight = (
        pl.when(pl.col("patientweight") > 0).then(pl.col("patientweight")).otherwise(act.DEFAULT_WEIGHT_KG)
    )
    lf = (
        table.scan()
        .filter(pl.col("itemid").is_in(ids))
        .filter(pl.col("statusdescription").fill_null("") != "Rewritten")
        .unique()  # an exactly duplicated row would count its volume twice
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(
            hours_since("starttime").clip(-1.0, None).alias("start_h"),
            pl.min_horizontal(hours_since("endtime"), pl.col("out_h") + 1.0).alias("end_h"),
        )
        .filter(pl.col("end_h") >= pl.col("start_h"))
        .with_columns(
            act.fluid_ml(pl.col("amount"), pl.col("amountuom")).alias("volume"),
            pl.col("itemid")
            .replace_strict(act.TONICITY, default=None, return_dtype=pl.Float64)
            .alias("tonicity"),
            act.ug_per_kg_min(pl.col("rate"), pl.col("rateuom").fill_null(""), weight).alias("agent_rate"),
        )
    )
    lf = _explode_hours(lf)
    aggs = [
        (pl.col("volume") * pl.col("tonicity") * pl.col("share")).sum().cast(pl.Float32).alias("fluid_tev"),
        (pl.col("volume") * pl.col("tonicity").is_not_null() * pl.col("share"))
        .sum()
        .cast(pl.Float32)
        .alias("fluid_raw"),
    ]
    for name, (itemid, _) in act.VASOPRESSORS.items():
        aggs.append(
            pl.col("agent_rate").filter(pl.col("itemid") == itemid).max().cast(pl.Float32).alias(name)
        )
    hourly = collect(table, lf.group_by("stay_id", "hour").agg(aggs))
    ne_eq = pl.sum_horizontal([pl.col(n).fill_null(0.0) * f for n, (_, f) in act.VASOPRESSORS.items()])
    return hourly.with_columns(ne_eq.cast(pl.Float32).alias("ne_eq"))


def urine_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """outputevents -> urine output (mL) per (stay_id, hour); GU irrigant counted negative (mimic-code)."""
    ids = [*act.URINE_IDS, act.GU_IRRIGANT_IN]
    sign = pl.when(pl.col("itemid") == act.GU_IRRIGANT_IN).then(-1.0).otherwise(1.0)
    lf = (
        table.scan()
        .filter(pl.col("itemid").is_in(ids) & pl.col("value").is_not_null())
        .unique()  # an exactly duplicated row would count its volume twice
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(hours_since("charttime").floor().cast(pl.Int32).alias("hour"))
        .filter(pl.col("hour") >= -1)
        .group_by("stay_id", "hour")
        .agg((pl.col("value") * sign).sum().cast(pl.Float32).alias("urine"))
    )
    return collect(table, lf)


def vent_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """procedureevents invasive ventilation intervals -> (stay_id, hour, vent=1) for the hours they touch."""
    lf = (
        table.scan()
        .filter(pl.col("itemid") == act.INVASIVE_VENT_ID)
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(
            hours_since("starttime").clip(-1.0, None).alias("start_h"),
            pl.min_horizontal(hours_since("endtime"), pl.col("out_h") + 1.0).alias("end_h"),
        )
        .filter(pl.col("end_h") >= pl.col("start_h"))
    )
    lf = _explode_hours(lf).group_by("stay_id", "hour").agg(pl.lit(1, dtype=pl.Int8).alias("vent"))
    return collect(table, lf)
