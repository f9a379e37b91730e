"""`data_prep.py export-minari REPLAY --out DIR`: a cleansepsis replay as a Minari dataset.

Minari (Farama Foundation) is the offline-RL dataset format read by TorchRL, d3rlpy and others. It is an
optional dependency (`uv sync --extra minari`, or `pip install "cleansepsis[minari]"`); nothing here
touches the network: the dataset is written under `--out`, which is used as Minari's datasets folder
(`MINARI_DATASETS_PATH`), and is loaded back from there:

    MINARI_DATASETS_PATH=DIR python -c "import minari; d = minari.load_dataset('cleansepsis/NAME-v0')"

Mapping (one Minari episode per replay episode, in episode_id order; steps in t order):
- observations: the episode's `obs` rows followed by the last row's `next_obs` (T + 1 rows), float32;
  this needs `next_obs[t] == obs[t + 1]` inside each episode, which is checked;
- actions (int64, Discrete(n_actions)), rewards, terminations, truncations: one per transition;
- infos: the replay's optional and extra numeric columns (behavior_prob, state_index, MIMIC doses, ...),
  one row per transition plus a copy of the last one (Minari keeps infos per observation); a scalar column
  comes back with shape (T + 1, 1);
- episode metadata `options`: {"episode_id": the replay's episode_id, "split": train/val/test};
- dataset metadata `cleansepsis`: the replay's metadata (feature names, normalisation, reward, source, ...,
  content hash), as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import tyro

from cleansepsis.io import atomic_dir, check_output
from cleansepsis.replay import REQUIRED_COLUMNS, ReplayError, content_hash, read_metadata, validate_frame

INSTALL_HINT = (
    'install the optional dependency: `uv sync --extra minari` or `pip install "cleansepsis[minari]"`'
)
NAMESPACE = "cleansepsis"


class MinariExportError(ValueError):
    """The export cannot be done (minari missing, a bad dataset id); the message says why."""


@dataclass(frozen=True)
class ExportMinariArgs:
    """Export a cleansepsis replay (parquet) as a Minari dataset, for TorchRL, d3rlpy and other Minari readers."""

    replay: tyro.conf.Positional[Path]
    """The replay parquet file (written by `data_prep.py icu-sepsis` or `data_prep.py mimic`)."""
    out: Path
    """Minari datasets folder (MINARI_DATASETS_PATH); the dataset goes to OUT/<dataset-id>."""
    dataset_id: str | None = None
    """Minari dataset id, `namespace/name-vN`; default `cleansepsis/<replay file stem>-v0`."""
    overwrite: bool = False
    """Replace the dataset if it exists in OUT."""


def _minari():
    try:
        import minari
    except ImportError as err:
        raise MinariExportError(f"minari is not installed ({err}); {INSTALL_HINT}") from None
    return minari


def default_dataset_id(replay: Path) -> str:
    name = re.sub(r"[^a-z0-9_]+", "-", replay.stem.lower()).strip("-_") or "replay"
    return f"{NAMESPACE}/{name}-v0"


@contextlib.contextmanager
def datasets_path(folder: Path) -> Iterator[None]:
    """Point Minari at `folder` for the duration (it reads MINARI_DATASETS_PATH on every call)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


@contextlib.contextmanager
def size_computed_once(storage_class) -> Iterator[None]:
    """minari 0.5 recomputes the dataset size by walking every file after each episode it writes, which is
    quadratic in the number of episodes (2,000 episodes took minutes); the size is computed once at the end."""
    original = storage_class.get_size
    storage_class.get_size = lambda self: 0.0
    try:
        yield
    finally:
        storage_class.get_size = original


def _info_columns(frame: pl.DataFrame) -> list[str]:
    """Numeric (or numeric array) columns besides the required ones: optional and extra columns."""
    names = []
    for name, dtype in frame.schema.items():
        if name in REQUIRED_COLUMNS:
            continue
        inner = dtype.inner if isinstance(dtype, pl.Array) else dtype
        if inner.is_numeric() or inner == pl.Boolean:
            names.append(name)
    return names


def episode_buffers(path: Path, frame: pl.DataFrame) -> list[dict]:
    """One Minari episode buffer per replay episode. Raises ReplayError if an episode's steps do not chain."""
    frame = frame.sort("episode_id", "t")
    episode = frame.get_column("episode_id").to_numpy()
    t = frame.get_column("t").to_numpy()
    obs = frame.get_column("obs").to_numpy().astype(np.float32, copy=False)
    next_obs = frame.get_column("next_obs").to_numpy().astype(np.float32, copy=False)
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    ends = np.r_[starts[1:], episode.size]
    first_t = np.repeat(t[starts], ends - starts)
    expected = np.arange(episode.size) - np.repeat(starts, ends - starts) + first_t
    bad = np.flatnonzero((t != expected) | (first_t != 0))
    if bad.size:
        row = int(bad[0])
        raise ReplayError(
            f"{path}: episode_id {episode[row]} has step t = {t[row]} where t = {expected[row] - first_t[row]} "
            "was expected; a Minari episode needs the steps t = 0, 1, 2, ... without gaps"
        )
    inner = np.ones(episode.size, bool)
    inner[ends - 1] = False
    chain = np.flatnonzero(inner & ~np.all(next_obs == np.roll(obs, -1, axis=0), axis=1))
    if chain.size:
        row = int(chain[0])
        raise ReplayError(
            f"{path}: episode_id {episode[row]} step t = {t[row]}: next_obs differs from the obs of step "
            f"t = {t[row] + 1}; a Minari episode stores one observation sequence, so the steps must chain"
        )
    action = frame.get_column("action").to_numpy().astype(np.int64)
    reward = frame.get_column("reward").to_numpy().astype(np.float32)
    terminated = frame.get_column("terminated").to_numpy()
    truncated = frame.get_column("truncated").to_numpy()
    split = frame.get_column("split").to_list()
    # per-step scalars are stored as (steps, 1): minari 0.5 cannot read back 1-d info arrays (empty shape)
    infos = {
        name: frame.get_column(name).to_numpy().reshape(frame.height, -1) for name in _info_columns(frame)
    }
    buffers = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        last = slice(end - 1, end)
        buffers.append(
            {
                "observations": np.concatenate([obs[start:end], next_obs[last]]),
                "actions": action[start:end],
                "rewards": reward[start:end],
                "terminations": terminated[start:end],
                "truncations": truncated[start:end],
                "infos": {k: np.concatenate([v[start:end], v[last]]) for k, v in infos.items()},
                "options": {"episode_id": int(episode[start]), "split": split[start]},
            }
        )
    return buffers


def export_minari(args: ExportMinariArgs) -> Path:
    """Write the replay as Minari dataset OUT/<dataset-id>; returns that folder."""
    minari = _minari()
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.dataset.minari_storage import MinariStorage

    path = Path(args.replay)
    dataset_id = args.dataset_id or default_dataset_id(path)
    try:
        namespace, _, _ = parse_dataset_id(dataset_id)
    except ValueError as err:
        raise MinariExportError(f"--dataset-id {dataset_id!r}: {err}") from None
    out = Path(args.out)
    target = out / dataset_id
    check_output(target, "dir", overwrite=args.overwrite)  # before the work: exists, or cannot be written

    meta = read_metadata(path)
    frame = pl.read_parquet(path)
    validate_frame(frame, meta, path)
    if content_hash(frame) != meta.get("content_hash"):
        raise ReplayError(
            f"{path}: content hash does not match its metadata; the rows were changed after writing"
        )
    buffers = episode_buffers(path, frame)

    import gymnasium as gym

    out.mkdir(parents=True, exist_ok=True)
    with (
        atomic_dir(target, overwrite=args.overwrite) as final,
        tempfile.TemporaryDirectory(dir=out) as scratch,
    ):
        # Minari writes into MINARI_DATASETS_PATH/<id>; build it in a scratch root, then move it into place
        with datasets_path(Path(scratch)):
            with warnings.catch_warnings(), size_computed_once(MinariStorage):
                # Minari warns about metadata a replay has no value for (code permalink, e-mail, env spec)
                warnings.simplefilter("ignore", UserWarning)
                dataset = minari.create_dataset_from_buffers(
                    dataset_id=dataset_id,
                    buffer=[EpisodeBuffer(**b) for b in buffers],
                    action_space=gym.spaces.Discrete(int(meta["n_actions"])),
                    observation_space=gym.spaces.Box(-np.inf, np.inf, (int(meta["obs_dim"]),), np.float32),
                    algorithm_name=f"cleansepsis replay ({meta.get('source')})",
                    author="cleansepsis",
                    description=f"cleansepsis replay {path.name} exported to Minari; the replay's metadata is "
                    "under the 'cleansepsis' key.",
                    data_format="arrow",
                )
            dataset.storage.update_metadata({"dataset_size": dataset.storage.get_size()})
            built = Path(scratch) / dataset_id
            with open(built / "data" / "metadata.json") as handle:
                dataset_meta = json.load(handle)
            dataset_meta[NAMESPACE] = meta
            with open(built / "data" / "metadata.json", "w") as handle:
                json.dump(dataset_meta, handle)
        for child in built.iterdir():  # into the atomic folder, beside its own marker file
            shutil.move(str(child), final / child.name)
    if namespace is not None:
        with datasets_path(out):
            from minari.namespace import create_namespace, list_local_namespaces

            if namespace not in list_local_namespaces():
                create_namespace(
                    namespace, description="datasets exported by cleansepsis (data_prep.py export-minari)"
                )
    print(
        f"wrote {target}: {len(buffers)} episodes, {frame.height} steps; load it with "
        f"MINARI_DATASETS_PATH={out} and minari.load_dataset({dataset_id!r})",
        file=sys.stderr,
    )
    return target
