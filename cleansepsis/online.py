"""What an online learner shares and no fork edits: the on-device replay buffer of ICU-Sepsis state
indices (observations are looked up when a batch is drawn), epsilon-greedy steps of the JAX envs into it,
uniform or proportional prioritised sampling (Schaul et al. 2016), and the stand-in replay description
that checkpoints of an online run carry. Everything here is pure and jittable; dqn.py uses it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis.replay import ACTION_ENCODING, Replay


class Buffer(eqx.Module):
    """Ring buffer of ICU-Sepsis transitions by state index; priorities are zero where empty."""

    state: jax.Array  # (capacity,) int32
    action: jax.Array  # (capacity,) int32
    reward: jax.Array  # (capacity,) float32
    next_state: jax.Array  # (capacity,) int32
    terminated: jax.Array  # (capacity,) bool
    priority: jax.Array  # (capacity,) float32
    position: jax.Array  # () int32, next slot to write
    size: jax.Array  # () int32


def empty_buffer(capacity: int) -> Buffer:
    return Buffer(
        jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, jnp.float32),
        jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, bool), jnp.zeros(capacity, jnp.float32),
        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
    )  # fmt: skip


class Batch(eqx.Module):
    """A training batch, from a replay or from the buffer."""

    obs: jax.Array  # (batch, obs_dim)
    action: jax.Array  # (batch,)
    reward: jax.Array  # (batch,)
    next_obs: jax.Array  # (batch, obs_dim)
    terminated: jax.Array  # (batch,) bool
    next_action_mask: jax.Array  # (batch, n_actions) bool
    weight: jax.Array  # (batch,) importance weight, 1 without prioritised replay


def masked_argmax(q: jax.Array, mask: jax.Array) -> jax.Array:
    """argmax over admissible actions. q, mask: (..., n_actions) -> (...)."""
    return jnp.argmax(jnp.where(mask, q, -jnp.inf), axis=-1)


def sample_rows(
    key: jax.Array, priorities: jax.Array, size: jax.Array, batch_size: int, beta, prioritized: bool
) -> tuple[jax.Array, jax.Array]:
    """Rows to train on and their importance weights. priorities: (capacity,), zero beyond `size`.
    Prioritised: P(i) proportional to priorities[i], weight (size * P(i))^-beta / max weight of the batch."""
    if not prioritized:
        rows = jax.random.randint(key, (batch_size,), 0, size)
        return rows, jnp.ones(batch_size, jnp.float32)
    cumulative = jnp.cumsum(priorities)  # (capacity,)
    total = cumulative[-1]
    # one draw per stratum of the total mass, as in Schaul et al.
    u = (jnp.arange(batch_size) + jax.random.uniform(key, (batch_size,))) * (total / batch_size)
    rows = jnp.clip(jnp.searchsorted(cumulative, u, side="right"), 0, size - 1)
    prob = priorities[rows] / total
    weight = (size * prob) ** (-beta)
    return rows, weight / weight.max()


def replay_batch(data: Any, rows: jax.Array, weight: jax.Array) -> Batch:
    return Batch(data.obs[rows], data.action[rows], data.reward[rows], data.next_obs[rows],
                 data.terminated[rows], data.next_action_mask[rows], weight)  # fmt: skip


def buffer_batch(buffer: Buffer, env_params: Any, rows: jax.Array, weight: jax.Array) -> Batch:
    s, s_next = buffer.state[rows], buffer.next_state[rows]
    return Batch(env_params.state_vectors[s], buffer.action[rows], buffer.reward[rows],
                 env_params.state_vectors[s_next], buffer.terminated[rows], env_params.admissible_mask[s_next],
                 weight)  # fmt: skip


def act_and_store(
    key: jax.Array,
    env_state: Any,
    buffer: Buffer,
    max_priority: jax.Array,
    q_fn: Callable[[jax.Array], jax.Array],
    epsilon: jax.Array,
    env_params: Any,
) -> tuple[Any, Buffer, dict[str, jax.Array]]:
    """Step every env once, epsilon-greedy over its state's admissible actions by `q_fn(observations)`, and
    add the transitions to the buffer at `max_priority`. Returns (env state, buffer, episode counts)."""
    from cleansepsis import env as sepsis_env

    explore_key, pick_key, step_key = jax.random.split(key, 3)
    s = env_state.state_index  # (num_envs,)
    num_envs = s.shape[0]
    mask = env_params.admissible_mask[s]  # (num_envs, n_actions)
    greedy = masked_argmax(q_fn(env_params.state_vectors[s]), mask)
    random_action = jax.random.categorical(pick_key, jnp.where(mask, 0.0, -jnp.inf))  # uniform admissible
    explore = jax.random.uniform(explore_key, (num_envs,)) < epsilon
    action = jnp.where(explore, random_action, greedy)
    _, env_state, reward, terminated, truncated, info = jax.vmap(
        sepsis_env.step_autoreset, in_axes=(0, 0, 0, None)
    )(jax.random.split(step_key, num_envs), env_state, action, env_params)
    at, capacity = buffer.position, buffer.state.shape[0]
    put = lambda arr, x: jax.lax.dynamic_update_slice(arr, x.astype(arr.dtype), (at,))  # noqa: E731
    buffer = Buffer(
        put(buffer.state, s), put(buffer.action, action), put(buffer.reward, reward),
        put(buffer.next_state, info["next_state_index"]), put(buffer.terminated, terminated),
        put(buffer.priority, jnp.full(num_envs, max_priority)),
        (at + num_envs) % capacity, jnp.minimum(buffer.size + num_envs, capacity),
    )  # fmt: skip
    done = terminated | truncated
    return env_state, buffer, {"episodes": done.sum(), "survivals": (reward * done).sum()}


def reset_envs(key: jax.Array, num_envs: int, env_params: Any) -> Any:
    from cleansepsis import env as sepsis_env

    _, env_state = jax.vmap(sepsis_env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), env_params)
    return env_state


def set_priorities(priorities: Any, rows: jax.Array, new: jax.Array) -> Any:
    """Priorities (an array, or a Buffer's) with rows set to new."""
    if isinstance(priorities, Buffer):
        return dataclasses.replace(priorities, priority=priorities.priority.at[rows].set(new))
    return priorities.at[rows].set(new)


def online_source() -> Replay:
    """A stand-in for the replay that checkpoints describe when the data came from the env itself."""
    from cleansepsis import env as sepsis_env

    meta = {
        "action_encoding": ACTION_ENCODING,
        "feature_names": list(sepsis_env.FEATURE_NAMES),
        "normalisation": sepsis_env.NORMALISATION,
        "content_hash": None,
        "source": "icu-sepsis-online",
        "env_id": sepsis_env.ENV_ID,
        "action_bins": None,
        "obs_dim": sepsis_env.OBS_DIM,
        "n_actions": sepsis_env.N_ACTIONS,
    }
    return Replay(
        path=Path(f"online:{sepsis_env.ENV_ID}"), data=None, meta=meta, has={}, episode_ids=np.empty(0)
    )
