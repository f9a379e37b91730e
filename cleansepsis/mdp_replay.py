"""Replays of a tabular behaviour policy rolled out in any MDP of the core, and `data_prep.py sepsis-sim`.

    frame, meta = make_policy_replay(params, policy, episodes=10_000, seed=0, env_id=..., ...)

Rows carry the observation the learner sees (`params.state_vectors` of the state), the true state index
(for a partially observed MDP such as the simulator this reveals the hidden state: for exact evaluation
and OPE diagnostics, not for learning), `behavior_prob` and the admissible-action masks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import polars as pl

from cleansepsis import mdp
from cleansepsis.icu_replay import episode_splits
from cleansepsis.io import OutputExistsError
from cleansepsis.replay import write_replay

GENERATOR_VERSION = 1


def make_policy_replay(
    params: mdp.MDPParams,
    policy: np.ndarray,
    episodes: int,
    seed: int,
    meta: dict[str, Any],
    val_frac: float = 0.0,
    test_frac: float = 0.0,
    progress: bool = False,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Roll out `episodes` episodes of `policy` (S, A) in the JAX env; returns (frame, metadata). `meta`
    gives feature_names, normalisation, source, env_id, reward and args (completed here)."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    splits = episode_splits(episodes, seed, val_frac, test_frac)
    rollout = mdp.rollout_episodes(
        jax.random.key(seed), np.asarray(policy, np.float32), params, episodes, progress=progress
    )
    host = jax.device_get(params)
    vectors = np.asarray(host.state_vectors, np.float32)
    mask = np.asarray(host.admissible_mask)
    state, next_state = rollout["state_index"], rollout["next_state_index"]
    obs_dim, n_actions = vectors.shape[1], mask.shape[1]
    frame = pl.DataFrame(
        [
            pl.Series("episode_id", rollout["episode"], pl.Int64),
            pl.Series("t", rollout["t"], pl.Int32),
            pl.Series("obs", vectors[state], pl.Array(pl.Float32, obs_dim)),
            pl.Series("action", rollout["action"], pl.Int32),
            pl.Series("reward", rollout["reward"], pl.Float32),
            pl.Series("next_obs", vectors[next_state], pl.Array(pl.Float32, obs_dim)),
            pl.Series("terminated", rollout["terminated"], pl.Boolean),
            pl.Series("truncated", rollout["truncated"], pl.Boolean),
            pl.Series("split", splits[rollout["episode"]].astype(str), pl.String),
            pl.Series("state_index", state, pl.Int32),
            pl.Series("next_state_index", next_state, pl.Int32),
            pl.Series("behavior_prob", rollout["behavior_prob"], pl.Float32),
            pl.Series("action_mask", mask[state], pl.Array(pl.Boolean, n_actions)),
            pl.Series("next_action_mask", mask[next_state], pl.Array(pl.Boolean, n_actions)),
        ]
    )
    out = {"obs_dim": obs_dim, "n_actions": n_actions, **meta}
    out["args"] = {
        **meta.get("args", {}),
        "generator_version": GENERATOR_VERSION,
        "episodes": int(episodes),
        "seed": int(seed),
        "val_frac": float(val_frac),
        "test_frac": float(test_frac),
        "max_steps": int(host.max_steps),
    }
    return frame, out


# ---------------------------------------------------------------------------------------------------------
# data_prep.py sepsis-sim
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SepsisSimArgs:
    """Write a replay of physician episodes in the Oberst-Sontag sepsis simulator."""

    out: Path
    """Output parquet file."""
    episodes: int = 10_000
    """Number of episodes (at most 20 steps each)."""
    seed: int = 0
    """Random seed: the same seed gives the same rows."""
    version: Literal["v2", "original"] = "v2"
    """Dynamics: sim-v2 (default) or the original master with its glucose bug."""
    observation: Literal["obs720", "obs144", "full1440"] = "obs720"
    """What the learner sees: no diabetes (default), no diabetes and no glucose, or the full state."""
    start: Literal["os", "tw606"] = "os"
    """Start distribution: Oberst-Sontag's, or Tang-Wiens' uniform over the 606 non-terminal states."""
    val_frac: float = 0.0
    """Fraction of episodes in the "val" split."""
    test_frac: float = 0.0
    """Fraction of episodes in the "test" split."""
    overwrite: bool = False
    """Replace an existing output file."""


def make_sepsis_sim_replay(
    args: SepsisSimArgs, progress: bool = False
) -> tuple[pl.DataFrame, dict[str, Any]]:
    from cleansepsis import sepsis_sim as S

    params = S.load_params(args.version, args.observation, args.start)
    meta = {
        "feature_names": S.feature_names(args.observation),
        "normalisation": f"one-hot levels of the simulator's variables ({args.observation}); no scaling",
        "source": "sepsis-sim",
        "env_id": S.ENV_ID,
        "reward": S.REWARD,
        "args": {
            "generator": "cleansepsis.mdp_replay.make_sepsis_sim_replay",
            "version": args.version,
            "observation": args.observation,
            "start": args.start,
            "behavior_policy": "Oberst-Sontag physician: policy iteration (gamma 0.99) on the non-absorbing "
            "full-state MDP, 0.95 on its action and 0.05/7 on each other; it sees diabetes and glucose",
            "simulator_action_encoding": S.ACTION_ENCODING,
        },
    }
    return make_policy_replay(
        params,
        S.physician_policy(args.version),
        args.episodes,
        args.seed,
        meta,
        args.val_frac,
        args.test_frac,
        progress,
    )


def build_sepsis_sim(args: SepsisSimArgs) -> dict[str, Any]:
    """`data_prep.py sepsis-sim`: build and write the replay; prints a summary to stderr."""
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    frame, meta = make_sepsis_sim_replay(args, progress=True)
    meta["args"]["command"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}
    written = write_replay(args.out, frame, meta, overwrite=args.overwrite)
    mean_return = float(frame.get_column("reward").sum()) / args.episodes
    print(
        f"wrote {args.out}: {written['n_episodes']} episodes, {written['n_transitions']} transitions, "
        f"mean return {mean_return:.4f}, content hash {written['content_hash'][:16]}; "
        f"{time.perf_counter() - start:.2f} s",
        file=sys.stderr,
    )
    return written
