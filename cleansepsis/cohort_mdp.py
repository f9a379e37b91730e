"""A tabular MDP built from a cohort replay by the ICU-Sepsis recipe, loaded in the core (`cleansepsis.mdp`).

    python data_prep.py mdp --replay data/mimic/replay.parquet --states 100 --threshold 5 --out data/mdp

Recipe (Choudhary, Gupta & Thomas, RLC 2024, `icu_sepsis_helpers` build/create_matrices/parse_matrices; the
facts in /work/shared/docs/mdp-from-cohort.md; no code copied):
1. States: k-means (k-means++ start, Lloyd iterations, `n_init` restarts, the lowest inertia kept; seeded,
   in JAX) on the observations of the train split's rows, or `--cluster state-index` to take the replay's
   tabular state as the cluster (for validating the recipe on ICU-Sepsis).
2. Counts over the train split: every row counts (state, action); a row followed by a row of the same
   episode counts (state, action, next state); the last row of an episode that ended `terminated` counts a
   transition to death or survival: survival when its reward is positive (the outcome rewards of the
   ICU-Sepsis and MIMIC replays), else death. A last row that was truncated (the data window ended, the
   outcome unknown) counts its transition to the state of its next_obs.
3. Threshold: a (state, action) pair is admissible when it was counted more than `threshold` times
   (ICU-Sepsis: 20). Other rows are zeroed, the rest normalised.
4. Pruning: a state without an admissible action is dead; transitions into dead states are removed and the
   rows renormalised (a row left empty becomes inadmissible), until no dead state remains. Dead states are
   deleted; the start distribution (first rows of the episodes) is renormalised over the kept states.
5. Inadmissible actions: 'mean' (the unweighted mean of the state's admissible rows, ICU-Sepsis's
   `uniform_unweighted`) or 'single' (the row of the state's most counted admissible action); at load
   time `strategy='terminate'` sends them to death instead.
6. The clinician policy: the row-normalised counts of (state, action) over all train rows, not thresholded
   (as ICU-Sepsis ships it). Rewards: `r_survive` (1) on entering survival, `r_death` (0) on entering death.
   States: kept clusters 0..K'-1, death K', survival K'+1. gamma 1.

The values computed on this MDP are exact for the model, not for the patients: they inherit every choice
above (the clusters, the threshold, the made-up rows of inadmissible actions, the outcome at the end of the
data window) and the sampling error of the counts.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from cleansepsis import mdp
from cleansepsis.io import OutputExistsError, atomic_dir

ENV_ID = "CleanSepsis/CohortMDP-v0"
ARRAYS_FILE = "mdp.safetensors"
META_FILE = "mdp.json"
REPLAY_FILE = "replay.parquet"
FORMAT_VERSION = 1
MAX_STEPS = 200
STRATEGIES = ("mean", "terminate")


class CohortMDPError(ValueError):
    """A cohort MDP cannot be built or read; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# k-means in JAX
# ---------------------------------------------------------------------------------------------------------


def _squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    return jnp.maximum(
        jnp.sum(x * x, 1)[:, None] - 2.0 * x @ centres.T + jnp.sum(centres * centres, 1)[None, :], 0.0
    )


@functools.partial(jax.jit, static_argnames=("k", "max_iter"))
def _kmeans_once(key: jax.Array, x: jax.Array, k: int, max_iter: int) -> tuple[jax.Array, jax.Array]:
    """k-means++ start then Lloyd iterations until the assignment stops changing; (centres, inertia)."""
    n = x.shape[0]
    first_key, key = jax.random.split(key)
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(first_key, (), 0, n)])
    closest = jnp.sum((x - centres[0]) ** 2, 1)

    def add_centre(i, carry):
        centres, closest, key = carry
        key, draw = jax.random.split(key)
        chosen = jax.random.choice(draw, n, p=closest / jnp.maximum(closest.sum(), 1e-30))
        centres = centres.at[i].set(x[chosen])
        return centres, jnp.minimum(closest, jnp.sum((x - x[chosen]) ** 2, 1)), key

    centres, _, _ = jax.lax.fori_loop(1, k, add_centre, (centres, closest, key))

    def lloyd(carry):
        centres, labels, _, i = carry
        new_labels = jnp.argmin(_squared_distances(x, centres), 1)
        counts = jax.ops.segment_sum(jnp.ones(n, x.dtype), new_labels, k)
        sums = jax.ops.segment_sum(x, new_labels, k)
        new_centres = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)
        return new_centres, new_labels, jnp.any(new_labels != labels), i + 1

    def keep_going(carry):
        return carry[2] & (carry[3] < max_iter)

    start = (centres, jnp.full(n, -1, jnp.int32), jnp.array(True), jnp.array(0))
    centres, _, _, _ = jax.lax.while_loop(keep_going, lloyd, start)
    inertia = jnp.sum(jnp.min(_squared_distances(x, centres), 1))
    return centres, inertia


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 8, max_iter: int = 300) -> np.ndarray:
    """Centres (k, d) float32 of the best of `n_init` k-means++ runs (lowest inertia), seeded."""
    x = np.asarray(x, np.float32)
    if len(x) < k:
        raise CohortMDPError(f"k-means needs at least {k} rows for {k} states, got {len(x)}")
    keys = jax.random.split(jax.random.key(seed), n_init)
    best, best_inertia = None, np.inf
    for key in keys:  # restarts one after another: k x n distances stay the largest array
        centres, inertia = _kmeans_once(key, jnp.asarray(x), k, max_iter)
        if float(inertia) < best_inertia:
            best, best_inertia = np.asarray(centres), float(inertia)
    return best


def nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centre of every row of x (chunks of rows, so memory stays small)."""
    c = jnp.asarray(centres, jnp.float32)
    out = [
        np.asarray(jnp.argmin(_squared_distances(jnp.asarray(x[i : i + chunk], jnp.float32), c), 1))
        for i in range(0, len(x), chunk)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------


def count_transitions(
    cluster: np.ndarray,
    next_cluster: np.ndarray,
    action: np.ndarray,
    episode: np.ndarray,
    t: np.ndarray,
    last_reward: np.ndarray,
    terminated: np.ndarray,
    k: int,
    n_actions: int,
) -> dict[str, np.ndarray]:
    """Counts over rows sorted by (episode, t): tx (k, A, k+2) with death k and survival k+1, the (state,
    action) counts and the first states."""
    tx = np.zeros((k, n_actions, k + 2))
    visits = np.zeros((k, n_actions))
    np.add.at(visits, (cluster, action), 1.0)
    last = np.ones(len(cluster), bool)
    last[:-1] = episode[1:] != episode[:-1]
    follows = ~last
    follows[:-1] &= t[1:] == t[:-1] + 1  # a gap in time ends the counted chain there
    nxt = np.empty_like(cluster)
    nxt[:-1] = cluster[1:]
    target = np.where(follows, nxt, next_cluster)
    ends = last & terminated
    target = np.where(ends, np.where(last_reward > 0, k + 1, k), target)
    np.add.at(tx, (cluster, action, target), 1.0)
    first = np.ones(len(cluster), bool)
    first[1:] = episode[1:] != episode[:-1]
    starts = np.bincount(cluster[first], minlength=k).astype(np.float64)
    return {"counts": tx, "visits": visits, "starts": starts}


def build_arrays(
    counts: np.ndarray,
    visits: np.ndarray,
    starts: np.ndarray,
    threshold: int,
    inadmissible: str,
) -> dict[str, Any]:
    """Threshold, prune, map inadmissible actions. Returns tx (K'+2, A, K'+2), start, admissible mask,
    clinician policy, kept cluster ids and pruning counts."""
    k, n_actions, _ = counts.shape
    totals = counts.sum(-1)
    admissible = totals > threshold
    probs = np.where(admissible[..., None], counts / np.maximum(totals, 1.0)[..., None], 0.0)
    alive = np.ones(k, bool)
    rounds = 0
    while True:
        dead = alive & ~admissible.any(1)
        if not dead.any():
            break
        rounds += 1
        alive &= ~dead
        probs[:, :, :k][:, :, ~alive] = 0.0
        mass = probs.sum(-1)
        admissible &= mass > 0
        probs = np.where(admissible[..., None], probs / np.maximum(mass, 1e-300)[..., None], 0.0)
    kept = np.flatnonzero(alive)
    if kept.size == 0:
        raise CohortMDPError(
            f"no state keeps an action counted more than {threshold} times; lower --threshold"
        )
    n = kept.size
    columns = np.concatenate([kept, [k, k + 1]])
    tx = np.zeros((n + 2, n_actions, n + 2))
    tx[:n] = probs[kept][:, :, columns]
    mask = np.ones((n + 2, n_actions), bool)
    mask[:n] = admissible[kept]
    for s in range(n):
        rows = tx[s, mask[s]]
        if inadmissible == "mean":
            fill = rows.mean(0)
        else:  # 'single': the most counted admissible action's row
            best = np.flatnonzero(mask[s])[np.argmax(totals[kept[s], mask[s]])]
            fill = tx[s, best]
        tx[s, ~mask[s]] = fill
    tx[n, :, n] = 1.0  # death and survival are absorbing
    tx[n + 1, :, n + 1] = 1.0
    start = np.zeros(n + 2)
    start[:n] = starts[kept]
    if start.sum() == 0:
        raise CohortMDPError("no episode starts in a kept state")
    start /= start.sum()
    clinician = np.zeros((n + 2, n_actions))
    clinician[:n] = visits[kept] / np.maximum(visits[kept].sum(1, keepdims=True), 1.0)
    return {
        "tx": tx,
        "start_dist": start,
        "admissible_mask": mask,
        "clinician_probs": clinician,
        "kept_clusters": kept,
        "pruned": int(k - n),
        "pruning_rounds": rounds,
    }


def improper_states(tx: np.ndarray, mask: np.ndarray, n_live: int) -> np.ndarray:
    """Live states from which some policy (over admissible actions) never reaches a terminal state: the
    largest set in which every state has an admissible action whose whole row stays in the set. With
    gamma 1 a policy that stays there forever never ends its episode, so an MDP with such states is
    evaluated over its time limit (`max_steps`) instead of by a linear solve."""
    inside = np.ones(n_live, bool)
    while True:
        stays = (tx[:n_live, :, :n_live] * ~inside[None, None, :]).sum(-1) == 0  # no mass leaves the set
        stays &= (tx[:n_live, :, n_live:].sum(-1) == 0) & mask[:n_live]
        new = inside & stays.any(1)
        if np.array_equal(new, inside):
            return np.flatnonzero(inside)
        inside = new


@dataclass(frozen=True)
class CohortMdpArgs:
    """Build a tabular MDP from a cohort replay by the ICU-Sepsis recipe (k-means states, counted
    transitions, threshold, pruning, admissible actions), and the replay mapped to its states."""

    replay: Path
    """Input replay parquet (data_prep.py mimic, synth, icu-sepsis, ...). Only its train split is used."""
    out: Path
    """Output folder: mdp.safetensors, mdp.json and replay.parquet (the input rows with their MDP states)."""
    states: int = 100
    """Number of k-means clusters (ICU-Sepsis: 750). Ignored with --cluster state-index."""
    threshold: int = 20
    """A (state, action) pair is admissible if counted more than this many times (ICU-Sepsis: 20)."""
    seed: int = 0
    """Seed of the k-means starts."""
    n_init: int = 8
    """k-means restarts (the lowest inertia is kept; ICU-Sepsis: 32)."""
    cluster: Literal["kmeans", "state-index"] = "kmeans"
    """States from k-means on obs, or the replay's state_index column (to validate on ICU-Sepsis)."""
    inadmissible: Literal["mean", "single"] = "mean"
    """Rows of inadmissible actions: the mean of the admissible rows, or the most counted action's row."""
    r_survive: float = 1.0
    """Reward on entering survival."""
    r_death: float = 0.0
    """Reward on entering death (ICU-Sepsis: 0)."""
    overwrite: bool = False
    """Replace an existing output folder."""


def build_cohort_mdp(args: CohortMdpArgs) -> dict[str, Any]:
    """`data_prep.py mdp`: build the MDP and write the folder; returns its metadata."""
    from cleansepsis.replay import load_replay

    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    if args.threshold < 0:
        raise CohortMDPError(f"--threshold must be at least 0, got {args.threshold}")
    replay = load_replay(args.replay)
    frame = pl.read_parquet(args.replay)
    frame = frame.with_row_index("_row").sort(["episode_id", "t"])
    train = frame.filter(pl.col("split") == "train")
    if train.height == 0:
        raise CohortMDPError(f"{args.replay}: no rows in the train split")
    obs = train.get_column("obs").to_numpy().astype(np.float32)
    next_obs = train.get_column("next_obs").to_numpy().astype(np.float32)
    n_actions = replay.n_actions
    if args.cluster == "state-index":
        if "state_index" not in frame.columns:
            raise CohortMDPError(f"{args.replay}: --cluster state-index needs a state_index column")
        states = train.get_column("state_index").to_numpy().astype(np.int64)
        ids = np.unique(states)
        cluster = np.searchsorted(ids, states)
        raw_next = train.get_column("next_state_index").to_numpy().astype(np.int64)
        position = np.searchsorted(ids, raw_next).clip(0, len(ids) - 1)
        known = ids[position] == raw_next
        next_cluster = np.where(known, position, 0)  # unknown next states only occur at terminal rows
        centres = np.stack([obs[cluster == c][0] for c in range(len(ids))])
        k = len(ids)
    else:
        if args.states < 1:
            raise CohortMDPError(f"--states must be at least 1, got {args.states}")
        centres = kmeans(obs, args.states, args.seed, args.n_init)
        cluster, next_cluster = nearest(obs, centres), nearest(next_obs, centres)
        k, ids = args.states, np.arange(args.states)
    episode = train.get_column("episode_id").to_numpy()
    counted = count_transitions(
        cluster,
        next_cluster,
        train.get_column("action").to_numpy().astype(np.int64),
        episode,
        train.get_column("t").to_numpy().astype(np.int64),
        train.get_column("reward").to_numpy(),
        train.get_column("terminated").to_numpy(),
        k,
        n_actions,
    )
    built = build_arrays(
        counted["counts"], counted["visits"], counted["starts"], args.threshold, args.inadmissible
    )
    n = len(built["kept_clusters"])
    bad = improper_states(built["tx"], built["admissible_mask"], n)
    vectors = np.zeros((n + 2, centres.shape[1]), np.float32)
    vectors[:n] = centres[built["kept_clusters"]]
    meta = {
        "format_version": FORMAT_VERSION,
        "env_id": ENV_ID,
        "source_replay": str(args.replay),
        "source_content_hash": replay.meta.get("content_hash"),
        "source_env_id": replay.meta.get("env_id"),
        "feature_names": list(replay.meta["feature_names"]),
        "n_actions": int(n_actions),
        "n_clusters": int(k),
        "n_states": int(n + 2),
        "death": int(n),
        "survival": int(n + 1),
        "pruned_clusters": built["pruned"],
        "improper_states": int(bad.size),
        "pruning_rounds": built["pruning_rounds"],
        "kept_cluster_ids": [int(ids[c]) for c in built["kept_clusters"]],
        "admissible_per_state": {
            "mean": float(built["admissible_mask"][:n].sum(1).mean()),
            "min": int(built["admissible_mask"][:n].sum(1).min()),
            "max": int(built["admissible_mask"][:n].sum(1).max()),
        },
        "train_rows": int(train.height),
        "train_episodes": int(np.unique(episode).size),
        "r_survive": float(args.r_survive),
        "r_death": float(args.r_death),
        "notice": "values on this MDP are exact for the model built from the data, not for the patients",
        "args": {key: str(v) if isinstance(v, Path) else v for key, v in asdict(args).items()},
    }
    from safetensors.numpy import save_file

    from cleansepsis.replay import write_replay

    out = Path(args.out)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        save_file(
            {
                "tx": built["tx"],
                "start_dist": built["start_dist"],
                "admissible_mask": built["admissible_mask"].astype(np.uint8),
                "clinician_probs": built["clinician_probs"],
                "state_vectors": vectors,
                "cluster_centres": np.asarray(centres, np.float32),
            },
            tmp / ARRAYS_FILE,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        mapped, mapped_meta = map_replay_frame(frame, replay.meta, built, centres, args, out.resolve())
        write_replay(tmp / REPLAY_FILE, mapped, mapped_meta)
    print(
        f"wrote {out}: {n} states kept of {k} ({built['pruned']} pruned), death {n}, survival {n + 1}; "
        f"{meta['admissible_per_state']['mean']:.2f} admissible actions per state",
        file=sys.stderr,
    )
    return meta


def map_replay_frame(
    frame: pl.DataFrame,
    source_meta: dict[str, Any],
    built: dict[str, Any],
    centres: np.ndarray,
    args: CohortMdpArgs,
    mdp_dir: Path,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """All rows of the replay (every split, original order) with state_index / next_state_index of the MDP:
    the nearest kept cluster centre (for --cluster state-index, the row's own state if kept); a terminated
    last transition goes to death or survival by its reward. Observations are unchanged."""
    frame = frame.sort("_row")
    kept = built["kept_clusters"]
    n = len(kept)
    if args.cluster == "state-index":
        ids = np.unique(frame.filter(pl.col("split") == "train").get_column("state_index").to_numpy())
        kept_ids = ids[kept]
        kept_centres = centres[kept]

        def to_state(raw: np.ndarray, vectors: np.ndarray) -> np.ndarray:
            lookup = np.full(max(int(raw.max()), int(kept_ids.max())) + 1, -1)
            lookup[kept_ids] = np.arange(len(kept_ids))
            own = lookup[np.maximum(raw, 0)]
            missing = own < 0
            own[missing] = nearest(vectors[missing], kept_centres)
            return own

        state = to_state(
            frame.get_column("state_index").to_numpy(), frame.get_column("obs").to_numpy().astype(np.float32)
        )
        next_state = to_state(
            frame.get_column("next_state_index").to_numpy(),
            frame.get_column("next_obs").to_numpy().astype(np.float32),
        )
    else:
        kept_centres = centres[kept]
        state = nearest(frame.get_column("obs").to_numpy().astype(np.float32), kept_centres)
        next_state = nearest(frame.get_column("next_obs").to_numpy().astype(np.float32), kept_centres)
    terminated = frame.get_column("terminated").to_numpy()
    reward = frame.get_column("reward").to_numpy()
    next_state = np.where(terminated, np.where(reward > 0, n + 1, n), next_state)
    mask = built["admissible_mask"]
    columns = [
        c
        for c in frame.columns
        if c not in ("_row", "state_index", "next_state_index", "action_mask", "next_action_mask")
    ]
    # A logged action the model found too rare stays admissible in its own row, so that every learner's
    # loss can see it (the replay refuses a mask that excludes the logged action); the next row's mask is
    # then the next_action_mask within an episode, and the model's mask at the episode's end.
    action = frame.get_column("action").to_numpy()
    row_mask = mask[state].copy()
    row_mask[np.arange(len(action)), action] = True
    next_mask = mask[next_state].copy()
    episode = frame.get_column("episode_id").to_numpy()
    t = frame.get_column("t").to_numpy()
    order = np.lexsort((t, episode))
    goes_on = episode[order][1:] == episode[order][:-1]
    next_mask[order[:-1][goes_on]] = row_mask[order[1:][goes_on]]
    mapped = frame.select(columns).with_columns(
        pl.Series("state_index", state, pl.Int32),
        pl.Series("next_state_index", next_state, pl.Int32),
        pl.Series("action_mask", row_mask, pl.Array(pl.Boolean, mask.shape[1])),
        pl.Series("next_action_mask", next_mask, pl.Array(pl.Boolean, mask.shape[1])),
    )
    meta = {
        k: v
        for k, v in source_meta.items()
        if k not in ("n_transitions", "n_episodes", "content_hash", "schema_version", "action_encoding")
    }
    meta["env_id"] = ENV_ID
    meta["n_states"] = int(mask.shape[0])
    meta["state_index_kind"] = "cluster"  # many observations per state: the rows keep their real obs
    meta["source"] = "cohort-mdp"  # not the source's name: its dynamics are this MDP's now
    meta["reward"] = f"the source replay's: {source_meta.get('reward')}"
    meta["args"] = {
        **source_meta.get("args", {}),
        "mdp_dir": str(mdp_dir),
        "mapped_from": str(args.replay),
        "source_of_mapped_replay": source_meta.get("source"),
    }
    return mapped, meta


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def read_mdp(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of a cohort MDP folder (cached per path)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / ARRAYS_FILE).exists() or not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path}: not a cohort MDP folder (needs {ARRAYS_FILE} and {META_FILE})")
    try:
        arrays = load_file(path / ARRAYS_FILE)
        meta = json.loads((path / META_FILE).read_text())
    except Exception as err:  # safetensors and json raise their own types
        raise CohortMDPError(f"{path}: unreadable cohort MDP ({type(err).__name__}: {err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CohortMDPError(
            f"{path}/{META_FILE}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    arrays["admissible_mask"] = arrays["admissible_mask"].astype(bool)
    return arrays, meta


def load_params(
    path: str | Path, strategy: str = "mean", obs_mode: str = "vector", max_steps: int = MAX_STEPS
) -> mdp.MDPParams:
    """A cohort MDP folder as MDPParams, gamma 1. Exact evaluation by linear solve when every policy ends
    its episodes (the time limit then only cuts simulated episodes); when some kept states can cycle forever
    (`improper_states` in mdp.json, common with little data), by backward induction over `max_steps` steps,
    which is exactly the Gymnasium env's task. strategy 'terminate' sends inadmissible actions to death."""
    mdp.check_choice("strategy", strategy, STRATEGIES)
    return _load_params(Path(path).resolve(), strategy, obs_mode, int(max_steps))


@functools.cache
def _load_params(path: Path, strategy: str, obs_mode: str, max_steps: int) -> mdp.MDPParams:
    arrays, meta = read_mdp(path)
    tx = arrays["tx"].copy()
    n = meta["death"]
    if strategy == "terminate":
        inadmissible = ~arrays["admissible_mask"]
        tx[inadmissible] = 0.0
        tx[inadmissible, n] = 1.0
    terminal = np.zeros(n + 2, bool)
    terminal[n:] = True
    reward = np.zeros(n + 2)
    reward[n], reward[n + 1] = meta["r_death"], meta["r_survive"]
    return mdp.make_params(
        tx=tx,
        start_dist=arrays["start_dist"],
        reward_next=reward,
        terminal=terminal,
        admissible_mask=arrays["admissible_mask"],
        state_vectors=arrays["state_vectors"],
        clinician_probs=arrays["clinician_probs"],
        max_steps=max_steps,
        spec=("cohort", str(path), strategy),
        finite_horizon=meta["improper_states"] > 0,
        strategy=strategy,
        obs_mode=obs_mode,
    )


@functools.cache
def _reference_table(path: str, strategy: str, max_steps: int) -> tuple:
    params = _load_params(Path(path), strategy, "vector", max_steps)
    host = jax.device_get(params)
    arrays, meta = read_mdp(Path(path))
    tx = arrays["tx"].copy()
    n = meta["death"]
    if strategy == "terminate":
        tx[~arrays["admissible_mask"]] = 0.0
        tx[~arrays["admissible_mask"], n] = 1.0
    table = mdp.np_reference_table(
        tx,
        arrays["start_dist"],
        np.asarray(host.reward_next, np.float64),
        np.asarray(host.terminal),
        arrays["admissible_mask"],
        arrays["clinician_probs"],
        horizon=max_steps if meta["improper_states"] else None,
    )
    return tuple((name, row["expected_return"], row["mean_length"]) for name, row in table.items())


def reference_values(params: mdp.MDPParams) -> dict[str, dict[str, float]]:
    """Float64 exact return and mean length of the reference policies on a cohort MDP (see
    `mdp.np_reference_table`)."""
    _, path, strategy = params.spec
    table = _reference_table(path, strategy, int(params.max_steps))
    return {name: {"expected_return": r, "mean_length": n} for name, r, n in table}


class CohortMDPEnv(mdp.FiniteMDPEnv):
    """A cohort MDP folder as a Gymnasium env (`gymnasium.make("CleanSepsis/CohortMDP-v0", path=...)`)."""

    def __init__(
        self, path: str | Path, strategy: str = "mean", obs_mode: str = "vector", max_steps: int = MAX_STEPS
    ):
        super().__init__(load_params(path, strategy, obs_mode, max_steps))
