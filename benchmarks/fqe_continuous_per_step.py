"""Where continuous FQE loses a target's value: its Q along the TARGET's own trajectories against their returns.

A diagnostic on the vancomycin simulator, not part of the package. Fit continuous FQE for one checkpoint on
one logged replay of clinician episodes (as `bench_fqe_continuous.py` does, with the same keys), keep every
fit (the estimate and its refits), then roll out the target itself (`--rollout-patients`, with the hidden
state) and compare, step by step, the fits' mean Q(h_t, pi(h_t)) with the Monte Carlo return-to-go G_t.
Since Q is 0 after the last step,

    E_pi[Q(h_0, pi)] - E_pi[G_0] = sum_t E_pi[Q(h_t, pi) - r_t - Q(h_t+1, pi)],

so the per-step on-policy Bellman residuals add up to FQE's error and say at which step it is lost (the
last step's residual is a pure regression of the reward on (history, dose), no bootstrapping).

With `--dose-curve` it also checks the dose response: at steps 0, 3 and 6 of fresh target trajectories,
the mean Q(h_t, f * pi(h_t)) for f in `--factors` against the MC value of giving f * pi(h_t) once and
following the target after (from the same patients; a flatter Q than the truth is a Q that does not resolve
the dose's effect).

    uv run python benchmarks/fqe_continuous_per_step.py --checkpoint runs/iql/checkpoints/s0_seed0 --seed 5
    uv run python benchmarks/fqe_continuous_per_step.py --checkpoint ... --seed 5 --dose-encoding standardised
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fqe_continuous as B

from cleansepsis import ope
from cleansepsis import ope_continuous as oc
from cleansepsis import vancomycin as V

DEFAULT_FQE = oc.ContinuousFQEConfig()


@dataclass(frozen=True)
class Args:
    checkpoint: Path
    """A continuous-policy checkpoint folder (iql_continuous.py or its BC), evaluated acting by its mean."""
    seed: int = 5
    """Seed of the logged replay (as the bench's --seeds)."""
    episodes: int = 10_000
    """Logged clinician episodes."""
    refits: int = 3
    """FQE refits on episode resamples besides the estimate (all are kept and averaged)."""
    hidden: int = DEFAULT_FQE.hidden
    fqe_iterations: int = DEFAULT_FQE.n_iterations
    fqe_steps: int = DEFAULT_FQE.steps_per_iteration
    batch_size: int = DEFAULT_FQE.batch_size
    learning_rate: float = DEFAULT_FQE.learning_rate
    dose_encoding: str = DEFAULT_FQE.dose_encoding
    history_lags: int = DEFAULT_FQE.history_lags
    rollout_patients: int = 20_000
    """Target trajectories for the per-step comparison."""
    dose_curve: bool = True
    """Also compare Q with the truth at scaled doses (steps 0, 3, 6)."""
    curve_patients: int = 4_000
    curve_repeats: int = 4
    """The dose curve's patients: `curve_patients` keys, each folded with 0..curve_repeats-1."""
    factors: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)
    out: Path | None = None
    """Also write the result as JSON here."""


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__)
    started = time.time()
    params = V.VancoParams()
    config = oc.ContinuousFQEConfig(hidden=args.hidden, n_iterations=args.fqe_iterations,
                                    steps_per_iteration=args.fqe_steps, batch_size=args.batch_size,
                                    learning_rate=args.learning_rate, dose_encoding=args.dose_encoding,
                                    history_lags=args.history_lags)  # fmt: skip
    data, _ = B.logged_data(B.Args(episodes=args.episodes), args.seed, params)
    target, acting, sim_policy = B.checkpoint_targets((args.checkpoint,))[0]

    # the fit as continuous_off_policy_evaluation makes it (the same keys as the bench's first target; 200
    # resamples, as the bench's n_boot: the refits use their first rows)
    problem = oc.prepare_continuous_fqe(data, B.on_observation(target), low=0.0, high=V.DOSE_MAX_MG, acting=acting,
                                        n_action_samples=4, n_boot=max(args.refits, 200),
                                        key=jax.random.key(args.seed * 1_000 + 2), config=config)  # fmt: skip
    t0 = time.time()
    fit, networks = oc.continuous_fqe_estimate(problem.fqe_data, 1.0, problem.fqe_key, problem.counts, config,
                                               n_refits=args.refits, progress="FQE fits")  # fmt: skip
    values = [fit["estimate"], *fit["refit_estimates"]]
    fit_seconds = time.time() - t0
    scaling = problem.scaling

    def mean_q(history: np.ndarray, doses: np.ndarray) -> np.ndarray:
        return np.mean([oc.q_values(n, scaling, history, doses[:, None])[:, 0] for n in networks], 0)

    # the target's own trajectories
    records = jax.tree.map(
        np.asarray, V.rollout_jit(jax.random.key(777), params, sim_policy, args.rollout_patients)
    )
    patients, steps = records["reward"].shape
    rollout = B.rollout_transitions(records)
    history, _ = oc.history_features(np.asarray(rollout.obs), np.asarray(rollout.action), np.asarray(rollout.next_obs),
                                     ope.episode_layout(rollout.episode_id, rollout.t), config.history_lags)  # fmt: skip
    q = mean_q(history, np.asarray(rollout.action)).reshape(patients, steps)
    returns_to_go = np.cumsum(records["reward"][:, ::-1], 1)[:, ::-1]
    q_after = np.concatenate([q[:, 1:], np.zeros((patients, 1))], 1)
    residual = q - records["reward"] - q_after
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "fqe_values": values,
        "fit_seconds": fit_seconds,
        "target_mc_value": float(returns_to_go[:, 0].mean()),
        "target_mc_se": float(returns_to_go[:, 0].std(ddof=1) / np.sqrt(patients)),
        "per_step": [{"t": t, "q": float(q[:, t].mean()), "return_to_go": float(returns_to_go[:, t].mean()),
                      "q_minus_return": float((q[:, t] - returns_to_go[:, t]).mean()),
                      "bellman_residual": float(residual[:, t].mean()),
                      "bellman_residual_se": float(residual[:, t].std(ddof=1) / np.sqrt(patients))}
                     for t in range(steps)],
    }  # fmt: skip
    if args.dose_curve:
        result["dose_curve"] = dose_curve(args, params, sim_policy, mean_q, config.history_lags)
    result["seconds"] = time.time() - started
    print(report(result))
    if args.out is not None:
        from cleansepsis.io import write_json

        write_json(args.out, result, overwrite=True)
    return 0


def dose_curve(args: Args, params: V.VancoParams, sim_policy, mean_q, lags: int) -> list[dict]:
    """At steps 0, 3, 6: mean Q(h_t, f pi(h_t)) and the MC value of f pi(h_t) once, then the target."""

    def patient(key, factor, deviation_step):
        k_reset, k_run = jax.random.split(key)
        obs, state = V.reset(k_reset, params)

        def body(carry, xs):
            obs, state = carry
            k_step, t = xs
            k_act, k_env = jax.random.split(k_step)
            dose = sim_policy(k_act, obs, state, params)[0]
            dose = jnp.clip(jnp.where(t == deviation_step, dose * factor, dose), 0.0, V.DOSE_MAX_MG)
            next_obs, next_state, reward, _, _ = V.step(k_env, state, dose, params)
            return (next_obs, next_state), (obs, dose, reward, next_obs)

        xs = (jax.random.split(k_run, V.N_DECISIONS), jnp.arange(V.N_DECISIONS))
        return jax.lax.scan(body, (obs, state), xs)[1]

    run = jax.jit(jax.vmap(patient, in_axes=(0, None, None)))
    base = jax.random.split(jax.random.key(4242), args.curve_patients)
    keys = jnp.concatenate(
        [jax.vmap(lambda k, r=r: jax.random.fold_in(k, r))(base) for r in range(args.curve_repeats)]
    )
    n, steps = args.curve_patients * args.curve_repeats, V.N_DECISIONS
    layout = ope.episode_layout(np.repeat(np.arange(n), steps), np.tile(np.arange(steps), n))
    rows = []
    for deviation_step in (0, 3, 6):
        row = {"t": deviation_step}
        for factor in args.factors:
            obs, dose, reward, next_obs = (np.asarray(x) for x in run(keys, factor, deviation_step))
            flat = [x.reshape(n * steps, *x.shape[2:]) for x in (obs, dose, next_obs)]
            history = oc.history_features(flat[0], flat[1], flat[2], layout, lags)[0].reshape(n, steps, -1)
            value = reward[:, deviation_step:].sum(1)
            row[f"{factor:g}"] = {"q": float(mean_q(history[:, deviation_step], dose[:, deviation_step]).mean()),
                                  "mc": float(value.mean()), "mc_se": float(value.std(ddof=1) / np.sqrt(n))}  # fmt: skip
        rows.append(row)
    return rows


def report(result: dict) -> str:
    values = result["fqe_values"]
    lines = [f"FQE fits {', '.join(f'{v:.3f}' for v in values)} (mean {np.mean(values):.3f}; {result['fit_seconds']:.0f} s); "
             f"the target's MC value on its rollouts {result['target_mc_value']:.3f} +- {result['target_mc_se']:.3f}",
             "", "| step | mean Q(h_t, pi) | return-to-go | Q - return | Bellman residual +- SE |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["per_step"]:
        lines.append(f"| {r['t']} | {r['q']:.3f} | {r['return_to_go']:.3f} | {r['q_minus_return']:+.3f} | "
                     f"{r['bellman_residual']:+.4f} +- {r['bellman_residual_se']:.4f} |")  # fmt: skip
    if "dose_curve" in result:
        factors = [k for k in result["dose_curve"][0] if k != "t"]
        lines += ["", "| step | " + " | ".join(f"dose x {f}: Q / MC" for f in factors) + " |",
                  "|---|" + "---|" * len(factors)]  # fmt: skip
        for row in result["dose_curve"]:
            lines.append(
                f"| {row['t']} | "
                + " | ".join(f"{row[f]['q']:.3f} / {row[f]['mc']:.3f}" for f in factors)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
