"""What every learner script shares and no fork edits: argument checks made before any work, the batch
mode chosen from the data, data loading, hyperparameter grids, the exact evaluation hook, the compiled
sweep over settings x seeds, the finite-loss check and the results table. The run folder (summary.json,
metrics.parquet, curves.png, checkpoints) is written by `cleansepsis.run_folder`.

How an algorithm file uses it (see iql.py for a complete one):

    runs.check_common_args(args)                           # one `error:` line before any work
    run_dir = runs.check_run_dir(args, __file__)           # existing folder / --overwrite refused now
    runs.enable_compilation_cache()                        # a second identical run does not compile again
    replay, train_data, env_params = runs.load_training_data(args.replay, args.split)
    settings, hparams = runs.make_hparam_grid({"tau": args.tau, "beta": args.beta})
    train = make_train(args, train_data, env_params)      # pure train(key, hparams, inputs)
    # inside train, the evaluations and the saved policies come out of one scan:
    #     carry, metrics, saved = runs.scan_evaluations(evaluate, carry, args.num_evals, evals_per_save, snapshot)
    seeds = runs.seed_list(args.seed, args.num_seeds)
    (policy, metrics, saved), timing = runs.run_sweep(train, seeds, hparams, n_ticks=n_evals,
                                                      inputs=(train_data, env_params))
    runs.check_finite(metrics, settings, seeds)            # raises NonFiniteError naming step/seed/term
    runs.print_results_table("iql", settings, seeds, metrics, reference)
    runs.finish_run(algo="iql", script=__file__, ...)      # cleansepsis.run_folder.finish_run

Shapes: `train(key, hparams)` sees one seed and one setting; `run_sweep` vmaps it over seeds (inner axis)
and settings (outer axis), so every array it returns has leading axes (n_settings, n_seeds, ...). Metrics
are dicts of arrays (n_settings, n_seeds, n_evals); `steps` is (n_evals,), the update count at each entry.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import interrupts, sweep
from cleansepsis.io import OutputExistsError
from cleansepsis.replay import (
    SPLITS,
    Replay,
    ReplayError,
    Transitions,
    action_space_of,
    describe_action_space,
    load_replay,
    read_metadata,
)
from cleansepsis.run_folder import (  # noqa: F401  (re-exported: the learners use runs.X)
    POLICY_METRICS,
    RunFolderError,
    default_run_dir,
    finish_run,
    fmt_setting,
    is_policy_metric,
    script_identity,
    script_stem,
)
from cleansepsis.run_folder import check_run_dir as _check_run_dir

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


class RunError(ValueError):
    """A run that cannot go on (bad arguments, unusable data, non-finite losses); the message says why."""


class NonFiniteError(RunError):
    """A loss became NaN or inf; the message names the step, the setting, the seed and the term."""


USER_ERRORS = (RunError, ReplayError, OutputExistsError, RunFolderError, FileNotFoundError)


def cli_main(main: Callable[[], None]) -> None:
    """Run a script's main(), turning the project's errors into `error: ...` on stderr and exit code 1."""
    status = interrupts.run_cli(main, USER_ERRORS)  # Ctrl-C, also when swallowed on the way: status 130
    if status:
        raise SystemExit(status)


# --------------------------------------------------------------------------------------------------
# Arguments checked before any work (loading data, compiling)

# the shared options every learner's Args has, with the same meaning (see docs/learners.md)
COMMON_OPTIONS = (
    "replay", "split", "num_updates", "eval_every", "save_every", "batch_size", "full_batch", "minibatch",
    "learning_rate", "lr_decay", "hidden", "seed", "num_seeds", "run_dir", "run_name", "overwrite",
)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(condition: bool, message: str) -> None:
    """Raise RunError(message) unless condition: the one-line check every learner makes of its arguments."""
    if not condition:
        raise RunError(message)


def check_common_args(args: Any) -> None:
    """The checks of the shared options (whichever of them `args` has), before any data is loaded: every
    bad value gives one RunError naming the option and the value."""
    fields = vars(args) if not hasattr(args, "__dataclass_fields__") else {
        name: getattr(args, name) for name in args.__dataclass_fields__
    }
    for name in ("eval_every", "batch_size", "num_seeds"):
        if name in fields:
            require(fields[name] >= 1, f"{_option(name)} must be at least 1, got {fields[name]}")
    if fields.get("num_updates") is not None:
        n, every = fields["num_updates"], fields["eval_every"]
        require(n >= 1, f"--num-updates must be at least 1, got {n}")
        require(n % every == 0, f"--num-updates {n} is not a multiple of --eval-every {every}: the run logs and "
                                f"evaluates every {every} updates, so use for example --num-updates {-(-n // every) * every}")
    if fields.get("save_every"):
        save, every = fields["save_every"], fields["eval_every"]
        require(save >= 0, f"--save-every must be 0 (only the final policy) or positive, got {save}")
        require(save % every == 0, f"--save-every {save} is not a multiple of --eval-every {every}")
        n = fields.get("num_updates")
        if n is not None:
            require(n % save == 0, f"--num-updates {n} is not a multiple of --save-every {save}")
    elif "save_every" in fields:
        require(fields["save_every"] == 0, f"--save-every must be 0 or positive, got {fields['save_every']}")
    if "learning_rate" in fields and fields["learning_rate"] is not None:
        for value in _as_tuple(fields["learning_rate"]):
            require(math.isfinite(value) and value > 0, f"--learning-rate values must be positive, got {value}")
    if fields.get("hidden") is not None:
        hidden = _as_tuple(fields["hidden"])
        require(len(hidden) >= 1 and min(hidden) >= 1, f"--hidden needs positive widths, got {hidden}")
    if fields.get("full_batch") and fields.get("minibatch"):
        raise RunError("--full-batch and --minibatch exclude each other; give at most one")
    if "split" in fields:
        require(fields["split"] in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got {fields['split']!r}")
    if fields.get("replay") is not None:
        path = Path(fields["replay"])
        if not path.is_file():
            raise FileNotFoundError(f"--replay {path}: no such file")
    if "run_name" in fields:
        name = fields["run_name"]
        require(bool(name) and "/" not in name and os.sep not in name and name not in (".", ".."),
                f"--run-name must be a plain name (no path separators), got {name!r}")


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def check_run_dir(args: Any, script: str | Path) -> Path:
    """The run folder this run will write (--run-dir, or runs/<script>__<run name>__<time>), refused now if
    it exists without --overwrite or if --overwrite would replace a folder that is not a run folder."""
    stem = script_stem(script_identity(script))
    path = Path(args.run_dir) if args.run_dir is not None else default_run_dir(stem, args.run_name)
    return _check_run_dir(path, args.overwrite)


def updates_at_saves(num_updates: int, save_every: int) -> list[int]:
    """Update counts at which --save-every keeps a policy besides the final one."""
    return list(range(save_every, num_updates, save_every)) if save_every else []


# --------------------------------------------------------------------------------------------------
# Defaults chosen from the data

# Full batch when an update over the whole replay costs at most a batch of this many rows...
FULL_BATCH_MAX_ROWS = 20_000
# ...and the replay's observations repeat: at most one distinct (observation, mask) row per 2 transitions
# (ICU-Sepsis: 714 rows for 926,212 transitions, about 450 for 1,100; MIMIC-IV: observations never repeat,
# so rows are transitions plus episodes, and it trains on minibatches).
FULL_BATCH_MAX_ROW_SHARE = 0.5
# ...and the replay comes from an env the full-batch AUTO values were tuned on. On the Oberst-Sontag
# simulator's physician replay (a near-deterministic logging policy) they gave CQL -0.59 and IQL 0.27,
# where the minibatch defaults give 0.51 (docs/mdp.md), so other sources keep minibatches unless asked.
FULL_BATCH_TUNED_ENVS = ("CleanSepsis/ICUSepsis-v0",)


def choose_batch_mode(
    data: Transitions, full_batch: bool, minibatch: bool, env_id: str | None
) -> tuple[Any, bool, str]:
    """(the training data, whether it is the full batch, why) for --full-batch / --minibatch / neither.

    With neither flag the replay's distinct observations decide: full batch when they are few (see the two
    constants above) and the replay's env is one the full-batch defaults were tuned on, the data then being
    `cleansepsis.full_batch.FullBatch`; otherwise minibatches of `Transitions`."""
    from cleansepsis.full_batch import full_batch as make_full_batch
    from cleansepsis.replay import distinct_transitions

    if minibatch:
        return data, False, "--minibatch"
    distinct = distinct_transitions(data)
    rows = int(distinct.obs_table.shape[0])
    if full_batch:
        return make_full_batch(distinct), True, f"--full-batch ({rows} distinct observations, {distinct.size} distinct transitions)"
    few = rows <= FULL_BATCH_MAX_ROWS and rows <= FULL_BATCH_MAX_ROW_SHARE * data.size
    why = (f"{rows} distinct observations in {data.size} transitions: "
           + ("few, so every update uses the whole replay" if few else "too many to repeat, so minibatches"))
    if few and env_id not in FULL_BATCH_TUNED_ENVS:
        few = False
        why += (f"; but the full-batch defaults were tuned on {', '.join(FULL_BATCH_TUNED_ENVS)} only, not on "
                f"{env_id or 'this replay'}, so minibatches (--full-batch to override)")
    return (make_full_batch(distinct) if few else data), few, why


@dataclasses.dataclass(frozen=True)
class BySize:
    """An AUTO table value that depends on how many transitions the training split has: `small` up to
    `up_to` transitions, `large` above (`resolve_defaults` picks one)."""

    small: Any
    large: Any
    up_to: int

    def pick(self, n_transitions: int | None) -> Any:
        if n_transitions is None:
            raise RunError("this learner's AUTO table depends on the replay's size; pass n_transitions")
        return self.small if n_transitions <= self.up_to else self.large


def resolve_defaults(
    args: Any, auto: Mapping[str, Mapping[str, Any]], full_batch: bool, n_transitions: int | None = None
) -> tuple[Any, dict]:
    """`args` with the batch mode set and every option left at None or "auto" replaced by the learner's
    AUTO table entry for that mode (a `BySize` entry by the training split's `n_transitions`); the update
    count is rounded up to a multiple of --eval-every (and --save-every). Returns (resolved args,
    {"batch_mode", "chosen": the values filled in}); summary.json records both, so it says what was
    trained."""
    mode = "full batch" if full_batch else "minibatch"
    changes: dict[str, Any] = {}
    if hasattr(args, "full_batch"):  # learners without a full-batch loss have neither flag
        changes = {"full_batch": full_batch, "minibatch": not full_batch}
    chosen: dict[str, Any] = {}
    for name, value in auto[mode].items():
        if getattr(args, name) is None or getattr(args, name) == "auto":
            changes[name] = chosen[name] = value.pick(n_transitions) if isinstance(value, BySize) else value
    if "num_updates" in chosen:
        step = math.lcm(args.eval_every, args.save_every or args.eval_every)
        changes["num_updates"] = chosen["num_updates"] = -(-chosen["num_updates"] // step) * step
    args = dataclasses.replace(args, **changes)
    check_common_args(args)
    sized = {} if n_transitions is None else {"n_transitions": int(n_transitions)}
    return args, {"batch_mode": mode, **sized, "chosen": chosen}


# --------------------------------------------------------------------------------------------------
# Persistent compilation cache

COMPILATION_CACHE_VARIABLE = "CLEANSEPSIS_COMPILATION_CACHE"


def enable_compilation_cache() -> Path | None:
    """Keep compiled programs in JAX's persistent cache under the project's cache folder
    (`cleansepsis.icu_replay.cache_dir()/jax`), so a second identical run loads its program instead of
    compiling it. `CLEANSEPSIS_COMPILATION_CACHE=PATH` moves it, `=off` turns it off. JAX does not cache a
    program with host callbacks: the learners' programs have none (run_sweep runs them in chunks and
    advances the progress bar between them), and with the cache on `tick` adds none to other programs.
    Returns the folder, or None when off."""
    from cleansepsis.icu_replay import cache_dir

    value = os.environ.get(COMPILATION_CACHE_VARIABLE, "").strip()
    if value.lower() in ("off", "0", "no", "false"):
        sweep._progress["ticks"] = True
        return None
    path = Path(value) if value else cache_dir() / "jax"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    sweep._progress["ticks"] = False
    return path


# --------------------------------------------------------------------------------------------------
# Data


DISCRETE_LEARNERS = "iql.py, cql.py, dqn.py or bc.py"
CONTINUOUS_LEARNER = "iql_continuous.py"


def check_action_kind(replay_path: str | Path, continuous: bool) -> None:
    """Refuse, from the metadata alone (before the rows are read or anything compiled), a replay whose
    actions are not the kind the learner handles: one RunError naming the file and the learner to use."""
    meta = read_metadata(replay_path)
    space = action_space_of(meta)
    if (space.get("kind") == "continuous") != continuous:
        use = CONTINUOUS_LEARNER if space.get("kind") == "continuous" else DISCRETE_LEARNERS
        raise RunError(f"{replay_path} has {describe_action_space(space)}; use {use}")


def load_training_data(
    replay_path: str | Path | None, split: str = "train", continuous: bool = False
) -> tuple[Replay, Transitions, Any]:
    """(replay, the transitions of `split`, env params or None).

    With no path, the built-in ICU-Sepsis clinician replay (10,000 episodes, seed 0), built on first use.
    Env params are loaded when the replay comes from an MDP whose dynamics are known (ICU-Sepsis, the
    sepsis simulator, a cohort MDP), so that policies are evaluated exactly. `continuous`: the learner
    takes continuous actions; a replay of the other kind is refused before its rows are read. Continuous
    replays get no env params here (the vancomycin simulator is evaluated by simulation, not exactly)."""
    if replay_path is None:
        from cleansepsis.icu_replay import default_replay_path

        replay_path = default_replay_path()
    check_action_kind(replay_path, continuous)
    replay = load_replay(replay_path)
    data = replay.split(split)
    if continuous:
        return replay, data, None
    from cleansepsis import mdp

    env_params = mdp.params_for_replay(replay.meta)  # None where the dynamics are unknown (MIMIC-IV)
    if env_params is not None:
        n_actions = env_params.admissible_mask.shape[1]
        if replay.obs_dim != env_params.state_vectors.shape[1] or replay.n_actions != n_actions:
            raise RunError(
                f"{replay.path}: env {replay.meta.get('env_id') or replay.meta.get('source')} has obs_dim "
                f"{env_params.state_vectors.shape[1]} / n_actions {n_actions}, but the replay has "
                f"{replay.obs_dim} / {replay.n_actions}"
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


def learning_rate_at(peak: jnp.ndarray, count: jnp.ndarray, num_updates: int, schedule: str) -> jnp.ndarray:
    """The learning rate after `count` updates: "cosine" from the (traced) peak to zero over num_updates,
    or "constant"."""
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count, num_updates) / num_updates))
    if schedule == "constant":
        return peak * jnp.ones_like(count, jnp.float32)
    raise RunError(f"--lr-schedule must be cosine or constant after defaults are chosen, got {schedule!r}")


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
    return jax.tree.map(lambda x: sweep.on_host(x, lambda a: a[setting, seed_index]) if hasattr(x, "shape") else x, tree)


def scan_evaluations(
    evaluate: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    num_evals: int,
    evals_per_save: int,
    snapshot: Callable[[Any], Any],
) -> tuple[Any, Any, Any]:
    """`jax.lax.scan(evaluate, carry, None, num_evals)` -> (carry, metrics (num_evals, ...), saved), where
    with evals_per_save > 0 `saved` stacks snapshot(carry) after every evals_per_save evaluations except
    the last (that one is the final policy): (num_evals // evals_per_save - 1, ...). None without saves.

    Inside run_sweep this is where the program is cut into chunks of evaluations (`sweep.run_sweep`), so
    train must return these metrics and saved policies as they come: `(final, metrics, saved)`."""
    chunked = sweep.chunked_scan_evaluations(evaluate, carry, num_evals, evals_per_save, snapshot)
    if chunked is not None:
        return chunked
    if not evals_per_save or evals_per_save >= num_evals:
        carry, metrics = jax.lax.scan(evaluate, carry, None, length=num_evals)
        return carry, metrics, None

    def period(carry, _):
        carry, metrics = jax.lax.scan(evaluate, carry, None, length=evals_per_save)
        return carry, (metrics, snapshot(carry))

    carry, (metrics, saved) = jax.lax.scan(period, carry, None, length=num_evals // evals_per_save)
    metrics = jax.tree.map(lambda x: x.reshape(num_evals, *x.shape[2:]), metrics)
    return carry, metrics, jax.tree.map(lambda x: x[:-1], saved)


def policy_at(final: Any, saved: Any, setting: int, seed_index: int, save_index: int | None) -> Any:
    """One policy returned by run_sweep: the final one (save_index None) or the save_index-th saved one."""
    if save_index is None:
        return index_run(final, setting, seed_index)
    return jax.tree.map(lambda x: sweep.on_host(x, lambda a: a[setting, seed_index, save_index]), saved)


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
    width = max([len(fmt_setting(s)) for s in settings] + [len(algo) + 12, 24])
    lines = [f"{algo}: final values, mean +- std over {len(seeds)} seed(s)"]
    lines.append(f"{'setting':<{width}}  " + "  ".join(f"{c:>19}" for c in columns))
    for i, setting in enumerate(settings):
        cells = []
        for c in columns:
            final = metrics[c][i, :, -1]
            cells.append(f"{final.mean():>10.4f} +- {final.std():.4f}")
        lines.append(f"{fmt_setting(setting):<{width}}  " + "  ".join(f"{x:>19}" for x in cells))
    for name, value in (reference or {}).items():
        lines.append(f"{'(' + name + ')':<{width}}  {value:>10.4f}")
    return "\n".join(lines)


def print_results_table(*args: Any, **kwargs: Any) -> None:
    print(results_table(*args, **kwargs), flush=True)


def print_plan(title: str, args: Any, defaults: Mapping[str, Any], why: str) -> None:
    """One line on stderr: what will be trained, and which values the batch mode chose."""
    chosen = ", ".join(f"{_option(k)} {' '.join(map(str, _as_tuple(v)))}" for k, v in defaults["chosen"].items())
    print(f"{title}: {defaults['batch_mode']} ({why}); {args.num_updates} updates per policy"
          + (f"; defaults chosen: {chosen}" if chosen else ""), file=sys.stderr, flush=True)


def print_timing(timing: Mapping[str, float], path: Path) -> None:
    print(f"compile {timing['compile_seconds']:.1f} s, train {timing['train_seconds']:.1f} s; wrote {path}",
          file=sys.stderr, flush=True)
