"""Sepsis-3 cohort as mimic-code defines it (`medication/antibiotic.sql`, `sepsis/suspicion_of_infection.sql`,
`sepsis/sepsis3.sql`; facts in /work/shared/docs/mimic-iv-reference.md §3).

- Antibiotics: prescriptions whose drug name matches the list below, not drug_type 'BASE', not an eye, ear or
  topical route, not a cream/gel/desensitisation; attached to an ICU stay when started during it.
- Suspected infection, per antibiotic: the first culture in (abx - 72 h, abx] gives SI time = culture time;
  else a culture in [abx, abx + 24 h) gives SI time = antibiotic time. A culture without charttime is
  compared by date (3 days before / 1 day after).
- Sepsis-3: an in-ICU hour whose 24 h SOFA is >= 2 and whose end lies in [SI - 48 h, SI + 24 h]. Per stay the
  earliest SI with such an hour, and its earliest such hour; onset = that hour's end (mimic-code `sofa_time`).
"""

from __future__ import annotations

import polars as pl

# Drug-name fragments (lower case) from mimic-code's antibiotic list (generic and brand names; not all of them),
# plus a few generics it spells by brand only (daptomycin, ertapenem, imipenem, tigecycline).
ANTIBIOTIC_NAMES = (
    "amikacin", "amoxicill", "ampicillin", "augmentin", "avelox", "azactam", "azithromycin", "aztreonam",
    "bactrim", "biaxin", "cefazolin", "cefoxitin", "ceftazidime", "cefaclor", "cefadroxil", "cefdinir",
    "cefditoren", "cefepime", "cefotan", "cefotetan", "cefotaxime", "ceftaroline", "cefpodoxime", "cefprozil",
    "ceftibuten", "ceftin", "ceftriaxone", "cefuroxime", "cephalexin", "chloramphenicol", "cipro", "claforan",
    "clarithromycin", "cleocin", "clindamycin", "cubicin", "daptomycin", "dicloxacillin", "doxycy",
    "ertapenem", "erythromycin", "flagyl", "fortaz", "gentamicin", "imipenem", "kanamycin", "keflex",
    "kefzol", "levaquin", "levofloxacin", "linezolid", "macrobid", "maxipime", "meropenem", "methicillin",
    "metronidazole", "minocycline", "moxifloxacin", "nafcillin", "neomycin", "nitrofurantoin", "norfloxacin",
    "ofloxacin", "oxacillin", "penicillin", "piperacillin", "rifampin", "rocephin", "septra", "smz-tmp",
    "streptomycin", "sulfamethoxazole", "tazobactam", "tetracycline", "tigecycline", "tobramycin",
    "trimethoprim", "unasyn", "vancocin", "vancomycin", "zosyn", "zyvox",
    "amikin", "bactocill", "bicillin", "cayston", "cedax", "cephalothin", "cephapirin", "doryx", "duricef",
    "dynacin", "erythrocin", "factive", "furadantin", "garamycin", "lincocin", "macrodantin", "mefoxin",
    "minocin", "monurol", "omnicef", "pfizerpen", "rifadin", "spectracef", "sulfadiazine", "sulfisoxazole",
    "suprax", "synercid", "tazicef", "timentin", "vantin", "vibativ", "vibramycin", "zinacef", "zithromax",
)  # fmt: skip
EXCLUDED_ROUTES = ("OU", "OS", "OD", "AU", "AS", "AD", "TP")
EXCLUDED_WORDS = ("cream", "desensitization", "ophth oint", "gel")
CULTURE_BEFORE_H, CULTURE_AFTER_H = 72.0, 24.0
SOFA_BEFORE_H, SOFA_AFTER_H = 48.0, 24.0


def is_antibiotic(drug: pl.Expr, route: pl.Expr, drug_type: pl.Expr) -> pl.Expr:
    name = drug.str.to_lowercase()
    pattern = "|".join(ANTIBIOTIC_NAMES)
    excluded = "|".join(EXCLUDED_WORDS)
    return (
        name.str.contains(pattern)
        & ~name.str.contains(excluded)
        & ~route.fill_null("").str.to_uppercase().is_in(list(EXCLUDED_ROUTES))
        & (drug_type.fill_null("") != "BASE")
    )


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
    """One row per specimen: subject, its charttime (may be null) and chartdate."""
    return micro.group_by("micro_specimen_id").agg(
        pl.col("subject_id").first(),
        pl.col("charttime").min().alias("culture_time"),
        pl.col("chartdate").min().dt.date().alias("culture_date"),
    )


def suspected_infection(abx: pl.DataFrame, cult: pl.DataFrame) -> pl.DataFrame:
    """Per antibiotic with a matching culture: (stay_id, subject_id, abx_time, culture_time, si_time)."""
    pairs = abx.join(cult, on="subject_id", how="inner")
    hours = (pl.col("culture_time") - pl.col("abx_time")).dt.total_seconds(fractional=True) / 3600.0
    days = (pl.col("culture_date") - pl.col("abx_time").dt.date()).dt.total_days()
    before = (
        pl.when(pl.col("culture_time").is_not_null())
        .then((hours > -CULTURE_BEFORE_H) & (hours <= 0))
        .otherwise((days > -CULTURE_BEFORE_H / 24) & (days <= 0))
    )
    after = (
        pl.when(pl.col("culture_time").is_not_null())
        .then((hours > 0) & (hours < CULTURE_AFTER_H))
        .otherwise((days > 0) & (days <= CULTURE_AFTER_H / 24))
    )
    culture_at = pl.coalesce(pl.col("culture_time"), pl.col("culture_date").cast(pl.Datetime("us")))
    first_before = (
        pairs.filter(before)
        .sort(culture_at)
        .group_by("stay_id", "abx_time", maintain_order=True)
        .agg(pl.col("subject_id").first(), culture_at.first().alias("culture_time"))
        .with_columns(pl.col("culture_time").alias("si_time"))
    )
    first_after = (
        pairs.filter(after)
        .sort(culture_at)
        .group_by("stay_id", "abx_time", maintain_order=True)
        .agg(pl.col("subject_id").first(), culture_at.first().alias("culture_time"))
        .join(first_before.select("stay_id", "abx_time"), on=["stay_id", "abx_time"], how="anti")
        .with_columns(pl.col("abx_time").alias("si_time"))
    )
    columns = ["stay_id", "subject_id", "abx_time", "culture_time", "si_time"]
    return pl.concat([first_before.select(columns), first_after.select(columns)]).sort("stay_id", "si_time")


def sepsis_onset(si: pl.DataFrame, grid: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """Per stay meeting Sepsis-3: si_time, abx_time, culture_time, onset hour (hours since t0), onset time and
    the SOFA at onset."""
    si_h = si.join(stays.select("stay_id", "t0"), on="stay_id").with_columns(
        ((pl.col("si_time") - pl.col("t0")).dt.total_seconds(fractional=True) / 3600.0).alias("si_h")
    )
    sofa_hours = grid.filter((pl.col("hour") >= 0) & (pl.col("sofa") >= 2)).select(
        "stay_id", (pl.col("hour") + 1).alias("onset_h"), pl.col("sofa").alias("sofa_at_onset")
    )
    matched = (
        si_h.join(sofa_hours, on="stay_id", how="inner")
        .filter(
            (pl.col("onset_h") >= pl.col("si_h") - SOFA_BEFORE_H)
            & (pl.col("onset_h") <= pl.col("si_h") + SOFA_AFTER_H)
        )
        .sort("stay_id", "si_time", "abx_time", "onset_h")
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
