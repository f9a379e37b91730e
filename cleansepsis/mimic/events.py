"""The streaming passes over the big event tables, each reduced to small per-(stay, hour) aggregates or to the
few raw rows that need per-event logic (GCS components, oxygen devices, blood gases).

Time is measured in hours since `t0`, the ICU admission time truncated to the hour. Each measured row keeps
enough to be binned two ways later (`bin_measured`):
- mimic-code's convention for the Sepsis-3 cohort: hour h holds events charted in (t0 + h, t0 + h + 1]
  (`icustay_hourly`: "(ENDTIME - 1 hour, ENDTIME]"), by charttime;
- the state's convention: hour h holds results *available* in [t0 + h, t0 + h + 1) (labs: `storetime`), so
  the hour ending at a window start holds only what was known strictly before it.
The aggregate rows are keyed by (stay, feature, floor(charttime), charttime-on-the-hour, floor(available)).

Ties: rows of one variable at one timestamp are collapsed first: the value shown is that of the preferred
item (the order of `Measured.chart_ids` / `lab_ids`: invasive before cuff), then the higher value; the hourly
minimum/maximum use the mean of the timestamp's chart rows (as mimic-code `vitalsign` averages MAP items) and
every lab row. Every float sum runs over sorted values, so the output is the same bytes on every run.
"""

from __future__ import annotations

import polars as pl

from cleansepsis.mimic import actions as act
from cleansepsis.mimic import features as feat
from cleansepsis.mimic.tables import Table, collect, collect_many

HOURS_BEFORE_ICU = 48  # labs up to this long before ICU admission may still inform the first state
SECONDS_PER_HOUR = 3600.0
NEVER = 1.0e6  # availability (hours) of a lab without storetime: never shown to a state
KEYS = ["stay_id", "feature", "hour", "exact", "avail_hour"]
SPECIMEN_CODE = -1  # feature code of the blood gas specimen-type rows (1.0 = arterial) inside the lab pass

# mimic-code `measurement/oxygen_delivery` and `ventilator_setting` itemids
O2_DEVICE_ID, O2_FLOW_ID, FIO2_CHART_ID = 226732, 223834, 223835
VENT_MODE_ID, VENT_MODE_HAMILTON_ID = 223849, 229314
OXYGEN_IDS = (O2_DEVICE_ID, O2_FLOW_ID, FIO2_CHART_ID, VENT_MODE_ID, VENT_MODE_HAMILTON_ID)
GCS_IDS = (feat.GCS_EYE_ID, feat.GCS_VERBAL_ID, feat.GCS_MOTOR_ID)
PO2_ID, FIO2_LAB_ID = 50821, 50816
# ventilation status classes of mimic-code `treatment/ventilation` (device / mode text -> status), in its
# priority order: tracheostomy > invasive > non-invasive > high-flow > supplemental oxygen > none
TRACH_DEVICES = ("Tracheostomy tube", "Trach mask")
INVASIVE_DEVICES = ("Endotracheal tube",)
INVASIVE_MODES = (
    "(S) CMV", "APRV", "APRV/Biphasic+ApnPress", "APRV/Biphasic+ApnVol", "APV (cmv)", "Ambient",
    "Apnea Ventilation", "CMV", "CMV/ASSIST", "CMV/ASSIST/AutoFlow", "CMV/AutoFlow", "CPAP/PPS",
    "CPAP/PSV+Apn TCPL", "CPAP/PSV+ApnPres", "CPAP/PSV+ApnVol", "MMV", "MMV/AutoFlow", "MMV/PSV",
    "MMV/PSV/AutoFlow", "P-CMV", "PCV+", "PCV+/PSV", "PCV+Assist", "PRES/AC", "PRVC/AC", "PRVC/SIMV",
    "PSV/SBT", "SIMV", "SIMV/AutoFlow", "SIMV/PRES", "SIMV/PSV", "SIMV/PSV/AutoFlow", "SIMV/VOL",
    "SYNCHRON MASTER", "SYNCHRON SLAVE", "VOL/AC",
)  # fmt: skip
INVASIVE_MODES_HAMILTON = ("APRV", "APV (cmv)", "Ambient", "(S) CMV", "P-CMV", "SIMV", "APV (simv)", "P-SIMV",
                           "VS", "ASV")  # fmt: skip
NIV_DEVICES = ("Bipap mask", "CPAP mask")
NIV_MODES_HAMILTON = ("DuoPaP", "NIV", "NIV-ST")
HFNC_DEVICES = ("High flow nasal cannula",)
O2_DEVICES = ("Non-rebreather", "Face tent", "Aerosol-cool", "Venti mask", "Medium conc mask", "Ultrasonic neb",
              "Vapomist", "Oxymizer", "High flow neb", "Nasal cannula")  # fmt: skip
STATUS_TRACH, STATUS_INVASIVE, STATUS_NIV, STATUS_HFNC, STATUS_O2, STATUS_NONE = 6, 5, 4, 3, 2, 1
VENT_GAP_H = 14.0  # mimic-code: a 14 h gap between charted settings ends a ventilation episode
GCS_CARRY_H = 6.0  # mimic-code `gcs`: a component charted in the previous 6 h is carried forward
FIO2_BEFORE_GAS_H = 4.0  # mimic-code `bg`: FiO2 charted at most 4 h before the gas


def hours_since(col: str) -> pl.Expr:
    return (pl.col(col) - pl.col("t0")).dt.total_seconds(fractional=True) / SECONDS_PER_HOUR


def _ranges() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "feature": [*(feat.FEATURE_CODE[m.name] for m in feat.MEASURED), SPECIMEN_CODE],
            "low": [*(float(m.low) for m in feat.MEASURED), 0.0],
            "high": [*(float(m.high) for m in feat.MEASURED), 1.0],
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


def aggregate(lf: pl.LazyFrame, mean_per_time: bool, extra_keys: list[str] | None = None) -> pl.LazyFrame:
    """(stay_id, feature, t, avail, rank, valuenum) rows -> one row per KEYS with `last` (the tie-broken value
    at the latest timestamp), `t_last`, `t_avail`, `min`, `max`. `mean_per_time`: the min/max of a timestamp
    with several rows use their mean (chart vitals), else every row (labs)."""
    value = pl.col("valuenum")
    extra = extra_keys or []
    per_time = lf.group_by("stay_id", "feature", "t", "avail", *extra).agg(
        value.sort_by(["rank", "valuenum"], descending=[True, False]).last().alias("value"),
        (value.sort().mean() if mean_per_time else value.min()).alias("lo"),
        (value.sort().mean() if mean_per_time else value.max()).alias("hi"),
    )
    t = pl.col("t")
    return (
        per_time.with_columns(
            t.floor().cast(pl.Int32).alias("hour"),
            (t == t.floor()).alias("exact"),
            pl.col("avail").floor().cast(pl.Int32).alias("avail_hour"),
        )
        .group_by(*KEYS, *extra)
        .agg(
            pl.col("value").sort_by(["t", "avail", "value"]).last().cast(pl.Float32).alias("last"),
            t.max().alias("t_last"),
            t.min().alias("t_first"),
            pl.col("avail").max().alias("t_avail"),
            pl.col("lo").min().cast(pl.Float32).alias("min"),
            pl.col("hi").max().cast(pl.Float32).alias("max"),
        )
    )


def chart_pass(table: Table, stays: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One scan of chartevents -> (measured aggregates, raw GCS component rows, raw oxygen/ventilator rows)."""
    mapping = feat.itemid_to_feature("CE")
    rank = feat.itemid_priority("CE")
    wanted = sorted({*mapping, *GCS_IDS, *OXYGEN_IDS})
    base = (
        table.scan()
        .filter(pl.col("itemid").is_in(wanted))
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(hours_since("charttime").alias("t"))
        .filter(pl.col("t").is_between(-HOURS_BEFORE_ICU, pl.col("out_h")))
    )
    measured = base.filter(
        pl.col("itemid").is_in(list(mapping)) & pl.col("valuenum").is_not_null()
    ).with_columns(
        pl.col("itemid").replace_strict(mapping, return_dtype=pl.Int16).alias("feature"),
        pl.col("itemid").replace_strict(rank, return_dtype=pl.Int8).alias("rank"),
        pl.col("t").alias("avail"),  # chartevents: charted = known (storetime is blank in the demo)
    )
    measured = aggregate(_clean(measured), mean_per_time=True)
    gcs = gcs_components(base.filter(pl.col("itemid").is_in(list(GCS_IDS))))
    text = pl.col("itemid").is_in([O2_DEVICE_ID, VENT_MODE_ID, VENT_MODE_HAMILTON_ID])
    oxygen = base.filter(pl.col("itemid").is_in(list(OXYGEN_IDS))).select(
        "stay_id",
        "t",
        pl.col("itemid").cast(pl.Int32),
        pl.when(text).then(pl.col("value").str.strip_chars()).alias("value"),  # only the text items need it
        pl.col("valuenum").cast(pl.Float32),
    )
    return tuple(collect_many(table, [measured, gcs, oxygen]))  # type: ignore[return-value]


def gcs_components(lf: pl.LazyFrame) -> pl.LazyFrame:
    """GCS chartevents rows -> one row per (stay_id, t) with the eye, verbal and motor scores charted then
    (verbal 'No Response-ETT', the intubated patient, coded 0 as mimic-code `gcs`; out-of-range scores null)."""
    eye, verbal, motor = feat.GCS_EYE_ID, feat.GCS_VERBAL_ID, feat.GCS_MOTOR_ID
    item, v = pl.col("itemid"), pl.col("valuenum")
    ett = pl.col("value") == feat.GCS_VERBAL_ETT
    component = {
        "eye": pl.when((item == eye) & v.is_between(1, 4)).then(v),
        "verbal": pl.when((item == verbal) & ett)
        .then(0.0)
        .when((item == verbal) & v.is_between(1, 5))
        .then(v),
        "motor": pl.when((item == motor) & v.is_between(1, 6)).then(v),
    }
    return (
        lf.group_by("stay_id", "t")
        .agg(*(expr.max().cast(pl.Float32).alias(name) for name, expr in component.items()))
        .filter(pl.any_horizontal(pl.col(n).is_not_null() for n in component))
    )


def gcs_events(wide: pl.DataFrame) -> pl.DataFrame:
    """GCS total per charting time, as mimic-code `measurement/gcs`: a missing component is carried forward
    from a charting in the previous 6 h (per component), else counted normal (eye 4, verbal 5, motor 6);
    'No Response-ETT' (intubated) gives 15, also when carried forward. `wide`: gcs_components rows.
    Rows: (stay_id, t, gcs)."""
    component = ("eye", "verbal", "motor")
    wide = wide.sort("stay_id", "t")
    carried = []
    for name in component:
        at = pl.when(pl.col(name).is_not_null()).then(pl.col("t"))
        wide = wide.with_columns(
            pl.col(name).forward_fill().over("stay_id").alias(f"{name}_ff"),
            at.forward_fill().over("stay_id").alias(f"{name}_t"),
        ).with_columns(
            # the value before this row (for the "was intubated, now is not" rule)
            pl.col(f"{name}_ff").shift(1).over("stay_id").alias(f"{name}_prev"),
            pl.col(f"{name}_t").shift(1).over("stay_id").alias(f"{name}_prev_t"),
        )
        fresh = (pl.col("t") - pl.col(f"{name}_prev_t")) < GCS_CARRY_H
        carried.append(
            pl.coalesce(pl.col(name), pl.when(fresh).then(pl.col(f"{name}_prev"))).alias(f"{name}_c")
        )
    wide = wide.with_columns(carried)
    prev_verbal_fresh = (pl.col("t") - pl.col("verbal_prev_t")) < GCS_CARRY_H
    was_intubated = prev_verbal_fresh & (pl.col("verbal_prev") == 0)
    own = pl.col("eye").fill_null(4) + pl.col("verbal").fill_null(5) + pl.col("motor").fill_null(6)
    total = (
        pl.when(pl.col("verbal") == 0)
        .then(15.0)
        .when(pl.col("verbal").is_null() & was_intubated)
        .then(15.0)
        .when(was_intubated)  # extubated since: this charting's own components only
        .then(own)
        .otherwise(
            pl.col("eye_c").fill_null(4) + pl.col("verbal_c").fill_null(5) + pl.col("motor_c").fill_null(6)
        )
    )
    return wide.select("stay_id", "t", total.cast(pl.Float64).alias("gcs"))


def gcs_aggregates(raw: pl.DataFrame) -> pl.DataFrame:
    events = gcs_events(raw).select(
        "stay_id",
        pl.lit(feat.FEATURE_CODE["gcs"], dtype=pl.Int16).alias("feature"),
        "t",
        pl.col("t").alias("avail"),
        pl.lit(0, dtype=pl.Int8).alias("rank"),
        pl.col("gcs").alias("valuenum"),
    )
    return aggregate(events.lazy(), mean_per_time=True).collect()


def ventilation_status(oxygen: pl.DataFrame) -> pl.DataFrame:
    """(stay_id, t, status) per charting time of an O2 device or ventilator mode (mimic-code classes)."""
    item, value = pl.col("itemid"), pl.col("value")
    device, mode, hamilton = item == O2_DEVICE_ID, item == VENT_MODE_ID, item == VENT_MODE_HAMILTON_ID
    status = (
        pl.when(device & value.is_in(TRACH_DEVICES))
        .then(STATUS_TRACH)
        .when(
            (device & value.is_in(INVASIVE_DEVICES))
            | (mode & value.is_in(INVASIVE_MODES))
            | (hamilton & value.is_in(INVASIVE_MODES_HAMILTON))
        )
        .then(STATUS_INVASIVE)
        .when((device & value.is_in(NIV_DEVICES)) | (hamilton & value.is_in(NIV_MODES_HAMILTON)))
        .then(STATUS_NIV)
        .when(device & value.is_in(HFNC_DEVICES))
        .then(STATUS_HFNC)
        .when(device & value.is_in(O2_DEVICES))
        .then(STATUS_O2)
        .when(device & (value == "None"))
        .then(STATUS_NONE)
    )
    return (
        oxygen.with_columns(status.cast(pl.Int8).alias("status"))
        .filter(pl.col("status").is_not_null())
        .group_by("stay_id", "t")
        .agg(pl.col("status").max())
        .sort("stay_id", "t")
    )


def charted_vent_intervals(oxygen: pl.DataFrame) -> pl.DataFrame:
    """Invasive ventilation episodes from charted devices and modes, as mimic-code `treatment/ventilation`:
    consecutive chartings of the same status form an episode, ended by the next charting of another status
    (or by the last charting when the next is 14 h or more later); an episode of one charting is dropped."""
    rows = ventilation_status(oxygen).with_columns(
        pl.col("t").shift(-1).over("stay_id").alias("t_next"),
        pl.col("t").shift(1).over("stay_id").alias("t_prev"),
        pl.col("status").shift(1).over("stay_id").alias("status_prev"),
    )
    new = (
        pl.col("status_prev").is_null()
        | (pl.col("status_prev") != pl.col("status"))
        | ((pl.col("t") - pl.col("t_prev")) >= VENT_GAP_H)
    )
    end = (
        pl.when(pl.col("t_next").is_null() | ((pl.col("t_next") - pl.col("t")) >= VENT_GAP_H))
        .then(pl.col("t"))
        .otherwise(pl.col("t_next"))
    )
    episodes = (
        rows.with_columns(new.cast(pl.Int32).cum_sum().over("stay_id").alias("episode"), end.alias("end"))
        .group_by("stay_id", "episode")
        .agg(
            pl.col("status").first(),
            pl.col("t").min().alias("start_h"),
            pl.col("t").max().alias("last_t"),
            pl.col("end").max().alias("end_h"),
        )
        .filter((pl.col("status") == STATUS_INVASIVE) & (pl.col("start_h") != pl.col("last_t")))
    )
    return episodes.select("stay_id", "start_h", "end_h").sort("stay_id", "start_h", "end_h")


def oxygen_support(oxygen: pl.DataFrame) -> pl.DataFrame:
    """(stay_id, t, device, flow) rows of O2 device and flow chartings, for FiO2 estimation in the state."""
    device = oxygen.filter(pl.col("itemid") == O2_DEVICE_ID).select(
        "stay_id", "t", pl.col("value").alias("device")
    )
    flow = oxygen.filter((pl.col("itemid") == O2_FLOW_ID) & pl.col("valuenum").is_between(0, 100)).select(
        "stay_id", "t", pl.col("valuenum").alias("flow")
    )
    device = device.group_by("stay_id", "t").agg(pl.col("device").sort().last())
    flow = flow.group_by("stay_id", "t").agg(pl.col("flow").max())
    return device.join(flow, on=["stay_id", "t"], how="full", coalesce=True).sort("stay_id", "t")


def chart_fio2(oxygen: pl.DataFrame) -> pl.DataFrame:
    """Charted FiO2 (%) per (stay_id, t), cleaned as mimic-code `bg` (fractions x 100; 1-20 dropped)."""
    v = pl.col("valuenum")
    cleaned = (
        pl.when((v > 0.2) & (v <= 1.0)).then(v * 100.0).when((v >= 20) & (v <= 100)).then(v).otherwise(None)
    )
    return (
        oxygen.filter(pl.col("itemid") == FIO2_CHART_ID)
        .with_columns(cleaned.alias("fio2"))
        .filter(pl.col("fio2").is_not_null())
        .group_by("stay_id", "t")
        .agg(pl.col("fio2").max())
        .sort("t")
    )


def lab_pass(table: Table, stays: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """labevents -> (measured aggregates, blood gas specimens), in one streaming scan.

    Labs attach to the stays of their admission (hadm_id, as mimic-code's chemistry / blood count / enzyme
    tables); blood gas rows attach to every stay of the patient (mimic-code `sofa` joins gases by patient)
    and are aggregated per specimen, so that pH, PaO2, PaCO2 and base excess can be kept for arterial
    specimens only (52033 = 'ART.' on the same specimen_id). A lab is available to a state from its
    `storetime` (no storetime: never). Gas specimens: (stay_id, specimen_id, t, avail, arterial, po2, fio2_lab)."""
    mapping = feat.itemid_to_feature("LE")
    rank = feat.itemid_priority("LE")
    gas_feature_ids = [i for name in feat.ARTERIAL_ONLY for i in feat.MEASURED_BY_NAME[name].lab_ids]
    gas_ids = sorted({feat.SPECIMEN_TYPE_ID, PO2_ID, FIO2_LAB_ID, *gas_feature_ids})
    item = pl.col("itemid")
    is_gas = item.is_in(gas_ids)
    specimen_type = item == feat.SPECIMEN_TYPE_ID
    arterial = pl.col("value").str.strip_chars() == feat.ARTERIAL_SPECIMEN
    lf = (
        table.scan()
        .filter(item.is_in(sorted({*mapping, *gas_ids})))
        .join(
            stays.lazy().select("subject_id", pl.col("hadm_id").alias("stay_hadm"), "stay_id", "t0", "out_h"),
            on="subject_id",
            how="inner",
        )
        .with_columns(
            hours_since("charttime").alias("t"), (pl.col("hadm_id") == pl.col("stay_hadm")).alias("own")
        )
        .filter(
            pl.col("t").is_between(-HOURS_BEFORE_ICU, pl.col("out_h"))
            & (pl.col("own").fill_null(False) | is_gas)
        )
        .with_columns(
            item.replace_strict(mapping, default=SPECIMEN_CODE, return_dtype=pl.Int16).alias("feature"),
            item.replace_strict(rank, default=0, return_dtype=pl.Int8).alias("rank"),
            hours_since("storetime").fill_null(NEVER).alias("avail"),
            pl.when(is_gas).then(pl.col("specimen_id")).alias("specimen"),
            pl.when(specimen_type)
            .then(arterial.cast(pl.Float64))
            .otherwise(pl.col("valuenum"))
            .alias("valuenum"),
        )
        .filter(pl.col("valuenum").is_not_null())
    )
    grouped = aggregate(_clean(lf), mean_per_time=False, extra_keys=["specimen", "own"])
    rows = collect(table, grouped)
    gas_codes = [feat.FEATURE_CODE[name] for name in feat.ARTERIAL_ONLY]
    gases = (
        rows.filter(pl.col("specimen").is_not_null())
        .group_by("stay_id", "specimen")
        .agg(
            pl.col("t_last").max().alias("t"),
            pl.col("t_avail").max().alias("avail"),
            (pl.col("max").filter(pl.col("feature") == SPECIMEN_CODE).max() == 1.0)
            .fill_null(False)
            .alias("arterial"),
            pl.col("max")
            .filter(pl.col("feature") == feat.FEATURE_CODE["pao2"])
            .max()
            .cast(pl.Float64)
            .alias("po2"),
            pl.col("max")
            .filter(pl.col("feature") == feat.FEATURE_CODE["fio2"])
            .max()
            .cast(pl.Float64)
            .alias("fio2_lab"),
        )
        .rename({"specimen": "specimen_id"})
        .sort("stay_id", "specimen_id")
    )
    arterial_ids = gases.filter(pl.col("arterial")).select("stay_id", pl.col("specimen_id").alias("specimen"))
    kept = rows.filter(pl.col("own").fill_null(False) & (pl.col("feature") != SPECIMEN_CODE))
    measured = pl.concat(
        [
            kept.filter(~pl.col("feature").is_in(gas_codes)),
            kept.filter(pl.col("feature").is_in(gas_codes)).join(
                arterial_ids, on=["stay_id", "specimen"], how="semi"
            ),
        ]
    )
    return measured.drop("specimen", "own"), gases


def gas_pf(
    gases: pl.DataFrame,
    fio2: pl.DataFrame,
    vent: pl.DataFrame,
    status: pl.DataFrame,
    procedures: pl.DataFrame,
) -> pl.DataFrame:
    """Arterial gases with a P/F ratio, per stay: (stay_id, t, avail, pf, vent, vent_known).

    FiO2 is that of the gas specimen, else the last charted FiO2 of the stay in the 4 h up to the gas (mimic-code
    `bg`); `vent` is whether a charted invasive ventilation episode contains the gas time (mimic-code `sofa`
    pafi; for the cohort). `vent_known` uses only what was charted up to the gas (for the state): the last charted
    ventilation status at or before it, within 14 h, is invasive, or a ventilation procedure covers it."""
    art = gases.filter(pl.col("arterial") & pl.col("po2").is_not_null()).sort("t", "stay_id", "specimen_id")
    paired = art.join_asof(
        fio2.select("stay_id", pl.col("t").alias("t_fio2"), pl.col("fio2").alias("fio2_chart")),
        left_on="t",
        right_on="t_fio2",
        by="stay_id",
        strategy="backward",
        tolerance=FIO2_BEFORE_GAS_H,
        check_sortedness=False,
    )
    ratio = 100.0 * pl.col("po2") / pl.coalesce(pl.col("fio2_lab"), pl.col("fio2_chart"))
    paired = paired.with_columns(ratio.alias("pf")).filter(pl.col("pf").is_not_null())
    on_vent = (
        paired.select("stay_id", "specimen_id", "t")
        .join(vent, on="stay_id", how="inner")
        .filter((pl.col("t") >= pl.col("start_h")) & (pl.col("t") <= pl.col("end_h")))
        .select("stay_id", "specimen_id")
        .unique()
        .with_columns(pl.lit(True).alias("vent"))
    )
    paired = paired.join(on_vent, on=["stay_id", "specimen_id"], how="left").sort("t")
    last_status = paired.select("stay_id", "specimen_id", "t").join_asof(
        status.select("stay_id", pl.col("t").alias("t_status"), "status").sort("t_status"),
        left_on="t",
        right_on="t_status",
        by="stay_id",
        strategy="backward",
        tolerance=VENT_GAP_H - 1e-9,
        check_sortedness=False,
    )
    by_procedure = (
        paired.select("stay_id", "specimen_id", "t")
        .join(procedures, on="stay_id", how="inner")
        .filter((pl.col("t") >= pl.col("start_h")) & (pl.col("t") <= pl.col("end_h")))
        .select("stay_id", "specimen_id")
        .unique()
        .with_columns(pl.lit(True).alias("by_procedure"))
    )
    known = last_status.join(by_procedure, on=["stay_id", "specimen_id"], how="left").select(
        "stay_id",
        "specimen_id",
        (
            (pl.col("status") == STATUS_INVASIVE).fill_null(False) | pl.col("by_procedure").fill_null(False)
        ).alias("vent_known"),
    )
    return (
        paired.join(known, on=["stay_id", "specimen_id"], how="left")
        .select("stay_id", "specimen_id", "t", "avail", "pf", pl.col("vent").fill_null(False), "vent_known")
        .sort("stay_id", "t", "specimen_id")
    )


def bin_measured(measured: pl.DataFrame, convention: str) -> pl.DataFrame:
    """Aggregates -> one row per (stay_id, feature, hour) under a convention: "chart" = mimic-code's
    (h, h+1] by charttime (for the cohort), "avail" = [h, h+1) by the time the result was available (states)."""
    if convention == "chart":
        hour = pl.col("hour") - pl.col("exact").cast(pl.Int32)
        measured = measured.with_columns(hour.alias("bin"))
    else:
        measured = measured.filter(pl.col("t_avail") < NEVER).with_columns(pl.col("avail_hour").alias("bin"))
    return (
        measured.group_by("stay_id", "feature", "bin")
        .agg(
            pl.col("min").min(),
            pl.col("max").max(),
            pl.col("last").sort_by(["t_last", "t_avail", "last"]).last(),
            pl.col("t_last").max(),
        )
        .rename({"bin": "hour"})
    )


def bin_pf(pf: pl.DataFrame, convention: str) -> pl.DataFrame:
    """Gas P/F ratios -> worst ventilated and non-ventilated P/F per (stay_id, hour), as mimic-code `sofa`."""
    if convention == "chart":
        hour = (pl.col("t").ceil() - 1).cast(pl.Int32)
    else:
        pf = pf.filter(pl.col("avail") < NEVER).with_columns(pl.col("vent_known").alias("vent"))
        hour = pl.col("avail").floor().cast(pl.Int32)
    return (
        pf.with_columns(hour.alias("hour"))
        .group_by("stay_id", "hour")
        .agg(
            pl.col("pf").filter(pl.col("vent")).min().alias("pf_vent"),
            pl.col("pf").filter(~pl.col("vent")).min().alias("pf_novent"),
        )
    )


def _explode_hours(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per hour bin [h, h+1) an interval [start_h, end_h) overlaps, with the overlapped share of it."""
    first = pl.col("start_h").floor().cast(pl.Int32)
    last = pl.max_horizontal(pl.col("end_h").ceil().cast(pl.Int32), first + 1)
    lf = lf.with_columns(pl.int_ranges(first, last, dtype=pl.Int32).alias("hour")).explode("hour")
    duration = pl.col("end_h") - pl.col("start_h")
    overlap = pl.min_horizontal(pl.col("end_h"), pl.col("hour") + 1.0) - pl.max_horizontal(
        pl.col("start_h"), pl.col("hour").cast(pl.Float64)
    )
    share = pl.when(duration > 0).then(overlap / duration).otherwise(1.0)
    return lf.with_columns(share.clip(0.0, 1.0).alias("share"))


def _explode_hour_ends(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per hour h whose end (h + 1) lies in (start_h, end_h]: the infusion runs at the hour's end
    (mimic-code `sofa`: starttime < hour end <= endtime)."""
    first_end = pl.col("start_h").floor().cast(pl.Int32) + 1
    last_end = pl.col("end_h").floor().cast(pl.Int32)
    ends = pl.int_ranges(first_end, pl.max_horizontal(last_end + 1, first_end), dtype=pl.Int32)
    return (
        lf.with_columns(ends.alias("end"))
        .explode("end")
        .filter(pl.col("end").is_not_null())
        .with_columns((pl.col("end") - 1).alias("hour"))
    )


def _sorted_sum(expr: pl.Expr) -> pl.Expr:
    """A float sum independent of row order (same bytes on every run)."""
    return expr.drop_nulls().sort().sum()


def input_hourly(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """inputevents -> per (stay_id, hour [h, h+1)): tonicity-adjusted and raw IV fluid (mL, prorated over the
    hours the infusion ran), the max rate of each vasopressor agent (ug/kg/min; vasopressin U/min) and the
    NE-equivalent rate (action); and per hour end, the rate of each SOFA agent running at it (`*_at_end`)."""
    ids = list(act.TONICITY) + [itemid for itemid, _ in act.VASOPRESSORS.values()]
    weight = (
        pl.when(pl.col("patientweight") > 0).then(pl.col("patientweight")).otherwise(act.DEFAULT_WEIGHT_KG)
    )
    rows = collect(
        table,
        table.scan()
        .filter(pl.col("itemid").is_in(ids))
        .filter(pl.col("statusdescription").fill_null("") != "Rewritten")
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner"),
    )
    # an exactly duplicated row would count its volume twice; sorted so every later step sees one order
    rows = rows.unique().sort(rows.columns)
    lf = (
        rows.lazy()
        .with_columns(
            hours_since("starttime").clip(-1.0, None).alias("start_h"),
            pl.min_horizontal(hours_since("endtime"), pl.col("out_h") + 1.0).alias("end_h"),
        )
        .filter(pl.col("end_h") >= pl.col("start_h"))
        .with_columns(
            act.fluid_ml(pl.col("amount"), pl.col("amountuom"), pl.col("itemid")).alias("volume"),
            pl.col("itemid")
            .replace_strict(act.TONICITY, default=None, return_dtype=pl.Float64)
            .alias("tonicity"),
            act.ug_per_kg_min(pl.col("rate"), pl.col("rateuom").fill_null(""), weight).alias("agent_rate"),
        )
    )
    hourly = _explode_hours(lf)
    aggs = [
        _sorted_sum(pl.col("volume") * pl.col("tonicity") * pl.col("share"))
        .cast(pl.Float32)
        .alias("fluid_tev"),
        _sorted_sum(pl.col("volume") * pl.col("tonicity").is_not_null() * pl.col("share"))
        .cast(pl.Float32)
        .alias("fluid_raw"),
    ]
    for name, (itemid, _) in act.VASOPRESSORS.items():
        aggs.append(
            pl.col("agent_rate").filter(pl.col("itemid") == itemid).max().cast(pl.Float32).alias(name)
        )
    ne_eq = pl.sum_horizontal([pl.col(n).fill_null(0.0) * f for n, (_, f) in act.VASOPRESSORS.items()])
    hourly = hourly.group_by("stay_id", "hour").agg(aggs).with_columns(ne_eq.cast(pl.Float32).alias("ne_eq"))
    at_end = _explode_hour_ends(lf).group_by("stay_id", "hour").agg(
        pl.col("agent_rate").filter(pl.col("itemid") == act.VASOPRESSORS[name][0]).max().cast(pl.Float32)
        .alias(f"{name}_at_end")
        for name in act.SOFA_AGENTS
    )  # fmt: skip
    out = hourly.join(at_end, on=["stay_id", "hour"], how="full", coalesce=True).collect()
    return out.sort("stay_id", "hour")


def urine_events(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """outputevents -> urine output (mL) per (stay_id, t) charting time, GU irrigant counted negative
    (mimic-code `urine_output`)."""
    ids = [*act.URINE_IDS, act.GU_IRRIGANT_IN]
    sign = pl.when(pl.col("itemid") == act.GU_IRRIGANT_IN).then(-1.0).otherwise(1.0)
    lf = (
        table.scan()
        .filter(pl.col("itemid").is_in(ids) & pl.col("value").is_not_null())
        .unique()  # an exactly duplicated row would count its volume twice
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .with_columns(hours_since("charttime").alias("t"))
        .filter(pl.col("t") >= -HOURS_BEFORE_ICU)
        .group_by("stay_id", "t")
        .agg(_sorted_sum(pl.col("value") * sign).alias("urine"))
    )
    return collect(table, lf).sort("stay_id", "t")


URINE_WINDOW_H = 23.0  # mimic-code `urine_output_rate`: the charting and those of the 23 h before it
URINE_MIN_OBSERVED_H, URINE_MAX_OBSERVED_H = 22.0, 30.0  # mimic-code `sofa`: uo_tm_24hr in [22, 30]


def urine_24h(urine: pl.DataFrame, first_hr: pl.DataFrame) -> pl.DataFrame:
    """Per urine charting, the 24 h output as mimic-code `urine_output_rate` and `sofa` compute it: the
    output charted in the 23 h up to it, over the time it covers (each charting covers the time since the
    previous one; the first, the time since the stay's first heart rate), scaled to 24 h when that time is
    22-30 h, else unknown. `first_hr`: (stay_id, first_hr_t). Rows: (stay_id, t, urine, uo_24h)."""
    seconds = (pl.col("t") * 3600.0).round().cast(pl.Int64)
    rows = (
        urine.join(first_hr, on="stay_id", how="left")
        .sort("stay_id", "t")
        .with_columns(
            seconds.alias("t_s"),
            (pl.col("t") - pl.col("t").shift(1).over("stay_id"))
            .fill_null(pl.col("t") - pl.col("first_hr_t"))
            .alias("covered_h"),
        )
    )
    window = f"{int(URINE_WINDOW_H * 3600) + 1}i"  # (t - 23 h - 1 s, t] = [t - 23 h, t] in whole seconds
    sums = rows.rolling(index_column="t_s", period=window, closed="right", group_by="stay_id").agg(
        pl.col("urine").sum().alias("urine_window"), pl.col("covered_h").sum().alias("covered_window")
    )
    rows = rows.join(sums, on=["stay_id", "t_s"], how="left")
    covered = pl.col("covered_window")
    valid = (covered >= URINE_MIN_OBSERVED_H) & (covered <= URINE_MAX_OBSERVED_H)
    uo_24h = pl.when(valid).then(pl.col("urine_window") / covered * 24.0)
    return rows.select("stay_id", "t", "urine", uo_24h.alias("uo_24h")).sort("stay_id", "t")


def bin_urine(urine: pl.DataFrame, convention: str) -> pl.DataFrame:
    """Urine chartings -> per (stay_id, hour): output in the hour (mL) and the highest 24 h estimate of a
    charting in the hour (mimic-code `sofa` takes MAX(uo_24hr) per hour)."""
    hour = (pl.col("t").ceil() - 1) if convention == "chart" else pl.col("t").floor()
    return (
        urine.with_columns(hour.cast(pl.Int32).alias("hour"))
        .group_by("stay_id", "hour")
        .agg(_sorted_sum(pl.col("urine")).cast(pl.Float32).alias("urine"), pl.col("uo_24h").max())
    )


def procedure_vent_intervals(table: Table, stays: pl.DataFrame) -> pl.DataFrame:
    """procedureevents invasive ventilation (225792) -> (stay_id, start_h, end_h)."""
    lf = (
        table.scan()
        .filter(pl.col("itemid") == act.INVASIVE_VENT_ID)
        .join(stays.lazy().select("stay_id", "t0", "out_h"), on="stay_id", how="inner")
        .select("stay_id", hours_since("starttime").alias("start_h"), hours_since("endtime").alias("end_h"))
        .filter(pl.col("end_h") >= pl.col("start_h"))
    )
    return collect(table, lf).sort("stay_id", "start_h", "end_h")


def vent_known_hourly(oxygen: pl.DataFrame, procedures: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """Ventilation as known at each hour's end, for the state: (stay_id, hour, vent=1) when the last ventilation
    status charted before t0 + h + 1 (within 14 h) is invasive, or a ventilation procedure touches the hour.
    (mimic-code's episodes end at the *next* charting, which may lie after a window start.)"""
    hours = (
        stays.select(
            "stay_id",
            pl.int_ranges(-HOURS_BEFORE_ICU, pl.col("out_h").ceil().cast(pl.Int32) + 1, dtype=pl.Int32).alias(
                "hour"
            ),
        )
        .explode("hour")
        .with_columns((pl.col("hour") + 1).cast(pl.Float64).alias("end"))
        .sort("end")
    )
    charted = (
        hours.join_asof(
            ventilation_status(oxygen).sort("t"),
            left_on="end",
            right_on="t",
            by="stay_id",
            strategy="backward",
            allow_exact_matches=False,
            tolerance=VENT_GAP_H - 1e-9,
            check_sortedness=False,
        )
        .filter(pl.col("status") == STATUS_INVASIVE)
        .select("stay_id", "hour", pl.lit(1, dtype=pl.Int8).alias("vent"))
    )
    return pl.concat([charted, vent_hourly(procedures)]).unique().sort("stay_id", "hour")


def vent_hourly(intervals: pl.DataFrame) -> pl.DataFrame:
    """Ventilation intervals -> (stay_id, hour, vent=1) for every hour [h, h+1) they touch."""
    lf = intervals.lazy().with_columns(pl.col("start_h").clip(-HOURS_BEFORE_ICU, None))
    return (
        _explode_hours(lf)
        .group_by("stay_id", "hour")
        .agg(pl.lit(1, dtype=pl.Int8).alias("vent"))
        .collect()
        .sort("stay_id", "hour")
    )
