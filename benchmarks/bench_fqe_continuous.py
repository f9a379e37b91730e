"""Validate continuous FQE (and continuous importance sampling) against the vancomycin simulator's truth.

Roll out `--episodes` clinician-like episodes (the logged data, with the clinician's exact log density per
mg), estimate the value of several target policies from them with `cleansepsis.ope_continuous`, and
compare with each target's true value by Monte Carlo over `--mc-patients` simulated patients
(`vancomycin.policy_value`, undiscounted, with its standard error). A target passes when
|FQE - MC| <= 2 * sqrt(MC SE^2 + FQE SE^2), with FQE's SE the spread of its refits on episode resamples.

Targets: the clinician policy itself (stochastic: FQE averages over sampled doses; WIS weights are all 1),
the clinician rule acting by its mean (deterministic), the same rule with 20% higher doses and the same
log-normal noise (stochastic, so importance sampling is defined), a fixed 1,000 mg every 12 h
(deterministic, partly outside the logged doses), and any continuous-policy checkpoints given (evaluated
acting by their mean dose, as the learners' own evaluation does).

    uv run python benchmarks/bench_fqe_continuous.py                    # the default FQE: Q on obs + history
    uv run python benchmarks/bench_fqe_continuous.py --history-lags 0 --hidden 128 --fqe-steps 500  # obs only
    uv run python benchmarks/bench_fqe_continuous.py --seeds 1 2 3 --targets "clinician (stochastic)" \
        --checkpoints runs/bc/checkpoints/s0_seed0 runs/iql/checkpoints/s0_seed0
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
from jax.scipy.special import ndtr, ndtri

from cleansepsis import ope_continuous as oc
from cleansepsis import vancomycin as V
from cleansepsis.replay import Transitions

DEFAULT_FQE = oc.ContinuousFQEConfig()


@dataclass(frozen=True)
class Args:
    episodes: int = 10_000
    """Logged clinician episodes (the issue's data size)."""
    mc_patients: int = 100_000
    """Simulated patients per true value (Monte Carlo)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the logged data: one independent replay each (every target's FQE is fitted on each)."""
    mc_seed: int = 1_000
    """Seed of the Monte Carlo patients (the same for every target)."""
    # the FQE defaults are ContinuousFQEConfig's: the validated history fit (docs/evaluation.md)
    fqe_iterations: int = DEFAULT_FQE.n_iterations
    """FQE iterations (target refreshes); the episodes have 8 steps."""
    fqe_steps: int = DEFAULT_FQE.steps_per_iteration
    """Adam steps per FQE iteration."""
    hidden: int = DEFAULT_FQE.hidden
    """Width of the Q network's two hidden layers."""
    batch_size: int = DEFAULT_FQE.batch_size
    """Minibatch of each Adam step (larger batches cost little more per step on a CPU)."""
    learning_rate: float = DEFAULT_FQE.learning_rate
    """Adam's rate at the start of each FQE iteration (cosine-decayed within it)."""
    dose_encoding: str = DEFAULT_FQE.dose_encoding
    """How the dose enters the Q network: "standardised" (dose and log dose) or "bounds" ([-1, 1])."""
    history_lags: int = DEFAULT_FQE.history_lags
    """Q also sees this many previous (obs, dose) steps of each episode (7, the default: the whole history;
    0: Q on the observation only, the fit measured before the history default)."""
    target_focus: float = DEFAULT_FQE.target_focus
    """Extra regression weight on rows whose logged dose is near the target's dose (0: none)."""
    focus_bandwidth: float = DEFAULT_FQE.focus_bandwidth
    """The focus kernel's bandwidth, as a share of the dose bounds' range."""
    dose_every_layer: bool = DEFAULT_FQE.dose_every_layer
    """The dose enters every layer of Q (concatenated to each hidden layer's input), not only the first."""
    oracle_state: bool = False
    """Diagnostic: Q also sees the simulator's hidden state (PK parameters, drug amounts, kidney function,
    previous AUC), which makes it Markov; the targets still act on the observation. Not available on real
    data: it measures how much of FQE's error comes from the observation not being a Markov state."""
    refits: int = 5
    """FQE refits on episode resamples for the interval (5: the validated fit's)."""
    action_samples: int = 4
    """Sampled doses per next state for stochastic targets."""
    n_boot: int = 200
    """Episode resamples of the importance-sampling estimators."""
    checkpoints: tuple[Path, ...] = ()
    """Continuous-policy checkpoint folders (iql_continuous.py / its BC) to add as targets."""
    targets: tuple[str, ...] = ()
    """Only these targets (names as in the table); default: all."""
    out: Path | None = None
    """Also write the results as JSON here."""


def rollout_transitions(records: dict[str, np.ndarray]) -> Transitions:
    """A simulator rollout (patients, steps, ...) as flat replay transitions with continuous doses."""
    n_patients, n_steps = records["reward"].shape
    n = n_patients * n_steps

    def flat(x):
        return jnp.asarray(np.asarray(x).reshape(n, *np.asarray(x).shape[2:]))

    return Transitions(
        obs=flat(records["obs"]),
        action=flat(records["dose"]).astype(jnp.float32),
        reward=flat(records["reward"]),
        next_obs=flat(records["next_obs"]),
        terminated=flat(records["terminated"]).astype(bool),
        truncated=jnp.zeros(n, bool),
        episode_id=jnp.repeat(jnp.arange(n_patients, dtype=jnp.int32), n_steps),
        t=jnp.tile(jnp.arange(n_steps, dtype=jnp.int32), n_patients),
        split=jnp.full(n, 2, jnp.int8),
        state_index=jnp.full(n, -1, jnp.int32),
        next_state_index=jnp.full(n, -1, jnp.int32),
        behavior_prob=jnp.full(n, jnp.nan, jnp.float32),
        action_mask=jnp.ones((n, 0), bool),
        next_action_mask=jnp.ones((n, 0), bool),
        behavior_log_density=flat(records["log_density"]),
    )


HIDDEN_STATE = ("eta_cl", "eta_vc", "eta_vp", "kidney", "amount_central", "amount_peripheral", "previous_auc",
                "creatinine_base")


def rollout_with_state(key: jax.Array, params: V.VancoParams, policy, n_patients: int) -> dict[str, jax.Array]:
    """`V.rollout`'s records plus the hidden state before and after each step ("state", "next_state")."""

    def one_patient(k):
        k_reset, k_run = jax.random.split(k)
        obs, state = V.reset(k_reset, params)

        def hidden(s):
            return jnp.stack([getattr(s, name) for name in HIDDEN_STATE]).astype(jnp.float32)

        def body(carry, k_step):
            obs, state = carry
            k_act, k_env = jax.random.split(k_step)
            dose, log_density = policy(k_act, obs, state, params)
            next_obs, next_state, reward, terminated, _ = V.step(k_env, state, dose, params)
            record = {"obs": obs, "dose": jnp.clip(dose, 0.0, V.DOSE_MAX_MG), "log_density": log_density,
                      "reward": reward, "next_obs": next_obs, "terminated": terminated, "state": hidden(state),
                      "next_state": hidden(next_state)}  # fmt: skip
            return (next_obs, next_state), record

        return jax.lax.scan(body, (obs, state), jax.random.split(k_run, V.N_DECISIONS))[1]

    return jax.vmap(one_patient)(jax.random.split(key, n_patients))


_rollout_with_state = jax.jit(rollout_with_state, static_argnums=(2, 3))


def on_observation(target: oc.ContinuousTarget) -> oc.ContinuousTarget:
    """The target acting on the first OBS_DIM columns (the observation) of an input with more columns."""

    def cut(obs):
        return obs[:, : V.OBS_DIM]

    return oc.ContinuousTarget(
        name=target.name, mean_dose=lambda o: target.mean_dose(cut(o)),
        sample=None if target.sample is None else (lambda k, o: target.sample(k, cut(o))),
        log_density=None if target.log_density is None else (lambda o, d: target.log_density(cut(o), d)),
    )  # fmt: skip


def logged_data(args: Args, seed: int, params: V.VancoParams) -> tuple[Transitions, np.ndarray]:
    """One replay of clinician episodes (with the hidden state appended to obs when --oracle-state)."""
    key = jax.random.key(seed)
    if not args.oracle_state:
        records = jax.tree.map(np.asarray, V.rollout_jit(key, params, V.clinician_policy, args.episodes))
        return rollout_transitions(records), records["reward"].sum(1)
    records = jax.tree.map(np.asarray, _rollout_with_state(key, params, V.clinician_policy, args.episodes))
    records["obs"] = np.concatenate([records["obs"], records.pop("state")], -1)
    records["next_obs"] = np.concatenate([records["next_obs"], records.pop("next_state")], -1)
    return rollout_transitions(records), records["reward"].sum(1)


def rule_dose(obs: jnp.ndarray) -> jnp.ndarray:
    return jnp.clip(V.clinician_rule_dose(obs), 0.0, V.DOSE_MAX_MG)


def scaled_clinician(factor: float):
    """The clinician's log-normal noise around `factor` x its rule: (simulator policy, log density)."""
    log_sd = V.CLINICIAN_LOG_SD

    def mu_of(obs):
        return jnp.log(jnp.clip(factor * V.clinician_rule_dose(obs), 1.0, V.DOSE_MAX_MG))

    def log_density(obs, dose):
        mu = mu_of(obs)
        safe = jnp.clip(dose, 1e-6, V.DOSE_MAX_MG)
        z = (jnp.log(safe) - mu) / log_sd
        upper = ndtr((jnp.log(V.DOSE_MAX_MG) - mu) / log_sd)
        logpdf = -0.5 * z * z - jnp.log(log_sd * safe * jnp.sqrt(2.0 * jnp.pi)) - jnp.log(upper)
        return jnp.where((dose > 0.0) & (dose <= V.DOSE_MAX_MG), logpdf, -jnp.inf)

    def policy(key, obs, state, params):
        del state, params
        mu = mu_of(obs)
        upper = ndtr((jnp.log(V.DOSE_MAX_MG) - mu) / log_sd)
        dose = jnp.exp(mu + log_sd * ndtri(jax.random.uniform(key, minval=1e-7, maxval=1.0) * upper))
        dose = jnp.minimum(dose, V.DOSE_MAX_MG)
        return dose, log_density(obs, dose)

    return policy, log_density


def deterministic_simulator_policy(dose_fn):
    """obs -> dose (one observation) as a simulator policy."""

    def policy(key, obs, state, params):
        del key, state, params
        return jnp.clip(dose_fn(obs), 0.0, V.DOSE_MAX_MG), jnp.zeros((), jnp.float32)

    return policy


def checkpoint_targets(paths: tuple[Path, ...]) -> list[tuple[oc.ContinuousTarget, str, object]]:
    """Checkpoints through `cleansepsis.policy.load_policy`, acting by their mean dose (mg)."""
    if not paths:
        return []
    from cleansepsis.evaluate_continuous import continuous_target_of
    from cleansepsis.policy import load_policy

    out = []
    for path in paths:
        policy = load_policy(path)
        target = continuous_target_of(policy, name=f"{policy.config.get('algo', 'policy')} {path.name}")
        out.append((target, "mean", deterministic_simulator_policy(lambda o, t=target: t.mean_dose(o[None])[0])))
    return out


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__)
    try:  # a bad FQE setting is one error line before anything is simulated or compiled
        config = oc.ContinuousFQEConfig(hidden=args.hidden, n_iterations=args.fqe_iterations,
                                        steps_per_iteration=args.fqe_steps, dose_encoding=args.dose_encoding,
                                        history_lags=args.history_lags, batch_size=args.batch_size,
                                        learning_rate=args.learning_rate, target_focus=args.target_focus,
                                        focus_bandwidth=args.focus_bandwidth,
                                        dose_every_layer=args.dose_every_layer)  # fmt: skip
    except oc.OPEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = V.VancoParams()
    started = time.time()
    shifted, shifted_density = scaled_clinician(1.2)
    targets = [
        (oc.simulator_target("clinician (stochastic)", V.clinician_policy, V.clinician_log_density,
                             jax.vmap(rule_dose)),
         "sample", V.clinician_policy),
        (oc.deterministic_target("clinician rule, mean (deterministic)", jax.vmap(rule_dose)), "mean",
         deterministic_simulator_policy(rule_dose)),
        (oc.simulator_target("rule x 1.2, clinician noise (stochastic)", shifted, shifted_density,
                             jax.vmap(lambda o: jnp.clip(1.2 * V.clinician_rule_dose(o), 0.0, V.DOSE_MAX_MG))),
         "sample", shifted),
        (oc.deterministic_target("fixed 1000 mg (deterministic)", lambda o: jnp.full(o.shape[0], 1000.0)), "mean",
         V.fixed_dose_policy(1000.0)),
        *checkpoint_targets(args.checkpoints),
    ]  # fmt: skip
    if args.targets:
        targets = [t for t in targets if t[0].name in args.targets]
    # true values first: one Monte Carlo per target, on the same patients for every target
    truth = {}
    for target, _, sim_policy in targets:
        t0 = time.time()
        truth[target.name] = (*V.policy_value(jax.random.key(args.mc_seed), params, sim_policy, args.mc_patients),
                              time.time() - t0)  # fmt: skip
    rows, observed_means = [], []
    for seed in args.seeds:
        data, observed = logged_data(args, seed, params)
        observed_means.append(float(observed.mean()))
        print(f"{args.episodes} clinician episodes (seed {seed}): observed return {observed.mean():.4f} "
              f"+- {observed.std(ddof=1) / np.sqrt(len(observed)):.4f}", file=sys.stderr)  # fmt: skip
        for i, (target, acting, _) in enumerate(targets):
            mc, mc_se, t_mc = truth[target.name]
            t0 = time.time()
            result = oc.continuous_off_policy_evaluation(
                data, on_observation(target), low=0.0, high=V.DOSE_MAX_MG, gamma=1.0,
                behavior_log_density=np.asarray(data.behavior_log_density), acting=acting,
                n_action_samples=args.action_samples, n_boot=args.n_boot,
                key=jax.random.key(seed * 1_000 + 2 + i), config=config, n_refits=args.refits,
                progress=f"FQE {target.name} (seed {seed})",
            )  # fmt: skip
            fqe = result["estimators"]["fqe"]
            se = float(np.hypot(mc_se, fqe["boot_std"]))
            row = {
                "target": target.name, "seed": seed, "acting": acting, "q_inputs": fqe["q_inputs"], "mc_value": mc,
                "mc_se": mc_se,
                "fqe": fqe["estimate"], "fqe_se": fqe["boot_std"], "fqe_error": fqe["estimate"] - mc,
                "combined_se": se, "error_in_se": (fqe["estimate"] - mc) / se,
                "within_2se": bool(abs(fqe["estimate"] - mc) <= 2 * se),
                "is": {k: result["estimators"][k]["estimate"] for k in ("wis", "pdwis", "wdr")},
                "is_se": {k: result["estimators"][k]["boot_std"] for k in ("wis", "pdwis", "wdr")},
                "ess": None if result["weights"] is None else result["weights"]["ess"],
                "is_undefined": result["undefined"],
                "support": dose_support(result["state_doses"], np.asarray(data.obs)[:, : V.OBS_DIM]),
                "mean_dose_mg": float(np.mean(result["state_doses"])),
                "seconds_mc": t_mc, "seconds_ope": time.time() - t0,
            }  # fmt: skip
            rows.append(row)
            print(f"[seed {seed}, {i + 1}/{len(targets)}] {target.name}: MC {mc:.4f} +- {mc_se:.4f}, FQE "
                  f"{fqe['estimate']:.4f} +- {fqe['boot_std']:.4f} (error {row['fqe_error']:+.4f} = "
                  f"{row['error_in_se']:+.1f} SE), WIS {row['is']['wis']:.4f}, WDR {row['is']['wdr']:.4f}, "
                  f"OPE {row['seconds_ope']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    print(table(rows, args, observed_means, config))
    print(f"\ntotal {time.time() - started:.0f} s")
    if args.out is not None:
        from cleansepsis.io import write_json

        write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                              "observed_return": observed_means}, overwrite=True)  # fmt: skip
    return 0


def dose_support(target_doses: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """Where the target's (mean) doses at the logged states lie in the clinician's log-normal around its rule:
    the share within 2 of its log-sds (about its central 95%), and the median |log ratio| in log-sds."""
    rule = np.asarray(jax.vmap(rule_dose)(jnp.asarray(obs)), np.float64)
    z = np.abs(np.log(np.maximum(target_doses, 1.0) / np.maximum(rule, 1.0))) / V.CLINICIAN_LOG_SD
    return {"share_within_2_log_sd": float((z <= 2.0).mean()), "median_log_sd": float(np.median(z))}


def _fmt(x: float | None, se: float | None = None) -> str:
    if x is None or not np.isfinite(x):
        return "undefined"
    return f"{x:.3f}" if se is None or not np.isfinite(se) else f"{x:.3f} +- {se:.3f}"


def table(rows: list[dict], args: Args, observed_means: list[float], config: oc.ContinuousFQEConfig) -> str:
    features = oc.q_inputs(args.history_lags) + (" + hidden simulator state (diagnostic)" if args.oracle_state else "")
    options = oc.fit_options_text(config)
    lines = [
        f"Logged: {args.episodes} clinician episodes per replay, seeds {list(args.seeds)} (observed returns "
        f"{', '.join(f'{m:.3f}' for m in observed_means)}). FQE: Q on {features}, MLP {args.hidden}x2, "
        f"{args.fqe_iterations} iterations x {args.fqe_steps} steps of batch {args.batch_size} (rate "
        f"{args.learning_rate:g}{options}), SE = sd of {args.refits} refits on episode "
        f"resamples. MC: {args.mc_patients} patients (seed {args.mc_seed}). Error in SEs: (FQE - MC) / "
        "sqrt(MC SE^2 + FQE SE^2); within 2 SE when |error| <= 2 of them.",
        "",
        "| target | seed | MC value +- SE | mean dose (mg) | doses within 2 log-sd of the rule | FQE +- SE | FQE error "
        "| error in SEs | within 2 SE | WIS +- SE | WDR +- SE | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ess = "n/a" if r["ess"] is None else f"{r['ess']:.0f}"
        lines.append(
            f"| {r['target']} | {r['seed']} | {r['mc_value']:.3f} +- {r['mc_se']:.3f} | {r['mean_dose_mg']:.0f} | "
            f"{100 * r['support']['share_within_2_log_sd']:.0f}% | {_fmt(r['fqe'], r['fqe_se'])} | "
            f"{r['fqe_error']:+.3f} | {r['error_in_se']:+.1f} | {'yes' if r['within_2se'] else 'no'} | "
            f"{_fmt(r['is']['wis'], r['is_se']['wis'])} | {_fmt(r['is']['wdr'], r['is_se']['wdr'])} | {ess} |"
        )
    lines += ["", "| target | replays within 2 SE | mean error | mean error in SEs |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == name]
        lines.append(f"| {name} | {sum(r['within_2se'] for r in mine)} of {len(mine)} | "
                     f"{np.mean([r['fqe_error'] for r in mine]):+.3f} | "
                     f"{np.mean([r['error_in_se'] for r in mine]):+.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
