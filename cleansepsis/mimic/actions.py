"""Treatments: vasopressors as norepinephrine-equivalent rate, IV fluids as tonicity-adjusted volume, and
their 5 x 5 binning.

Factors: mimic-code `norepinephrine_equivalent_dose` (Goradia et al. 2020), see
/work/shared/docs/mimic-iv-reference.md §4: NE 1, epinephrine 1, phenylephrine /10, dopamine /100,
vasopressin 2.5 per U/min. Dobutamine is not a vasopressor for the NE equivalent (kept for SOFA only).
Fluid ids and tonicity factors: the AI Clinician's list (same section).
"""

from __future__ import annotations

import numpy as np
import polars as pl

NOREPINEPHRINE, EPINEPHRINE, PHENYLEPHRINE, DOPAMINE, VASOPRESSIN, DOBUTAMINE = (
    221906,
    221289,
    221749,
    221662,
    222315,
    221653,
)
# agent name -> (itemid, NE-equivalent factor on the agent's rate in ug/kg/min, or U/min for vasopressin)
VASOPRESSORS: dict[str, tuple[int, float]] = {
    "norepinephrine": (NOREPINEPHRINE, 1.0),
    "epinephrine": (EPINEPHRINE, 1.0),
    "phenylephrine": (PHENYLEPHRINE, 0.1),
    "dopamine": (DOPAMINE, 0.01),
    "vasopressin": (VASOPRESSIN, 2.5),
    "dobutamine": (DOBUTAMINE, 0.0),
}
AGENT_OF_ITEMID = {itemid: name for name, (itemid, _) in VASOPRESSORS.items()}
SOFA_AGENTS = ("dopamine", "dobutamine", "epinephrine", "norepinephrine")  # mimic-code `sofa` cardiovascular

TONICITY: dict[int, float] = {
    225158: 1.0,  # NaCl 0.9%
    225828: 1.0,  # lactated Ringer's
    225825: 1.0,  # D5NS
    225827: 1.0,  # D5LR
    225941: 1.0,  # D5 1/4NS
    225823: 0.5,  # D5 1/2NS
    225159: 0.5,  # NaCl 0.45%
    225161: 3.0,  # NaCl 3%
    228341: 8.0,  # NaCl 23.4%
    220862: 5.0,  # albumin 25%
    220864: 1.0,  # albumin 5%
    220995: 6.66,  # NaHCO3 8.4%
    227533: 6.66,  # NaHCO3 8.4% (amp)
    227531: 2.75,  # mannitol
    225943: 1.0,  # solution
    226089: 1.0,  # piggyback
    225168: 1.0,  # packed red blood cells
    220970: 1.0,  # fresh frozen plasma
    225170: 1.0,  # platelets
    225171: 1.0,  # cryoprecipitate
}

URINE_IDS = (226559, 226560, 226561, 226584, 226563, 226564, 226565, 226567, 226557, 226558, 227489)
GU_IRRIGANT_IN = 227488  # counted negative, as mimic-code `urine_output`
INVASIVE_VENT_ID = 225792
DEFAULT_WEIGHT_KG = 80.0  # used for mcg/min rates when no weight is charted (as the AI Clinician)


def ug_per_kg_min(rate: pl.Expr, unit: pl.Expr, weight: pl.Expr) -> pl.Expr:
    """A vasopressor infusion rate in ug/kg/min (vasopressin: U/min). Unknown units give null."""
    unit = unit.str.to_lowercase()
    return (
        pl.when(unit == "mcg/kg/min")
        .then(rate)
        .when(unit == "mcg/min")
        .then(rate / weight)
        .when(unit == "mg/kg/min")
        .then(rate * 1000.0)
        .when(unit == "mcg/kg/hour")
        .then(rate / 60.0)
        .when(unit == "units/hour")
        .then(rate / 60.0)
        .when(unit == "units/min")
        .then(rate)
        .otherwise(None)
    )


SODIUM_BICARBONATE_ITEMIDS = (220995, 227533)  # 8.4%: 1 mEq per mL
MANNITOL_ITEMID = 227531  # charted in grams; 20% solution: 5 mL per g
MANNITOL_ML_PER_G = 5.0


def fluid_ml(amount: pl.Expr, unit: pl.Expr, itemid: pl.Expr) -> pl.Expr:
    """Volume in mL: mL and L as charted; sodium bicarbonate 8.4% in mEq (1 mEq/mL) and mannitol in grams
    (20%, 5 mL/g) converted, so their tonicity factors apply (MIMIC-IV charts them in mEq and grams)."""
    unit = unit.str.to_lowercase().str.strip_chars_end(".")
    return (
        pl.when(unit == "ml")
        .then(amount)
        .when(unit == "l")
        .then(amount * 1000.0)
        .when(itemid.is_in(SODIUM_BICARBONATE_ITEMIDS) & (unit == "meq"))
        .then(amount)
        .when((itemid == MANNITOL_ITEMID) & (unit == "grams"))
        .then(amount * MANNITOL_ML_PER_G)
        .otherwise(None)
    )


def quartile_edges(doses: np.ndarray) -> list[float]:
    """Edges q25, q50, q75 of the non-zero doses (train split only); [] if there are none."""
    doses = np.asarray(doses, np.float64)
    positive = doses[np.isfinite(doses) & (doses > 0)]
    if positive.size == 0:
        return []
    return [float(q) for q in np.quantile(positive, [0.25, 0.5, 0.75])]


def dose_level(doses: np.ndarray, edges: list[float]) -> np.ndarray:
    """0 for none (or unknown), else 1..4: dose <= q25 -> 1, <= q50 -> 2, <= q75 -> 3, above -> 4."""
    doses = np.nan_to_num(np.asarray(doses, np.float64), nan=0.0)
    if not edges:
        return np.where(doses > 0, 4, 0).astype(np.int32)
    levels = 1 + np.searchsorted(np.asarray(edges), doses, side="left")
    return np.where(doses > 0, levels, 0).astype(np.int32)


def encode_action(fluid_level: np.ndarray, vaso_level: np.ndarray) -> np.ndarray:
    """ICU-Sepsis order: 5 * fluid + vaso."""
    return (5 * np.asarray(fluid_level) + np.asarray(vaso_level)).astype(np.int32)
