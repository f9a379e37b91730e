"""Validate the off-policy estimators where the truth is known: ICU-Sepsis clinician replays.

For each dataset seed, roll out `--episodes` clinician episodes, estimate the value of several target
policies with WIS, PDWIS, WDR and FQE (bootstrap 95% intervals over episodes), and compare with the
exact value of the softened target (what importance sampling estimates) from the linear solve.
Prints, per policy and estimator: mean error, RMSE, and the share of datasets whose interval covers
the exact value. Goals: FQE within 0.01; the WIS interval covers the exact value in >= 90% of datasets.
A second table gives every interval's coverage and mean width: the reported one (`ci_low`, `ci_high`;
WDR's refits FQE per resample), the basic bootstrap, for WIS / PDWIS / WDR the delta-method normal,
bootstrap-t and BCa intervals, for WDR the percentile with FQE's Q fixed and refitted, for FQE its
partial-identification interval (`identified`) and the identified set itself (docs/evaluation.md).

    uv run python benchmarks/bench_ope.py --datasets 10 --episodes 10000
    uv run python benchmarks/bench_ope.py --checkpoints runs/cql__x/checkpoints/s0_seed0   # add a policy
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import tyro

from cleansepsis import env, ope
from cleansepsis.icu_replay import make_clinician_replay
from cleansepsis.policy import load_policy
from cleansepsis.replay import frame_to_replay


@dataclass(frozen=True)
class Args:
    datasets: int = 10
    """Dataset seeds (repeated replays)."""
    episodes: int = 10_000
    """Clinician episodes per dataset."""
    n_boot: int = 100
    """Bootstrap resamples of episodes per estimate."""
    epsilon: float = 0.01
    """Softening of each target policy (uniform over admissible actions)."""
    checkpoints: tuple[Path, ...] = ()
    """Policy checkpoint folders (trained on ICU-Sepsis) to add as targets."""
    seed: int = 1000
    """First dataset seed (kept away from the seeds learners train on)."""
    report_every: int = 0
    """Also print the table so far (to stderr) every this many datasets (0: only at the end)."""
    targets: tuple[str, ...] = ()
    """Only these target policies (names as in the table, e.g. "greedy clinician"); default: all."""


def target_policies(params: env.EnvParams, checkpoints: tuple[Path, ...]) -> dict[str, np.ndarray]:
    mask = np.asarray(params.admissible_mask)
    clinician = np.asarray(env.clinician_policy(params, renormalise=True), np.float64)
    optimal = np.asarray(env.optimal_policy(params), np.float64)
    targets = {
        "clinician": clinician,
        "greedy clinician": np.asarray(env.greedy_admissible(clinician, mask), np.float64),
        "optimal/clinician 50:50": 0.5 * optimal + 0.5 * clinician,
        "random admissible": np.asarray(env.random_policy(params, admissible_only=True), np.float64),
    }
    for path in checkpoints:
        policy = load_policy(path, feature_names=list(env.FEATURE_NAMES))
        targets[f"{policy.config.get('algo')} {path.name}"] = np.asarray(
            policy.action_probs(params.state_vectors, mask), np.float64
        )
    return targets


def main() -> None:
    args = tyro.cli(Args)
    params = env.load_params()
    mask = np.asarray(params.admissible_mask)
    targets = target_policies(params, args.checkpoints)
    if args.targets:
        unknown = sorted(set(args.targets) - set(targets))
        if unknown:
            sys.exit(f"error: unknown target policies {unknown}; choose from {sorted(targets)}")
        targets = {name: targets[name] for name in args.targets}
    exact = {}
    for name, table in targets.items():
        soft = ope.soften(table, args.epsilon, mask)
        exact[name] = float(env.policy_evaluation(soft.astype(np.float32), params)[0])
    estimators = ope.ESTIMATORS
    errors = {(p, e): [] for p in targets for e in estimators}
    covered = {(p, e): [] for p in targets for e in estimators}
    covered_basic = {(p, e): [] for p in targets for e in estimators}
    ess = {p: [] for p in targets}
    intervals = {}  # (policy, estimator, interval name) -> list of (low, high)
    start = time.perf_counter()
    for d in range(args.datasets):
        t0 = time.perf_counter()
        frame, meta = make_clinician_replay(args.episodes, seed=args.seed + d)
        data = frame_to_replay(frame, meta, Path(f"<dataset {d}>")).data  # not written: no file needed
        states, next_states = np.asarray(data.state_index), np.asarray(data.next_state_index)
        for name, table in targets.items():
            result = ope.off_policy_evaluation(
                data, table[states], table[next_states], np.asarray(data.behavior_prob),
                gamma=1.0, epsilon=args.epsilon, n_boot=args.n_boot, key=jax.random.key(d), n_states=env.N_STATES,
                action_mask=mask[states], next_action_mask=mask[next_states],
                value_bounds=(0.0, 1.0),  # ICU-Sepsis: reward 1 on survival, 0 otherwise, gamma 1
            )  # fmt: skip
            ess[name].append(result["weights"]["ess"])
            for e in estimators:
                est = result["estimators"][e]
                errors[name, e].append(est["estimate"] - exact[name])
                covered[name, e].append(est["ci_low"] <= exact[name] <= est["ci_high"])
                if "ci_basic" in est:
                    covered_basic[name, e].append(est["ci_basic"][0] <= exact[name] <= est["ci_basic"][1])
                for kind, (low, high) in interval_bounds(est).items():
                    intervals.setdefault((name, e, kind), []).append((low, high))
        print(f"dataset {d + 1}/{args.datasets} (seed {args.seed + d}): {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        if args.report_every and (d + 1) % args.report_every == 0 and d + 1 < args.datasets:
            print(coverage_table(args, d + 1, time.perf_counter() - start, targets, exact, ess, errors, covered,
                                 covered_basic), file=sys.stderr, flush=True)  # fmt: skip
            print(interval_table(targets, exact, intervals), file=sys.stderr, flush=True)
    print(coverage_table(args, args.datasets, time.perf_counter() - start, targets, exact, ess, errors, covered,
                         covered_basic))  # fmt: skip
    print(interval_table(targets, exact, intervals))


# "reported": ci_low / ci_high, the interval each estimator reports (WDR: refit, FQE: fitting interval)
INTERVAL_KEYS = {"reported": None, "percentile, Q fixed": "ci_fixed_model", "basic": "ci_basic",
                 "normal": "ci_normal", "bootstrap-t": "ci_bootstrap_t", "BCa": "ci_bca",
                 "percentile, Q refit": "ci_refit", "bootstrap-t, Q refit": "ci_refit_bootstrap_t",
                 "identified": "ci_identified", "identified set (no sampling)": "identified_set"}  # fmt: skip


def interval_bounds(est: dict) -> dict[str, tuple[float, float]]:
    """Every interval an estimator's result holds, by name."""
    out = {}
    for kind, key in INTERVAL_KEYS.items():
        if key is None:
            out[kind] = (est["ci_low"], est["ci_high"])
        elif est.get(key) is not None:
            out[kind] = (float(est[key][0]), float(est[key][1]))
    return out


def interval_table(targets, exact, intervals) -> str:
    """Coverage and mean width of every interval, per target and estimator (NaN bounds count as a miss)."""
    lines = ["\n| target policy | estimator | interval | coverage | mean width | median width |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in targets:
        for e in ope.ESTIMATORS:
            for kind in INTERVAL_KEYS:
                pairs = np.asarray(intervals.get((name, e, kind), []), np.float64)
                if not pairs.size:
                    continue
                cover = np.mean((pairs[:, 0] <= exact[name]) & (exact[name] <= pairs[:, 1]))
                width = pairs[:, 1] - pairs[:, 0]
                lines.append(f"| {name} | {e.upper()} | {kind} | {100 * cover:.0f}% | "
                             f"{np.nanmean(width):.4f} | {np.nanmedian(width):.4f} |")  # fmt: skip
    return "\n".join(lines)


def coverage_table(args: Args, done: int, seconds: float, targets, exact, ess, errors, covered, covered_basic) -> str:
    lines = [f"\n{done} datasets x {args.episodes} clinician episodes; epsilon {args.epsilon}; "
             f"{args.n_boot} bootstrap resamples; {seconds:.0f} s in all\n",
             "| target policy | exact (softened) | mean ESS | estimator | mean error | RMSE | max abs error | coverage "
             "| coverage (basic bootstrap) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in targets:
        for e in ope.ESTIMATORS:
            err = np.asarray(errors[name, e], np.float64)
            finite = err[np.isfinite(err)]
            rmse = float(np.sqrt(np.mean(finite**2))) if finite.size else float("nan")
            cover = float(np.mean(covered[name, e]))
            basic = f"{100 * np.mean(covered_basic[name, e]):.0f}%" if covered_basic[name, e] else "n/a"
            lines.append(f"| {name} | {exact[name]:.4f} | {np.mean(ess[name]):.0f} | {e.upper()} | "
                         f"{np.mean(finite):+.4f} | {rmse:.4f} | {np.max(np.abs(finite)):.4f} | {100 * cover:.0f}% "
                         f"| {basic} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
