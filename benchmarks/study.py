"""The studies of the CQL seed paper on ICU-Sepsis, as one command writing a report folder.

    uv run python benchmarks/study.py                  # the full study (about 60 minutes on 2 idle cores)
    uv run python benchmarks/study.py --quick          # a smoke test of every part, tiny budgets

Parts (the time of each is printed and recorded):

1. Data efficiency. For each budget of clinician episodes (`--sizes`, default 1k, 3k, 10k, 30k, 100k),
   80% train and 20% are kept for selection. BC (bc.py), CQL (cql.py, alpha `--cql-alpha`), offline
   Double DQN (cql.py with alpha 0: its loss is then the Double DQN TD loss alone) and IQL (iql.py) train
   `--seeds` seeds each, keeping checkpoints along training. Per learner, size and seed: the exact return
   of the final checkpoint, of the best checkpoint (oracle: chosen with the true MDP) and of the one FQE
   selects on the held-out episodes (highest estimate). One figure with bands over seeds.
2. Sweeps at `--sweep-sizes` (default 10k and 100k): cql.py's alpha and iql.py's tau x beta grid, the exact
   return beside the FQE estimate of each setting's final policy, and the best and FQE-selected checkpoint.
3. Safety of the FQE-selected policies at the sweep sizes: agreement with the clinicians, inadmissible
   rate, support mass and low-support share under the clinicians' policy, Festor et al. hazards (not
   computable on ICU-Sepsis: its states carry no MAP, CVP or fluid balance; said in the table), and 5 x 5
   action heatmaps beside the clinicians'.

Learners train through their own command lines (flags read off their --help; in process with --quick),
full batch for cql and iql. Run folders are reused when present, so an interrupted study resumes.
Writes study.md, study.json, data_efficiency.png and actions_<size>.png into `--out`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import REPO, train_learner

from cleansepsis import env, plots, safety, select
from cleansepsis.icu_replay import make_clinician_replay
from cleansepsis.io import atomic_file, write_json
from cleansepsis.policy import load_policy
from cleansepsis.replay import load_replay, write_replay

LEARNERS = ("BC", "CQL", "DDQN", "IQL")


@dataclass(frozen=True)
class Args:
    sizes: tuple[int, ...] = (1_000, 3_000, 10_000, 30_000, 100_000)
    """Budgets of clinician episodes (80% train, 20% selection)."""
    seeds: int = 5
    """Seeds per learner and size."""
    sweep_sizes: tuple[int, ...] = (10_000, 100_000)
    """Sizes of the CQL alpha and IQL tau x beta sweeps and of the safety table."""
    val_frac: float = 0.2
    cql_alpha: float = 0.005
    """CQL weight of the data-efficiency study (0 is offline Double DQN)."""
    cql_sweep: tuple[float, ...] = (0.0, 0.001, 0.005, 0.02, 0.05, 0.1)
    cql_updates: int = 2_000
    cql_save_every: int = 250
    cql_learning_rate: float = 3e-3
    iql_tau: float = 0.9
    iql_beta: float = 30.0
    iql_sweep_tau: tuple[float, ...] = (0.7, 0.9, 0.99)
    iql_sweep_beta: tuple[float, ...] = (3.0, 10.0, 30.0)
    iql_sweep_seeds: int = 1
    iql_updates: int = 4_000
    iql_save_every: int = 500
    iql_learning_rate: float = 3e-3
    bc_updates: int = 2_000
    bc_save_every: int = 500
    hidden: int = 128
    n_boot: int = 50
    """Bootstrap resamples for the WIS/WDR intervals (FQE selects by its estimate here)."""
    replay_seed: int = 0
    learners_dir: Path = REPO
    out: Path = REPO / "runs" / "study"
    quick: bool = False
    """Smoke test: two tiny sizes, 2 seeds, a few updates, learners in process."""


def quick_args(args: Args) -> Args:
    """One tiny size that is also the sweep size, 2 seeds, two checkpoints per policy, small networks; the
    IQL sweep holds the study's IQL setting and has as many seeds, so it doubles as the IQL run."""
    return replace(
        args, sizes=(300,), seeds=2, sweep_sizes=(300,), cql_sweep=(0.0, 0.005), cql_updates=20, cql_save_every=10,
        iql_sweep_tau=(0.9,), iql_sweep_beta=(3.0, 30.0), iql_sweep_seeds=2, iql_updates=20, iql_save_every=10,
        bc_updates=20, bc_save_every=10, hidden=16, n_boot=10,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Training and scoring one size


def make_replay(args: Args, n: int, out: Path) -> Path:
    path = out / f"replay_{n}.parquet"
    if not path.is_file():
        frame, meta = make_clinician_replay(n, args.replay_seed, val_frac=args.val_frac)
        write_replay(path, frame, meta)
    return path


def train_size(args: Args, n: int, replay: Path, out: Path, log) -> dict[str, list[Path]]:
    """The run folders of one size: bc, cql (alpha 0 and the study's alpha, or the sweep), iql (+ sweep)."""
    common = {"num_seeds": args.seeds, "in_process": args.quick, "log": log, "hidden": args.hidden}
    sweep = n in args.sweep_sizes
    alphas = args.cql_sweep if sweep else (0.0, args.cql_alpha)
    folders = {
        "bc": train_learner("bc", args.learners_dir, replay, out / f"n{n}_bc", [], updates=args.bc_updates,
                            save_every=args.bc_save_every, **common),
        "cql": train_learner("cql", args.learners_dir, replay, out / f"n{n}_cql",
                             ["--alpha", *map(str, alphas), "--learning-rate", str(args.cql_learning_rate)],
                             updates=args.cql_updates, save_every=args.cql_save_every, **common),
    }  # fmt: skip
    # the IQL sweep doubles as the IQL run when it holds the study's setting with as many seeds
    reuse = sweep and args.iql_sweep_seeds == args.seeds and args.iql_tau in args.iql_sweep_tau and (
        args.iql_beta in args.iql_sweep_beta)  # fmt: skip
    if not reuse:
        folders["iql"] = train_learner(
            "iql", args.learners_dir, replay, out / f"n{n}_iql",
            ["--tau", str(args.iql_tau), "--beta", str(args.iql_beta), "--learning-rate", str(args.iql_learning_rate)],
            updates=args.iql_updates, save_every=args.iql_save_every, **common,
        )  # fmt: skip
    if sweep:
        folders["iql_sweep"] = train_learner(
            "iql", args.learners_dir, replay, out / f"n{n}_iql_sweep",
            ["--tau", *map(str, args.iql_sweep_tau), "--beta", *map(str, args.iql_sweep_beta), "--learning-rate",
             str(args.iql_learning_rate)], updates=args.iql_updates, save_every=args.iql_save_every,
            **{**common, "num_seeds": args.iql_sweep_seeds},
        )  # fmt: skip
        if reuse:
            folders["iql"] = folders["iql_sweep"]
    return folders


def score(args: Args, folders: list[Path], replay: Path, act: str, log) -> list[dict[str, Any]]:
    """Every candidate of the folders with its FQE/WDR/WIS estimates and exact return."""
    sel_args = select.Args(run_dirs=tuple(folders), replay=replay, split="val", act=act, n_boot=args.n_boot,
                           fqe_interval_top=0, shortlist=1, fqe_boot=0)  # fmt: skip
    scored = select.score_candidates(sel_args, log)
    rows = []
    for i, c in enumerate(scored.candidates):
        rows.append({
            "name": c.name, "path": str(c.path), "algo": c.algo, "hparams": c.hparams, "seed": c.seed,
            "updates": c.updates, "exact": float(scored.exact[i]),
            **{m: float(scored.scores.estimate[m][i]) for m in ("fqe", "wdr", "wis")},
        })  # fmt: skip
    return rows


def _pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final (most updates), oracle-best and FQE-selected rows of one group of checkpoints."""
    final = max(rows, key=lambda r: (r["updates"] or 0))
    best = max(rows, key=lambda r: r["exact"])
    chosen = max(rows, key=lambda r: (np.nan_to_num(r["fqe"], nan=-np.inf), -(r["updates"] or 0)))
    return {"final": final["exact"], "oracle": best["exact"], "selected": chosen["exact"],
            "selected_path": chosen["path"], "selected_updates": chosen["updates"],
            "selected_fqe": chosen["fqe"], "final_fqe": final["fqe"]}  # fmt: skip


def learner_rows(rows: list[dict[str, Any]], learner: str, args: Args) -> list[dict[str, Any]]:
    algo = {"BC": "bc", "CQL": "cql", "DDQN": "cql", "IQL": "iql"}[learner]
    rows = [r for r in rows if r["algo"] == algo]
    if learner == "CQL":
        rows = [r for r in rows if np.isclose(r["hparams"].get("alpha", -1), args.cql_alpha)]
    if learner == "DDQN":
        rows = [r for r in rows if np.isclose(r["hparams"].get("alpha", -1), 0.0)]
    if learner == "IQL":
        rows = [r for r in rows if np.isclose(r["hparams"].get("tau", -1), args.iql_tau)
                and np.isclose(r["hparams"].get("beta", -1), args.iql_beta)]  # fmt: skip
    return rows


def cells(rows: list[dict[str, Any]], learner: str, args: Args) -> dict[str, Any]:
    """Per seed: final, oracle-best and FQE-selected exact return; mean, min and max over seeds."""
    mine = learner_rows(rows, learner, args)
    per_seed = {}
    for seed in sorted({r["seed"] for r in mine}):
        per_seed[int(seed)] = _pick([r for r in mine if r["seed"] == seed])
    out: dict[str, Any] = {"per_seed": per_seed, "n_candidates": len(mine)}
    for k in ("final", "oracle", "selected"):
        values = np.array([v[k] for v in per_seed.values()])
        out[k] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    return out


def sweep_table(rows: list[dict[str, Any]], algo: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per setting: final exact and FQE (mean over seeds), oracle-best and FQE-selected checkpoint."""
    mine = [r for r in rows if r["algo"] == algo]
    settings = sorted({tuple(r["hparams"].get(k) for k in keys) for r in mine})
    table = []
    for setting in settings:
        group = [r for r in mine if tuple(r["hparams"].get(k) for k in keys) == setting]
        picks = [_pick([r for r in group if r["seed"] == s]) for s in sorted({r["seed"] for r in group})]
        table.append({
            "setting": dict(zip(keys, setting, strict=True)), "n_seeds": len(picks),
            **{k: float(np.mean([p[k] for p in picks])) for k in ("final", "final_fqe", "oracle", "selected")},
        })  # fmt: skip
    return table


# ----------------------------------------------------------------------------------------------
# Safety


def safety_rows(args: Args, picks: dict[str, dict[str, Any]], replay_path: Path, n: int, out: Path) -> list[dict]:
    """Safety measures of each learner's FQE-selected policy (first seed) on the selection episodes, and
    the action heatmaps beside the clinicians'."""
    replay = load_replay(replay_path)
    data = replay.split("val")
    params = env.load_params()
    clinician = np.asarray(env.clinician_policy(params), np.float64)
    states = np.asarray(data.state_index)
    behaviour = clinician[states]
    mask = np.asarray(data.action_mask)
    logged = np.asarray(data.action)
    obs = np.asarray(data.obs)
    panels = {"clinicians (logged)": np.asarray(safety.dose_distributions(behaviour, logged)["clinicians"]
                                                ["joint_fluid_by_vaso"])}  # fmt: skip
    table = []
    for learner, cell in picks.items():
        first_seed = min(cell["per_seed"])
        path = cell["per_seed"][first_seed]["selected_path"]
        policy = load_policy(path, replay)
        probs = select.act_probs(policy, obs, mask, "policy" if learner == "BC" else "greedy").astype(np.float64)
        support = safety.support(probs, behaviour)
        agreement = safety.agreement(probs.argmax(1), logged)
        table.append({
            "learner": learner, "checkpoint": str(Path(path).relative_to(out)), "agreement": agreement["action"],
            "agreement_vaso": agreement["vaso_level"], "agreement_fluid": agreement["fluid_level"],
            "inadmissible_rate": safety.inadmissible_rate(probs, mask), "support_mass": support["support_mass"],
            "low_support_rate": support["low_support_rate"], "low_support_threshold": support["threshold"],
            "hazards": "not computable on ICU-Sepsis (no MAP, CVP or fluid balance in its states)",
        })  # fmt: skip
        panels[f"{learner} (FQE-selected)"] = np.asarray(
            safety.dose_distributions(probs, logged)["policy"]["joint_fluid_by_vaso"])
    plots.action_heatmaps(out / f"actions_{n}.png", panels,
                          title=f"{n} episodes: actions on the selection episodes, % of states")  # fmt: skip
    return table


# ----------------------------------------------------------------------------------------------
# Report


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in result["data_efficiency"])
    fig, axes = plt.subplots(1, len(LEARNERS), figsize=(4.2 * len(LEARNERS), 3.8), sharey=True, squeeze=False)
    for ax, learner in zip(axes[0], LEARNERS, strict=True):
        for k, style, color in (("oracle", "-", "C0"), ("selected", "--", "C1"), ("final", ":", "C2")):
            cell = [result["data_efficiency"][str(n)][learner][k] for n in sizes]
            mean = [c["mean"] for c in cell]
            ax.plot(sizes, mean, style, color=color, marker="o", ms=3,
                    label={"oracle": "best checkpoint (oracle)", "selected": "FQE-selected", "final": "final"}[k])  # fmt: skip
            ax.fill_between(sizes, [c["min"] for c in cell], [c["max"] for c in cell], color=color, alpha=0.15)
        for name, value in result["reference"].items():
            ax.axhline(value, color="gray", lw=0.8, ls="-." if name == "optimal" else ":")
        ax.set_xscale("log")
        ax.set_title(learner)
        ax.set_xlabel("clinician episodes (80% train)")
    axes[0][0].set_ylabel("exact return (band: min-max over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Data efficiency on ICU-Sepsis (gray: clinician and optimal)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = ["# ICU-Sepsis studies (CQL seed paper)", "",
             f"Command: `{result['command']}`. Exact returns are the true values of each policy on the ICU-Sepsis "
             "MDP (linear solve). Each size keeps 20% of its episodes for selection; FQE selects by its estimate "
             "on them. Oracle = the best checkpoint by exact return (not a method).", "",
             "## Wall time per part", "", "| part | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.0f} |" for k, v in result["seconds"].items()]
    lines += ["", f"Load average at start {result['load_average'][0]:.1f}, at end {result['load_average_end'][0]:.1f} "
              "(2 cores).", "", "## Data efficiency (exact return, mean [min, max] over seeds)", "",
              "| episodes | learner | final | FQE-selected | oracle best | candidates |", "|---|---|---|---|---|---|"]  # fmt: skip
    for n, by_learner in result["data_efficiency"].items():
        for learner, c in by_learner.items():
            cell = [f"{c[k]['mean']:.4f} [{c[k]['min']:.4f}, {c[k]['max']:.4f}]" for k in ("final", "selected", "oracle")]
            lines.append(f"| {n} | {learner} | " + " | ".join(cell) + f" | {c['n_candidates']} |")
    for n, sweeps in result["sweeps"].items():
        for name, table in sweeps.items():
            lines += ["", f"## {name} at {n} episodes (mean over seeds)", "",
                      "| setting | final exact | final FQE | FQE-selected exact | oracle best exact |", "|---|---|---|---|---|"]  # fmt: skip
            for row in table:
                setting = ", ".join(f"{k} {v:g}" for k, v in row["setting"].items())
                lines.append(f"| {setting} | {row['final']:.4f} | {row['final_fqe']:.4f} | {row['selected']:.4f} | "
                             f"{row['oracle']:.4f} |")  # fmt: skip
    for n, table in result["safety"].items():
        lines += ["", f"## Safety of the FQE-selected policies at {n} episodes (selection episodes)", "",
                  "| learner | agreement (action / vaso / fluid) | inadmissible | support mass | low-support share | "
                  "Festor hazards |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in table:
            lines.append(f"| {r['learner']} | {100 * r['agreement']:.1f}% / {100 * r['agreement_vaso']:.1f}% / "
                         f"{100 * r['agreement_fluid']:.1f}% | {100 * r['inadmissible_rate']:.2f}% | "
                         f"{r['support_mass']:.3f} | {100 * r['low_support_rate']:.1f}% | {r['hazards']} |")  # fmt: skip
        lines += ["", f"Low support: clinician probability below {table[0]['low_support_threshold']}. "
                  f"Heatmaps: `actions_{n}.png`."]  # fmt: skip
    lines += ["", "Figure: `data_efficiency.png`.", "", f"Settings: {a}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.quick:
        args = quick_args(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(*parts: Any) -> None:
        print(*parts, file=sys.stderr, flush=True)

    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average": os.getloadavg(), "seconds": {}, "data_efficiency": {}, "sweeps": {}, "safety": {},
        "reference": {"clinician": 0.782014, "optimal": 0.875142},
    }  # fmt: skip
    for n in args.sizes:
        t0 = time.perf_counter()
        replay = make_replay(args, n, out)
        folders = train_size(args, n, replay, out, log)
        t1 = time.perf_counter()
        rows = score(args, folders["cql"] + folders["iql"], replay, "greedy", log)
        rows += score(args, folders["bc"], replay, "policy", log)
        by_learner = {learner: cells(rows, learner, args) for learner in LEARNERS}
        result["data_efficiency"][str(n)] = by_learner
        if n in args.sweep_sizes:
            sweep_rows = (rows if folders["iql_sweep"] == folders["iql"]
                          else score(args, folders["iql_sweep"], replay, "greedy", log))  # fmt: skip
            result["sweeps"][str(n)] = {
                "cql.py alpha sweep": sweep_table(rows, "cql", ("alpha",)),
                "iql.py tau x beta grid": sweep_table(sweep_rows, "iql", ("tau", "beta")),
            }
            result["safety"][str(n)] = safety_rows(args, by_learner, replay, n, out)
        t2 = time.perf_counter()
        result["seconds"][f"{n} episodes: train"] = t1 - t0
        result["seconds"][f"{n} episodes: score, select, safety"] = t2 - t1
        log(f"study: {n} episodes done (train {t1 - t0:.0f} s, score {t2 - t1:.0f} s)")
        for learner, c in by_learner.items():
            log(f"  {learner}: final {c['final']['mean']:.4f}, FQE-selected {c['selected']['mean']:.4f}, "
                f"oracle {c['oracle']['mean']:.4f}")  # fmt: skip
    result["seconds"]["total"] = time.perf_counter() - start
    result["load_average_end"] = os.getloadavg()
    figure(result, out / "data_efficiency.png")
    write_json(out / "study.json", result)
    with atomic_file(out / "study.md", overwrite=True) as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
