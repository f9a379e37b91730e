"""Charlson comorbidity index from `hosp.diagnoses_icd`, ICD-9-CM and ICD-10 codes of Quan et al. 2005
("Coding algorithms for defining comorbidities in ICD-9-CM and ICD-10 administrative data", Med Care 43:1130),
with Charlson's 1987 weights, as mimic-code `comorbidity/charlson.sql` applies them to MIMIC-IV. The age points
are left out (age is its own state feature).

No look-ahead: diagnoses are coded at discharge, so an admission's own codes are not known during its ICU stay.
A stay's index uses only the admissions of the same patient discharged before the stay began.
"""

from __future__ import annotations

import polars as pl

# condition -> (ICD-9 prefixes, ICD-9 prefix ranges, ICD-10 prefixes, ICD-10 prefix ranges); a range
# (lo, hi) matches codes whose first len(lo) characters lie in [lo, hi].
Codes = tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...], tuple[tuple[str, str], ...]]
CONDITIONS: dict[str, Codes] = {
    "myocardial_infarct": (("410", "412"), (), ("I21", "I22", "I252"), ()),
    "congestive_heart_failure": (
        ("428", "39891", "40201", "40211", "40291", "40401", "40403", "40411", "40413", "40491", "40493"),
        (("4254", "4259"),),
        ("I43", "I50", "I099", "I110", "I130", "I132", "I255", "I420", "I425", "I426", "I427", "I428", "I429",
         "P290"),
        (),
    ),
    "peripheral_vascular_disease": (
        ("440", "441", "0930", "4373", "4471", "5571", "5579", "V434"),
        (("4431", "4439"),),
        ("I70", "I71", "I731", "I738", "I739", "I771", "I790", "I792", "K551", "K558", "K559", "Z958", "Z959"),
        (),
    ),
    "cerebrovascular_disease": (("36234",), (("430", "438"),), ("G45", "G46", "H340"), (("I60", "I69"),)),
    "dementia": (("290", "2941", "3312"), (), ("F00", "F01", "F02", "F03", "G30", "F051", "G311"), ()),
    "chronic_pulmonary_disease": (
        ("4168", "4169", "5064", "5081", "5088"),
        (("490", "505"),),
        ("I278", "I279", "J684", "J701", "J703"),
        (("J40", "J47"), ("J60", "J67")),
    ),
    "rheumatic_disease": (
        ("725", "4465", "7100", "7101", "7102", "7103", "7104", "7140", "7141", "7142", "7148"),
        (),
        ("M05", "M06", "M32", "M33", "M34", "M315", "M351", "M353", "M360"),
        (),
    ),
    "peptic_ulcer_disease": (("531", "532", "533", "534"), (), ("K25", "K26", "K27", "K28"), ()),
    "mild_liver_disease": (
        ("570", "571", "0706", "0709", "5733", "5734", "5738", "5739", "V427", "07022", "07023", "07032", "07033",
         "07044", "07054"),
        (),
        ("B18", "K73", "K74", "K700", "K701", "K702", "K703", "K709", "K713", "K714", "K715", "K717", "K760",
         "K762", "K763", "K764", "K768", "K769", "Z944"),
        (),
    ),
    "diabetes_without_cc": (
        ("2500", "2501", "2502", "2503", "2508", "2509"),
        (),
        ("E100", "E101", "E106", "E108", "E109", "E110", "E111", "E116", "E118", "E119", "E120", "E121", "E126",
         "E128", "E129", "E130", "E131", "E136", "E138", "E139", "E140", "E141", "E146", "E148", "E149"),
        (),
    ),
    "diabetes_with_cc": (
        ("2504", "2505", "2506", "2507"),
        (),
        ("E102", "E103", "E104", "E105", "E107", "E112", "E113", "E114", "E115", "E117", "E122", "E123", "E124",
         "E125", "E127", "E132", "E133", "E134", "E135", "E137", "E142", "E143", "E144", "E145", "E147"),
        (),
    ),
    "paraplegia": (
        ("342", "343", "3341", "3440", "3441", "3442", "3443", "3444", "3445", "3446", "3449"),
        (),
        ("G81", "G82", "G041", "G114", "G801", "G802", "G830", "G831", "G832", "G833", "G834", "G839"),
        (),
    ),
    "renal_disease": (
        ("582", "585", "586", "V56", "5880", "V420", "V451", "40301", "40311", "40391", "40402", "40403", "40412",
         "40413", "40492", "40493"),
        (("5830", "5837"),),
        ("N18", "N19", "I120", "I131", "N032", "N033", "N034", "N035", "N036", "N037", "N052", "N053", "N054",
         "N055", "N056", "N057", "N250", "Z490", "Z491", "Z492", "Z940", "Z992"),
        (),
    ),
    "malignant_cancer": (
        ("2386",),
        (("140", "172"), ("1740", "1958"), ("200", "208")),
        ("C43", "C88"),
        (("C00", "C26"), ("C30", "C34"), ("C37", "C41"), ("C45", "C58"), ("C60", "C76"), ("C81", "C85"),
         ("C90", "C97")),
    ),
    "severe_liver_disease": (
        ("4560", "4561", "4562"),
        (("5722", "5728"),),
        ("I850", "I859", "I864", "I982", "K704", "K711", "K721", "K729", "K765", "K766", "K767"),
        (),
    ),
    "metastatic_solid_tumor": (("196", "197", "198", "199"), (), ("C77", "C78", "C79", "C80"), ()),
    "aids": (("042", "043", "044"), (), ("B20", "B21", "B22", "B24"), ()),
}  # fmt: skip
# Charlson 1987 weights; within a pair only the heavier condition counts (liver, diabetes, cancer).
SIMPLE_WEIGHTS = {
    "myocardial_infarct": 1, "congestive_heart_failure": 1, "peripheral_vascular_disease": 1,
    "cerebrovascular_disease": 1, "dementia": 1, "chronic_pulmonary_disease": 1, "rheumatic_disease": 1,
    "peptic_ulcer_disease": 1, "paraplegia": 2, "renal_disease": 2, "aids": 6,
}  # fmt: skip
HIERARCHIES = (
    (("mild_liver_disease", 1), ("severe_liver_disease", 3)),
    (("diabetes_without_cc", 1), ("diabetes_with_cc", 2)),
    (("malignant_cancer", 2), ("metastatic_solid_tumor", 6)),
)


def _matches(code: pl.Expr, prefixes: tuple[str, ...], ranges: tuple[tuple[str, str], ...]) -> pl.Expr:
    hit = pl.lit(False)
    for prefix in prefixes:
        hit = hit | code.str.starts_with(prefix)
    for lo, hi in ranges:
        head = code.str.slice(0, len(lo))
        hit = hit | ((head.str.len_chars() == len(lo)) & (head >= lo) & (head <= hi))
    return hit


def condition_flags(diagnoses: pl.DataFrame) -> pl.DataFrame:
    """(subject_id, hadm_id, icd_code, icd_version) -> one row per admission with a 0/1 column per condition."""
    code = pl.col("icd_code").str.strip_chars().str.to_uppercase()
    nine, ten = pl.col("icd_version") == 9, pl.col("icd_version") == 10
    flags = [
        ((nine & _matches(code, p9, r9)) | (ten & _matches(code, p10, r10))).alias(name)
        for name, (p9, r9, p10, r10) in CONDITIONS.items()
    ]
    return (
        diagnoses.with_columns(flags)
        .group_by("subject_id", "hadm_id")
        .agg(pl.col(name).any().cast(pl.Int32) for name in CONDITIONS)
        .sort("subject_id", "hadm_id")
    )


def charlson_score(flags: dict[str, pl.Expr]) -> pl.Expr:
    score = pl.sum_horizontal([flags[name] * weight for name, weight in SIMPLE_WEIGHTS.items()])
    for (light, w_light), (heavy, w_heavy) in HIERARCHIES:
        score = score + pl.max_horizontal(flags[light] * w_light, flags[heavy] * w_heavy)
    return score


def charlson_before_stay(
    diagnoses: pl.DataFrame, admissions: pl.DataFrame, stays: pl.DataFrame
) -> pl.DataFrame:
    """(stay_id, charlson): the index over every admission of the patient discharged before the stay's
    intime (0 when there is none). The current admission's own codes are never used."""
    flags = condition_flags(diagnoses).join(
        admissions.select("hadm_id", "dischtime"), on="hadm_id", how="inner"
    )
    earlier = (
        stays.select("stay_id", "subject_id", "hadm_id", "intime")
        .join(flags, on="subject_id", how="inner", suffix="_prev")
        .filter((pl.col("hadm_id_prev") != pl.col("hadm_id")) & (pl.col("dischtime") <= pl.col("intime")))
        .group_by("stay_id")
        .agg(pl.col(name).max() for name in CONDITIONS)
    )
    scored = earlier.select("stay_id", charlson_score({n: pl.col(n) for n in CONDITIONS}).alias("charlson"))
    return (
        stays.select("stay_id")
        .join(scored, on="stay_id", how="left")
        .with_columns(pl.col("charlson").fill_null(0).cast(pl.Float32))
        .sort("stay_id")
    )
