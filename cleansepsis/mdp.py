"""A finite MDP in pure JAX: params pytree, reset/step/auto-reset, rollouts, exact evaluation, Gymnasium.

One core serves every tabular MDP of the project (ICU-Sepsis in `cleansepsis.env`, the Oberst-Sontag
simulator in `cleansepsis.sepsis_sim`, MDPs built from a cohort in `cleansepsis.cohort_mdp`); each of
those modules is a loader that returns an `MDPParams`:

    params = load("icu-sepsis")                      # or "sepsis-sim", or a cohort MDP directory
    obs, state = reset(key, params)
    obs, state, reward, terminated, truncated = step(key, state, action, params)
    ret, length = policy_evaluation(policy, params)  # exact, policy (S, A)

Conventions shared by all MDPs: the reward is a function of the next state (`reward_next[s']`, paid on
entering s'); an episode ends on entering a terminal state or after `max_steps` steps; stepping a terminal
state leaves it there with reward 0. Exact evaluation is either a linear solve over the live states
(`finite_horizon=False`: the time limit is treated as never reached, as for ICU-Sepsis where
P(length > 500) < 1e-17; terminal states must be the last indices) or backward induction over the
`max_steps` steps (`finite_horizon=True`, the simulator's 20-step episodes).

Sampling the next state is O(1): every (state, action) row has a Walker/Vose alias table over its non-zero
next states, built once in numpy when the params are loaded.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis.linalg import linear_solve

OBS_MODES = ("index", "onehot", "vector")

_PACK_SHIFT = 16  # alias tables pack (primary next state, alias next state) into one int32
_PACK_MASK = (1 << _PACK_SHIFT) - 1
MAX_MDP_STATES = 1 << 15  # two state indices must fit one int32 (sign bit unused)

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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


# ---------------------------------------------------------------------------------------------------------
# Alias tables (numpy, built once per MDP)
# ---------------------------------------------------------------------------------------------------------


def alias_tables(probs: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables for each row of `probs` (rows, n) over its non-zero entries, padded to `width`.

    Returns (threshold (rows, width) float32, packed (rows, width) int32): draw a slot j uniformly, then the
    outcome is `packed & 0xFFFF` if u < threshold[j] else `packed >> 16`. Built by running Vose's
    algorithm on all rows in lockstep (one pairing per row per iteration), so it takes milliseconds.
    """
    probs = np.asarray(probs, np.float64)
    if probs.shape[1] > MAX_MDP_STATES:
        raise ValueError(f"alias tables hold at most {MAX_MDP_STATES} outcomes, got {probs.shape[1]}")
    rows = probs.shape[0]
    support = probs > 0
    counts = support.sum(1)
    if counts.min() == 0:
        raise ValueError(f"row {int(np.argmin(counts))} has no non-zero probability")
    width = int(counts.max()) if width is None else width
    if counts.max() > width:
        raise ValueError(f"a row has {counts.max()} non-zero entries, more than the table width {width}")
    # Rows are independent: build them in blocks, so the int64/float64 work arrays stay near 16 MB each
    # (all of ICU-Sepsis's 17,900 rows at once took over 600 MB at the peak).
    block = max(1, _ALIAS_BLOCK_ELEMENTS // width)
    if rows > block:
        parts = [_alias_rows(probs[i : i + block], support[i : i + block], counts[i : i + block], width)
                 for i in range(0, rows, block)]  # fmt: skip
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _alias_rows(probs, support, counts, width)


_ALIAS_BLOCK_ELEMENTS = 2**21


def _alias_rows(
    probs: np.ndarray, support: np.ndarray, counts: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """alias_tables on rows already checked."""
    rows = probs.shape[0]
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
    row_start = np.repeat(np.arange(rows, dtype=np.int64) * n, width)
    thr = threshold.astype(np.float64).ravel()
    # one bincount over the flat (row, next) cells: the primary slots' shares, then the aliases', added in the
    # same order as two np.add.at calls would (same bytes) at a fraction of np.add.at's time
    cells = np.concatenate([row_start + (packed & _PACK_MASK).ravel(), row_start + (packed >> _PACK_SHIFT).ravel()])
    shares = np.concatenate([thr / width, (1.0 - thr) / width])
    return np.bincount(cells, weights=shares, minlength=rows * n).reshape(rows, n)


# ---------------------------------------------------------------------------------------------------------
# Params and state pytrees
# ---------------------------------------------------------------------------------------------------------


class MDPParams(eqx.Module):
    """Everything a finite MDP needs, as device arrays. Static fields change the program. Build with a
    loader (`load`, `cleansepsis.env.load_params`, `cleansepsis.sepsis_sim.load_params`, ...) or
    `make_params` from numpy arrays. S states, A actions, W alias slots."""

    tx: jax.Array  # (S, A, S) float32 transition probabilities (for ICU-Sepsis: strategy applied)
    alias_threshold: jax.Array  # (S, A, W) float32
    alias_next: jax.Array  # (S, A, W) int32, packed primary | alias << 16
    start_dist: jax.Array  # (S,) float32
    start_threshold: jax.Array  # (S0,) float32 alias table over start_dist
    start_next: jax.Array  # (S0,) int32 packed
    admissible_mask: jax.Array  # (S, A) bool
    state_vectors: jax.Array  # (S, obs_dim) float32: the observation vector of each state
    obs_index: jax.Array  # (S,) int32: the observation index of each state (0..n_obs-1)
    reward_next: jax.Array  # (S,) float32: reward paid on entering the state
    sofa: jax.Array  # (S,) float32 SOFA score per state where the MDP has one (ICU-Sepsis), else zeros
    clinician_probs: jax.Array  # (S, A) float32: the behaviour (clinician / physician) policy
    terminal: jax.Array  # (S,) bool
    max_steps: jax.Array  # () int32: time limit (truncation), the horizon when finite_horizon
    strategy: str = eqx.field(static=True, default="mean")
    obs_mode: str = eqx.field(static=True, default="vector")
    n_obs: int = eqx.field(static=True, default=0)
    gamma: float = eqx.field(static=True, default=1.0)  # discount of the exact evaluation
    finite_horizon: bool = eqx.field(static=True, default=False)
    n_live: int = eqx.field(
        static=True, default=0
    )  # states 0..n_live-1 are the non-terminal ones (solve mode)
    spec: tuple = eqx.field(static=True, default=())  # (loader name, *options): identifies the MDP

    @property
    def n_states(self) -> int:
        return self.tx.shape[-1]

    @property
    def n_actions(self) -> int:
        return self.tx.shape[-2]

    @property
    def obs_dim(self) -> int:
        return self.state_vectors.shape[-1]


class EnvState(eqx.Module):
    state_index: jax.Array  # () int32
    time: jax.Array  # () int32, steps taken in this episode


def numpy_tables(tx: np.ndarray, start_dist: np.ndarray) -> dict[str, np.ndarray]:
    """Alias tables of a transition array (S, A, S) and of a start distribution (S,)."""
    n_states, n_actions, _ = tx.shape
    threshold, packed = alias_tables(tx.reshape(n_states * n_actions, n_states))
    start_threshold, start_packed = alias_tables(np.asarray(start_dist)[None, :])
    return {
        "alias_threshold": threshold.reshape(n_states, n_actions, -1),
        "alias_next": packed.reshape(n_states, n_actions, -1),
        "start_threshold": start_threshold[0],
        "start_next": start_packed[0],
    }


def validate_arrays(tx: np.ndarray, start_dist: np.ndarray, terminal: np.ndarray, where: str) -> None:
    """Rows of tx and start_dist are distributions; start mass on live states only. Raises ValueError."""
    if tx.ndim != 3 or tx.shape[0] != tx.shape[2]:
        raise ValueError(f"{where}: transitions must have shape (S, A, S), got {tx.shape}")
    if tx.shape[0] > MAX_MDP_STATES:
        raise ValueError(f"{where}: {tx.shape[0]} states, more than the {MAX_MDP_STATES} the sampler packs")
    if not np.isfinite(tx).all() or (tx < 0).any():
        raise ValueError(f"{where}: transition probabilities must be finite and non-negative")
    sums = tx.sum(-1)
    bad = np.argwhere(np.abs(sums - 1.0) > 1e-6)
    if bad.size:
        s, a = bad[0]
        raise ValueError(f"{where}: transition row (state {s}, action {a}) sums to {sums[s, a]}, not 1")
    if abs(float(np.sum(start_dist)) - 1.0) > 1e-6 or (np.asarray(start_dist) < 0).any():
        raise ValueError(f"{where}: the start distribution must be non-negative and sum to 1")
    if (np.asarray(start_dist)[terminal] > 0).any():
        raise ValueError(f"{where}: the start distribution puts mass on terminal states")
    if not terminal.any():
        raise ValueError(f"{where}: the MDP has no terminal state")


def make_params(
    *,
    tx: np.ndarray,
    start_dist: np.ndarray,
    reward_next: np.ndarray,
    terminal: np.ndarray,
    admissible_mask: np.ndarray,
    state_vectors: np.ndarray,
    clinician_probs: np.ndarray,
    max_steps: int,
    spec: tuple,
    obs_index: np.ndarray | None = None,
    n_obs: int | None = None,
    sofa: np.ndarray | None = None,
    gamma: float = 1.0,
    finite_horizon: bool = False,
    strategy: str = "mean",
    obs_mode: str = "vector",
    tables: dict[str, np.ndarray] | None = None,
) -> MDPParams:
    """MDPParams from numpy arrays (checked; alias tables built unless given)."""
    check_choice("obs_mode", obs_mode, OBS_MODES)
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    terminal = np.asarray(terminal, bool)
    n_states = tx.shape[0]
    if tables is None:
        validate_arrays(tx, start_dist, terminal, spec[0] if spec else "MDP")
        tables = numpy_tables(tx, start_dist)
    n_live = int((~terminal).sum())
    if not finite_horizon and terminal[:n_live].any():
        raise ValueError("exact evaluation by linear solve needs the terminal states last")
    if obs_index is None:
        obs_index, n_obs = np.arange(n_states), n_states
    if obs_mode == "onehot" and n_obs is None:
        raise ValueError("n_obs is needed for one-hot observations")
    return MDPParams(
        tx=jnp.asarray(tx, jnp.float32),
        alias_threshold=jnp.asarray(tables["alias_threshold"]),
        alias_next=jnp.asarray(tables["alias_next"]),
        start_dist=jnp.asarray(start_dist, jnp.float32),
        start_threshold=jnp.asarray(tables["start_threshold"]),
        start_next=jnp.asarray(tables["start_next"]),
        admissible_mask=jnp.asarray(admissible_mask, bool),
        state_vectors=jnp.asarray(state_vectors, jnp.float32),
        obs_index=jnp.asarray(obs_index, jnp.int32),
        reward_next=jnp.asarray(reward_next, jnp.float32),
        sofa=jnp.asarray(np.zeros(n_states) if sofa is None else sofa, jnp.float32),
        clinician_probs=jnp.asarray(clinician_probs, jnp.float32),
        terminal=jnp.asarray(terminal),
        max_steps=jnp.asarray(int(max_steps), jnp.int32),
        gamma=float(gamma),
        strategy=strategy,
        obs_mode=obs_mode,
        n_obs=int(n_obs),
        finite_horizon=bool(finite_horizon),
        n_live=n_live,
        spec=tuple(spec),
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


def _sample_next(bits: jax.Array, state_index: jax.Array, action: jax.Array, params: MDPParams) -> jax.Array:
    width = params.alias_threshold.shape[-1]
    slot = (bits[0] % jnp.uint32(width)).astype(jnp.int32)
    uniform = (bits[1] >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    word = params.alias_next[state_index, action, slot]
    threshold = params.alias_threshold[state_index, action, slot]
    return jnp.where(uniform < threshold, word & _PACK_MASK, word >> _PACK_SHIFT)


def _sample_start(bits: jax.Array, params: MDPParams) -> jax.Array:
    return _alias_draw(bits, params.start_threshold, params.start_next)


def _word_slot_uniform(word: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """An alias slot and a uniform in [0, 1) from ONE uint32 word: slot = word mod width, and the
    quotient (uniform on 0..floor(2^32 / width) - 1, independent of the slot but for the top `width`
    words of 2^32) scaled to [0, 1) in float32. Resolution: width / 2^32 or float32's rounding, whichever
    is coarser (1.7e-7 for ICU-Sepsis' 712-slot start table, 6e-8 for the two-word draw)."""
    w = jnp.uint32(width)
    slot = (word % w).astype(jnp.int32)
    uniform = (word // w).astype(jnp.float32) * jnp.float32(width * 2.0**-32)
    return slot, uniform


def _sample_next_word(
    word: jax.Array, state_index: jax.Array, action: jax.Array, params: MDPParams
) -> jax.Array:
    slot, uniform = _word_slot_uniform(word, params.alias_threshold.shape[-1])
    packed = params.alias_next[state_index, action, slot]
    threshold = params.alias_threshold[state_index, action, slot]
    return jnp.where(uniform < threshold, packed & _PACK_MASK, packed >> _PACK_SHIFT)


def _sample_start_word(word: jax.Array, params: MDPParams) -> jax.Array:
    slot, uniform = _word_slot_uniform(word, params.start_threshold.shape[-1])
    packed = params.start_next[slot]
    return jnp.where(uniform < params.start_threshold[slot], packed & _PACK_MASK, packed >> _PACK_SHIFT)


# The batched steps draw their words with XLA's RngBitGenerator, its ThreeFry algorithm named explicitly
# (so the bits do not depend on the backend's default), seeded by 4 words of the caller's key: on CPU it
# costs about half of drawing the same words with jax.random.bits (docs/mdp.md, "Speed").
BATCH_BIT_ALGORITHM = jax.lax.RandomAlgorithm.RNG_THREE_FRY


def batch_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random words of `shape` for a whole batch, determined by `key` (any jax key)."""
    seed = jax.random.bits(key, (4,), jnp.uint32)
    return jax.lax.rng_bit_generator(seed, shape, jnp.uint32, algorithm=BATCH_BIT_ALGORITHM)[1]


def observe(state_index: jax.Array, params: MDPParams) -> jax.Array:
    """The observation of a state for `params.obs_mode`: 'vector' (obs_dim,) float32, 'index' () int32
    (the observation index), 'onehot' (n_obs,) float32."""
    if params.obs_mode == "vector":
        return params.state_vectors[state_index]
    if params.obs_mode == "onehot":
        return jax.nn.one_hot(params.obs_index[state_index], params.n_obs, dtype=jnp.float32)
    return params.obs_index[state_index]


def reset(key: jax.Array, params: MDPParams) -> tuple[jax.Array, EnvState]:
    """Draw a start state from `start_dist`. Returns (obs, state)."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    state = EnvState(state_index=_sample_start(bits, params), time=jnp.zeros((), jnp.int32))
    return observe(state.state_index, params), state


def _transition(bits, state: EnvState, action, params: MDPParams):
    action = jnp.asarray(action, jnp.int32)
    was_terminal = params.terminal[state.state_index]
    sampled = _sample_next(bits, state.state_index, action, params)
    next_index = jnp.where(was_terminal, state.state_index, sampled)  # terminal states stay put
    reward = jnp.where(was_terminal, 0.0, params.reward_next[next_index]).astype(jnp.float32)
    time = state.time + (~was_terminal).astype(jnp.int32)
    terminated = params.terminal[next_index]
    truncated = (time >= params.max_steps) & ~terminated
    return EnvState(state_index=next_index, time=time), reward, terminated, truncated


def step(key: jax.Array, state: EnvState, action: jax.Array, params: MDPParams):
    """One step. Returns (obs, state, reward, terminated, truncated). Stepping a terminal state leaves it
    unchanged with reward 0 (no auto-reset here; see `step_autoreset`)."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    state, reward, terminated, truncated = _transition(bits, state, action, params)
    return observe(state.state_index, params), state, reward, terminated, truncated


def _autoreset_transition(bits, state: EnvState, action, params: MDPParams):
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


def _autoreset_transition_words(words, state: EnvState, action, params: MDPParams):
    """`_autoreset_transition` from two words: one for the transition, one for a possible reset."""
    action = jnp.asarray(action, jnp.int32)
    was_terminal = params.terminal[state.state_index]
    sampled = _sample_next_word(words[0], state.state_index, action, params)
    next_index = jnp.where(was_terminal, state.state_index, sampled)
    reward = jnp.where(was_terminal, 0.0, params.reward_next[next_index]).astype(jnp.float32)
    time = state.time + (~was_terminal).astype(jnp.int32)
    terminated = params.terminal[next_index]
    truncated = (time >= params.max_steps) & ~terminated
    done = terminated | truncated
    fresh = _sample_start_word(words[1], params)
    new_state = EnvState(state_index=jnp.where(done, fresh, next_index), time=jnp.where(done, 0, time))
    return new_state, EnvState(state_index=next_index, time=time), reward, terminated, truncated


def step_autoreset(key: jax.Array, state: EnvState, action: jax.Array, params: MDPParams):
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


def reset_batch(key: jax.Array, params: MDPParams, batch: int) -> tuple[jax.Array, EnvState]:
    """`reset` for `batch` envs at once (leading axis on obs and state), from one key."""
    bits = jax.random.bits(key, (batch, 2), jnp.uint32)
    state_index = jax.vmap(_sample_start, in_axes=(0, None))(bits, params)
    state = EnvState(state_index=state_index, time=jnp.zeros(batch, jnp.int32))
    return jax.vmap(observe, in_axes=(0, None))(state_index, params), state


def step_autoreset_batch(key: jax.Array, state: EnvState, action: jax.Array, params: MDPParams):
    """`step_autoreset` for a batch of envs (leading axis on state and action). The whole batch's random
    words come from one `batch_words` call (XLA's ThreeFry seeded by the key), and each env uses two:
    one for its transition and one for a possible reset (`_word_slot_uniform`). Same key, same result;
    the draws differ from `step_autoreset`'s (which takes four words of jax.random.bits per env), with
    the same distribution. Returns the same tuple with a leading batch axis."""
    batch = state.state_index.shape[0]
    words = batch_words(key, (batch, 2))
    new_state, stepped, reward, terminated, truncated = jax.vmap(
        _autoreset_transition_words, in_axes=(0, 0, 0, None)
    )(words, state, jnp.asarray(action, jnp.int32), params)
    observe_batch = jax.vmap(observe, in_axes=(0, None))
    info = {
        "next_state_index": stepped.state_index,
        "final_obs": observe_batch(stepped.state_index, params),
        "episode_length": stepped.time,
    }
    return observe_batch(new_state.state_index, params), new_state, reward, terminated, truncated, info


# ---------------------------------------------------------------------------------------------------------
# Batched rollouts of a tabular policy (Monte Carlo checks and replay builders)
# ---------------------------------------------------------------------------------------------------------


def policy_cdf(policy: jax.Array) -> jax.Array:
    """Row-wise CDF (S, A) of a policy for inverse-CDF sampling. The last entry is exactly 1 and
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
        new_state, stepped, reward, terminated, truncated = _autoreset_transition(
            bits[1:], state, action, params
        )
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

    carry, records = jax.lax.scan(
        body, (state_index, time, episode_count), jax.random.split(chunk_key, n_steps)
    )
    return (key, carry), records


def rollout_episodes(
    key: jax.Array,
    policy: jax.Array,
    params: MDPParams,
    n_episodes: int,
    n_envs: int = 8192,
    chunk_steps: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run `n_episodes` complete episodes of a tabular policy (S, A) in the JAX env.

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
    # Every env starts in a terminal state with episode count -1: its first step is a dropped no-op
    # that auto-resets it, so the start states are drawn inside the one compiled chunk.
    parked = int(np.flatnonzero(np.asarray(params.terminal))[-1])
    carry = (jnp.full(batch, parked, jnp.int32), jnp.zeros(batch, jnp.int32), jnp.full(batch, -1, jnp.int32))
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
# Policies and exact evaluation
# ---------------------------------------------------------------------------------------------------------


def _terminal_rows_uniform(policy: jax.Array, params: MDPParams) -> jax.Array:
    return jnp.where(params.terminal[:, None], 1.0 / params.n_actions, policy)


def clinician_policy(params: MDPParams, renormalise: bool = True) -> jax.Array:
    """The behaviour policy of the MDP (S, A). renormalise=True restricts it to the admissible actions and
    renormalises; False gives it as stored. Terminal rows are uniform (they are never used)."""
    probs = params.clinician_probs
    if renormalise:
        probs = jnp.where(params.admissible_mask, probs, 0.0)
        probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
    return _terminal_rows_uniform(probs, params)


def random_policy(params: MDPParams, admissible_only: bool = False) -> jax.Array:
    """Uniform over all actions, or over each state's admissible actions. (S, A)."""
    if admissible_only:
        mask = params.admissible_mask.astype(jnp.float32)
        return mask / mask.sum(-1, keepdims=True)
    return jnp.full((params.n_states, params.n_actions), 1.0 / params.n_actions, jnp.float32)


def greedy_admissible(q: jax.Array, admissible_mask: jax.Array) -> jax.Array:
    """One-hot policy (..., S, A) of the argmax of q over admissible actions only (lowest index wins
    ties). An unrestricted argmax picks an inadmissible action in 17 states of ICU-Sepsis."""
    masked = jnp.where(admissible_mask, q, -jnp.inf)
    return jax.nn.one_hot(jnp.argmax(masked, axis=-1), q.shape[-1], dtype=jnp.float32)


def observation_policy(obs_policy: jax.Array, params: MDPParams) -> jax.Array:
    """A policy over observations (n_obs, A) as a policy over states (S, A): each state acts through its
    observation, so it is evaluated exactly on the full (hidden) state space."""
    obs_policy = jnp.asarray(obs_policy)
    if obs_policy.shape[-2] != params.n_obs:
        raise ValueError(f"observation policy needs {params.n_obs} rows, got shape {obs_policy.shape}")
    return obs_policy[..., params.obs_index, :]


def _batched(fn):
    """Let a function of one (S, A) policy take leading batch axes."""

    @functools.wraps(fn)
    def wrapper(policy, params, *args, **kwargs):
        policy = jnp.asarray(policy)
        shape = (params.n_states, params.n_actions)
        if policy.ndim < 2 or policy.shape[-2:] != shape:
            raise ValueError(f"policy must have shape (..., {shape[0]}, {shape[1]}), got {policy.shape}")
        if policy.ndim == 2:
            return fn(policy, params, *args, **kwargs)
        inner = wrapper
        return jax.vmap(lambda p: inner(p, params, *args, **kwargs))(policy)

    return wrapper


def _horizon_values(p_pi: jax.Array, params: MDPParams) -> tuple[jax.Array, jax.Array]:
    """Backward induction over max_steps steps: expected (discounted) return and expected length from
    each state at time 0; zero at terminal states."""
    live = (~params.terminal).astype(p_pi.dtype)
    immediate = p_pi @ params.reward_next.astype(p_pi.dtype)

    def backup(_, carry):
        values, lengths = carry
        values = live * (immediate + params.gamma * (p_pi @ (live * values)))
        lengths = live * (1.0 + p_pi @ (live * lengths))
        return values, lengths

    zero = jnp.zeros(params.n_states, p_pi.dtype)
    return jax.lax.fori_loop(0, params.max_steps, backup, (zero, zero))


@_batched
def policy_state_values(policy: jax.Array, params: MDPParams) -> tuple[jax.Array, jax.Array]:
    """Per-state expected return and expected remaining steps under `policy`, (S,) each (zero at terminal
    states): one linear solve over the live states, or backward induction when `finite_horizon`."""
    policy = policy.astype(params.tx.dtype)
    # Contract the whole tx and slice the small result: slicing tx first copies 51 MB (3x slower).
    p_pi = jnp.einsum("sa,sat->st", policy, params.tx)  # (S, S)
    if params.finite_horizon:
        return _horizon_values(p_pi, params)
    _single_thread_lapack()
    n = params.n_live
    system = jnp.eye(n, dtype=p_pi.dtype) - params.gamma * p_pi[:n, :n]
    rhs = jnp.stack([p_pi[:n] @ params.reward_next, jnp.ones(n, p_pi.dtype)], axis=1)  # (n, 2)
    solution = linear_solve(system, rhs)  # never a batched LU: see cleansepsis/linalg.py
    lengths = solution[:, 1]
    if params.gamma != 1.0:  # lengths are undiscounted: their own solve
        lengths = linear_solve(jnp.eye(n, dtype=p_pi.dtype) - p_pi[:n, :n], jnp.ones(n, p_pi.dtype))
    pad = jnp.zeros(params.n_states - n, solution.dtype)
    return jnp.concatenate([solution[:, 0], pad]), jnp.concatenate([lengths, pad])


@_batched
def policy_evaluation(policy: jax.Array, params: MDPParams) -> tuple[jax.Array, jax.Array]:
    """Exact (expected return, mean episode length) of a stochastic policy (S, A) from `start_dist`.
    Leading batch axes are allowed (vmapped). Rows of terminal states are ignored."""
    values, lengths = policy_state_values(policy, params)
    return params.start_dist @ values, params.start_dist @ lengths


def q_values(values: jax.Array, params: MDPParams) -> jax.Array:
    """Q (S, A) of a state-value vector (S,) for the next step: reward of entering s' plus discounted
    value of s'; zero at terminal states."""
    live = (~params.terminal).astype(values.dtype)
    target = params.reward_next.astype(values.dtype) + params.gamma * live * values
    q = jnp.einsum("sat,t->sa", params.tx, target)
    return jnp.where(params.terminal[:, None], 0.0, q)


def value_iteration(params: MDPParams, max_iters: int = 50, tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Optimal Q (S, A) and V (S,) with actions restricted to the admissible ones.

    Solve mode: policy iteration (each evaluation an exact linear solve), which reaches the optimum in a
    handful of iterations; an action changes only if it improves Q by more than `tol`, so float32
    near-ties cannot make it cycle. Finite horizon: backward induction; the optimal policy then depends
    on the time step, and Q and V are those of the first step (V from the start is the optimum over all
    policies, time-dependent ones included). V[s] = max over admissible a of Q[s, a].
    """
    if params.finite_horizon:
        return _horizon_optimum(params)

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


def _horizon_optimum(params: MDPParams) -> tuple[jax.Array, jax.Array]:
    def backup(_, carry):
        _, values = carry
        q = q_values(values, params)
        v = jnp.max(jnp.where(params.admissible_mask, q, -jnp.inf), axis=-1)
        return q, jnp.where(params.terminal, 0.0, v)

    zero_q = jnp.zeros(params.tx.shape[:2], params.tx.dtype)
    return jax.lax.fori_loop(
        0, params.max_steps, backup, (zero_q, jnp.zeros(params.n_states, params.tx.dtype))
    )


def optimal_policy(params: MDPParams) -> jax.Array:
    """The greedy-admissible one-hot policy of `value_iteration`, (S, A). Under a finite horizon this is
    the first step's greedy policy used at every step (stationary, so not always optimal)."""
    q, _ = value_iteration(params)
    return greedy_admissible(q, params.admissible_mask)


# Float64 numpy versions, for published reference figures (float32 agrees to about 1e-5).


def solve64(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Float64 LU solve in scipy's single-threaded LAPACK (numpy's threaded one is 10x slower when busy)."""
    _single_thread_lapack()
    import scipy.linalg

    return scipy.linalg.solve(matrix, rhs)


def np_state_values(
    policy: np.ndarray,
    tx: np.ndarray,
    reward_next: np.ndarray,
    terminal: np.ndarray,
    gamma: float,
    horizon: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-state (value, expected length) of a policy (S, A): a linear solve over the live states
    (terminal states last) when `horizon` is None, else backward induction over `horizon` steps."""
    live = ~terminal
    if horizon is None:
        n = int(live.sum())
        p_pi = np.einsum("sa,sat->st", policy[:n], tx[:n], optimize=True)
        rhs = np.stack([p_pi @ reward_next, np.ones(n)], axis=1)
        solution = solve64(np.eye(n) - gamma * p_pi[:, :n], rhs)
        values, lengths = solution[:, 0], solution[:, 1]
        if gamma != 1.0:  # lengths are undiscounted
            lengths = solve64(np.eye(n) - p_pi[:, :n], np.ones(n))
        pad = np.zeros(len(terminal) - n)
        return np.concatenate([values, pad]), np.concatenate([lengths, pad])
    p_pi = np.einsum("sa,sat->st", policy, tx, optimize=True)
    immediate = p_pi @ reward_next
    values, lengths = np.zeros(len(terminal)), np.zeros(len(terminal))
    for _ in range(horizon):
        values = live * (immediate + gamma * (p_pi @ (live * values)))
        lengths = live * (1.0 + p_pi @ (live * lengths))
    return values, lengths


def np_policy_evaluation(
    policy, tx, start, reward_next, terminal, gamma=1.0, horizon=None
) -> tuple[float, float]:
    values, lengths = np_state_values(policy, tx, reward_next, terminal, gamma, horizon)
    return float(start @ values), float(start @ lengths)


def np_optimal(
    tx: np.ndarray,
    reward_next: np.ndarray,
    terminal: np.ndarray,
    mask: np.ndarray,
    gamma: float,
    horizon: int | None,
    start_policy: np.ndarray,
    tol: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 optimum over admissible actions: (one-hot policy (S, A) of the first step, V (S,)).
    Policy iteration from `start_policy`'s argmax (solve mode) or backward induction (finite horizon)."""
    n_states, n_actions, _ = tx.shape
    live = ~terminal
    if horizon is not None:
        values = np.zeros(n_states)
        for _ in range(horizon):
            q = tx @ (reward_next + gamma * live * values)
            q = np.where(mask, q, -np.inf)
            values = np.where(live, q.max(1), 0.0)
        return np.eye(n_actions)[np.argmax(q, axis=1)], values
    action = np.argmax(np.where(mask, start_policy, -np.inf), axis=1)
    for _ in range(200):
        values, _ = np_state_values(np.eye(n_actions)[action], tx, reward_next, terminal, gamma, None)
        q = tx @ (reward_next + gamma * live * values)
        best = np.argmax(np.where(mask, q, -np.inf), axis=1)
        gain = q[np.arange(n_states), best] - q[np.arange(n_states), action]
        improve = (gain > tol) & live
        if not improve.any():
            break
        action = np.where(improve, best, action)
    return np.eye(n_actions)[action], values


def np_reference_table(
    tx: np.ndarray,
    start: np.ndarray,
    reward_next: np.ndarray,
    terminal: np.ndarray,
    mask: np.ndarray,
    clinician: np.ndarray,
    gamma: float = 1.0,
    horizon: int | None = None,
) -> dict[str, dict[str, float]]:
    """Float64 exact return and mean length of the reference policies of a finite MDP: random (uniform
    over all actions), random_admissible, clinician (as stored), clinician_renormalised (to admissible
    actions), greedy_clinician (its admissible argmax) and optimal (over admissible actions; under a finite
    horizon the time-dependent optimum)."""
    n_states, n_actions, _ = tx.shape
    renormalised = np.where(mask, clinician, 0.0)
    renormalised /= np.maximum(renormalised.sum(1, keepdims=True), 1e-300)
    renormalised[terminal] = 1.0 / n_actions
    policies = {
        "random": np.full((n_states, n_actions), 1.0 / n_actions),
        "random_admissible": mask / mask.sum(1, keepdims=True),
        "clinician": clinician,
        "clinician_renormalised": renormalised,
        "greedy_clinician": np.eye(n_actions)[np.argmax(np.where(mask, renormalised, -np.inf), axis=1)],
    }
    table = {}
    for name, policy in policies.items():
        value, length = np_policy_evaluation(policy, tx, start, reward_next, terminal, gamma, horizon)
        table[name] = {"expected_return": value, "mean_length": length}
    optimal, values = np_optimal(tx, reward_next, terminal, mask, gamma, horizon, renormalised)
    if horizon is None:
        value, length = np_policy_evaluation(optimal, tx, start, reward_next, terminal, gamma, None)
    else:  # the time-dependent optimum's value; its length is not that of any one stationary policy
        value, length = float(start @ values), float("nan")
    table["optimal"] = {"expected_return": value, "mean_length": length}
    return table


# ---------------------------------------------------------------------------------------------------------
# Loaders: one per MDP, found by name
# ---------------------------------------------------------------------------------------------------------

# name -> (module, function): a loader returns MDPParams; `reference_values` of that module gives its table
LOADERS: dict[str, tuple[str, str]] = {
    "icu-sepsis": ("cleansepsis.env", "load_params"),
    "sepsis-sim": ("cleansepsis.sepsis_sim", "load_params"),
    "cohort": ("cleansepsis.cohort_mdp", "load_params"),
}


def _loader_module(name: str):
    import importlib

    return importlib.import_module(LOADERS[name][0])


def load(name_or_path: str | Path, **options: Any) -> MDPParams:
    """The params of an MDP by name ('icu-sepsis', 'sepsis-sim') or a cohort MDP directory."""
    name = str(name_or_path)
    if name in LOADERS and name != "cohort":
        module = _loader_module(name)
        return getattr(module, LOADERS[name][1])(**options)
    path = Path(name)
    if path.is_dir():
        return _loader_module("cohort").load_params(path, **options)
    raise FileNotFoundError(
        f"unknown MDP {name!r}: expected one of {[n for n in LOADERS if n != 'cohort']} or a cohort MDP directory"
    )


def reference_values(params: MDPParams) -> dict[str, dict[str, float]]:
    """Exact float64 expected return and mean length of the reference policies of the MDP `params` was
    loaded from (random, random_admissible, clinician, clinician_renormalised, greedy_clinician, optimal,
    plus any the MDP adds)."""
    if not params.spec or params.spec[0] not in LOADERS:
        raise ValueError("these params carry no loader spec; use np_reference_table on their arrays")
    return _loader_module(params.spec[0]).reference_values(params)


def params_for_replay(meta: dict[str, Any]) -> MDPParams | None:
    """The env params a replay was drawn from (by its metadata's env_id and args), or None for replays
    without known dynamics (MIMIC). Learners and evaluation use this to evaluate policies exactly."""
    env_id = meta.get("env_id")
    args = meta.get("args") or {}
    if env_id == "CleanSepsis/ICUSepsis-v0" or (env_id is None and meta.get("source") == "icu-sepsis"):
        from cleansepsis import env

        return env.load_params()
    if env_id == "CleanSepsis/SepsisSim-v0":
        from cleansepsis import sepsis_sim

        return sepsis_sim.load_params(
            version=args.get("version", "v2"),
            observation=args.get("observation", "obs720"),
            start=args.get("start", "os"),
        )
    if env_id == "CleanSepsis/CohortMDP-v0":
        from cleansepsis import cohort_mdp

        return cohort_mdp.load_params(Path(args["mdp_dir"]))
    return None


# ---------------------------------------------------------------------------------------------------------
# Gymnasium class
# ---------------------------------------------------------------------------------------------------------


class FiniteMDPEnv(gymnasium.Env):
    """A finite MDP as a Gymnasium env over the same arrays and alias tables as the JAX core (numpy RNG).

    Actions: Discrete(A). Observations per `params.obs_mode` ('vector' Box(obs_dim), 'index'
    Discrete(n_obs), 'onehot' Box(n_obs)). `info` carries `admissible_actions`, `state_vector` and
    `state_index` (the true state, which a learner of a partially observed MDP must not use). Episodes
    are truncated at `max_steps`.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, params: MDPParams | None = None, mdp: str = "icu-sepsis", **options: Any):
        params = load(mdp, **options) if params is None else params
        host = jax.device_get(params)
        self.params = params
        self.obs_mode, self.max_steps = params.obs_mode, int(host.max_steps)
        self._threshold, self._next = np.asarray(host.alias_threshold), np.asarray(host.alias_next)
        self._start_threshold, self._start_next = (
            np.asarray(host.start_threshold),
            np.asarray(host.start_next),
        )
        self._state_vectors = np.asarray(host.state_vectors, np.float32)
        self._obs_index = np.asarray(host.obs_index)
        self._reward = np.asarray(host.reward_next, np.float64)
        self._terminal = np.asarray(host.terminal)
        self._admissible = [np.flatnonzero(row) for row in np.asarray(host.admissible_mask)]
        self.n_obs = params.n_obs
        self.action_space = gymnasium.spaces.Discrete(params.n_actions)
        if self.obs_mode == "vector":
            bound = float(np.abs(self._state_vectors).max()) + 1.0
            self.observation_space = gymnasium.spaces.Box(-bound, bound, (params.obs_dim,), np.float32)
        elif self.obs_mode == "onehot":
            self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (self.n_obs,), np.float32)
        else:
            self.observation_space = gymnasium.spaces.Discrete(self.n_obs)
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
            out = np.zeros(self.n_obs, np.float32)
            out[self._obs_index[self._state]] = 1.0
            return out
        return int(self._obs_index[self._state])

    def _info(self) -> dict[str, Any]:
        return {
            "admissible_actions": self._admissible[self._state].tolist(),
            "state_vector": self._state_vectors[self._state].copy(),
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
        if self._terminal[self._state]:
            raise RuntimeError("the episode has ended; call reset()")
        action = int(action)
        if not 0 <= action < self.action_space.n:
            raise ValueError(f"action {action} outside 0..{self.action_space.n - 1}")
        self._state = self._draw(self._threshold[self._state, action], self._next[self._state, action])
        self._time += 1
        terminated = bool(self._terminal[self._state])
        truncated = self._time >= self.max_steps and not terminated
        reward = float(self._reward[self._state])
        return self._obs(), reward, terminated, truncated, self._info()


def register(env_id: str, entry_point: str | Callable[..., gymnasium.Env]) -> None:
    """Register an env id with Gymnasium (idempotent)."""
    if env_id not in gymnasium.registry:
        gymnasium.register(id=env_id, entry_point=entry_point)


# Every MDP's id, registered when the core is imported (entry points load their module lazily).
register("CleanSepsis/SepsisSim-v0", "cleansepsis.sepsis_sim:SepsisSimEnv")
register("CleanSepsis/CohortMDP-v0", "cleansepsis.cohort_mdp:CohortMDPEnv")
