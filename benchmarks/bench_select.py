"""How well does off-policy selection choose among many checkpoints? Measured on ICU-Sepsis, where every
candidate's exact value is known.

One budget of clinician episodes (`--episodes`, default 10,000) is split into training and selection
episodes (`--val-frac`, default 0.2: 8,000 / 2,000). cql.py and iql.py train a grid of settings x seeds on
the training episodes with full-batch updates, keeping a checkpoint every `--save-every` updates (or, with
learners that lack `--save-every`, training once per budget). Every checkpoint is a candidate.
`cleansepsis.select` scores them all on the selection episodes with FQE, WDR, WIS and the two-stage rule,
and the script reports, per method and rule, the selected candidate's exact return, the regret (best exact
return among the candidates minus the selected one's) and the Spearman correlation of the estimates with
the exact values.

With `--folds K` it also cross-fits: the budget is cut into K folds of episodes; the grid trains K times,
each time on all folds but one, and every configuration (algorithm, setting, number of updates) is scored
on the fold it did not see; the configuration with the highest mean estimate over folds and seeds is then
trained on all the episodes and deployed. Regret and Spearman are measured on the configurations trained
on all the episodes.

    uv run python benchmarks/bench_select.py                        # 10k episodes, plain 8k / 2k split
    uv run python benchmarks/bench_select.py --episodes 1000        # a small cohort
    uv run python benchmarks/bench_select.py --folds 5              # also cross-fitted

Outputs go to `--out` (default runs/bench_select_<episodes>): the replays, the learners' run folders
(reused when present), selection.{json,md,png} and bench_select.{json,md}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import tyro

from cleansepsis import select
from cleansepsis.icu_replay import make_clinician_replay
from cleansepsis.io import write_json
from cleansepsis.replay import write_replay

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Args:
    episodes: int = 10_000
    """Clinician episodes in the one data budget."""
    val_frac: float = 0.2
    """Share of the episodes kept for selection in the plain split."""
    seed: int = 0
    """Seed of the clinician replay and of the split."""
    num_seeds: int = 3
    """Seeds per learner setting."""
    cql_alpha: tuple[float, ...] = (0.0, 0.005, 0.02)
    """cql.py settings (full batch, learning rate --cql-learning-rate)."""
    cql_learning_rate: float = 3e-3
    cql_updates: int = 3_000
    cql_save_every: int = 500
    iql_tau: tuple[float, ...] = (0.9, 0.99)
    """iql.py settings (full batch, width 128, beta --iql-beta, cosine learning rate)."""
    iql_beta: float = 30.0
    iql_learning_rate: float = 3e-3
    iql_updates: int = 8_000
    iql_save_every: int = 1_000
    n_boot: int = 100
    """Bootstrap resamples for the intervals."""
    fqe_interval_top: int = 10
    """Candidates with the highest FQE estimates whose FQE interval is refitted per resample."""
    fqe_boot: int = 100
    """Resamples refitted for each FQE interval."""
    shortlist: int = 10
    """Two-stage shortlist (by WIS)."""
    folds: int = 0
    """Cross-fitting folds (0: the plain split only)."""
    learners: tuple[str, ...] = ("cql", "iql")
    """Which learners' grids make the candidates."""
    learners_dir: Path = REPO
    """Folder holding cql.py and iql.py."""
    out: Path | None = None
    """Output folder; default runs/bench_select_<episodes>."""


# ----------------------------------------------------------------------------------------------
# Training the candidates through the learners' command lines


def _help(script: Path) -> str:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=script.parent,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    return done.stdout + done.stderr


_MODULES: dict[Path, Any] = {}


def _module(script: Path) -> Any:
    """The learner script imported as a module (for in-process runs)."""
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_learner_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


def learner_flags(script: Path, in_process: bool) -> set[str]:
    """The command-line flags a learner script accepts."""
    if in_process:
        return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(_module(script).Args)}
    return set(re.findall(r"--[a-z][a-z0-9-]*", _help(script)))


def _run_in_process(script: Path, argv: list[str]) -> None:
    main = _module(script).main
    if inspect.signature(main).parameters:
        main(argv)
        return
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        main()
    finally:
        sys.argv = saved


def train_learner(
    algo: str,
    learners_dir: Path,
    replay: Path,
    run_dir: Path,
    settings: list[str],
    *,
    num_seeds: int,
    updates: int,
    save_every: int,
    hidden: int = 128,
    in_process: bool = False,
    log=print,
) -> list[Path]:
    """Train `{algo}.py` (cql, iql or bc) on the replay's train split with full-batch updates (cql, iql),
    width 128 and a cosine learning rate, keeping a checkpoint every `save_every` updates. Learners without
    `--save-every` train once per budget instead (one run folder each). Existing run folders are reused.
    The flags are read off the learner's --help, so this works before and after the learners' `--save-every`
    and `--num-updates` changes. Returns the run folders."""
    script = learners_dir.resolve() / f"{algo}.py"
    replay, run_dir = replay.resolve(), run_dir.resolve()  # the learner runs in learners_dir
    text = learner_flags(script, in_process)
    flags = ["--replay", str(replay), "--num-seeds", str(num_seeds), "--eval-every", str(save_every), *settings]
    if algo in ("cql", "iql"):
        flags += ["--full-batch"]
        flags += ["--hidden", str(hidden)] if "--depth" in text else ["--hidden", str(hidden), str(hidden)]
    if "--lr-schedule" in text:
        flags += ["--lr-schedule", "cosine"]
    elif algo == "iql":
        flags += ["--lr-decay"]  # cql.py decays by default; bc.py has no schedule
    updates_flag = "--num-updates" if "--num-updates" in text else "--total-updates"
    if "--save-every" in text:
        jobs = [(run_dir, [updates_flag, str(updates), "--save-every", str(save_every)])]
    else:
        jobs = [(run_dir.with_name(f"{run_dir.name}_u{n:07d}"), [updates_flag, str(n)])
                for n in range(save_every, updates + 1, save_every)]  # fmt: skip
    folders = []
    for folder, extra in jobs:
        if not (folder / "summary.json").is_file():
            t0 = time.perf_counter()
            folder.parent.mkdir(parents=True, exist_ok=True)
            if in_process:
                _run_in_process(script, [*flags, *extra, "--run-dir", str(folder)])
                log(f"  trained {folder.name} in {time.perf_counter() - t0:.0f} s (in process)")
                folders.append(folder)
                continue
            cmd = [sys.executable, str(script), *flags, *extra, "--run-dir", str(folder)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=learners_dir,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
            folder.parent.mkdir(parents=True, exist_ok=True)
            (folder.parent / f"{folder.name}.log").write_text(" ".join(cmd) + "\n\n" + done.stdout + done.stderr)
            if done.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            log(f"  trained {folder.name} in {time.perf_counter() - t0:.0f} s")
        folders.append(folder)
    return folders


def train(algo: str, args: Args, replay: Path, run_dir: Path, log) -> list[Path]:
    """The benchmark's grid of one learner."""
    if algo == "cql":
        settings = ["--alpha", *map(str, args.cql_alpha), "--learning-rate", str(args.cql_learning_rate)]
        updates, every = args.cql_updates, args.cql_save_every
    else:
        settings = ["--tau", *map(str, args.iql_tau), "--beta", str(args.iql_beta), "--learning-rate",
                    str(args.iql_learning_rate)]  # fmt: skip
        updates, every = args.iql_updates, args.iql_save_every
    return train_learner(algo, args.learners_dir, replay, run_dir, settings, num_seeds=args.num_seeds,
                         updates=updates, save_every=every, log=log)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Measures


def measures(scored: select.Scored, args: select.Args) -> dict[str, Any]:
    """Per rule and method: selected exact return, regret, top-5 regret, Spearman."""
    out: dict[str, Any] = {"n_candidates": len(scored.candidates), "oracle_best_exact": float(scored.exact.max()),
                           "oracle_best": scored.candidates[int(np.argmax(scored.exact))].name, "rules": {}}  # fmt: skip
    for rule in select.RULES:
        report = select.build_report(replace(args, rule=rule), scored.replay, scored.candidates, scored.scores,
                                     scored.shortlist, scored.exact, scored.exact_soft)  # fmt: skip
        out["rules"][rule] = {
            m: {k: e[k] for k in ("name", "estimate", "ci_low", "ci_high", "exact_return", "regret", "top5_regret",
                                  "spearman", "covers_exact_softened")}
            for m, e in report["methods"].items()
        }  # fmt: skip
    by_algo = {}
    for algo in sorted({str(c.algo) for c in scored.candidates}):
        idx = [i for i, c in enumerate(scored.candidates) if str(c.algo) == algo]
        by_algo[algo] = {"n": len(idx), "best_exact": float(scored.exact[idx].max()),
                         "worst_exact": float(scored.exact[idx].min())}  # fmt: skip
    out["by_algo"] = by_algo
    return out


def plain_split(args: Args, out: Path, log) -> dict[str, Any]:
    replay = out / "replay.parquet"
    if not replay.is_file():
        frame, meta = make_clinician_replay(args.episodes, args.seed, val_frac=args.val_frac)
        write_replay(replay, frame, meta)
    timings = {}
    t0 = time.perf_counter()
    folders = [folder for algo in args.learners for folder in train(algo, args, replay, out / algo, log)]
    timings["train_seconds"] = time.perf_counter() - t0
    sel_args = select.Args(run_dirs=tuple(folders), replay=replay, split="val", n_boot=args.n_boot,
                           fqe_interval_top=args.fqe_interval_top, shortlist=args.shortlist, overwrite=True, out=out,
                           fqe_boot=args.fqe_boot)  # fmt: skip
    t0 = time.perf_counter()
    scored = select.score_candidates(sel_args, log)
    timings["select_seconds"] = time.perf_counter() - t0
    report = select.build_report(sel_args, scored.replay, scored.candidates, scored.scores, scored.shortlist,
                                 scored.exact, scored.exact_soft)  # fmt: skip
    select.write_outputs(report, out, overwrite=True)
    result = measures(scored, sel_args)
    result.update(timings, n_train_episodes=args.episodes - round(args.val_frac * args.episodes),
                  n_selection_episodes=round(args.val_frac * args.episodes))  # fmt: skip
    return result


# ----------------------------------------------------------------------------------------------
# Cross-fitting


def fold_replays(args: Args, out: Path) -> tuple[list[Path], Path]:
    """K replays, fold f as `val` and the other folds as `train`, and one with every episode in `train`."""
    frame, meta = make_clinician_replay(args.episodes, args.seed)
    fold = np.random.default_rng(args.seed + 1).permutation(args.episodes) % args.folds  # fold of each episode
    episode_fold = fold[frame.get_column("episode_id").to_numpy()]
    paths = []
    for f in range(args.folds):
        path = out / f"replay_fold{f}.parquet"
        if not path.is_file():
            split = np.where(episode_fold == f, "val", "train")
            write_replay(path, frame.with_columns(pl.Series("split", split, pl.String)), dict(meta))
        paths.append(path)
    full = out / "replay_all.parquet"
    if not full.is_file():
        write_replay(full, frame, dict(meta))
    return paths, full


def config_key(c: select.Candidate) -> str:
    return json.dumps({"algo": c.algo, "hparams": c.hparams, "updates": c.updates}, sort_keys=True)


def cross_fit(args: Args, out: Path, log) -> dict[str, Any]:
    fold_paths, full = fold_replays(args, out)
    per_config: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for f, path in enumerate(fold_paths):
        folders = [folder for algo in args.learners for folder in train(algo, args, path, out / f"fold{f}_{algo}", log)]
        sel_args = select.Args(run_dirs=tuple(folders), replay=path, split="val", n_boot=args.n_boot,
                               fqe_interval_top=args.fqe_interval_top, shortlist=args.shortlist,
                               fqe_boot=args.fqe_boot)  # fmt: skip
        scored = select.score_candidates(sel_args, log)
        for i, c in enumerate(scored.candidates):
            entry = per_config.setdefault(config_key(c), {m: [] for m in ("fqe", "wdr", "wis")})
            for m in entry:
                entry[m].append(float(scored.scores.estimate[m][i]))
    folders = [folder for algo in args.learners for folder in train(algo, args, full, out / f"all_{algo}", log)]
    deployed = select.list_candidates(folders)
    policies = [select.load_policy(c.path) for c in deployed]
    tables, mask = select.exact_tables(policies, "greedy")
    exact, _ = select.exact_values(tables, mask, 0.01)
    truth: dict[str, list[float]] = {}
    for c, value in zip(deployed, exact, strict=True):
        truth.setdefault(config_key(c), []).append(float(value))
    result = cross_fit_choice(per_config, truth)
    result["seconds"] = time.perf_counter() - t0
    return result


def cross_fit_choice(per_config: dict[str, dict[str, list[float]]], truth: dict[str, list[float]]) -> dict[str, Any]:
    """Per method: the configuration with the highest mean estimate over folds and seeds, and its regret and
    Spearman against the exact returns of the configurations trained on all the episodes (mean over seeds).
    Configurations missing on either side are left out; NaN estimates are ignored in the means."""
    keys = sorted(k for k in per_config if k in truth)
    if not keys:
        raise ValueError("no configuration was both scored on a fold and trained on all the episodes")
    true_mean = np.array([np.mean(truth[k]) for k in keys])
    result: dict[str, Any] = {"n_configs": len(keys), "oracle_best_exact": float(true_mean.max()),
                              "oracle_best": keys[int(np.argmax(true_mean))], "methods": {}}  # fmt: skip
    for m in ("fqe", "wdr", "wis"):
        scores = [np.asarray(per_config[k][m], np.float64) for k in keys]
        est = np.array([s[np.isfinite(s)].mean() if np.isfinite(s).any() else np.nan for s in scores])
        if not np.isfinite(est).any():
            continue
        chosen = int(np.nanargmax(est))
        result["methods"][m] = {"config": keys[chosen], "estimate": float(est[chosen]),
                                "exact_return": float(true_mean[chosen]), "regret": float(true_mean.max() - true_mean[chosen]),
                                "n_estimates": int(np.isfinite(scores[chosen]).sum()),
                                "spearman": select.spearman(est, true_mean)}  # fmt: skip
    return result


# ----------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['n_candidates']} candidates; oracle best exact {result['oracle_best_exact']:.4f} "
             f"({result['oracle_best']})", "",
             "| rule | method | selected exact | regret | top-5 regret | Spearman | selected interval covers exact |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for rule, methods in result["rules"].items():
        for m, e in methods.items():
            lines.append(f"| {rule} | {m} | {e['exact_return']:.4f} | {e['regret']:.4f} | {e['top5_regret']:.4f} | "
                         f"{select._fmt(e['spearman'], 3)} | {e['covers_exact_softened']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = tyro.cli(Args, description=__doc__)
    unknown = sorted(set(args.learners) - {"cql", "iql"}) or (not args.learners and ["(none)"])
    if unknown:
        raise SystemExit(f"error: --learners {' '.join(unknown)}: expected cql and/or iql")
    out = (args.out or REPO / "runs" / f"bench_select_{args.episodes}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(*parts: Any) -> None:
        print(*parts, file=sys.stderr, flush=True)

    load = os.getloadavg()
    start = time.perf_counter()
    result: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "load_average_at_start": load}  # fmt: skip
    result["plain"] = plain_split(args, out, log)
    print(f"## Plain split ({result['plain']['n_train_episodes']} train / {result['plain']['n_selection_episodes']} "
          f"selection episodes)\n\n" + table(result["plain"]), flush=True)  # fmt: skip
    if args.folds > 1:
        result["cross_fit"] = cross_fit(args, out, log)
        print(f"\n## Cross-fitted over {args.folds} folds, deployed after training on all {args.episodes}\n")
        for m, e in result["cross_fit"]["methods"].items():
            print(f"- {m}: exact {e['exact_return']:.4f}, regret {e['regret']:.4f}, Spearman {select._fmt(e['spearman'], 3)}")
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_at_end"] = os.getloadavg()
    write_json(out / "bench_select.json", result)
    print(f"\nwall {result['wall_seconds']:.0f} s; load average {load[0]:.1f} at start, "
          f"{result['load_average_at_end'][0]:.1f} at end; wrote {out / 'bench_select.json'}")


if __name__ == "__main__":
    main()
