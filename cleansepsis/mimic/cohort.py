"""Sepsis-3 cohort as mimic-code defines it (`medication/antibiotic.sql`, `sepsis/suspicion_of_infection.sql`,
`sepsis/sepsis3.sql`, read at MIT-LCP/mimic-code; facts in /work/shared/docs/mimic-iv-reference.md §3).

- Antibiotics: prescriptions whose drug name contains one of mimic-code's fragments, drug_type not 'BASE',
  route not an eye/ear/topical code nor containing "ear"/"eye", not a cream/gel/desensitisation/ophth oint.
  A null route or drug_type is excluded (SQL `NOT IN` is not true for null). Attached to an ICU stay of the
  same admission when started in [intime, outtime).
- Suspected infection, per antibiotic: the earliest culture (by chartdate, then charttime, date-only last) in
  [abx - 72 h, abx) gives SI time = culture time; else the earliest culture in (abx, abx + 24 h] gives SI time
  = antibiotic time. A culture without charttime is compared by date: abx date in [date, date + 3 d] / in
  [date - 1 d, date].
- Sepsis-3: an in-ICU hour whose 24 h SOFA is >= 2 and whose end lies in [SI - 48 h, SI + 24 h]. Per stay the
  row first by (SI time, antibiotic time, culture time, hour end); onset = that hour's end (`sofa_time`).
"""

from __future__ import annotations

import re

import polars as pl

# Drug-name fragments (lower case) of mimic-code's `medication/antibiotic.sql`, all of them, spelled as there
# (its "cephapririn" typo included, so the same drugs match).
ANTIBIOTIC_NAMES = (
    "adoxa", "ala-tet", "alodox", "amikacin", "amikin", "amoxicill", "amphotericin", "anidulafungin", "ancef",
    "clavulanate", "ampicillin", "augmentin", "avelox", "avidoxy", "azactam", "azithromycin", "aztreonam",
    "axetil", "bactocill", "bactrim", "bactroban", "bethkis", "biaxin", "bicillin l-a", "cayston", "cefazolin",
    "cedax", "cefoxitin", "ceftazidime", "cefaclor", "cefadroxil", "cefdinir", "cefditoren", "cefepime",
    "cefotan", "cefotetan", "cefotaxime", "ceftaroline", "cefpodoxime", "cefpirome", "cefprozil", "ceftibuten",
    "ceftin", "ceftriaxone", "cefuroxime", "cephalexin", "cephalothin", "cephapririn", "chloramphenicol",
    "cipro", "ciprofloxacin", "claforan", "clarithromycin", "cleocin", "clindamycin", "cubicin",
    "dicloxacillin", "dirithromycin", "doryx", "doxycy", "duricef", "dynacin", "ery-tab", "eryped", "eryc",
    "erythrocin", "erythromycin", "factive", "flagyl", "fortaz", "furadantin", "garamycin", "gentamicin",
    "kanamycin", "keflex", "kefzol", "ketek", "levaquin", "levofloxacin", "lincocin", "linezolid", "macrobid",
    "macrodantin", "maxipime", "mefoxin", "metronidazole", "meropenem", "methicillin", "minocin",
    "minocycline", "monodox", "monurol", "morgidox", "moxatag", "moxifloxacin", "mupirocin", "myrac",
    "nafcillin", "neomycin", "nicazel doxy 30", "nitrofurantoin", "norfloxacin", "noroxin", "ocudox",
    "ofloxacin", "omnicef", "oracea", "oraxyl", "oxacillin", "pc pen vk", "pce dispertab", "panixine",
    "pediazole", "penicillin", "periostat", "pfizerpen", "piperacillin", "tazobactam", "primsol", "proquin",
    "raniclor", "rifadin", "rifampin", "rocephin", "smz-tmp", "septra", "solodyn", "spectracef",
    "streptomycin", "sulfadiazine", "sulfamethoxazole", "trimethoprim", "sulfatrim", "sulfisoxazole",
    "suprax", "synercid", "tazicef", "tetracycline", "timentin", "tobramycin", "unasyn", "vancocin",
    "vancomycin", "vantin", "vibativ", "vibra-tabs", "vibramycin", "zinacef", "zithromax", "zosyn", "zyvox",
)  # fmt: skip
EXCLUDED_ROUTES = ("OU", "OS", "OD", "AU", "AS", "AD", "TP")
EXCLUDED_ROUTE_WORDS = ("ear", "eye")
EXCLUDED_WORDS = ("cream", "desensitization", "ophth oint", "gel")
CULTURE_BEFORE_H, CULTURE_AFTER_H = 72.0, 24.0
CULTURE_BEFORE_DAYS, CULTURE_AFTER_DAYS = 3, 1
SOFA_BEFORE_H, SOFA_AFTER_H = 48.0, 24.0


def _any_of(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in words)


def is_antibiotic(drug: pl.Expr, route: pl.Expr, drug_type: pl.Expr) -> pl.Expr:
    name = drug.str.to_lowercase()
    route_lower = route.str.to_lowercase()
    keep = (
        name.str.contains(_any_of(ANTIBIOTIC_NAMES))
        & ~name.str.contains(_any_of(EXCLUDED_WORDS))
        & ~route.is_in(list(EXCLUDED_ROUTES))
        & ~route_lower.str.contains(_any_of(EXCLUDED_ROUTE_WORDS))
        & (drug_type != "BASE")
    )
    # SQL three-valued logic: a null route or drug_type never passes `NOT IN` / `NOT LIKE`
    return keep.fill_null(False) & route.is_not_null() & drug_type.is_not_null()


def antibiotics_in_stays(prescriptions: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """(stay_id, subject_id, abx_time) for antibiotics started during an ICU stay of the same admission."""
    return (
        prescriptions.filter(pl.col("starttime").is_not_null())
        .join(stays.select("stay_id", "hadm_id", "intime", "outtime"), on="hadm_id", how="inner")
        .filter((pl.col("starttime") >= pl.col("intime")) & (pl.col("starttime") < pl.col("outtime")))
        .select("stay_id", "subject_id", pl.col("starttime").alias("abx_time"))
        .unique()
    )


def cultures(micro: pl.DataFrame) -> pl.DataFrame:
    """One row per specimen (mimic-code collapses a specimen's rows with MAX): subject, charttime (may be
    null) and chartdate."""
    return micro.group_by("micro_specimen_id").agg(
        pl.col("subject_id").max(),
        pl.col("charttime").max().alias("culture_time"),
        pl.col("chartdate").max().dt.date().alias("culture_date"),
    )


def suspected_infection(abx: pl.DataFrame, cult: pl.DataFrame) -> pl.DataFrame:
    """Per antibiotic with a matching culture: (stay_id, subject_id, abx_time, culture_time, si_time)."""
    pairs = abx.join(cult, on="subject_id", how="inner")
    timed = pl.col("culture_time").is_not_null()
    hours = (pl.col("culture_time") - pl.col("abx_time")).dt.total_seconds(fractional=True) / 3600.0
    days = (pl.col("abx_time").dt.date() - pl.col("culture_date")).dt.total_days()  # abx date - culture date
    before = (
        pl.when(timed)
        .then((hours >= -CULTURE_BEFORE_H) & (hours < 0))
        .otherwise((days >= 0) & (days <= CULTURE_BEFORE_DAYS))
    )
    after = (
        pl.when(timed)
        .then((hours > 0) & (hours <= CULTURE_AFTER_H))
        .otherwise((days >= -CULTURE_AFTER_DAYS) & (days <= 0))
    )
    culture_at = pl.coalesce(pl.col("culture_time"), pl.col("culture_date").cast(pl.Datetime("us")))
    # mimic-code's order: chartdate, then charttime with date-only cultures last; specimen id settles the rest
    order = ["stay_id", "abx_time", "culture_date", "culture_time", "micro_specimen_id"]

    def first_culture(frame: pl.DataFrame) -> pl.DataFrame:
        return (
            frame.sort(order, nulls_last=True)
            .group_by("stay_id", "abx_time", maintain_order=True)
            .agg(pl.col("subject_id").first(), culture_at.first().alias("culture_time"))
        )

    first_before = first_culture(pairs.filter(before)).with_columns(pl.col("culture_time").alias("si_time"))
    first_after = (
        first_culture(pairs.filter(after))
        .join(first_before.select("stay_id", "abx_time"), on=["stay_id", "abx_time"], how="anti")
        .with_columns(pl.col("abx_time").alias("si_time"))
    )
    columns = ["stay_id", "subject_id", "abx_time", "culture_time", "si_time"]
    return pl.concat([first_before.select(columns), first_after.select(columns)]).sort(
        "stay_id", "si_time", "abx_time", "culture_time"
    )


def sepsis_onset(si: pl.DataFrame, grid: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """Per stay meeting Sepsis-3: si_time, abx_time, culture_time, onset hour (hours since t0), onset time and
    the SOFA at onset."""
    si_h = si.join(stays.select("stay_id", "t0"), on="stay_id").with_columns(
        ((pl.col("si_time") - pl.col("t0")).dt.total_seconds(fractional=True) / 3600.0).alias("si_h")
    )
    # in-ICU rows only: mimic-code's hour 0 ends at the first heart rate rounded up to the hour
    first_end = stays.select("stay_id", "first_hour_end") if "first_hour_end" in stays.columns else None
    sofa_hours = grid.filter(pl.col("sofa") >= 2).select(
        "stay_id", (pl.col("hour") + 1).alias("onset_h"), pl.col("sofa").alias("sofa_at_onset")
    )
    if first_end is None:
        sofa_hours = sofa_hours.filter(pl.col("onset_h") >= 1)
    else:
        sofa_hours = sofa_hours.join(first_end, on="stay_id").filter(
            pl.col("onset_h") >= pl.col("first_hour_end")
        )
    matched = (
        si_h.join(sofa_hours, on="stay_id", how="inner")
        .filter(
            (pl.col("onset_h") >= pl.col("si_h") - SOFA_BEFORE_H)
            & (pl.col("onset_h") <= pl.col("si_h") + SOFA_AFTER_H)
        )
        .sort("stay_id", "si_time", "abx_time", "culture_time", "onset_h")
        .group_by("stay_id", maintain_order=True)
        .first()
    )
    return matched.select(
        "stay_id",
        "abx_time",
        "culture_time",
        "si_time",
        pl.col("onset_h").cast(pl.Int32),
        (pl.col("t0") + pl.duration(hours=pl.col("onset_h"))).alias("onset_time"),
        "sofa_at_onset",
    )
