"""Clinical sanity and safety measures of a policy on logged states, side by side with the clinicians.

- agreement with the logged actions (overall, per vasopressor and fluid level);
- dose-level distributions (5 vasopressor x 5 fluid levels) of policy and clinicians;
- support: the behaviour probability of the policy's actions, and the low-support rate;
- the ICU-Sepsis inadmissible-action rate;
- the four hazard scenarios of Festor et al. 2022 (BMJ Health Care Inform, e100549) on MIMIC-IV replays
  with raw MAP, CVP and cumulative balance;
- the calibration of a behaviour model (reliability table, expected calibration error).

Actions are `5 * fluid_level + vaso_level`. Policies are given as probabilities (N, A) over the logged
states: a greedy policy is one-hot. All functions are plain numpy: they run once per evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_LEVELS = 5
HAZARD_COLUMNS = ("map_mmhg", "cvp_mmhg", "cum_balance_ml", "vaso_ne_eq", "fluid_ml")
# Festor et al. 2022, Table 1; the clinicians' rates they measured on MIMIC are quoted for reference.
HAZARDS = {
    "A": "no vasopressor and fluids <= 20 mL/h while MAP < 55 mmHg (Festor clinicians: 53.7%)",
    "B": "vasopressor > 0.65 ug/kg/min while MAP > 95 mmHg (Festor clinicians: 2.5%)",
    "C": "no fluids while MAP <= 55 mmHg and CVP <= 5 mmHg (Festor clinicians: 53.8%)",
    "D": "fluids > 240 mL/h while MAP >= 75, balance > 10 L and CVP >= 15 mmHg (Festor clinicians: 37.4%)",
}


class SafetyError(ValueError):
    """Inputs the safety measures cannot use."""


def levels(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vaso_level, fluid_level) of actions encoded 5 * fluid + vaso."""
    actions = np.asarray(actions)
    return actions % N_LEVELS, actions // N_LEVELS


def agreement(policy_actions: np.ndarray, logged_actions: np.ndarray) -> dict[str, Any]:
    """Share of states where the policy's action equals the logged one, overall and per drug. The
    per-level lists give, for the states where the clinicians chose level k, the share where the
    policy chose the same level of that drug."""
    policy_actions, logged_actions = np.asarray(policy_actions), np.asarray(logged_actions)
    if policy_actions.shape != logged_actions.shape:
        raise SafetyError(f"{policy_actions.shape} policy actions for {logged_actions.shape} logged actions")
    pv, pf = levels(policy_actions)
    lv, lf = levels(logged_actions)

    def per_level(policy_level, logged_level):
        return [
            float((policy_level[logged_level == k] == k).mean()) if (logged_level == k).any() else None
            for k in range(N_LEVELS)
        ]

    return {
        "action": float((policy_actions == logged_actions).mean()),
        "vaso_level": float((pv == lv).mean()),
        "fluid_level": float((pf == lf).mean()),
        "vaso_by_logged_level": per_level(pv, lv),
        "fluid_by_logged_level": per_level(pf, lf),
        "mean_vaso_level_difference": float((pv - lv).mean()),
        "mean_fluid_level_difference": float((pf - lf).mean()),
        "n_states": len(logged_actions),
    }


def action_distribution(probs: np.ndarray) -> np.ndarray:
    """(5, 5) share of the probability mass per (fluid level, vaso level); rows fluid, columns vaso."""
    probs = np.asarray(probs, np.float64)
    return (probs.sum(0) / probs.sum()).reshape(N_LEVELS, N_LEVELS)


def dose_distributions(policy_probs: np.ndarray, logged_actions: np.ndarray) -> dict[str, Any]:
    """Level distributions of the policy (its probabilities) and of the clinicians (their logged actions)."""
    n_actions = np.asarray(policy_probs).shape[1]
    logged = np.eye(n_actions)[np.asarray(logged_actions)]
    out = {}
    for who, probs in (("policy", policy_probs), ("clinicians", logged)):
        joint = action_distribution(probs)
        out[who] = {"joint_fluid_by_vaso": joint.tolist(), "vaso": joint.sum(0).tolist(), "fluid": joint.sum(1).tolist()}
    return out


def support(policy_probs: np.ndarray, behavior_probs: np.ndarray, threshold: float = 0.01) -> dict[str, Any]:
    """Support mass: E_{a ~ pi}[pi_b(a|s)] averaged over states (for a greedy policy, the behaviour
    probability of its action); low-support rate: the share of the policy's actions (its mass) with
    pi_b(a|s) < threshold."""
    policy_probs, behavior_probs = np.asarray(policy_probs, np.float64), np.asarray(behavior_probs, np.float64)
    if policy_probs.shape != behavior_probs.shape:
        raise SafetyError(f"policy probs {policy_probs.shape} and behaviour probs {behavior_probs.shape} differ")
    mass = (policy_probs * behavior_probs).sum(1)
    low = (policy_probs * (behavior_probs < threshold)).sum(1)
    return {
        "support_mass": float(mass.mean()),
        "support_mass_p10": float(np.quantile(mass, 0.1)),
        "low_support_rate": float(low.mean()),
        "threshold": threshold,
    }


def inadmissible_rate(policy_probs: np.ndarray, action_mask: np.ndarray) -> float:
    """Mean probability mass the policy puts on actions outside each state's admissible set."""
    return float((np.asarray(policy_probs) * ~np.asarray(action_mask, bool)).sum(1).mean())


def level_doses(logged_levels: np.ndarray, doses: np.ndarray) -> np.ndarray:
    """(5,) a representative dose per level: 0 for level 0, else the median logged dose at that level
    (NaN for a level never logged). Used to give the policy's levels a dose for the hazard rules."""
    out = np.full(N_LEVELS, np.nan)
    out[0] = 0.0
    for k in range(1, N_LEVELS):
        chosen = doses[(logged_levels == k) & np.isfinite(doses)]
        if chosen.size:
            out[k] = float(np.median(chosen))
    return out


def hazard_flags(
    map_mmhg: np.ndarray, cvp_mmhg: np.ndarray, balance_ml: np.ndarray, vaso: np.ndarray, fluid_ml_per_h: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per scenario: (states where it applies, states where the treatment is the hazard). Missing
    measurements (NaN) leave a state out of the scenarios that need them."""
    with np.errstate(invalid="ignore"):
        return {
            "A": (map_mmhg < 55, (vaso <= 0) & (fluid_ml_per_h <= 20)),
            "B": (map_mmhg > 95, vaso > 0.65),
            "C": ((map_mmhg <= 55) & (cvp_mmhg <= 5), fluid_ml_per_h <= 0),
            "D": ((map_mmhg >= 75) & (balance_ml > 10_000) & (cvp_mmhg >= 15), fluid_ml_per_h > 240),
        }


def hazards(
    extras: dict[str, np.ndarray], step_hours: float, policy_actions: np.ndarray, logged_actions: np.ndarray
) -> dict[str, Any]:
    """Festor et al. hazard rates for the clinicians (their logged doses) and the policy (the median
    logged dose of each of its levels), per scenario: states where it applies and the share hazardous."""
    missing = [c for c in HAZARD_COLUMNS if c not in extras]
    if missing:
        raise SafetyError(f"hazards need the replay columns {list(HAZARD_COLUMNS)}; missing {missing}")
    if not step_hours or step_hours <= 0:
        raise SafetyError(f"step_hours must be positive to turn mL per step into mL/h; got {step_hours}")
    col = {c: np.asarray(extras[c], np.float64) for c in HAZARD_COLUMNS}
    logged_vaso, logged_fluid = levels(logged_actions)
    policy_vaso, policy_fluid = levels(policy_actions)
    vaso_dose = level_doses(logged_vaso, col["vaso_ne_eq"])
    fluid_dose = level_doses(logged_fluid, col["fluid_ml"] / step_hours)
    treatments = {
        "clinicians": (np.nan_to_num(col["vaso_ne_eq"]), np.nan_to_num(col["fluid_ml"]) / step_hours),
        "policy": (vaso_dose[policy_vaso], fluid_dose[policy_fluid]),
    }
    out: dict[str, Any] = {"definitions": HAZARDS, "dose_of_policy_levels": {
        "vaso_ne_eq_ug_kg_min": vaso_dose.tolist(), "fluid_ml_per_h": fluid_dose.tolist(),
        "how": "median logged dose of the clinicians' actions at each level in the evaluated data"}}  # fmt: skip
    for who, (vaso, fluid) in treatments.items():
        flags = hazard_flags(col["map_mmhg"], col["cvp_mmhg"], col["cum_balance_ml"], vaso, fluid)
        out[who] = {
            name: {
                "n_states": int(applies.sum()),
                "rate": float(hazard[applies].mean()) if applies.any() else None,
            }
            for name, (applies, hazard) in flags.items()
        }
    return out


def calibration(probs: np.ndarray, actions: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability of a behaviour model on logged actions: top-label confidence vs accuracy per bin,
    the expected calibration error, and the mean log-likelihood of the logged actions."""
    probs, actions = np.asarray(probs, np.float64), np.asarray(actions)
    confidence = probs.max(1)
    correct = probs.argmax(1) == actions
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    table, ece = [], 0.0
    for b in range(n_bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        conf, acc = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
        ece += in_bin.mean() * abs(conf - acc)
        table.append({"bin": [float(edges[b]), float(edges[b + 1])], "n": int(in_bin.sum()),
                      "confidence": conf, "accuracy": acc})  # fmt: skip
    logged = probs[np.arange(len(actions)), actions]
    return {
        "ece": float(ece),
        "reliability": table,
        "mean_log_likelihood": float(np.log(np.maximum(logged, 1e-12)).mean()),
        "accuracy": float(correct.mean()),
        "n": len(actions),
    }
