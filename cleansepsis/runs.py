"""What every learner script shares and no fork edits: data loading, hyperparameter grids, the exact
evaluation hook, the compiled sweep over settings x seeds with a progress bar, the finite-loss check, the
results table and the run folder (summary.json, metrics.parquet, curves.png, one checkpoint per policy).

How an algorithm file uses it (see iql.py for a complete one):

    replay, train_data, env_params = runs.load_training_data(args.replay)
    settings, hparams = runs.make_hparam_grid({"tau": args.tau, "beta": args.beta})
    train = make_train(args, train_data, env_params)      # pure train(key, hparams[, inputs]) -> (policy, metrics)
    # inside train's outer scan, once per evaluation:
    #     ret, length = runs.exact_evaluation(env_params, logits_716x25, "greedy")
    #     runs.tick()                                      # advances the progress bar
    seeds = runs.seed_list(args.seed, args.num_seeds)
    (policy, metrics), timing = runs.run_sweep(train, seeds, hparams, n_ticks=n_evals,
                                               inputs=(train_data, env_params))  # arguments, not constants
    runs.check_finite(metrics, settings, seeds)            # raises NonFiniteError naming step/seed/term
    runs.print_results_table("iql", settings, seeds, metrics, reference)
    runs.finish_run(algo="iql", args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
                    metrics=metrics, export=lambda s, i: export_policy(index_run(policy, s, i)),
                    outputs="logits", timing=timing, reference=reference)

Shapes: `train(key, hparams)` sees one seed and one setting; `run_sweep` vmaps it over seeds (inner axis)
and settings (outer axis), so every array it returns has leading axes (n_settings, n_seeds, ...). Metrics
are dicts of arrays (n_settings, n_seeds, n_evals); `steps` is (n_evals,), the update count at each entry.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl

from cleansepsis import interrupts
from cleansepsis.checkpoint import save_checkpoint
from cleansepsis.io import OutputExistsError, atomic_dir, write_json
from cleansepsis.replay import Replay, ReplayError, Transitions, load_replay

# the sweep and its devices live in cleansepsis.sweep; learners reach them as runs.*
from cleansepsis.sweep import (  # noqa: F401
    DISTRIBUTED_VARIABLE,
    HOST_DEVICES_VARIABLE,
    device_info,
    is_main_process,
    run_sweep,
    tick,
    use_host_devices,
)

ICU_SEPSIS_SOURCE = "icu-sepsis"
EVAL_KINDS = ("greedy", "softmax")
# Metrics that describe the policy rather than a loss (any name ending in _return or _length); they are
# not checked for finiteness as losses. These ones are also copied into summary.json and checkpoints.
POLICY_METRICS = ("exact_return", "mean_length", "greedy_return", "greedy_length")


def is_policy_metric(name: str) -> bool:
    return name.endswith(("_return", "_length"))


class RunError(ValueError):
    """A run that cannot go on (bad arguments, unusable data, non-finite losses); the message says why."""


class NonFiniteError(RunError):
    """A loss became NaN or inf; the message names the step, the setting, the seed and the term."""


USER_ERRORS = (RunError, ReplayError, OutputExistsError, FileNotFoundError)


def cli_main(main: Callable[[], None]) -> None:
    """Run a script's main(), turning the project's errors into `error: ...` on stderr and exit code 1."""
    status = interrupts.run_cli(main, USER_ERRORS)  # Ctrl-C, also when swallowed on the way: status 130
    if status:
        raise SystemExit(status)


# --------------------------------------------------------------------------------------------------
# Data


def load_training_data(replay_path: str | Path | None, split: str = "train") -> tuple[Replay, Transitions, Any]:
    """(replay, the transitions of `split`, env params or None).

    With no path, the built-in ICU-Sepsis clinician replay (10,000 episodes, seed 0), built on first use.
    Env params are loaded when the replay comes from ICU-Sepsis, so that policies are evaluated exactly."""
    if replay_path is None:
        from cleansepsis.icu_replay import default_replay_path

        replay_path = default_replay_path()
    replay = load_replay(replay_path)
    data = replay.split(split)
    env_params = None
    if replay.meta.get("source") == ICU_SEPSIS_SOURCE:
        from cleansepsis import env

        env_params = env.load_params()
        if replay.obs_dim != env_params.state_vectors.shape[1] or replay.n_actions != env.N_ACTIONS:
            raise RunError(
                f"{replay.path}: source is icu-sepsis but obs_dim {replay.obs_dim} / n_actions {replay.n_actions} "
                f"differ from the env's {env_params.state_vectors.shape[1]} / {env.N_ACTIONS}"
            )
    return replay, data, env_params


# Reference policies shown beside results: our name -> the name in env.reference_values.
REFERENCE_POLICIES = {
    "clinician": "clinician_renormalised",
    "greedy_clinician": "greedy_clinician",
    "random": "random",
    "optimal": "optimal",
}


def reference_values(env_params: Any) -> dict[str, float]:
    """Exact returns of the clinician (renormalised to admissible actions), greedy clinician, random and
    optimal policies of the ICU-Sepsis MDP (empty without env params)."""
    if env_params is None:
        return {}
    from cleansepsis import env

    table = env.reference_values(env_params)
    return {ours: float(table[theirs]["expected_return"]) for ours, theirs in REFERENCE_POLICIES.items()}


def sample_batch(key: jax.Array, data: Transitions, batch_size: int) -> Transitions:
    """A uniform batch of transitions, gathered on the device."""
    rows = jax.random.randint(key, (batch_size,), 0, data.action.shape[0])
    return jax.tree.map(lambda x: x[rows], data)


# --------------------------------------------------------------------------------------------------
# Hyperparameter grids and seeds


def make_hparam_grid(values: Mapping[str, Sequence[float] | float]) -> tuple[list[dict[str, float]], dict]:
    """Every combination of the given values, first key varying slowest.

    Returns (settings, stacked): settings[i] is a plain dict for printing and saving; stacked[name] is a
    float32 array of shape (n_settings,) to vmap over."""
    names = list(values)
    lists = []
    for name in names:
        v = values[name]
        v = [v] if isinstance(v, int | float) else list(v)
        if not v:
            raise RunError(f"hyperparameter --{name.replace('_', '-')} needs at least one value")
        for x in v:
            if not math.isfinite(float(x)):
                raise RunError(f"hyperparameter --{name.replace('_', '-')} has non-finite value {x}")
        lists.append([float(x) for x in v])
    settings = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists)]
    stacked = {name: jnp.asarray([s[name] for s in settings], jnp.float32) for name in names}
    return settings, stacked


def seed_list(seed: int, num_seeds: int) -> list[int]:
    """Seeds seed, seed+1, ...: `--seed 3 --num-seeds 1` repeats seed 3 of a larger run (up to float
    rounding: a different batch size can change the order of XLA's reductions); the same command repeats
    exactly."""
    if num_seeds < 1:
        raise RunError(f"--num-seeds must be at least 1, got {num_seeds}")
    return [seed + i for i in range(num_seeds)]


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per seed, (n_seeds, 2). Train splits its key; it never creates another."""
    return jnp.stack([jax.random.PRNGKey(s) for s in seeds])


def index_run(tree: Any, setting: int, seed_index: int) -> Any:
    """One (setting, seed) slice of a pytree returned by run_sweep."""
    return jax.tree.map(lambda x: x[setting, seed_index] if hasattr(x, "shape") else x, tree)


# --------------------------------------------------------------------------------------------------
# Exact evaluation on ICU-Sepsis, called inside the compiled program


def admissible_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax over the admissible actions only; inadmissible actions get probability 0."""
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def scores_to_policy(env_params: Any, scores: jnp.ndarray, kind: str) -> jnp.ndarray:
    """(716, n_actions) policy of Q-values or logits: "greedy" = argmax over admissible actions,
    "softmax" = softmax restricted to admissible actions."""
    from cleansepsis import env

    if kind == "greedy":
        return env.greedy_admissible(scores, env_params.admissible_mask).astype(jnp.float32)
    if kind == "softmax":
        return admissible_softmax(scores, env_params.admissible_mask).astype(jnp.float32)
    raise RunError(f"unknown evaluation kind {kind!r}; expected one of {EVAL_KINDS}")


def exact_evaluation(env_params: Any, scores: jnp.ndarray, kind: str = "greedy") -> tuple[jnp.ndarray, ...]:
    """Exact (expected return, mean episode length) on ICU-Sepsis of the policy given by `scores`, the
    (716, n_actions) Q-values or logits of the network applied to `env_params.state_vectors`.

    kind "greedy": argmax over admissible actions; "softmax": softmax restricted to admissible actions.
    Jittable and vmappable. To evaluate several policies in one step, use `exact_evaluations` (one call).
    The solve never lowers to a batched LU (`cleansepsis.linalg`), which deadlocked jaxlib on 2 threads."""
    from cleansepsis import env

    expected_return, mean_length = env.policy_evaluation(scores_to_policy(env_params, scores, kind), env_params)
    return expected_return, mean_length


def exact_evaluations(
    env_params: Any, policies: Mapping[str, tuple[jnp.ndarray, str]]
) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """Several policies evaluated exactly by one batched solve: {name: (scores, kind)} ->
    {name: (expected return, mean length)}."""
    from cleansepsis import env

    names = list(policies)
    stacked = jnp.stack([scores_to_policy(env_params, *policies[n]) for n in names])  # (k, 716, n_actions)
    returns, lengths = env.policy_evaluation(stacked, env_params)
    return {n: (returns[i], lengths[i]) for i, n in enumerate(names)}


# --------------------------------------------------------------------------------------------------
# Checks and reporting


def to_numpy(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in metrics.items()}


def check_finite(
    metrics: Mapping[str, Any],
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    steps: Sequence[int] | None = None,
) -> None:
    """Raise NonFiniteError at the first non-finite loss: its step, setting, seed and term."""
    for name, values in to_numpy(metrics).items():
        if is_policy_metric(name):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            s, i, *rest = np.argwhere(bad)[0]
            where = int(rest[0]) if rest else 0
            step = int(steps[where]) if steps is not None else where
            raise NonFiniteError(
                f"loss term {name!r} became non-finite ({values[(s, i, *rest)]}) at step {step} "
                f"for setting {s} {dict(settings[s])} seed {seeds[i]}; lower the learning rate or check the data"
            )


def _fmt_setting(setting: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in setting.items()) or "default"


def results_table(
    algo: str,
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    metrics: Mapping[str, Any],
    reference: Mapping[str, float] | None = None,
    columns: Sequence[str] = ("exact_return", "greedy_return", "mean_length"),
) -> str:
    """Mean +- std over seeds of the final value of each column, one row per setting, then references."""
    metrics = to_numpy(metrics)
    columns = [c for c in columns if c in metrics]
    if not columns:  # no env: show the final losses instead
        columns = [k for k in metrics if not is_policy_metric(k)][:3]
    width = max([len(_fmt_setting(s)) for s in settings] + [len(algo) + 12, 24])
    lines = [f"{algo}: final values, mean +- std over {len(seeds)} seed(s)"]
    lines.append(f"{'setting':<{width}}  " + "  ".join(f"{c:>19}" for c in columns))
    for i, setting in enumerate(settings):
        cells = []
        for c in columns:
            final = metrics[c][i, :, -1]
            cells.append(f"{final.mean():>10.4f} +- {final.std():.4f}")
        lines.append(f"{_fmt_setting(setting):<{width}}  " + "  ".join(f"{x:>19}" for x in cells))
    for name, value in (reference or {}).items():
        lines.append(f"{'(' + name + ')':<{width}}  {value:>10.4f}")
    return "\n".join(lines)


def print_results_table(*args: Any, **kwargs: Any) -> None:
    print(results_table(*args, **kwargs), flush=True)


# --------------------------------------------------------------------------------------------------
# Run folder


def default_run_dir(algo: str, name: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{algo}__{name}__{stamp}"


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


def metrics_frame(
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
) -> pl.DataFrame:
    """Long format: one row per (setting, seed, step); columns setting, seed, hparams, step, metrics."""
    metrics = to_numpy(metrics)
    steps = np.asarray(steps)
    n_settings, n_seeds, n_steps = len(settings), len(seeds), len(steps)
    for name, values in metrics.items():
        if values.shape != (n_settings, n_seeds, n_steps):
            raise RunError(f"metric {name!r} has shape {values.shape}; expected {(n_settings, n_seeds, n_steps)}")
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
    algo: str,
    settings: Sequence[Mapping[str, float]],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
    reference: Mapping[str, float] | None = None,
) -> None:
    """Learning curves, mean and min-max band over seeds per setting, reference lines on return panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = to_numpy(metrics)
    names = [n for n in ("exact_return", "greedy_return") if n in metrics]
    names += [n for n in metrics if not is_policy_metric(n)][: max(1, 4 - len(names))]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    steps = np.asarray(steps)
    for ax, name in zip(axes[0], names, strict=True):
        for i, setting in enumerate(settings):
            values = metrics[name][i]  # (n_seeds, n_steps)
            (line,) = ax.plot(steps, values.mean(0), label=_fmt_setting(setting))
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        if name.endswith("_return"):
            for (ref, value), style in zip((reference or {}).items(), (":", "--", "-."), strict=False):
                ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=ref)
        ax.set_title(name)
        ax.set_xlabel("update")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].legend(handles[:12], labels[:12], fontsize=7)
    fig.suptitle(f"{algo}: mean and min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def checkpoint_config(
    *,
    algo: str,
    replay: Replay,
    setting_index: int,
    setting: Mapping[str, float],
    seed: int,
    network: dict[str, Any],
    outputs: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of one policy checkpoint, everything a loader needs to check and use it."""
    meta = replay.meta
    config = {
        "algo": algo,
        "hparams": dict(setting),
        "seed": int(seed),
        "setting": int(setting_index),
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
    config.update(extra or {})
    return config


def finish_run(
    *,
    algo: str,
    args: Any,
    replay: Replay,
    settings: Sequence[Mapping[str, float]],
    seeds: Sequence[int],
    steps: Sequence[int],
    metrics: Mapping[str, Any],
    export: Callable[[int, int], tuple[dict[str, np.ndarray], dict[str, Any]]],
    outputs: str,
    timing: Mapping[str, float],
    n_updates: int,
    reference: Mapping[str, float] | None = None,
    run_dir: str | Path | None = None,
    name: str = "default",
    overwrite: bool = False,
    extra_summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write the run folder atomically and return its path.

    `export(setting_index, seed_index)` returns (tensors, network) of that policy, as
    `cleansepsis.checkpoint.save_checkpoint` takes them. `n_updates` is the number of updates per policy."""
    if outputs not in ("q_values", "logits"):
        raise RunError(f"outputs must be 'q_values' or 'logits', got {outputs!r}")
    path = Path(run_dir) if run_dir is not None else default_run_dir(algo, name)
    metrics = to_numpy(metrics)
    frame = metrics_frame(settings, seeds, steps, metrics)  # also checks shapes before anything is written
    train_seconds = float(timing["train_seconds"])
    n_policies = len(settings) * len(seeds)
    runs = []
    with atomic_dir(path, overwrite=overwrite) as tmp:
        for s, setting in enumerate(settings):
            for i, seed in enumerate(seeds):
                finals = {k: float(v[s, i, -1]) for k, v in metrics.items()}
                ckpt_rel = f"checkpoints/s{s}_seed{seed}"
                tensors, network = export(s, i)
                known = {k: finals[k] for k in POLICY_METRICS if k in finals}
                config = checkpoint_config(
                    algo=algo, replay=replay, setting_index=s, setting=setting, seed=seed,
                    network=network, outputs=outputs, extra=known,
                )
                save_checkpoint(tmp / ckpt_rel, tensors, config)
                runs.append({
                    "setting": s,
                    "seed": int(seed),
                    "hparams": dict(setting),
                    "final": finals,
                    **known,
                    "checkpoint": ckpt_rel,
                })
        frame.write_parquet(tmp / "metrics.parquet")
        plot_curves(tmp / "curves.png", algo, settings, steps, metrics, reference)
        summary = {
            "algo": algo,
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
            "runs": runs,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra_summary or {}),
        }
        write_json(tmp / "summary.json", summary)
    return path
