"""Reward variants, chosen with `--reward`. Facts: /work/shared/docs/mimic-iv-reference.md §5.

Outcome: death within 90 days of ICU admission, from `admissions.deathtime` or `patients.dod` (the earlier).
"""

from __future__ import annotations

import numpy as np

TERMINAL_SHAPED = 15.0
SOFA_COEF = -0.025
# Raghu et al. 2017 (`preprocessing/new_rewards.ipynb`): C0, C1, C2
RAGHU_C0, RAGHU_C1, RAGHU_C2 = -0.025, -0.125, -2.0

DEFINITIONS = {
    "mortality": {
        "formula": "r_t = 0 except at the last step of a stay: +1 if alive at 90 days, -1 if dead",
        "terminal": 1.0,
    },
    "sofa": {
        "formula": "r_t = -0.025 * (SOFA_{t+1} - SOFA_t); plus +15 (alive at 90 days) or -15 (dead) at the last step",
        "terminal": TERMINAL_SHAPED,
    },
    "raghu": {
        "formula": (
            "r_t = -0.025 * 1[SOFA_{t+1} == SOFA_t and SOFA_{t+1} > 0] - 0.125 * (SOFA_{t+1} - SOFA_t)"
            " - 2 * tanh(lactate_{t+1} - lactate_t) (0 when a lactate is unknown);"
            " plus +15 / -15 at the last step (Raghu et al. 2017)"
        ),
        "terminal": TERMINAL_SHAPED,
    },
}
OUTCOME = (
    "died within 90 days of ICU admission (admissions.deathtime or patients.dod, whichever is earlier); "
    "patients.dod is censored one year after the last discharge, so 90-day status is known for every stay"
)


def rewards(
    kind: str,
    sofa: np.ndarray,
    next_sofa: np.ndarray,
    lactate: np.ndarray,
    next_lactate: np.ndarray,
    last_step: np.ndarray,
    died: np.ndarray,
) -> np.ndarray:
    """Per-transition rewards (float32). `last_step` marks each stay's final transition; `died` is per row."""
    if kind not in DEFINITIONS:
        raise ValueError(f"unknown reward {kind!r}; expected one of {sorted(DEFINITIONS)}")
    sofa = np.asarray(sofa, np.float64)
    delta = np.asarray(next_sofa, np.float64) - sofa
    terminal = np.where(np.asarray(died, bool), -1.0, 1.0) * DEFINITIONS[kind]["terminal"]
    terminal = np.where(np.asarray(last_step, bool), terminal, 0.0)
    if kind == "mortality":
        shaped = np.zeros_like(delta)
    elif kind == "sofa":
        shaped = SOFA_COEF * delta
    else:
        lactate_change = np.nan_to_num(np.asarray(next_lactate, np.float64) - np.asarray(lactate, np.float64))
        same = (delta == 0) & (np.asarray(next_sofa) > 0)
        shaped = RAGHU_C0 * same + RAGHU_C1 * delta + RAGHU_C2 * np.tanh(lactate_change)
    return (shaped + terminal).astype(np.float32)
