"""An offline RL replay of clinician episodes on the ICU-Sepsis MDP, and the cached default replay.

The clinician policy (`expert_policy` of icu-sepsis, restricted to each state's admissible actions and
renormalised) is rolled out in the JAX env, vmapped over a batch of envs in `lax.scan`, and the records
reach the host once. Observations are the 47-dim state vectors as shipped (terminal next states have the
all-zero vector); reward 1 on entering survival; `terminated` on entering death or survival; `truncated`
at the time limit (500 steps, never reached in practice).

    frame, meta = make_clinician_replay(episodes=10_000, seed=0)
    path = default_replay_path()          # built on first use under $CLEANSEPSIS_CACHE, then reused
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import polars as pl

from cleansepsis import env as E
from cleansepsis.io import OutputExistsError
from cleansepsis.replay import SCHEMA_VERSION, ReplayError, read_metadata, write_replay

SOURCE = "icu-sepsis"
BEHAVIOR_POLICY = "clinician (icu-sepsis expert_policy) restricted to admissible actions and renormalised"


def check_split_fractions(val_frac: float, test_frac: float) -> None:
    """Any fractions in [0, 1] summing to at most 1: a replay may be all held-out episodes (e.g. a fresh
    test set for evaluation, `--test-frac 1`)."""
    for name, value in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if val_frac + test_frac > 1.0 + 1e-9:
        raise ValueError(f"val_frac + test_frac must be at most 1, got {val_frac + test_frac}")


def clinician_policy_numpy() -> np.ndarray:
    """The logging policy (716, 25) float32: the shipped clinician policy restricted to admissible
    actions and renormalised (as `env.clinician_policy(params)`, computed in numpy to spare the small
    eager JAX programs their compile time)."""
    raw = E.shipped_arrays()
    probs = np.where(raw["admissible_mask"], raw["expert_policy"], 0.0)
    probs /= np.maximum(probs.sum(1, keepdims=True), 1e-300)
    probs[list(E.TERMINAL_STATES)] = 1.0 / E.N_ACTIONS
    return probs.astype(np.float32)


def episode_splits(n_episodes: int, seed: int, val_frac: float, test_frac: float) -> np.ndarray:
    """Split name per episode (n_episodes,), fixed by the seed: a random `test_frac` of the episodes is
    "test", a random `val_frac` is "val", the rest "train"."""
    check_split_fractions(val_frac, test_frac)
    n_test = round(test_frac * n_episodes)
    n_val = min(round(val_frac * n_episodes), n_episodes - n_test)  # 0.5 + 0.5 of an odd count: no overflow
    order = np.random.default_rng(seed).permutation(n_episodes)
    splits = np.full(n_episodes, "train", dtype=object)
    splits[order[:n_test]] = "test"
    splits[order[n_test : n_test + n_val]] = "val"
    return splits


def make_clinician_replay(
    episodes: int,
    seed: int,
    strategy: str = "mean",
    val_frac: float = 0.0,
    test_frac: float = 0.0,
    progress: bool = False,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Roll out `episodes` clinician episodes; returns (frame in the replay schema, metadata).

    Columns: the replay's required ones plus state_index, next_state_index, behavior_prob (the
    renormalised clinician probability of the logged action), action_mask and next_action_mask
    (admissible actions). Same arguments, same rows.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    check_split_fractions(val_frac, test_frac)
    params = E.load_params(strategy)
    raw = E.shipped_arrays()
    policy = clinician_policy_numpy()
    rollout = E.rollout_episodes(jax.random.key(seed), policy, params, episodes, progress=progress)

    vectors = raw["state_cluster_centers"].astype(np.float32)
    mask = raw["admissible_mask"]
    state, next_state = rollout["state_index"], rollout["next_state_index"]
    splits = episode_splits(episodes, seed, val_frac, test_frac)
    frame = pl.DataFrame(
        [
            pl.Series("episode_id", rollout["episode"], pl.Int64),
            pl.Series("t", rollout["t"], pl.Int32),
            pl.Series("obs", vectors[state], pl.Array(pl.Float32, E.OBS_DIM)),
            pl.Series("action", rollout["action"], pl.Int32),
            pl.Series("reward", rollout["reward"], pl.Float32),
            pl.Series("next_obs", vectors[next_state], pl.Array(pl.Float32, E.OBS_DIM)),
            pl.Series("terminated", rollout["terminated"], pl.Boolean),
            pl.Series("truncated", rollout["truncated"], pl.Boolean),
            pl.Series("split", splits[rollout["episode"]].astype(str), pl.String),
            pl.Series("state_index", state, pl.Int32),
            pl.Series("next_state_index", next_state, pl.Int32),
            pl.Series("behavior_prob", rollout["behavior_prob"], pl.Float32),
            pl.Series("action_mask", mask[state], pl.Array(pl.Boolean, E.N_ACTIONS)),
            pl.Series("next_action_mask", mask[next_state], pl.Array(pl.Boolean, E.N_ACTIONS)),
        ]
    )
    meta = {
        "obs_dim": E.OBS_DIM,
        "n_actions": E.N_ACTIONS,
        "feature_names": list(E.FEATURE_NAMES),
        "normalisation": E.NORMALISATION,
        "source": SOURCE,
        "env_id": E.ENV_ID,
        "reward": E.REWARD,
        "args": {
            "generator": "cleansepsis.icu_replay.make_clinician_replay",
            "generator_version": GENERATOR_VERSION,
            "episodes": int(episodes),
            "seed": int(seed),
            "strategy": strategy,
            "val_frac": float(val_frac),
            "test_frac": float(test_frac),
            "behavior_policy": BEHAVIOR_POLICY,
            "max_steps": E.MAX_STEPS,
        },
    }
    return frame, meta


def cache_dir() -> Path:
    """$CLEANSEPSIS_CACHE, or ~/.cache/cleansepsis."""
    return Path(os.environ.get("CLEANSEPSIS_CACHE") or Path.home() / ".cache" / "cleansepsis")


# Bump when a change to the rollout code changes the rows drawn for a seed: the cached default replay's
# name carries it, so a stale cache from older code is never reused.
GENERATOR_VERSION = 2


def default_replay_file(episodes: int = 10_000, seed: int = 0) -> Path:
    """Where the cached default replay for these arguments lives (it may not exist yet)."""
    return cache_dir() / f"icu-sepsis-clinician-e{episodes}-s{seed}-v{SCHEMA_VERSION}-g{GENERATOR_VERSION}.parquet"


def heldout_replay_file(split: str, episodes: int, seed: int, strategy: str = "mean") -> Path:
    """Where the cached held-out replay (every episode in `split`) for these arguments lives."""
    return cache_dir() / (
        f"icu-sepsis-clinician-{split}-{strategy}-e{episodes}-s{seed}-v{SCHEMA_VERSION}-g{GENERATOR_VERSION}.parquet"
    )


def heldout_replay_path(split: str, episodes: int, seed: int, strategy: str = "mean") -> Path:
    """A cached replay of fresh clinician episodes, all in `split` ("val" or "test"): held-out data for
    evaluating policies trained on a replay drawn with another seed. Built on first use like the
    default replay (written whole under a temporary name, then renamed)."""
    if split not in ("val", "test"):
        raise ValueError(f"a held-out replay's split must be 'val' or 'test', got {split!r}")
    path = heldout_replay_file(split, episodes, seed, strategy)
    fractions = {"val_frac": float(split == "val"), "test_frac": float(split == "test")}
    if path.exists():
        try:
            args = read_metadata(path).get("args", {})
            same = (args.get("episodes"), args.get("seed"), args.get("strategy")) == (episodes, seed, strategy)
            if same and all(args.get(k) == v for k, v in fractions.items()):
                return path
        except ReplayError:
            pass
        print(f"rebuilding damaged cached replay {path}", file=sys.stderr)
        path.unlink(missing_ok=True)
    print(f"building a held-out ICU-Sepsis replay ({episodes} clinician episodes, seed {seed}) at {path}",
          file=sys.stderr)  # fmt: skip
    frame, meta = make_clinician_replay(episodes, seed, strategy, **fractions)
    try:
        write_replay(path, frame, meta, overwrite=False)
    except OutputExistsError:
        pass  # another process finished the same file first
    return path


def default_replay_path(episodes: int = 10_000, seed: int = 0) -> Path:
    """The built-in ICU-Sepsis clinician replay ('mean' strategy, all episodes in "train").

    Built on first use and cached; later calls return the cached file. The file is written to a
    temporary name and renamed when complete, so a reader never sees half a file, and two processes
    racing to build it both end with the same finished file.
    """
    path = default_replay_file(episodes, seed)
    if path.exists():
        try:
            meta = read_metadata(path)
            if meta.get("args", {}).get("episodes") == episodes and meta.get("args", {}).get("seed") == seed:
                return path
        except ReplayError:
            pass
        print(f"rebuilding damaged cached replay {path}", file=sys.stderr)
        path.unlink(missing_ok=True)
    print(f"building the default ICU-Sepsis replay ({episodes} clinician episodes) at {path}", file=sys.stderr)
    frame, meta = make_clinician_replay(episodes, seed)
    try:
        write_replay(path, frame, meta, overwrite=False)
    except OutputExistsError:
        pass  # another process finished the same file first
    return path


@dataclass(frozen=True)
class IcuSepsisArgs:
    """Write a replay of clinician episodes on the ICU-Sepsis MDP."""

    out: Path
    """Output parquet file."""
    episodes: int = 10_000
    """Number of episodes."""
    seed: int = 0
    """Random seed: the same seed gives the same rows."""
    strategy: Literal["mean", "terminate"] = "mean"
    """What an inadmissible action does. The clinician policy used here only takes admissible ones."""
    val_frac: float = 0.0
    """Fraction of episodes in the "val" split. The dynamics are known, so policies are evaluated exactly;
    held-out episodes only cost training data."""
    test_frac: float = 0.0
    """Fraction of episodes in the "test" split."""
    overwrite: bool = False
    """Replace an existing output file."""


def build_icu_sepsis(args: IcuSepsisArgs) -> dict[str, Any]:
    """`data_prep.py icu-sepsis`: build and write the replay; prints a summary to stderr."""
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    frame, meta = make_clinician_replay(
        args.episodes, args.seed, args.strategy, args.val_frac, args.test_frac, progress=True
    )
    rolled = time.perf_counter()
    meta["args"]["command"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}
    written = write_replay(args.out, frame, meta, overwrite=args.overwrite)
    done = time.perf_counter()
    survival = float(frame.get_column("reward").sum()) / args.episodes
    print(
        f"wrote {args.out}: {written['n_episodes']} episodes, {written['n_transitions']} transitions, "
        f"survival {survival:.4f}, content hash {written['content_hash'][:16]}; "
        f"rollout + frame {rolled - start:.2f} s, write {done - rolled:.2f} s",
        file=sys.stderr,
    )
    return written
