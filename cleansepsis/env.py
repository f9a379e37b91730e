"""The ICU-Sepsis benchmark MDP: a loader of the finite-MDP core (`cleansepsis.mdp`), its reference values,
and its Gymnasium class.

ICU-Sepsis (Choudhary, Gupta, Thomas, RLC 2024; PyPI `icu-sepsis` 2.0.1) is a tabular MDP built from
MIMIC-III: 713 patient states plus death (713), survival (714) and an unreachable absorbing state (715);
25 actions `a = 5 * fluid_level + vaso_level`; reward 1 on entering survival; gamma = 1.

The arrays are read from the installed `icu-sepsis` package without importing it (importing it pulls in
the legacy `gym` package). The functional API of the core is re-exported here, so existing code keeps
working:

    params = load_params()                                   # EnvParams (= mdp.MDPParams) pytree
    obs, state = reset(key, params)
    obs, state, reward, terminated, truncated = step(key, state, action, params)
    ret, length = policy_evaluation(policy, params)          # exact, policy (716, 25)

Sampling the next state is O(1): every (state, action) row has an alias table over its at most 213
non-zero next states, built once in numpy when the params are loaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from cleansepsis import mdp
from cleansepsis.mdp import (  # noqa: F401  (the core's API, re-exported under the names code imports)
    _PACK_MASK,
    _PACK_SHIFT,
    OBS_MODES,
    EnvState,
    _alias_draw,
    _autoreset_transition,
    _batched,
    _rollout_chunk,
    _sample_action,
    _sample_next,
    _sample_start,
    _single_thread_lapack,
    _terminal_rows_uniform,
    _transition,
    alias_probabilities,
    alias_tables,
    clinician_policy,
    episode_summaries,
    greedy_admissible,
    observe,
    optimal_policy,
    policy_cdf,
    policy_evaluation,
    policy_state_values,
    q_values,
    random_policy,
    reset,
    reset_batch,
    rollout_episodes,
    step,
    step_autoreset,
    step_autoreset_batch,
    value_iteration,
)
from cleansepsis.mdp import MDPParams as EnvParams
from cleansepsis.mdp import check_choice as _check_choice

N_STATES = 716
N_ACTIONS = 25
OBS_DIM = 47
N_PATIENT_STATES = 713
DEATH = 713
SURVIVAL = 714
ABSORBING = 715
TERMINAL_STATES = (DEATH, SURVIVAL, ABSORBING)
ENV_ID = "CleanSepsis/ICUSepsis-v0"
MAX_STEPS = 500
STRATEGIES = ("mean", "terminate")

# The 47 state features in order (icu-sepsis state_cluster_centers; AI Clinician cohort). The first 4 are
# binary shifted by -0.5, the next 32 z-scored, the last 11 log-transformed then z-scored.
FEATURE_NAMES = (
    "gender", "mechvent", "max_dose_vaso", "re_admission",
    "age", "Weight_kg", "GCS", "HR", "SysBP", "MeanBP", "DiaBP", "RR", "Temp_C", "FiO2_1", "Potassium",
    "Sodium", "Chloride", "Glucose", "Magnesium", "Calcium", "Hb", "WBC_count", "Platelets_count", "PTT",
    "PT", "Arterial_pH", "paO2", "paCO2", "Arterial_BE", "HCO3", "Arterial_lactate", "SOFA", "SIRS",
    "Shock_Index", "PaO2_FiO2", "cumulated_balance",
    "SpO2", "BUN", "Creatinine", "SGOT", "SGPT", "Total_bili", "INR", "input_total", "input_4hourly",
    "output_total", "output_4hourly",
)  # fmt: skip
NORMALISATION = (
    "as shipped by icu-sepsis: state vectors are the k-means cluster centres of the AI Clinician "
    "features; 4 binary features shifted by -0.5, 32 z-scored, 11 log-transformed then z-scored; "
    "terminal states have the all-zero vector"
)
REWARD = "1.0 on entering survival (state 714), 0.0 otherwise (death is 713); gamma = 1"


# ---------------------------------------------------------------------------------------------------------
# Loading the shipped arrays
# ---------------------------------------------------------------------------------------------------------


def assets_dir() -> Path:
    """The `envs/assets` folder of the installed icu-sepsis package (found without importing it)."""
    spec = importlib.util.find_spec("icu_sepsis")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the icu-sepsis package is not installed; run `uv sync`")
    return Path(next(iter(spec.submodule_search_locations))) / "envs" / "assets"


def read_admissible_actions(path: Path) -> np.ndarray:
    """admissible_actions.txt: first line the count per state, then one line of actions per state."""
    lines = path.read_text().splitlines()
    counts = [int(n) for n in lines[0].split()]
    if len(counts) != N_STATES or len(lines) < N_STATES + 1:
        raise ValueError(f"{path}: expected {N_STATES} states, found {len(counts)} counts")
    mask = np.zeros((N_STATES, N_ACTIONS), bool)
    for state, (count, line) in enumerate(zip(counts, lines[1 : N_STATES + 1], strict=True)):
        actions = [int(a) for a in line.split()]
        if len(actions) != count:
            raise ValueError(f"{path}: state {state} lists {len(actions)} actions, header says {count}")
        mask[state, actions] = True
    return mask


@functools.cache
def shipped_arrays() -> dict[str, np.ndarray]:
    """The shipped float64 arrays (read-only): tx_mat, d_0, expert_policy, state_cluster_centers,
    sofa_scores, admissible_mask. Cached: read once per process."""
    folder = assets_dir()
    with np.load(folder / "dynamics.npz") as data:
        arrays = {
            k: np.asarray(data[k], np.float64)
            for k in ("tx_mat", "d_0", "expert_policy", "state_cluster_centers", "sofa_scores")
        }
    arrays["admissible_mask"] = read_admissible_actions(folder / "admissible_actions.txt")
    if arrays["tx_mat"].shape != (N_STATES, N_ACTIONS, N_STATES):
        raise ValueError(f"{folder}/dynamics.npz: tx_mat has shape {arrays['tx_mat'].shape}")
    for value in arrays.values():
        value.flags.writeable = False
    return arrays


@functools.cache
def transition_matrix(strategy: str) -> np.ndarray:
    """Float64 (716, 25, 716) transition probabilities with the inadmissible-action strategy applied
    (read-only, cached)."""
    _check_choice("strategy", strategy, STRATEGIES)
    raw = shipped_arrays()
    if strategy == "mean":  # the shipped rows of inadmissible actions already are the admissible mean
        return raw["tx_mat"]
    tx = raw["tx_mat"].copy()
    inadmissible = ~raw["admissible_mask"]
    tx[inadmissible] = 0.0
    tx[inadmissible, DEATH] = 1.0
    tx.flags.writeable = False
    return tx


@functools.cache
def _alias_mean() -> tuple[np.ndarray, np.ndarray]:
    tx = shipped_arrays()["tx_mat"]
    threshold, packed = alias_tables(tx.reshape(N_STATES * N_ACTIONS, N_STATES))
    return threshold.reshape(N_STATES, N_ACTIONS, -1), packed.reshape(N_STATES, N_ACTIONS, -1)


@functools.cache
def _numpy_params(strategy: str) -> dict[str, np.ndarray]:
    threshold, packed = _alias_mean()
    if strategy == "terminate":  # inadmissible -> death with certainty
        inadmissible = ~shipped_arrays()["admissible_mask"]
        threshold, packed = threshold.copy(), packed.copy()
        threshold[inadmissible] = 1.0
        packed[inadmissible] = DEATH | (DEATH << _PACK_SHIFT)
    start_threshold, start_packed = alias_tables(shipped_arrays()["d_0"][None, :])
    return {
        "alias_threshold": threshold,
        "alias_next": packed,
        "start_threshold": start_threshold[0],
        "start_next": start_packed[0],
    }


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


def load_params(strategy: str = "mean", obs_mode: str = "vector", max_steps: int = MAX_STEPS) -> EnvParams:
    """The ICU-Sepsis MDP as an EnvParams pytree (cached: equal arguments give the same immutable object).

    strategy: what an inadmissible action does: 'mean' (the shipped rows: the mean of the admissible
        actions' rows) or 'terminate' (the patient dies).
    obs_mode: 'vector' (the 47-dim state vector), 'index' (the int32 state) or 'onehot' (716 floats).
    """
    _check_choice("strategy", strategy, STRATEGIES)
    _check_choice("obs_mode", obs_mode, OBS_MODES)
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    return _load_params(strategy, obs_mode, int(max_steps))


@functools.cache
def _device_arrays(strategy: str) -> dict[str, Any]:
    """The float32 kernel and the alias tables on the device, shared by every obs_mode/max_steps variant of
    a strategy (one copy each instead of one per variant: the kernel alone is 51 MB)."""
    import jax.numpy as jnp

    return {
        "tx": jnp.asarray(transition_matrix(strategy), jnp.float32),
        **{name: jnp.asarray(table) for name, table in _numpy_params(strategy).items()},
    }


@functools.cache
def _load_params(strategy: str, obs_mode: str, max_steps: int) -> EnvParams:
    raw = shipped_arrays()
    device = _device_arrays(strategy)
    terminal = np.zeros(N_STATES, bool)
    terminal[list(TERMINAL_STATES)] = True
    reward = np.zeros(N_STATES)
    reward[SURVIVAL] = 1.0
    return mdp.make_params(
        tx=device["tx"],
        start_dist=raw["d_0"],
        reward_next=reward,
        terminal=terminal,
        admissible_mask=raw["admissible_mask"],
        state_vectors=raw["state_cluster_centers"],
        clinician_probs=raw["expert_policy"],
        sofa=raw["sofa_scores"],
        max_steps=max_steps,
        spec=("icu-sepsis", strategy),
        strategy=strategy,
        obs_mode=obs_mode,
        tables={name: device[name] for name in _numpy_params(strategy)},
    )


# ---------------------------------------------------------------------------------------------------------
# Reference values (float64, from the shipped arrays)
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _reference_table(strategy: str) -> tuple[tuple[str, float, float], ...]:
    raw = shipped_arrays()
    terminal = np.zeros(N_STATES, bool)
    terminal[list(TERMINAL_STATES)] = True
    reward = np.zeros(N_STATES)
    reward[SURVIVAL] = 1.0
    table = mdp.np_reference_table(
        transition_matrix(strategy),
        raw["d_0"],
        reward,
        terminal,
        raw["admissible_mask"],
        raw["expert_policy"],
    )
    return tuple((name, row["expected_return"], row["mean_length"]) for name, row in table.items())


def reference_values(params: EnvParams) -> dict[str, dict[str, float]]:
    """Exact expected return (= survival probability) and mean episode length of the reference policies
    under `params.strategy`, computed once per strategy in float64 from the shipped arrays:
    random (uniform over 25), random_admissible, clinician (as shipped), clinician_renormalised,
    greedy_clinician (argmax of the renormalised clinician policy) and optimal (policy iteration over
    admissible actions). Params of another MDP get that MDP's table (`mdp.reference_values`)."""
    if params.spec and params.spec[0] != "icu-sepsis":
        return mdp.reference_values(params)
    return {
        name: {"expected_return": expected_return, "mean_length": mean_length}
        for name, expected_return, mean_length in _reference_table(params.strategy)
    }


# ---------------------------------------------------------------------------------------------------------
# Gymnasium class
# ---------------------------------------------------------------------------------------------------------


class ICUSepsisEnv(mdp.FiniteMDPEnv):
    """ICU-Sepsis as a Gymnasium env over the same arrays and alias tables as the JAX core (numpy RNG).

    Actions: Discrete(25), `5 * fluid_level + vaso_level`. Observations per `obs_mode` ('vector' Box(47),
    'index' Discrete(716), 'onehot' Box(716)). `info` carries `admissible_actions`, `state_vector`,
    `sofa_score` (like the reference env) and `state_index`. Episodes are truncated at `max_steps`.
    """

    def __init__(self, strategy: str = "mean", obs_mode: str = "vector", max_steps: int = MAX_STEPS):
        super().__init__(load_params(strategy, obs_mode, max_steps))
        self.strategy = strategy
        self._sofa = shipped_arrays()["sofa_scores"]

    def _info(self) -> dict[str, Any]:
        info = super()._info()
        info["sofa_score"] = float(self._sofa[self._state])
        return info


def register() -> None:
    """Register ENV_ID with Gymnasium (idempotent)."""
    mdp.register(ENV_ID, "cleansepsis.env:ICUSepsisEnv")


register()
