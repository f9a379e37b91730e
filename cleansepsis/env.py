"""The ICU-Sepsis benchmark MDP in JAX: a pure functional core, exact evaluation, and a Gymnasium class.

ICU-Sepsis (Choudhary, Gupta, Thomas, RLC 2024; PyPI `icu-sepsis` 2.0.1) is a tabular MDP built from
MIMIC-III: 713 patient states plus death (713), survival (714) and an unreachable absorbing state (715);
25 actions `a = 5 * fluid_level + vaso_level`; reward 1 on entering survival; gamma = 1.

The arrays are read from the installed `icu-sepsis` package without importing it (importing it pulls in
the legacy `gym` package). Everything below is jit-, vmap- and scan-able:

    params = load_params()                                   # EnvParams pytree
    obs, state = reset(key, params)
    obs, state, reward, terminated, truncated = step(key, state, action, params)
    ret, length = policy_evaluation(policy, params)          # exact, policy (716, 25)

Sampling the next state is O(1): every (state, action) row has an alias table over its at most 213
non-zero next states, built once in numpy when the params are loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis.linalg import linear_solve

_lapack_configured = False


def _single_thread_lapack() -> None:
    """Give scipy's OpenBLAS (which jax uses for LU solves on CPU) one thread, before the first solve.

    On the busy 2-core machine its threads spun against each other (a 713x713 solve took 350-430 ms with
    the default threads, 30-37 ms with one). If scipy.linalg is not loaded yet, it is loaded with
    OPENBLAS_NUM_THREADS=1; if it is, the thread count of the loaded library is set through
    `openblas_set_num_threads`. Left alone when the user set OPENBLAS_NUM_THREADS. Called when a solve
    is first traced rather than at import, which spares scripts that never solve the scipy import.
    """
    global _lapack_configured
    if _lapack_configured or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    _lapack_configured = True
    if "scipy.linalg" not in sys.modules:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        try:
            import scipy.linalg.cython_lapack  # noqa: F401  (loads the library, which reads the variable)
        except ImportError:
            pass
        finally:
            del os.environ["OPENBLAS_NUM_THREADS"]
        return
    _set_loaded_openblas_threads(1)


def _set_loaded_openblas_threads(n_threads: int) -> None:
    """Set the threads of scipy's already loaded OpenBLAS (not numpy's 64-bit-integer one)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line and "/" in line}
    except OSError:
        return
    for path in paths:
        if "openblas64" in Path(path).name:
            continue
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            setter = getattr(library, name, None)
            if setter is not None:
                setter(ctypes.c_int(n_threads))
                break


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
OBS_MODES = ("index", "onehot", "vector")

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

_PACK_SHIFT = 16  # alias tables pack (primary next state, alias next state) into one int32
_PACK_MASK = (1 << _PACK_SHIFT) - 1


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def alias_tables(probs: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables for each row of `probs` (rows, n) over its non-zero entries, padded to `width`.

    Returns (threshold (rows, width) float32, packed (rows, width) int32): draw a slot j uniformly, then the
    outcome is `packed & 0xFFFF` if u < threshold[j] else `packed >> 16`. Built by running Vose's
    algorithm on all rows in lockstep (one pairing per row per iteration), so it takes milliseconds.
    """
    probs = np.asarray(probs, np.float64)
    rows = probs.shape[0]
    support = probs > 0
    counts = support.sum(1)
    width = int(counts.max()) if width is None else width
    if counts.max() > width:
        raise ValueError(f"a row has {counts.max()} non-zero entries, more than the table width {width}")
    # The non-zero entries of each row first, in column order; zero padding after them.
    row_of, column = np.nonzero(support)
    slot_of = np.arange(row_of.size) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.zeros((rows, width), np.int64)
    top = np.zeros((rows, width))
    order[row_of, slot_of] = column
    top[row_of, slot_of] = probs[row_of, column]
    scaled = (top / top.sum(1, keepdims=True) * width).ravel()
    threshold = np.ones(rows * width)
    alias_slot = np.tile(np.arange(width), rows)
    is_small = (scaled < 1.0).reshape(rows, width)
    # Stacks as flat arrays, one block of `width` per row: the row's small (large) slots in slot order;
    # the pointers are the stack sizes. Indices into `scaled` are flat: row * width + slot.
    base = np.arange(rows) * width
    small = (np.argsort(~is_small, axis=1, kind="stable") + base[:, None]).ravel()
    large = (np.argsort(is_small, axis=1, kind="stable") + base[:, None]).ravel()
    n_small = is_small.sum(1)
    n_large = width - n_small
    active = np.flatnonzero((n_small > 0) & (n_large > 0))
    while active.size:
        s = small[base[active] + n_small[active] - 1]
        g = large[base[active] + n_large[active] - 1]
        threshold[s] = scaled[s]
        alias_slot[s] = g - base[active]
        scaled[g] -= 1.0 - scaled[s]
        n_small[active] -= 1
        became_small = scaled[g] < 1.0
        moved, moved_slot = active[became_small], g[became_small]
        n_large[moved] -= 1
        small[base[moved] + n_small[moved]] = moved_slot
        n_small[moved] += 1
        active = active[(n_small[active] > 0) & (n_large[active] > 0)]
    threshold = threshold.reshape(rows, width)
    alias_slot = alias_slot.reshape(rows, width)
    primary = order
    alias = np.take_along_axis(order, alias_slot, axis=1)
    packed = (primary | (alias << _PACK_SHIFT)).astype(np.int32)
    return threshold.astype(np.float32), packed


def alias_probabilities(threshold: np.ndarray, packed: np.ndarray, n: int) -> np.ndarray:
    """The distribution an alias table samples from (rows, n); for tests and checks."""
    rows, width = threshold.shape
    out = np.zeros((rows, n))
    row_index = np.repeat(np.arange(rows), width)
    thr = threshold.astype(np.float64).ravel()
    np.add.at(out, (row_index, (packed & _PACK_MASK).ravel()), thr / width)
    np.add.at(out, (row_index, (packed >> _PACK_SHIFT).ravel()), (1.0 - thr) / width)
    return out


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
# Params and state pytrees
# ---------------------------------------------------------------------------------------------------------


class EnvParams(eqx.Module):
    """Everything the MDP needs, as device arrays; `strategy` and `obs_mode` are static (they change the
    program). Build with `load_params`."""

    tx: jax.Array  # (716, 25, 716) float32 transition probabilities, strategy applied
    alias_threshold: jax.Array  # (716, 25, W) float32, W = 213 slots
    alias_next: jax.Array  # (716, 25, W) int32, packed primary | alias << 16
    start_dist: jax.Array  # (716,) float32
    start_threshold: jax.Array  # (S0,) float32 alias table over start_dist
    start_next: jax.Array  # (S0,) int32 packed
    admissible_mask: jax.Array  # (716, 25) bool
    state_vectors: jax.Array  # (716, 47) float32, zeros for terminal states
    sofa: jax.Array  # (716,) float32
    clinician_probs: jax.Array  # (716, 25) float32, expert_policy as shipped (terminal rows zero)
    terminal: jax.Array  # (716,) bool
    max_steps: jax.Array  # () int32
    strategy: str = eqx.field(static=True, default="mean")
    obs_mode: str = eqx.field(static=True, default="vector")


class EnvState(eqx.Module):
    state_index: jax.Array  # () int32
    time: jax.Array  # () int32, steps taken in this episode


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
def _load_params(strategy: str, obs_mode: str, max_steps: int) -> EnvParams:
    raw = shipped_arrays()
    tables = _numpy_params(strategy)
    terminal = np.zeros(N_STATES, bool)
    terminal[list(TERMINAL_STATES)] = True
    return EnvParams(
        tx=jnp.asarray(transition_matrix(strategy), jnp.float32),
        alias_threshold=jnp.asarray(tables["alias_threshold"]),
        alias_next=jnp.asarray(tables["alias_next"]),
        start_dist=jnp.asarray(raw["d_0"], jnp.float32),
        start_threshold=jnp.asarray(tables["start_threshold"]),
        start_next=jnp.asarray(tables["start_next"]),
        admissible_mask=jnp.asarray(raw["admissible_mask"]),
        state_vectors=jnp.asarray(raw["state_cluster_centers"], jnp.float32),
        sofa=jnp.asarray(raw["sofa_scores"], jnp.float32),
        clinician_probs=jnp.asarray(raw["expert_policy"], jnp.float32),
        terminal=jnp.asarray(terminal),
        max_steps=jnp.asarray(max_steps, jnp.int32),
        strategy=strategy,
        obs_mode=obs_mode,
    )


# ---------------------------------------------------------------------------------------------------------
# Functional core (gymnax style)
# ---------------------------------------------------------------------------------------------------------


def _alias_draw(bits: jax.Array, threshold: jax.Array, packed: jax.Array) -> jax.Array:
    """One draw from a (width,) alias table given two uint32 random words."""
    width = threshold.shape[-1]
    slot = (bits[0] % jnp.uint32(width)).astype(jnp.int32)
    uniform = (bits[1] >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # 24 exact bits in [0, 1)
    word = packed[slot]
    return jnp.where(uniform < threshold[slot], word & _PACK_MASK, word >> _PACK_SHIFT)


def _sample_next(bits: jax.Array, state_index: jax.Array, action: jax.Array, params: EnvParams) -> jax.Array:
    width = params.alias_threshold.shape[-1]
    slot = (bits[0] % jnp.uint32(width)).astype(jnp.int32)
    uniform = (bits[1] >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    word = params.alias_next[state_index, action, slot]
    threshold = params.alias_threshold[state_index, action, slot]
    return jnp.where(uniform < threshold, word & _PACK_MASK, word >> _PACK_SHIFT)


def _sample_start(bits: jax.Array, params: EnvParams) -> jax.Array:
    return _alias_draw(bits, params.start_threshold, params.start_next)


def observe(state_index: jax.Array, params: EnvParams) -> jax.Array:
    """The observation of a state for `params.obs_mode`: 'vector' (47,) float32, 'index' () int32,
    'onehot' (716,) float32."""
    if params.obs_mode == "vector":
        return params.state_vectors[state_index]
    if params.obs_mode == "onehot":
        return jax.nn.one_hot(state_index, N_STATES, dtype=jnp.float32)
    return jnp.asarray(state_index, jnp.int32)


def reset(key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
    """Draw a start state from `start_dist`. Returns (obs, state)."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    state = EnvState(state_index=_sample_start(bits, params), time=jnp.zeros((), jnp.int32))
    return observe(state.state_index, params), state


def _transition(bits, state: EnvState, action, params: EnvParams):
    action = jnp.asarray(action, jnp.int32)
    was_terminal = params.terminal[state.state_index]
    sampled = _sample_next(bits, state.state_index, action, params)
    next_index = jnp.where(was_terminal, state.state_index, sampled)  # terminal states stay put
    reward = ((next_index == SURVIVAL) & ~was_terminal).astype(jnp.float32)
    time = state.time + (~was_terminal).astype(jnp.int32)
    terminated = params.terminal[next_index]
    truncated = (time >= params.max_steps) & ~terminated
    return EnvState(state_index=next_index, time=time), reward, terminated, truncated


def step(key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
    """One step. Returns (obs, state, reward, terminated, truncated). Stepping a terminal state leaves it
    unchanged with reward 0 (no auto-reset here; see `step_autoreset`)."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    state, reward, terminated, truncated = _transition(bits, state, action, params)
    return observe(state.state_index, params), state, reward, terminated, truncated


def step_autoreset(key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
    """One step that resets the episode when it ends, for `lax.scan` rollouts.

    Returns (obs, state, reward, terminated, truncated, info): obs and state are already those of the new
    episode when the step ended one; reward, terminated and truncated describe the step taken. `info`
    holds the pre-reset facts: 'next_state_index' (the state the step reached), 'final_obs' (its
    observation) and 'episode_length' (steps in the episode so far, including this one).
    """
    bits = jax.random.bits(key, (4,), jnp.uint32)
    new_state, stepped, reward, terminated, truncated = _autoreset_transition(bits, state, action, params)
    info = {
        "next_state_index": stepped.state_index,
        "final_obs": observe(stepped.state_index, params),
        "episode_length": stepped.time,
    }
    return observe(new_state.state_index, params), new_state, reward, terminated, truncated, info


def reset_batch(key: jax.Array, params: EnvParams, batch: int) -> tuple[jax.Array, EnvState]:
    """`reset` for `batch` envs at once (leading axis on obs and state), from one key."""
    bits = jax.random.bits(key, (batch, 2), jnp.uint32)
    state_index = jax.vmap(_sample_start, in_axes=(0, None))(bits, params)
    state = EnvState(state_index=state_index, time=jnp.zeros(batch, jnp.int32))
    return jax.vmap(observe, in_axes=(0, None))(state_index, params), state


def step_autoreset_batch(key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
    """`step_autoreset` for a batch of envs (leading axis on state and action), drawing the random bits
    of the whole batch from one key: about 1.5-2x faster than vmapping `step_autoreset` over split keys.
    Returns the same tuple with a leading batch axis."""
    batch = state.state_index.shape[0]
    bits = jax.random.bits(key, (batch, 4), jnp.uint32)
    new_state, stepped, reward, terminated, truncated = jax.vmap(_autoreset_transition, in_axes=(0, 0, 0, None))(
        bits, state, jnp.asarray(action, jnp.int32), params
    )
    observe_batch = jax.vmap(observe, in_axes=(0, None))
    info = {
        "next_state_index": stepped.state_index,
        "final_obs": observe_batch(stepped.state_index, params),
        "episode_length": stepped.time,
    }
    return observe_batch(new_state.state_index, params), new_state, reward, terminated, truncated, info


def _autoreset_transition(bits, state: EnvState, action, params: EnvParams):
    """Step with four random words (two for the transition, two for a reset); returns
    (new_state, stepped_state_before_reset, reward, terminated, truncated)."""
    stepped, reward, terminated, truncated = _transition(bits[:2], state, action, params)
    done = terminated | truncated
    fresh = _sample_start(bits[2:4], params)
    new_state = EnvState(
        state_index=jnp.where(done, fresh, stepped.state_index),
        time=jnp.where(done, 0, stepped.time),
    )
    return new_state, stepped, reward, terminated, truncated


# ---------------------------------------------------------------------------------------------------------
# Batched rollouts of a tabular policy (for Monte Carlo checks and the ICU-Sepsis replay)
# ---------------------------------------------------------------------------------------------------------


def policy_cdf(policy: jax.Array) -> jax.Array:
    """Row-wise CDF (716, 25) of a policy for inverse-CDF sampling. The last entry is exactly 1 and
    zero-probability actions get empty intervals, so they are never drawn."""
    cdf = jnp.cumsum(jnp.asarray(policy, jnp.float32), axis=-1)
    return cdf / cdf[..., -1:]


def _sample_action(bits: jax.Array, cdf_row: jax.Array) -> jax.Array:
    uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    return jnp.sum(cdf_row[:-1] <= uniform).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _rollout_chunk(key, state_index, time, episode_count, episodes_per_env, policy, params, n_steps):
    """`n_steps` auto-reset steps of a batch of envs following a tabular policy, stacked as (n_steps, B).
    Returns (next key, carry), records. Everything per chunk happens in this one compiled program."""
    key, chunk_key = jax.random.split(key)
    cdf = policy_cdf(policy)

    def one_env(bits, state_index, time, count):
        state = EnvState(state_index=state_index, time=time)
        action = _sample_action(bits[0], cdf[state_index])
        new_state, stepped, reward, terminated, truncated = _autoreset_transition(bits[1:], state, action, params)
        done = terminated | truncated
        record = {
            "valid": (count >= 0) & (count < episodes_per_env),
            "episode": count,
            "t": time,
            "state_index": state_index,
            "action": action,
            "behavior_prob": policy[state_index, action],
            "next_state_index": stepped.state_index,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
        }
        return (new_state.state_index, new_state.time, count + done.astype(jnp.int32)), record

    def body(carry, step_key):
        state_index, time, count = carry
        bits = jax.random.bits(step_key, (state_index.shape[0], 5), jnp.uint32)
        return jax.vmap(one_env)(bits, state_index, time, count)

    carry, records = jax.lax.scan(body, (state_index, time, episode_count), jax.random.split(chunk_key, n_steps))
    return (key, carry), records


def rollout_episodes(
    key: jax.Array,
    policy: jax.Array,
    params: EnvParams,
    n_episodes: int,
    n_envs: int = 8192,
    chunk_steps: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run `n_episodes` complete episodes of a tabular policy (716, 25) in the JAX env.

    A batch of auto-resetting envs (`n_envs`, or fewer for small runs: a power of two from 256, so
    that small runs share one compiled program) runs on the device in jitted scans of `chunk_steps`
    steps until every env has finished its share (the first k episodes of each env, so no episode is
    selected by its length); the records go to the host once. Returns numpy arrays, one entry
    per transition, ordered by episode then step: episode (0..n_episodes-1), t, state_index, action,
    behavior_prob, next_state_index, reward, terminated, truncated.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be at least 1, got {n_episodes}")
    batch = min(int(n_envs), max(256, 1 << (int(n_episodes) - 1).bit_length()))
    per_env = -(-int(n_episodes) // batch)
    policy = jnp.asarray(policy, jnp.float32)
    # Every env starts in the absorbing state with episode count -1: its first step is a dropped no-op
    # that auto-resets it, so the start states are drawn inside the one compiled chunk.
    carry = (jnp.full(batch, ABSORBING, jnp.int32), jnp.zeros(batch, jnp.int32), jnp.full(batch, -1, jnp.int32))
    chunks = []
    steps = 0
    max_steps = int(params.max_steps)
    while True:
        (key, carry), records = _rollout_chunk(key, *carry, np.int32(per_env), policy, params, chunk_steps)
        chunks.append(records)
        steps += chunk_steps
        finished = int((np.asarray(carry[2]) >= per_env).sum())
        if progress:
            print(f"rollout: {steps} steps, {finished}/{batch} envs done", file=sys.stderr, flush=True)
        if finished == batch:
            break
        if steps > per_env * (max_steps + 1):
            raise RuntimeError("rollout did not finish; this cannot happen with a time limit")
    # Concatenate on the host: on the device each number of chunks would compile its own program.
    chunks = jax.device_get(chunks)
    host = {k: np.concatenate([chunk[k] for chunk in chunks]) for k in chunks[0]}
    # (T, B) -> (B, T): rows of one env in time order, so its episodes come in order too.
    host = {k: np.ascontiguousarray(v.T).ravel() for k, v in host.items()}
    env_index = np.repeat(np.arange(batch), host["valid"].size // batch)
    episode = env_index * per_env + host.pop("episode")
    keep = host.pop("valid") & (episode < n_episodes)
    out = {"episode": episode[keep].astype(np.int64)}
    out.update({k: v[keep] for k, v in host.items()})
    return out


def episode_summaries(rollout: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode return and length of a `rollout_episodes` result."""
    n = int(rollout["episode"].max()) + 1
    returns = np.bincount(rollout["episode"], weights=rollout["reward"], minlength=n)
    lengths = np.bincount(rollout["episode"], minlength=n)
    return returns, lengths


# ---------------------------------------------------------------------------------------------------------
# Policies and exact evaluation (gamma = 1)
# ---------------------------------------------------------------------------------------------------------


def _terminal_rows_uniform(policy: jax.Array, params: EnvParams) -> jax.Array:
    return jnp.where(params.terminal[:, None], 1.0 / N_ACTIONS, policy)


def clinician_policy(params: EnvParams, renormalise: bool = True) -> jax.Array:
    """The clinicians' estimated policy (716, 25). renormalise=True restricts it to the admissible
    actions and renormalises; False gives it as shipped. Terminal rows are uniform (they are never used)."""
    probs = params.clinician_probs
    if renormalise:
        probs = jnp.where(params.admissible_mask, probs, 0.0)
        probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
    return _terminal_rows_uniform(probs, params)


def random_policy(params: EnvParams, admissible_only: bool = False) -> jax.Array:
    """Uniform over all 25 actions, or over each state's admissible actions. (716, 25)."""
    if admissible_only:
        mask = params.admissible_mask.astype(jnp.float32)
        return mask / mask.sum(-1, keepdims=True)
    return jnp.full((N_STATES, N_ACTIONS), 1.0 / N_ACTIONS, jnp.float32)


def greedy_admissible(q: jax.Array, admissible_mask: jax.Array) -> jax.Array:
    """One-hot policy (..., 716, 25) of the argmax of q over admissible actions only (lowest index wins
    ties). An unrestricted argmax picks an inadmissible action in 17 states of ICU-Sepsis."""
    masked = jnp.where(admissible_mask, q, -jnp.inf)
    return jax.nn.one_hot(jnp.argmax(masked, axis=-1), q.shape[-1], dtype=jnp.float32)


def _batched(fn):
    """Let a function of one (716, 25) policy take leading batch axes."""

    @functools.wraps(fn)
    def wrapper(policy, params, *args, **kwargs):
        policy = jnp.asarray(policy)
        if policy.ndim < 2 or policy.shape[-2:] != (N_STATES, N_ACTIONS):
            raise ValueError(f"policy must have shape (..., {N_STATES}, {N_ACTIONS}), got {policy.shape}")
        if policy.ndim == 2:
            return fn(policy, params, *args, **kwargs)
        inner = wrapper
        return jax.vmap(lambda p: inner(p, params, *args, **kwargs))(policy)

    return wrapper


@_batched
def policy_state_values(policy: jax.Array, params: EnvParams) -> tuple[jax.Array, jax.Array]:
    """Per-state survival probability and expected remaining steps under `policy`, (716,) each (zero at
    terminal states), by one linear solve over the 713 patient states."""
    _single_thread_lapack()
    policy = policy.astype(params.tx.dtype)
    n = N_PATIENT_STATES
    # Contract the whole tx and slice the small result: slicing tx first copies 51 MB (3x slower).
    p_pi = jnp.einsum("sa,sat->st", policy, params.tx)  # (716, 716)
    system = jnp.eye(n, dtype=p_pi.dtype) - p_pi[:n, :n]
    rhs = jnp.stack([p_pi[:n, SURVIVAL], jnp.ones(n, p_pi.dtype)], axis=1)  # (713, 2)
    solution = linear_solve(system, rhs)  # never a batched LU: see cleansepsis/linalg.py
    pad = jnp.zeros((N_STATES - n, 2), solution.dtype)
    solution = jnp.concatenate([solution, pad])
    return solution[:, 0], solution[:, 1]


@_batched
def policy_evaluation(policy: jax.Array, params: EnvParams) -> tuple[jax.Array, jax.Array]:
    """Exact (expected return, mean episode length) of a stochastic policy (716, 25) from `start_dist`.
    Leading batch axes are allowed (vmapped). Rows of terminal states are ignored."""
    values, lengths = policy_state_values(policy, params)
    return params.start_dist @ values, params.start_dist @ lengths


def q_values(values: jax.Array, params: EnvParams) -> jax.Array:
    """Q (716, 25) of a state-value vector (716,): reward of entering survival plus next value; zero at
    terminal states."""
    target = values + (jnp.arange(N_STATES) == SURVIVAL).astype(values.dtype)
    q = jnp.einsum("sat,t->sa", params.tx, target)
    return jnp.where(params.terminal[:, None], 0.0, q)


def value_iteration(params: EnvParams, max_iters: int = 50, tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Optimal Q (716, 25) and V (716,) with actions restricted to the admissible ones.

    Computed by policy iteration (each evaluation an exact linear solve), which reaches the optimum in a
    handful of iterations; an action changes only if it improves Q by more than `tol`, so float32
    near-ties cannot make it cycle. V[s] = max over admissible a of Q[s, a].
    """

    def improve(policy):
        values, _ = policy_state_values(policy, params)
        q = q_values(values, params)
        current = jnp.sum(q * policy, axis=-1)
        best = greedy_admissible(q, params.admissible_mask)
        gain = jnp.sum(q * best, axis=-1) - current
        new = jnp.where((gain > tol)[:, None], best, policy)
        return new, jnp.any(gain > tol)

    def cond(carry):
        _, changed, i = carry
        return changed & (i < max_iters)

    def body(carry):
        policy, _, i = carry
        new, changed = improve(policy)
        return new, changed, i + 1

    start = greedy_admissible(params.clinician_probs, params.admissible_mask)
    policy, _, _ = jax.lax.while_loop(cond, body, (start, jnp.array(True), jnp.array(0)))
    values, _ = policy_state_values(policy, params)
    q = q_values(values, params)
    v = jnp.max(jnp.where(params.admissible_mask, q, -jnp.inf), axis=-1)
    return q, jnp.where(params.terminal, 0.0, v)


def optimal_policy(params: EnvParams) -> jax.Array:
    """The greedy-admissible one-hot policy of `value_iteration`, (716, 25)."""
    q, _ = value_iteration(params)
    return greedy_admissible(q, params.admissible_mask)


# Float64 numpy versions, for published reference figures (float32 agrees to about 1e-5).


def _solve64(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Float64 LU solve in scipy's single-threaded LAPACK (numpy's threaded one is 10x slower when busy)."""
    _single_thread_lapack()
    import scipy.linalg

    return scipy.linalg.solve(matrix, rhs)


def _np_policy_evaluation(policy: np.ndarray, tx: np.ndarray, start: np.ndarray) -> tuple[float, float]:
    n = N_PATIENT_STATES
    p_pi = np.einsum("sa,sat->st", policy[:n], tx[:n], optimize=True)
    rhs = np.stack([p_pi[:, SURVIVAL], np.ones(n)], axis=1)
    solution = _solve64(np.eye(n) - p_pi[:, :n], rhs)
    return float(start[:n] @ solution[:, 0]), float(start[:n] @ solution[:, 1])


def _np_optimal_policy(tx: np.ndarray, mask: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Policy iteration in float64 over admissible actions; one-hot (716, 25)."""
    n = N_PATIENT_STATES
    target = np.zeros(N_STATES)
    target[SURVIVAL] = 1.0
    action = np.argmax(np.where(mask, shipped_arrays()["expert_policy"], -np.inf), axis=1)
    for _ in range(100):
        p_pi = tx[np.arange(n), action[:n]]  # (713, 716)
        values = np.zeros(N_STATES)
        values[:n] = _solve64(np.eye(n) - p_pi[:, :n], p_pi[:, SURVIVAL])
        q = tx @ (values + target)
        best = np.argmax(np.where(mask, q, -np.inf), axis=1)
        gain = q[np.arange(N_STATES), best] - q[np.arange(N_STATES), action]
        improve = gain > tol
        improve[n:] = False
        if not improve.any():
            break
        action = np.where(improve, best, action)
    return np.eye(N_ACTIONS)[action]


@functools.cache
def _reference_table(strategy: str) -> tuple[tuple[str, float, float], ...]:
    raw = shipped_arrays()
    tx, start, mask = transition_matrix(strategy), raw["d_0"], raw["admissible_mask"]
    clinician = raw["expert_policy"]
    renormalised = np.where(mask, clinician, 0.0)
    renormalised /= np.maximum(renormalised.sum(1, keepdims=True), 1e-300)
    policies = {
        "random": np.full((N_STATES, N_ACTIONS), 1.0 / N_ACTIONS),
        "random_admissible": mask / mask.sum(1, keepdims=True),
        "clinician": clinician,
        "clinician_renormalised": renormalised,
        "greedy_clinician": np.eye(N_ACTIONS)[np.argmax(np.where(mask, renormalised, -np.inf), axis=1)],
        "optimal": _np_optimal_policy(tx, mask),
    }
    return tuple((name, *_np_policy_evaluation(policy, tx, start)) for name, policy in policies.items())


def reference_values(params: EnvParams) -> dict[str, dict[str, float]]:
    """Exact expected return (= survival probability) and mean episode length of the reference policies
    under `params.strategy`, computed once per strategy in float64 from the shipped arrays:
    random (uniform over 25), random_admissible, clinician (as shipped), clinician_renormalised,
    greedy_clinician (argmax of the renormalised clinician policy) and optimal (policy iteration over
    admissible actions)."""
    return {
        name: {"expected_return": expected_return, "mean_length": mean_length}
        for name, expected_return, mean_length in _reference_table(params.strategy)
    }


# ---------------------------------------------------------------------------------------------------------
# Gymnasium class
# ---------------------------------------------------------------------------------------------------------


class ICUSepsisEnv(gymnasium.Env):
    """ICU-Sepsis as a Gymnasium env over the same arrays and alias tables as the JAX core (numpy RNG).

    Actions: Discrete(25), `5 * fluid_level + vaso_level`. Observations per `obs_mode` ('vector' Box(47),
    'index' Discrete(716), 'onehot' Box(716)). `info` carries `admissible_actions`, `state_vector`,
    `sofa_score` (like the reference env) and `state_index`. Episodes are truncated at `max_steps`.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, strategy: str = "mean", obs_mode: str = "vector", max_steps: int = MAX_STEPS):
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("obs_mode", obs_mode, OBS_MODES)
        self.strategy, self.obs_mode, self.max_steps = strategy, obs_mode, int(max_steps)
        raw = shipped_arrays()
        tables = _numpy_params(strategy)
        self._threshold, self._next = tables["alias_threshold"], tables["alias_next"]
        self._start_threshold, self._start_next = tables["start_threshold"], tables["start_next"]
        self._state_vectors = raw["state_cluster_centers"].astype(np.float32)
        self._sofa = raw["sofa_scores"]
        self._admissible = [np.flatnonzero(row) for row in raw["admissible_mask"]]
        self.action_space = gymnasium.spaces.Discrete(N_ACTIONS)
        if obs_mode == "vector":
            bound = float(np.abs(self._state_vectors).max()) + 1.0
            self.observation_space = gymnasium.spaces.Box(-bound, bound, (OBS_DIM,), np.float32)
        elif obs_mode == "onehot":
            self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (N_STATES,), np.float32)
        else:
            self.observation_space = gymnasium.spaces.Discrete(N_STATES)
        self._state: int | None = None
        self._time = 0

    def _draw(self, threshold: np.ndarray, packed: np.ndarray) -> int:
        slot = int(self.np_random.integers(threshold.shape[-1]))
        word = int(packed[slot])
        return word & _PACK_MASK if self.np_random.random() < threshold[slot] else word >> _PACK_SHIFT

    def _obs(self):
        if self.obs_mode == "vector":
            return self._state_vectors[self._state].copy()
        if self.obs_mode == "onehot":
            out = np.zeros(N_STATES, np.float32)
            out[self._state] = 1.0
            return out
        return int(self._state)

    def _info(self) -> dict[str, Any]:
        return {
            "admissible_actions": self._admissible[self._state].tolist(),
            "state_vector": self._state_vectors[self._state].copy(),
            "sofa_score": float(self._sofa[self._state]),
            "state_index": int(self._state),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._state = self._draw(self._start_threshold, self._start_next)
        self._time = 0
        return self._obs(), self._info()

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._state in TERMINAL_STATES:
            raise RuntimeError("the episode has ended; call reset()")
        action = int(action)
        if not 0 <= action < N_ACTIONS:
            raise ValueError(f"action {action} outside 0..{N_ACTIONS - 1}")
        self._state = self._draw(self._threshold[self._state, action], self._next[self._state, action])
        self._time += 1
        terminated = self._state in TERMINAL_STATES
        truncated = self._time >= self.max_steps and not terminated
        reward = 1.0 if self._state == SURVIVAL else 0.0
        return self._obs(), reward, terminated, truncated, self._info()


def register() -> None:
    """Register ENV_ID with Gymnasium (idempotent)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="cleansepsis.env:ICUSepsisEnv")


register()
