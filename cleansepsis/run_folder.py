"""The folder a learner run writes, and the checks made on it before any work.

    runs/<script>__<run name>__<YYYYmmdd-HHMMSS>/
        summary.json        {"format": "cleansepsis-run", ...}: what was trained, timings, one entry per policy
        metrics.parquet     one row per (setting, seed, logged step)
        curves.png          mean and min-max band over seeds per setting
        checkpoints/s<setting>_seed<seed>/            the final policy
        checkpoints/s<setting>_seed<seed>_u<N:07d>/   with --save-every: the policy after N updates

A run is named after the script that made it (`my_iql.py` -> `my_iql__...`), and summary.json and every
checkpoint's config.json record the script's file name and the SHA-256 of its source, so a fork's results
never pass for the original's. `--overwrite` replaces only a folder whose summary.json carries the format
marker (or an empty folder): never a folder this code did not write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cleansepsis.checkpoint import save_checkpoint
from cleansepsis.io import OutputExistsError, atomic_dir, write_json
from cleansepsis.replay import Replay
from cleansepsis.sweep import device_info, is_main_process

RUN_FORMAT = "cleansepsis-run"
RUN_FORMAT_VERSION = 2
# Metrics that describe the policy rather than a loss; copied into summary.json and the checkpoints.
POLICY_METRICS = ("exact_return", "mean_length", "greedy_return", "greedy_length", "sim_return")


class RunFolderError(ValueError):
    """A run folder that cannot be written (it exists, or --overwrite would replace a foreign folder)."""


# --------------------------------------------------------------------------------------------------
# Which script made the run


def script_identity(script: str | Path) -> dict[str, str]:
    """{"script": file name, "script_sha256": hash of its bytes} of a learner script (pass `__file__`)."""
    path = Path(script)
    return {"script": path.name, "script_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def script_stem(identity: Mapping[str, str]) -> str:
    return Path(identity["script"]).stem


# --------------------------------------------------------------------------------------------------
# Checked before any work


def default_run_dir(stem: str, run_name: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stem}__{run_name}__{stamp}"


def is_run_folder(path: Path) -> bool:
    """True for a folder a learner wrote: its summary.json carries RUN_FORMAT."""
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("format") == RUN_FORMAT


def check_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any data is loaded or anything compiled, a run folder that could not be written at
    the end: an existing one without --overwrite, or with --overwrite one that is not a run folder."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        if not path.is_dir() or path.is_symlink():
            raise RunFolderError(f"--overwrite replaces only run folders, and {path} is not a folder")
        if any(path.iterdir()) and not is_run_folder(path):
            raise RunFolderError(
                f"--overwrite replaces only run folders (summary.json with format {RUN_FORMAT!r}), and {path} "
                "is not one; choose another --run-dir"
            )
    elif path.parent.exists() and not path.parent.is_dir():
        raise RunFolderError(f"{path.parent} is not a folder, so --run-dir {path} cannot be written")
    return path


# --------------------------------------------------------------------------------------------------
# Descriptions


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cleansepsis", "jax", "jaxlib", "equinox", "optax", "numpy", "polars"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def args_to_dict(args: Any) -> dict[str, Any]:
    raw = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    return json.loads(json.dumps(raw, default=str))


def fmt_setting(setting: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in setting.items()) or "default"


def is_policy_metric(name: str) -> bool:
    """Metrics that describe the policy (any name ending in _return or _length), not a loss."""
    return name.endswith(("_return", "_length"))


def checkpoint_name(setting_index: int, seed: int, updates: int | None = None) -> str:
    """checkpoints/s{s}_seed{seed} for the final policy, ..._u{updates:07d} for one saved during training."""
    base = f"checkpoints/s{setting_index}_seed{seed}"
    return base if updates is None else f"{base}_u{updates:07d}"


# --------------------------------------------------------------------------------------------------
# Files


def metrics_frame(
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
) -> pl.DataFrame:
    """Long format: one row per (setting, seed, step); columns setting, seed, hparams, step, metrics."""
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    steps = np.asarray(steps)
    n_settings, n_seeds, n_steps = len(settings), len(seeds), len(steps)
    for name, values in metrics.items():
        if values.shape != (n_settings, n_seeds, n_steps):
            raise RunFolderError(
                f"metric {name!r} has shape {values.shape}; expected {(n_settings, n_seeds, n_steps)}"
            )
    grid_setting, grid_seed, grid_step = np.meshgrid(
        np.arange(n_settings), np.asarray(seeds), steps, indexing="ij"
    )
    columns: dict[str, Any] = {
        "setting": grid_setting.ravel().astype(np.int32),
        "seed": grid_seed.ravel().astype(np.int64),
    }
    for name in settings[0] if settings else {}:
        columns[name] = np.asarray([s[name] for s in settings], np.float64)[grid_setting.ravel()]
    columns["step"] = grid_step.ravel().astype(np.int64)
    for name, values in metrics.items():
        columns[name] = values.reshape(-1).astype(np.float64)
    return pl.DataFrame(columns)


def plot_curves(
    path: Path,
    title: str,
    settings: Sequence[Mapping[str, float]],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
    reference: Mapping[str, float] | None = None,
) -> None:
    """Learning curves, mean and min-max band over seeds per setting, reference lines on return panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    names = [n for n in ("exact_return", "greedy_return", "sim_return") if n in metrics]
    names += [n for n in metrics if not is_policy_metric(n)][: max(1, 4 - len(names))]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    steps = np.asarray(steps)
    for ax, name in zip(axes[0], names, strict=True):
        for i, setting in enumerate(settings):
            values = metrics[name][i]  # (n_seeds, n_steps)
            (line,) = ax.plot(steps, values.mean(0), label=fmt_setting(setting))
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        if name.endswith("_return"):
            for (ref, value), style in zip((reference or {}).items(), (":", "--", "-."), strict=False):
                ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=ref)
        ax.set_title(name)
        ax.set_xlabel("update")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].legend(handles[:12], labels[:12], fontsize=7)
    fig.suptitle(f"{title}: mean and min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def checkpoint_config(
    *,
    algo: str,
    identity: Mapping[str, str],
    replay: Replay,
    setting_index: int,
    setting: Mapping[str, float],
    seed: int,
    updates: int,
    network: dict[str, Any],
    outputs: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of one policy checkpoint, everything a loader needs to check and use it."""
    meta = replay.meta
    config = {
        "algo": algo,
        **identity,
        "hparams": dict(setting),
        "seed": int(seed),
        "setting": int(setting_index),
        "updates": int(updates),
        "network": network,
        "outputs": outputs,
        "obs_dim": replay.obs_dim,
        "n_actions": replay.n_actions,
        "action_encoding": meta["action_encoding"],
        "feature_names": list(meta["feature_names"]),
        "normalisation": meta["normalisation"],
        "replay_path": str(replay.path),
        "replay_hash": meta.get("content_hash"),
        "replay_source": meta.get("source"),
        "env_id": meta.get("env_id"),
        "action_bins": meta.get("action_bins"),
        "cleansepsis_version": versions()["cleansepsis"],
    }
    if replay.is_continuous:  # the bounds and unit the policy's actions are in (discrete configs unchanged)
        config["action_space"] = replay.action_space
    config.update(extra or {})
    return config


Export = Callable[[int, int, int | None], tuple[dict[str, np.ndarray], dict[str, Any]]]


def finish_run(
    *,
    algo: str,
    script: str | Path,
    args: Any,
    replay: Replay,
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
    export: Export,
    outputs: str,
    timing: Mapping[str, float],
    n_updates: int,
    saved_updates: Sequence[int] = (),
    reference: Mapping[str, float] | None = None,
    run_dir: str | Path | None = None,
    run_name: str = "default",
    overwrite: bool = False,
    extra_summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write the run folder atomically and return its path.

    `export(setting_index, seed_index, save_index)` returns (tensors, network) of that policy as
    `cleansepsis.checkpoint.save_checkpoint` takes them: the final one for save_index None, else the one
    saved after `saved_updates[save_index]` updates. `steps` are the update counts at the logged metrics;
    policy metrics of a saved checkpoint are the ones logged at its update count."""
    if outputs not in ("q_values", "logits", "action_mean"):
        raise RunFolderError(f"outputs must be 'q_values', 'logits' or 'action_mean', got {outputs!r}")
    identity = script_identity(script)
    path = Path(run_dir) if run_dir is not None else default_run_dir(script_stem(identity), run_name)
    if not is_main_process():  # across processes every one holds the whole result; one writes it
        return path
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    frame = metrics_frame(settings, seeds, steps, metrics)  # also checks shapes before anything is written
    step_index = {int(step): j for j, step in enumerate(steps)}
    missing = [u for u in saved_updates if u not in step_index]
    if missing:
        raise RunFolderError(f"checkpoints saved at updates {missing}, where no metrics were logged")
    train_seconds = float(timing["train_seconds"])
    n_policies = len(settings) * len(seeds)
    entries = []

    def write_policy(tmp: Path, s: int, i: int, save_index: int | None) -> dict[str, Any]:
        updates = n_updates if save_index is None else int(saved_updates[save_index])
        j = step_index.get(updates, len(steps) - 1)
        known = {k: float(metrics[k][s, i, j]) for k in POLICY_METRICS if k in metrics}
        rel = checkpoint_name(s, seeds[i], None if save_index is None else updates)
        tensors, network = export(s, i, save_index)
        config = checkpoint_config(
            algo=algo, identity=identity, replay=replay, setting_index=s, setting=settings[s],
            seed=seeds[i], updates=updates, network=network, outputs=outputs, extra=known,
        )
        save_checkpoint(tmp / rel, tensors, config)
        return {"updates": updates, "checkpoint": rel, **known}

    with atomic_dir(path, overwrite=overwrite) as tmp:
        for s, setting in enumerate(settings):
            for i, seed in enumerate(seeds):
                finals = {k: float(v[s, i, -1]) for k, v in metrics.items()}
                final = write_policy(tmp, s, i, None)
                saved = [write_policy(tmp, s, i, k) for k in range(len(saved_updates))]
                entry = {
                    "setting": s,
                    "seed": int(seed),
                    "hparams": dict(setting),
                    "final": finals,
                    **{k: v for k, v in final.items() if k != "updates"},
                }
                if saved_updates:
                    entry["checkpoints"] = [*saved, final]
                entries.append(entry)
        frame.write_parquet(tmp / "metrics.parquet")
        plot_curves(tmp / "curves.png", script_stem(identity), settings, steps, metrics, reference)
        summary = {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "algo": algo,
            **identity,
            "args": args_to_dict(args),
            "device": device_info(),
            "versions": versions(),
            "replay": {
                "path": str(replay.path),
                "content_hash": replay.meta.get("content_hash"),
                "source": replay.meta.get("source"),
                "n_transitions": replay.meta.get("n_transitions"),
                "n_episodes": replay.meta.get("n_episodes"),
            },
            "compile_seconds": float(timing["compile_seconds"]),
            "train_seconds": train_seconds,
            "n_policies": n_policies,
            "updates_per_policy": int(n_updates),
            "updates_per_second": n_updates * n_policies / max(train_seconds, 1e-9),
            "reference": dict(reference or {}),
            "settings": [dict(s) for s in settings],
            "seeds": [int(x) for x in seeds],
            "runs": entries,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra_summary or {}),
        }
        write_json(tmp / "summary.json", summary)
    return path


__all__ = [
    "RUN_FORMAT",
    "OutputExistsError",
    "RunFolderError",
    "check_run_dir",
    "checkpoint_config",
    "checkpoint_name",
    "default_run_dir",
    "finish_run",
    "is_run_folder",
    "metrics_frame",
    "plot_curves",
    "script_identity",
]
