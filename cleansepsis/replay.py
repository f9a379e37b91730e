"""The one replay format every algorithm reads: a parquet file, one row per transition.

Columns (required):
    episode_id  int64     one ICU stay (or one simulated episode)
    t           int32     step within the episode, 0-based
    obs         float32[obs_dim]  state before the action
    action      int32     0..n_actions-1, encoded `5 * fluid_level + vaso_level` (ICU-Sepsis order);
                float32   for continuous actions: the dose in the metadata's unit, within [low, high]
    reward      float32
    next_obs    float32[obs_dim]
    terminated  bool      the episode ended in a terminal state (death or survival)
    truncated   bool      the episode was cut (time limit, end of data window)
    split       str       "train", "val" or "test", fixed per episode
Columns (optional, where known):
    state_index, next_state_index   int32   tabular state (ICU-Sepsis)
    behavior_prob                   float32 probability of the logged action under the logging policy
    action_mask, next_action_mask   bool[n_actions]  admissible actions in obs / next_obs
    behavior_log_density            float32 continuous actions only: log density of the logged action under the
                                            logging policy, per unit of the action (e.g. mg^-1)
Any other column is kept and returned in `Replay.extras` (for example raw doses or MAP on MIMIC-IV).

File metadata: key `cleansepsis` holds JSON with the schema version, obs_dim, n_actions, action encoding,
feature names, normalisation statistics, source, env id, reward definition, the arguments that made it
and a content hash of the columns.

The action space (metadata key `action_space`): `{"kind": "continuous", "name": "vancomycin_dose", "unit":
"mg", "low": 0.0, "high": 3000.0}` for a continuous action (then `n_actions` is 0, `action_encoding` is
"continuous", and there are no masks), or `{"kind": "discrete", "n": 25, "encoding": "5*fluid+vaso"}`. A file
without the key is discrete, so every replay written before continuous actions stays valid, hash and all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from cleansepsis.io import atomic_file

SCHEMA_VERSION = 1
METADATA_KEY = "cleansepsis"
ACTION_ENCODING = "5*fluid+vaso"
CONTINUOUS_ENCODING = "continuous"
ACTION_KINDS = ("discrete", "continuous")
# units a continuous action may be given in; a new drug adds its unit here (with a test)
ACTION_UNITS = ("mg", "g", "mcg", "units", "mL", "mg/kg", "mg/h", "mcg/kg/min", "units/h", "mL/h")
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("episode_id", "t", "obs", "action", "reward", "next_obs", "terminated", "truncated", "split")
OPTIONAL_COLUMNS = (
    "state_index", "next_state_index", "behavior_prob", "action_mask", "next_action_mask", "behavior_log_density"
)
# optional columns that mean nothing for one kind of action
DISCRETE_ONLY_COLUMNS = ("behavior_prob", "action_mask", "next_action_mask")
CONTINUOUS_ONLY_COLUMNS = ("behavior_log_density",)
REQUIRED_METADATA = (
    "schema_version",
    "obs_dim",
    "n_actions",
    "action_encoding",
    "feature_names",
    "normalisation",
    "source",
    "env_id",
    "reward",
    "args",
)


class ReplayError(ValueError):
    """A replay file that cannot be used; the message names the file and the problem."""


class Transitions(eqx.Module):
    """Device arrays of a replay, one leading axis of transitions. Unknown optional fields are filled
    (state index -1, behaviour prob and log density NaN, masks all True) and flagged in `Replay.has`.
    For continuous actions `action` is the float32 dose in the replay's unit and the masks are (N, 0)."""

    obs: jnp.ndarray  # (N, obs_dim) float32
    action: jnp.ndarray  # (N,) int32, or float32 for continuous actions
    reward: jnp.ndarray  # (N,) float32
    next_obs: jnp.ndarray  # (N, obs_dim) float32
    terminated: jnp.ndarray  # (N,) bool
    truncated: jnp.ndarray  # (N,) bool
    episode_id: jnp.ndarray  # (N,) int32, renumbered 0..E-1 in file order
    t: jnp.ndarray  # (N,) int32
    split: jnp.ndarray  # (N,) int8: 0 train, 1 val, 2 test
    state_index: jnp.ndarray  # (N,) int32
    next_state_index: jnp.ndarray  # (N,) int32
    behavior_prob: jnp.ndarray  # (N,) float32
    action_mask: jnp.ndarray  # (N, n_actions) bool
    next_action_mask: jnp.ndarray  # (N, n_actions) bool
    # (N,) float32, NaN where unknown; None only in Transitions built by hand without it
    behavior_log_density: jnp.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.action.shape[0])


@dataclass(frozen=True)
class Replay:
    """A validated replay: device arrays, the file's metadata, and which optional columns it had."""

    path: Path
    data: Transitions
    meta: dict[str, Any]
    has: dict[str, bool]
    episode_ids: np.ndarray  # original episode ids, indexed by the renumbered `data.episode_id`
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def obs_dim(self) -> int:
        return int(self.meta["obs_dim"])

    @property
    def n_actions(self) -> int:
        return int(self.meta["n_actions"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def action_space(self) -> dict[str, Any]:
        """The metadata's action space, with the discrete default for files written without one."""
        return action_space_of(self.meta)

    @property
    def is_continuous(self) -> bool:
        return self.action_space["kind"] == "continuous"

    def split(self, name: str) -> Transitions:
        """The transitions of one split ("train", "val" or "test"), as device arrays."""
        if name not in SPLITS:
            raise ReplayError(f"{self.path}: unknown split {name!r}; expected one of {SPLITS}")
        rows = np.flatnonzero(np.asarray(self.data.split) == SPLITS.index(name))
        if rows.size == 0:
            raise ReplayError(f"{self.path}: split {name!r} has no transitions")
        return take_rows(self.data, rows)

    def extras_for(self, name: str) -> dict[str, np.ndarray]:
        rows = np.asarray(self.data.split) == SPLITS.index(name)
        return {k: v[rows] for k, v in self.extras.items()}


def take_rows(data: Transitions, rows: np.ndarray) -> Transitions:
    # on the host: an eager device gather compiled one small program per field and row count
    rows = np.asarray(rows)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[rows]), data)


def action_space_of(meta: dict[str, Any]) -> dict[str, Any]:
    """A replay metadata's `action_space`; without the key, the discrete space its n_actions and encoding
    describe (every replay written before continuous actions)."""
    if "action_space" in meta:
        return dict(meta["action_space"])
    return {"kind": "discrete", "n": int(meta.get("n_actions", 0)),
            "encoding": meta.get("action_encoding", ACTION_ENCODING)}


def describe_action_space(space: dict[str, Any]) -> str:
    """A short description for messages: "continuous actions (vancomycin_dose, mg)"."""
    if space.get("kind") == "continuous":
        return f"continuous actions ({space.get('name')}, {space.get('unit')})"
    return f"discrete actions ({space.get('n')}, {space.get('encoding')})"


def check_action_space(meta: dict[str, Any], path: Path | str = "<replay>") -> dict[str, Any]:
    """The metadata's action space, checked against its n_actions and action_encoding; ReplayError naming
    the first problem. Returns the space (the discrete default filled in)."""
    space = meta.get("action_space")
    if space is None:
        if meta["action_encoding"] != ACTION_ENCODING:
            raise _fail(path, f"action encoding {meta['action_encoding']!r}; expected {ACTION_ENCODING!r}")
        return action_space_of(meta)
    if not isinstance(space, dict):
        raise _fail(path, f"metadata action_space is {space!r}; expected an object with a 'kind'")
    kind = space.get("kind")
    if kind not in ACTION_KINDS:
        raise _fail(path, f"metadata action_space kind {kind!r} is unknown; expected one of {ACTION_KINDS}")
    if kind == "discrete":
        n = space.get("n")
        if not _is_count(n) or n != int(meta["n_actions"]):
            raise _fail(path, f"metadata action_space n is {n!r}, but n_actions is {meta['n_actions']!r}")
        if space.get("encoding") != meta["action_encoding"] or meta["action_encoding"] != ACTION_ENCODING:
            raise _fail(
                path,
                f"action encoding {meta['action_encoding']!r} (action_space encoding {space.get('encoding')!r}); "
                f"expected {ACTION_ENCODING!r}",
            )
        return dict(space)
    for key in ("name", "unit", "low", "high"):
        if key not in space:
            raise _fail(path, f"metadata action_space (continuous) has no {key!r}; it needs name, unit, low, high")
    if space["unit"] not in ACTION_UNITS:
        raise _fail(path, f"metadata action_space unit {space['unit']!r} is unknown; expected one of {ACTION_UNITS}")
    if not isinstance(space["name"], str) or not space["name"]:
        raise _fail(path, f"metadata action_space name {space['name']!r} is not a non-empty string")
    low, high = space["low"], space["high"]
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x) for x in (low, high))
    if not numbers or not 0 <= low < high:
        raise _fail(path, f"metadata action_space bounds [{low!r}, {high!r}]; expected finite 0 <= low < high")
    if int(meta["n_actions"]) != 0 or meta["action_encoding"] != CONTINUOUS_ENCODING:
        raise _fail(
            path,
            f"continuous actions need n_actions 0 and action_encoding {CONTINUOUS_ENCODING!r}, got "
            f"{meta['n_actions']!r} and {meta['action_encoding']!r}",
        )
    return dict(space)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _hashable_dtype(dtype: pl.DataType) -> bool:
    """Types whose values `content_hash` turns into the same bytes on every run: numbers, booleans, strings
    (and categoricals, hashed as strings), dates and times as numbers, and fixed-width arrays of these."""
    if isinstance(dtype, pl.Array):
        return _hashable_dtype(dtype.inner)
    if isinstance(dtype, pl.Decimal):
        return False  # to_numpy gives Python Decimal objects
    return (
        dtype.is_numeric()
        or dtype in (pl.Boolean, pl.String, pl.Date, pl.Duration)
        or isinstance(dtype, pl.Categorical | pl.Enum | pl.Datetime | pl.Duration)
    )


def content_hash(frame: pl.DataFrame, path: Path | str = "<replay>") -> str:
    """sha256 over the columns in name order: equal rows give equal hashes, whatever the file bytes.

    A column whose values have no fixed byte form (a list, a struct, an object, or a boolean column with
    nulls) would hash differently on every run, so it is refused with a ReplayError naming it."""
    digest = hashlib.sha256()
    for name in sorted(frame.columns):
        series = frame.get_column(name)
        if not _hashable_dtype(series.dtype):
            raise _fail(path, _unhashable_message(name, series.dtype))
        if isinstance(series.dtype, pl.Categorical | pl.Enum):
            series = series.cast(pl.String)
        digest.update(name.encode())
        if series.dtype == pl.String:
            digest.update("\x1f".join(series.fill_null("\x00").to_list()).encode())
        else:
            values = series.to_numpy()
            if values.dtype == object:  # numpy has no missing value for booleans: nulls come back as None
                raise _fail(
                    path,
                    f"column {name!r} ({series.dtype}, {series.null_count()} null(s)) has no fixed byte form "
                    "to hash; fill its nulls before writing",
                )
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _unhashable_message(name: str, dtype: pl.DataType) -> str:
    return (
        f"column {name!r} has type {dtype}; a replay column must be numeric, boolean, string, categorical, "
        "a date, datetime or duration, or a fixed-width Array of numbers or booleans (store a list of fixed "
        "length as pl.Array, or one column per item)"
    )


def _fail(path: Path | str, message: str) -> ReplayError:
    return ReplayError(f"{path}: {message}")


def _check_array_column(path, frame: pl.DataFrame, name: str, inner: type[pl.DataType], width: int) -> None:
    dtype = frame.schema[name]
    if not isinstance(dtype, pl.Array) or dtype.inner != inner or dtype.size != width:
        raise _fail(path, f"column {name!r} has type {dtype}; expected Array({inner.__name__}, {width})")


def validate_frame(frame: pl.DataFrame, meta: dict[str, Any], path: Path | str = "<replay>") -> pl.DataFrame:
    """Check a replay's metadata, columns and structure; raise ReplayError naming the first problem found.
    Returns the frame with its rows in (episode_id, t) order (the same frame when they already are)."""
    check_format(frame, meta, path)
    return check_structure(frame, meta, path)


def check_format(frame: pl.DataFrame, meta: dict[str, Any], path: Path | str = "<replay>") -> None:
    """The metadata keys, column names and types, nulls, value ranges and splits (not the episodes)."""
    kind = meta.get("action_space", {}).get("kind") if isinstance(meta.get("action_space"), dict) else "discrete"
    if kind not in ACTION_KINDS:  # first: an unknown kind explains any missing n_actions
        raise _fail(path, f"metadata action_space kind {kind!r} is unknown; expected one of {ACTION_KINDS}")
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise _fail(path, f"metadata key {key!r} is missing")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise _fail(
            path,
            f"unknown schema version {meta['schema_version']!r}; this cleansepsis reads version {SCHEMA_VERSION}",
        )
    obs_dim, n_actions = int(meta["obs_dim"]), int(meta["n_actions"])
    if len(meta["feature_names"]) != obs_dim:
        raise _fail(path, f"metadata lists {len(meta['feature_names'])} feature names for obs_dim {obs_dim}")
    space = check_action_space(meta, path)
    continuous = space["kind"] == "continuous"
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise _fail(path, f"missing column(s) {missing}; a replay needs {list(REQUIRED_COLUMNS)}")
    if frame.height == 0:
        raise _fail(path, "has no rows")
    for name in DISCRETE_ONLY_COLUMNS if continuous else CONTINUOUS_ONLY_COLUMNS:
        if name in frame.columns:
            raise _fail(
                path,
                f"column {name!r} is for {'discrete' if continuous else 'continuous'} actions, and this replay "
                f"has {describe_action_space(space)}",
            )

    integer_columns = {"episode_id": pl.Int64, "t": pl.Int32}
    if not continuous:
        integer_columns["action"] = pl.Int32
    for name in ("state_index", "next_state_index"):
        if name in frame.columns:
            integer_columns[name] = pl.Int32
    for name, want in integer_columns.items():
        if frame.schema[name] != want:
            raise _fail(path, f"column {name!r} has type {frame.schema[name]}; expected {want}")
    float_columns = ["reward"] + [c for c in ("behavior_prob", "behavior_log_density") if c in frame.columns]
    float_columns += ["action"] if continuous else []
    for name in float_columns:
        if frame.schema[name] != pl.Float32:
            raise _fail(path, f"column {name!r} has type {frame.schema[name]}; expected Float32")
    for name in ("terminated", "truncated"):
        if frame.schema[name] != pl.Boolean:
            raise _fail(path, f"column {name!r} has type {frame.schema[name]}; expected Boolean")
    if frame.schema["split"] not in (pl.String, pl.Categorical, pl.Enum):
        raise _fail(path, f"column 'split' has type {frame.schema['split']}; expected String")
    _check_array_column(path, frame, "obs", pl.Float32, obs_dim)
    _check_array_column(path, frame, "next_obs", pl.Float32, obs_dim)
    for name in ("action_mask", "next_action_mask"):
        if name in frame.columns:
            _check_array_column(path, frame, name, pl.Boolean, n_actions)

    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for name in frame.columns:
        if name not in known and not _hashable_dtype(frame.schema[name]):
            raise _fail(path, _unhashable_message(name, frame.schema[name]))

    for name in [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in frame.columns)]:
        nulls = frame.get_column(name).null_count()
        if nulls:
            raise _fail(path, f"column {name!r} has {nulls} null value(s)")

    if continuous:
        _check_continuous_actions(frame, space, path)
    else:
        actions = frame.get_column("action")
        bad = frame.filter((actions < 0) | (actions >= n_actions))
        if bad.height:
            row = bad.row(0, named=True)
            raise _fail(
                path,
                f"column 'action' has value {row['action']} (episode {row['episode_id']}, t {row['t']}) "
                f"outside 0..{n_actions - 1}",
            )
    for name in ("obs", "next_obs", "reward", "behavior_prob", "behavior_log_density"):
        if name not in frame.columns:
            continue
        values = frame.get_column(name)
        flat = values.arr.explode() if isinstance(values.dtype, pl.Array) else values
        non_finite = int((~flat.is_finite()).sum())
        if non_finite:
            where = ""
            if not isinstance(values.dtype, pl.Array):
                row = frame.filter(~values.is_finite()).row(0, named=True)
                where = f"; the first at episode {row['episode_id']}, t {row['t']}: {row[name]}"
            raise _fail(path, f"column {name!r} has {non_finite} non-finite value(s) (NaN or inf){where}")
    if "behavior_prob" in frame.columns:
        prob = frame.get_column("behavior_prob")
        if bool(((prob <= 0) | (prob > 1)).any()):
            raise _fail(path, "column 'behavior_prob' has values outside (0, 1]")
    splits = set(frame.get_column("split").cast(pl.String).unique().to_list())
    if not splits <= set(SPLITS):
        raise _fail(path, f"column 'split' has value(s) {sorted(splits - set(SPLITS))}; expected {SPLITS}")


def _check_continuous_actions(frame: pl.DataFrame, space: dict[str, Any], path: Path | str) -> None:
    """Continuous actions are finite, not negative, and within the metadata's [low, high]; the error names
    the first bad row (in file order) and its value."""
    action = frame.get_column("action")
    unit, low, high = space["unit"], float(space["low"]), float(space["high"])
    checks = (
        (~action.is_finite(), "is not finite"),
        (action < 0, f"is negative; a dose in {unit} is at least 0"),
        ((action < low) | (action > high), f"is outside the metadata bounds [{low:g}, {high:g}] {unit}"),
    )
    for flags, why in checks:
        bad = frame.filter(flags)
        if bad.height:
            row = bad.row(0, named=True)
            raise _fail(
                path,
                f"column 'action' value {row['action']} (episode {row['episode_id']}, t {row['t']}) {why} "
                f"({bad.height} such row(s))",
            )


def _numpy(frame: pl.DataFrame, name: str) -> np.ndarray:
    return frame.get_column(name).to_numpy()


def _rows_differ(
    a: np.ndarray, b: np.ndarray, b_rows: np.ndarray | None = None, chunk: int = 1 << 16
) -> np.ndarray:
    """(n,) True where row i of the (n, k) array a differs from row i of b (or row b_rows[i] of b); in
    chunks, so that a million-row check never holds a (n, k) temporary."""
    out = np.empty(len(a), bool)
    for start in range(0, len(a), chunk):
        stop = start + chunk
        other = b[start:stop] if b_rows is None else b[b_rows[start:stop]]
        np.any(a[start:stop] != other, axis=1, out=out[start:stop])
    return out


def _state_count(meta: dict[str, Any]) -> int | None:
    """How many tabular states the replay's env has: `n_states` in the metadata, or ICU-Sepsis's 716."""
    if meta.get("n_states") is not None:
        return int(meta["n_states"])
    from cleansepsis import env

    return env.N_STATES if meta.get("env_id") == env.ENV_ID or meta.get("source") == "icu-sepsis" else None


def check_structure(frame: pl.DataFrame, meta: dict[str, Any], path: Path | str = "<replay>") -> pl.DataFrame:
    """The episodes: each a run of steps t = 0, 1, 2, ... that ends (terminated or truncated) at its last
    row and nowhere else, whose next_obs / next_state_index / next_action_mask are the next row's obs /
    state_index / action_mask, whose masks admit the logged action, and whose state indices are the env's
    and name one observation each. Rows in another order are sorted; returns the sorted frame.

    Expects a frame that passed `check_format`. Vectorised: about a second on a million-row replay."""
    episode, t = _numpy(frame, "episode_id"), _numpy(frame, "t")
    steps_forward = (np.diff(episode) > 0) | ((np.diff(episode) == 0) & (np.diff(t) > 0))
    if not steps_forward.all():
        frame = frame.sort("episode_id", "t", maintain_order=True)
        episode, t = _numpy(frame, "episode_id"), _numpy(frame, "t")

    def fail(row: int, message: str) -> ReplayError:
        return _fail(path, f"episode {episode[row]}: {message}")

    def first(flags: np.ndarray) -> int | None:
        hits = np.flatnonzero(flags)
        return int(hits[0]) if hits.size else None

    same = episode[1:] == episode[:-1]  # row i and row i + 1 belong to one episode
    starts, last = np.r_[True, ~same], np.r_[~same, True]
    if (row := first(t < 0)) is not None:
        raise fail(row, f"t is {t[row]}; t counts the steps of an episode from 0")
    if (row := first(same & (t[1:] == t[:-1]))) is not None:
        repeats = int(np.sum((episode == episode[row]) & (t == t[row])))
        if frame.slice(row, 1).equals(frame.slice(row + 1, 1)):
            raise fail(
                row, f"the row at t={t[row]} is duplicated ({repeats} identical rows); remove the copies"
            )
        raise fail(row, f"t={t[row]} occurs in {repeats} different rows; each step of an episode is one row")
    if (row := first(starts & (t != 0))) is not None:
        raise fail(
            row, f"starts at t={t[row]}; t counts from 0, so the rows of steps 0..{t[row] - 1} are missing"
        )
    if (row := first(same & (t[1:] != t[:-1] + 1))) is not None:
        raise fail(row, f"t jumps from {t[row]} to {t[row + 1]}; the rows of the steps between are missing")

    split = frame.get_column("split").cast(pl.String)
    split_changes = (split.slice(1) != split.slice(0, frame.height - 1)).to_numpy()
    if (row := first(same & split_changes)) is not None:
        raise fail(
            row,
            f"is spread over more than one split ({split[row]} at t={t[row]}, {split[row + 1]} at "
            f"t={t[row + 1]}); splits must be by episode",
        )

    terminated, truncated = _numpy(frame, "terminated"), _numpy(frame, "truncated")
    done = terminated | truncated
    if (row := first(done & ~last)) is not None:
        how = "terminated" if terminated[row] else "truncated"
        after = int(np.sum(episode == episode[row])) - 1 - int(t[row])
        every = " (every row of the file is terminated)" if terminated.all() else ""
        raise fail(
            row, f"the row at t={t[row]} is {how}, but {after} row(s) follow the end of the episode{every}"
        )
    if (row := first(last & ~done)) is not None:
        raise fail(
            row,
            f"never ends: its last row (t={t[row]}) is neither terminated nor truncated; the rows after it "
            "are missing, or set truncated where the data stop",
        )

    action = _numpy(frame, "action")
    rows = np.arange(frame.height)
    mask = _numpy(frame, "action_mask") if "action_mask" in frame.columns else None
    next_mask = _numpy(frame, "next_action_mask") if "next_action_mask" in frame.columns else None
    if mask is not None:
        if (row := first(~mask.any(axis=1))) is not None:
            raise fail(row, f"the action_mask at t={t[row]} admits no action")
        if (row := first(~mask[rows, action])) is not None:
            raise fail(row, f"the action_mask at t={t[row]} excludes the logged action {action[row]}")
    if next_mask is not None:
        if (row := first(~next_mask.any(axis=1) & ~terminated)) is not None:
            raise fail(row, f"the next_action_mask at t={t[row]} admits no action, but the episode goes on")
        if mask is not None and (row := first(same & _rows_differ(next_mask[:-1], mask[1:]))) is not None:
            raise fail(
                row, f"the next_action_mask at t={t[row]} differs from the action_mask at t={t[row + 1]}"
            )

    obs, next_obs = _numpy(frame, "obs"), _numpy(frame, "next_obs")
    if (row := first(same & _rows_differ(next_obs[:-1], obs[1:]))) is not None:
        raise fail(row, f"the next_obs at t={t[row]} differs from the obs at t={t[row + 1]}")

    n_states = _state_count(meta)
    for name in ("state_index", "next_state_index"):
        if name not in frame.columns:
            continue
        index = _numpy(frame, name)
        outside = (index < 0) | (index >= n_states) if n_states is not None else index < 0
        if (row := first(outside)) is not None:
            states = f"0..{n_states - 1}" if n_states is not None else "0 or more"
            raise fail(
                row, f"{name} {index[row]} at t={t[row]} is not a state of the env (expected {states})"
            )
    # a cohort MDP's state is a cluster of observations (metadata state_index_kind "cluster"): many per state
    if "state_index" in frame.columns and meta.get("state_index_kind") != "cluster":
        state = _numpy(frame, "state_index")
        pairs = [(state, obs, "obs", np.arange(frame.height))]
        if "next_state_index" in frame.columns:
            next_state = _numpy(frame, "next_state_index")
            if (row := first(same & (next_state[:-1] != state[1:]))) is not None:
                raise fail(
                    row,
                    f"the next_state_index at t={t[row]} ({next_state[row]}) differs from the state_index at "
                    f"t={t[row + 1]} ({state[row + 1]})",
                )
            # within an episode the next pair is the next row's pair (checked above): only the last rows add
            ends = np.flatnonzero(last)
            pairs.append((next_state[ends], next_obs[ends], "next_obs", ends))
        # one observation per state: store any row's observation under its index; if every row agrees with
        # what was stored, each index names one observation, whichever row the store kept
        index_all = np.concatenate([p[0] for p in pairs])
        if index_all.max() < 4 * len(index_all):
            slots = index_all
        else:  # sparse indices: number them densely first
            slots = np.unique(index_all, return_inverse=True)[1].reshape(-1)
        reference = np.zeros((int(slots.max()) + 1, obs.shape[1]), obs.dtype)
        offset = 0
        for index, values, _, _ in pairs:
            reference[slots[offset : offset + len(index)]] = values
            offset += len(index)
        offset = 0
        for index, values, name, at in pairs:
            bad = _rows_differ(values, reference, slots[offset : offset + len(index)])
            offset += len(index)
            if (hit := first(bad)) is not None:
                row = int(at[hit])
                raise fail(
                    row,
                    f"state {index[hit]} has a different {name} at t={t[row]} than elsewhere in the file; a "
                    "state_index must name one observation",
                )
    return frame


def write_replay(
    path: str | os.PathLike,
    frame: pl.DataFrame,
    meta: dict[str, Any],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate and write a replay atomically. Returns the metadata as written (with the content hash)."""
    path = Path(path)
    continuous = isinstance(meta.get("action_space"), dict) and meta["action_space"].get("kind") == "continuous"
    defaults = {"n_actions": 0, "action_encoding": CONTINUOUS_ENCODING} if continuous else {
        "action_encoding": ACTION_ENCODING}
    meta = {"schema_version": SCHEMA_VERSION, **defaults, **meta}
    frame = validate_frame(frame, meta, path)  # rows in (episode_id, t) order
    meta["n_transitions"] = frame.height
    meta["n_episodes"] = int(frame.get_column("episode_id").n_unique())
    meta["content_hash"] = content_hash(frame, path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        frame.write_parquet(
            tmp, compression="zstd", metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}
        )
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The replay metadata of a parquet file, without reading its rows."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    try:
        kv = pl.read_parquet_metadata(path)
    except Exception as err:  # polars raises several types for a damaged file
        raise _fail(path, f"is not a readable parquet file ({type(err).__name__}: {err})") from None
    if METADATA_KEY not in kv:
        raise _fail(path, f"has no {METADATA_KEY!r} metadata; it was not written by cleansepsis")
    try:
        return json.loads(kv[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise _fail(path, f"its {METADATA_KEY!r} metadata is not valid JSON ({err})") from None


def load_replay(path: str | os.PathLike, verify_hash: bool = True) -> Replay:
    """Read, validate and move a replay to the device once. Raises ReplayError before any compilation."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        frame = pl.read_parquet(path)
    except Exception as err:
        raise _fail(path, f"could not be read ({type(err).__name__}: {err})") from None
    check_format(frame, meta, path)
    if verify_hash and content_hash(frame, path) != meta.get("content_hash"):
        raise _fail(path, "content hash does not match its metadata; the rows were changed after writing")
    frame = check_structure(frame, meta, path)
    return frame_to_replay(frame, meta, path)


def frame_to_replay(frame: pl.DataFrame, meta: dict[str, Any], path: Path) -> Replay:
    n, n_actions = frame.height, int(meta["n_actions"])
    continuous = action_space_of(meta)["kind"] == "continuous"
    # discrete replays keep the keys they always had; continuous ones also say they have no masks
    optional = OPTIONAL_COLUMNS if continuous else [c for c in OPTIONAL_COLUMNS if c not in CONTINUOUS_ONLY_COLUMNS]
    has = {name: name in frame.columns for name in optional}
    episode_ids, episode_index = np.unique(frame.get_column("episode_id").to_numpy(), return_inverse=True)

    def column(name: str, fill: Any, dtype) -> np.ndarray:
        if name in frame.columns:
            return frame.get_column(name).to_numpy().astype(dtype, copy=False)
        return np.full(n, fill, dtype)

    def mask(name: str) -> np.ndarray:
        if name in frame.columns:
            return frame.get_column(name).to_numpy().astype(bool)
        return np.ones((n, n_actions), bool)

    split_names = frame.get_column("split").cast(pl.String).to_numpy()
    split_codes = np.zeros(n, np.int8)
    for code, name in enumerate(SPLITS):
        split_codes[split_names == name] = code
    data = Transitions(
        obs=jnp.asarray(frame.get_column("obs").to_numpy(), jnp.float32),
        action=jnp.asarray(frame.get_column("action").to_numpy(), jnp.float32 if continuous else jnp.int32),
        reward=jnp.asarray(frame.get_column("reward").to_numpy(), jnp.float32),
        next_obs=jnp.asarray(frame.get_column("next_obs").to_numpy(), jnp.float32),
        terminated=jnp.asarray(frame.get_column("terminated").to_numpy(), bool),
        truncated=jnp.asarray(frame.get_column("truncated").to_numpy(), bool),
        episode_id=jnp.asarray(episode_index, jnp.int32),
        t=jnp.asarray(frame.get_column("t").to_numpy(), jnp.int32),
        split=jax.device_put(split_codes),
        state_index=jax.device_put(column("state_index", -1, np.int32)),
        next_state_index=jax.device_put(column("next_state_index", -1, np.int32)),
        behavior_prob=jax.device_put(column("behavior_prob", np.nan, np.float32)),
        action_mask=jax.device_put(mask("action_mask")),
        next_action_mask=jax.device_put(mask("next_action_mask")),
        behavior_log_density=jax.device_put(column("behavior_log_density", np.nan, np.float32)),
    )
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    extras = {c: frame.get_column(c).to_numpy() for c in frame.columns if c not in known}
    return Replay(path=path, data=data, meta=meta, has=has, episode_ids=episode_ids, extras=extras)


class DistinctTransitions(eqx.Module):
    """A replay's distinct transitions, weighted by how often each occurs, over a table of its distinct
    (observation, admissible actions) pairs.

    `sum(weight * f(row))` equals the mean of f over every transition of the replay, so a full-batch loss
    runs the networks once per table row; a loss that is a sum over transitions of a function of Q(s, a)
    becomes a sum over the (table row, action) cells, weighted by `pair_weight`. On ICU-Sepsis a
    926,212-transition replay has 93,503 distinct transitions over 714 table rows."""

    obs_table: jnp.ndarray  # (U, obs_dim) float32: every distinct (obs, mask) and (next_obs, next_mask)
    mask_table: jnp.ndarray  # (U, n_actions) bool, the admissible actions of each table row
    obs_index: jnp.ndarray  # (M,) int32 table row of (obs, action_mask)
    next_obs_index: jnp.ndarray  # (M,) int32 table row of (next_obs, next_action_mask)
    action: jnp.ndarray  # (M,) int32
    reward: jnp.ndarray  # (M,) float32
    terminated: jnp.ndarray  # (M,) bool
    weight: jnp.ndarray  # (M,) float32, occurrences / N; sums to 1
    pair_weight: jnp.ndarray  # (U, n_actions) float32, the summed weight of each (table row, action)

    @property
    def size(self) -> int:
        return int(self.action.shape[0])

    def pair_mean(self, values: jnp.ndarray) -> jnp.ndarray:
        """(M,) per-transition values -> (U, n_actions) their weighted mean per (table row, action), 0 where
        the replay never took that action there."""
        n_rows, n_actions = self.pair_weight.shape
        pair = self.obs_index * n_actions + self.action
        total = jax.ops.segment_sum(self.weight * values, pair, n_rows * n_actions).reshape(n_rows, n_actions)
        return total / jnp.maximum(self.pair_weight, jnp.finfo(jnp.float32).tiny)

    def squared_error(self, q: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
        """sum_i weight_i (q[obs_i, action_i] - target_i)^2 for q (..., U, n_actions) and target (M,), giving
        (...), through the cells: sum_i w_i (q - y_i)^2 = sum over cells of W (q - mean y)^2 + W var y."""
        target_mean, target_square_mean = self.pair_mean(target), self.pair_mean(target**2)
        cell_error = (q - target_mean) ** 2 + target_square_mean - target_mean**2
        return jnp.sum(self.pair_weight * cell_error, axis=(-2, -1))


def _group_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, inverse, counts) of the distinct rows of a 2-D array, like `np.unique(axis=0)` but in sorted
    hash order: rows are hashed to one uint64, and the grouping is checked row by row (sorting whole rows
    took 50 s for the observations of a million-transition replay; hashing takes a few seconds)."""
    words = np.ascontiguousarray(rows)
    words = words.view(np.uint8).reshape(len(rows), -1)
    words = np.pad(words, ((0, 0), (0, -words.shape[1] % 8))).view(np.uint64)
    coefficients = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) * 2 + 1
    with np.errstate(over="ignore"):
        hashes = (words * coefficients).sum(axis=1, dtype=np.uint64)
    _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    if not np.array_equal(words[first][inverse], words):  # a hash collision: group exactly instead
        _, first, inverse, counts = np.unique(
            words, axis=0, return_index=True, return_inverse=True, return_counts=True
        )
    return first, inverse.reshape(-1), counts


def distinct_transitions(data: Transitions) -> DistinctTransitions:
    """Group identical transitions (same obs, action mask, action, reward, terminated, next obs and next
    mask), counting them. `truncated`, time and episode are not part of a one-step loss, so they do not
    split a group."""
    n = data.size
    obs = np.concatenate([np.asarray(data.obs, np.float32), np.asarray(data.next_obs, np.float32)])
    mask = np.concatenate([np.asarray(data.action_mask, bool), np.asarray(data.next_action_mask, bool)])
    row_first, row_inverse, _ = _group_rows(np.column_stack([obs.view(np.uint8), np.packbits(mask, axis=1)]))
    action = np.asarray(data.action, np.int32)
    reward = np.asarray(data.reward, np.float32)
    terminated = np.asarray(data.terminated, bool)
    key = np.column_stack(
        [row_inverse[:n], row_inverse[n:], action, reward.view(np.int32), terminated]  # reward: exact bits
    ).astype(np.int64)
    first, _, counts = _group_rows(key)
    weight = counts / n
    pair_weight = np.zeros((row_first.size, mask.shape[1]))
    np.add.at(pair_weight, (row_inverse[:n][first], action[first]), weight)
    return DistinctTransitions(
        obs_table=jax.device_put(obs[row_first]),
        mask_table=jax.device_put(mask[row_first]),
        obs_index=jnp.asarray(row_inverse[:n][first], jnp.int32),
        next_obs_index=jnp.asarray(row_inverse[n:][first], jnp.int32),
        action=jax.device_put(action[first]),
        reward=jax.device_put(reward[first]),
        terminated=jax.device_put(terminated[first]),
        weight=jnp.asarray(weight, jnp.float32),
        pair_weight=jnp.asarray(pair_weight, jnp.float32),
    )
