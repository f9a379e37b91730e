"""Replays of the vancomycin simulator: `data_prep.py vancomycin-sim`.

    python data_prep.py vancomycin-sim --episodes 10000 --seed 0 --out data/vanco_sim.parquet

Rolls out the clinician-like behaviour policy (`cleansepsis.vancomycin.clinician_policy`) in the pure-JAX
simulator and writes a continuous-action replay (cleansepsis/replay.py): the action is the dose in mg in
[0, 3000], `behavior_log_density` the exact log density of that dose under the behaviour policy (mg^-1),
env id `CleanSepsis/Vancomycin-v0`. The simulator's parameters go into the metadata (`args.simulator_params`)
so that a learner rebuilds the same simulator to evaluate its policies by simulation. Extra columns:
`auc24` (mg*h/L over the last 24 h), `aki` (1.0 for an AKI event in the interval), `level_drawn`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import polars as pl

from cleansepsis import vancomycin as V
from cleansepsis.icu_replay import cache_dir, check_split_fractions, episode_splits
from cleansepsis.io import OutputExistsError
from cleansepsis.replay import SCHEMA_VERSION, ReplayError, read_metadata, write_replay

SOURCE = "vancomycin-sim"
ACTION_SPACE = {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0, "high": V.DOSE_MAX_MG}
# patients per compiled rollout: fixed, so that the rows of a seed never depend on how the work is cut
CHUNK = 25_000
# bump when a change to the rollout changes the rows of a seed (the cached default replay's name carries it)
GENERATOR_VERSION = 1
REWARD = (
    "per 12 h interval: 1 for AUC24 in 400-600 mg*h/L; below, 1 - (400 - AUC24) / 200 (at least -1); above, "
    "1 - (AUC24 - 600) / 100 (at least -2); minus aki_penalty (3) for an AKI event (cleansepsis/vancomycin.py)"
)


@dataclass(frozen=True)
class VancomycinSimArgs:
    """Write a replay of clinician-like vancomycin dosing in the simulator (continuous doses in mg)."""

    out: Path
    """Output parquet file."""
    episodes: int = 10_000
    """Number of simulated patients (8 dosing decisions each)."""
    seed: int = 0
    """Random seed: the same seed gives the same bytes."""
    val_frac: float = 0.0
    """Fraction of episodes in the "val" split."""
    test_frac: float = 0.0
    """Fraction of episodes in the "test" split."""
    overwrite: bool = False
    """Replace an existing output file."""


def simulator_params_dict(params: V.VancoParams) -> dict[str, float]:
    return {f.name: float(getattr(params, f.name)) for f in dataclasses.fields(params)}


def simulator_params_from_meta(meta: dict[str, Any]) -> V.VancoParams | None:
    """The simulator a replay was drawn from (its env id is the simulator's), or None."""
    if meta.get("env_id") != V.ENV_ID:
        return None
    values = (meta.get("args") or {}).get("simulator_params") or {}
    known = {f.name for f in dataclasses.fields(V.VancoParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ReplayError(f"replay simulator_params has unknown field(s) {unknown}; expected some of {sorted(known)}")
    return V.VancoParams(**{k: float(v) for k, v in values.items()})


def rollout_clinician(episodes: int, seed: int, params: V.VancoParams) -> dict[str, np.ndarray]:
    """`episodes` clinician-like episodes as numpy arrays (episodes, N_DECISIONS, ...), in chunks of CHUNK."""
    n_chunks = -(-episodes // CHUNK)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_chunks)
    parts = []
    for i, key in enumerate(keys):
        size = min(CHUNK, episodes - i * CHUNK)
        parts.append(jax.tree.map(np.asarray, V.rollout_jit(key, params, V.clinician_policy, size)))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def make_vancomycin_replay(args: VancomycinSimArgs) -> tuple[pl.DataFrame, dict[str, Any]]:
    if args.episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {args.episodes}")
    check_split_fractions(args.val_frac, args.test_frac)  # before the rollout: bad fractions cost no simulation
    params = V.VancoParams()
    records = rollout_clinician(args.episodes, args.seed, params)
    n, steps = args.episodes, V.N_DECISIONS
    splits = episode_splits(n, args.seed, args.val_frac, args.test_frac)
    terminated = records["terminated"].reshape(-1)

    def flat(name: str, dtype) -> np.ndarray:
        return records[name].reshape(n * steps, *records[name].shape[2:]).astype(dtype)

    frame = pl.DataFrame([
        pl.Series("episode_id", np.repeat(np.arange(n, dtype=np.int64), steps), pl.Int64),
        pl.Series("t", np.tile(np.arange(steps, dtype=np.int32), n), pl.Int32),
        pl.Series("obs", flat("obs", np.float32), pl.Array(pl.Float32, V.OBS_DIM)),
        pl.Series("action", flat("dose", np.float32), pl.Float32),
        pl.Series("reward", flat("reward", np.float32), pl.Float32),
        pl.Series("next_obs", flat("next_obs", np.float32), pl.Array(pl.Float32, V.OBS_DIM)),
        pl.Series("terminated", terminated, pl.Boolean),
        pl.Series("truncated", np.zeros(n * steps, bool), pl.Boolean),
        pl.Series("split", np.repeat(splits, steps).astype(str), pl.String),
        pl.Series("behavior_log_density", flat("log_density", np.float32), pl.Float32),
        pl.Series("auc24", flat("auc24", np.float32), pl.Float32),
        pl.Series("aki", flat("aki", np.float32), pl.Float32),
        pl.Series("level_drawn", flat("level_drawn", np.float32), pl.Float32),
    ])
    meta = {
        "obs_dim": V.OBS_DIM,
        "feature_names": [name for name, _ in V.OBS_FEATURES],
        "feature_units": [unit for _, unit in V.OBS_FEATURES],
        "normalisation": "none: physical units (cleansepsis.vancomycin.OBS_FEATURES)",
        "source": SOURCE,
        "env_id": V.ENV_ID,
        "reward": REWARD,
        "action_space": dict(ACTION_SPACE),
        "step_hours": V.DECISION_HOURS,
        "args": {
            "generator": "cleansepsis.vancomycin_replay.make_vancomycin_replay",
            "generator_version": GENERATOR_VERSION,
            "episodes": args.episodes,
            "seed": args.seed,
            "val_frac": args.val_frac,
            "test_frac": args.test_frac,
            "behavior_policy": "cleansepsis.vancomycin.clinician_policy: log-normal (log-sd 0.2) around a "
            "weight-based, renal-scaled, level-adjusted rule, truncated to (0, 3000] mg",
            "simulator_params": simulator_params_dict(params),
        },
    }
    return frame, meta


def build_vancomycin_sim(args: VancomycinSimArgs) -> dict[str, Any]:
    """`data_prep.py vancomycin-sim`: build and write the replay; prints a summary to stderr."""
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    frame, meta = make_vancomycin_replay(args)
    written = write_replay(args.out, frame, meta, overwrite=args.overwrite)
    mean_return = float(frame.get_column("reward").sum()) / args.episodes
    print(
        f"wrote {args.out}: {written['n_episodes']} episodes, {written['n_transitions']} transitions, "
        f"mean return {mean_return:.4f}, content hash {written['content_hash'][:16]}; "
        f"{time.perf_counter() - start:.2f} s",
        file=sys.stderr,
    )
    return written


def default_replay_path(episodes: int = 10_000, seed: int = 0) -> Path:
    """The built-in simulator replay (clinician-like, all episodes in "train"), built on first use and
    cached (written atomically, so a racing process ends with the same finished file)."""
    path = cache_dir() / f"vancomycin-sim-e{episodes}-s{seed}-v{SCHEMA_VERSION}-g{GENERATOR_VERSION}.parquet"
    if path.exists():
        try:
            made = read_metadata(path).get("args", {})
            if made.get("episodes") == episodes and made.get("seed") == seed:
                return path
        except ReplayError:
            pass
        path.unlink(missing_ok=True)
    print(f"building the default vancomycin replay ({episodes} clinician-like episodes) at {path}", file=sys.stderr)
    frame, meta = make_vancomycin_replay(VancomycinSimArgs(out=path, episodes=episodes, seed=seed))
    try:
        write_replay(path, frame, meta, overwrite=False)
    except OutputExistsError:
        pass
    return path
