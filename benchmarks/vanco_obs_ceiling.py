"""How well can ANY policy that sees only the observation do on the vancomycin simulator? A ceiling for every
offline learner, by direct policy optimisation of a flexible observation -> dose network through the simulator.

The policy: an MLP (ReLU, `--hidden`) from the observation the learners see (`V.OBS_FEATURES`, standardised by
the mean and sd of a clinician-like rollout, plus the logs of its positive quantities: weight, creatinine,
clearance, last dose, last level, so that multiplicative dose rules are easy to represent) to the log-dose,
squashed into [log 10, log 3000] mg. It acts deterministically on the current observation, as the learners'
policies do.

The search: Adam on the mean return of `--batch-patients` fresh simulated patients per step, by pathwise
gradients through the pure-JAX simulator (exact two-compartment solution, reparameterised level noise).
The AKI event is a Bernoulli draw with no pathwise gradient, so during the search each interval's sampled
AKI penalty is replaced by its expectation given the exposure, penalty x (1 - exp(-hazard(AUC24))): the
same expected return, with a gradient through the hazard (what it still misses is the effect of a sampled
AKI on later kidney function). Every reported value is the TRUE simulator's return (sampled AKI), on
`--final-patients` patients the search never saw, beside the clinician-like and oracle policies on the same
patients (common random numbers): by default the very patients on which iql_continuous.py evaluates its final
policies, so the ceiling and the learners' values compare patient for patient.

    python benchmarks/vanco_obs_ceiling.py                      # defaults: 2,000 steps x 2,048 patients
    python benchmarks/vanco_obs_ceiling.py --steps 200 --final-patients 20000 --out /tmp/ceiling.json
    python benchmarks/vanco_obs_ceiling.py --within-clinician-sd 2 --checkpoints runs/iql/checkpoints/s0_seed0

Whatever it finds is achievable from the observation, so its value is a lower bound on the observation-only
optimum; the oracle (which reads the hidden PK parameters) is not.

`--within-clinician-sd K` asks how much of the gap offline data of the clinician-like policy can support: the
policy may only scale the clinician's rule dose by a factor within K of the clinician's own log-sd (0.2) of it,
dose = rule(obs) x exp(0.2 K tanh(net)), i.e. stay where the logged doses are (K = 2: 95% of the clinician's
doses at each observation lie within it). An offline learner that extracts its policy from logged actions, as
IQL's advantage-weighted regression does, has no data outside such a band, so this ceiling bounds what it can
reach from this data however many episodes it has.

`--history-lags K` lets the policy also read the episode's K previous steps (their observation features and
log dose, zero-padded at the start with a 'present' flag): the same search for a policy of the whole observed
history, on the same patients (the rollout uses the simulator's keys exactly as `V.rollout` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cleansepsis import vancomycin as V
from cleansepsis.networks import MLP

FEATURE = {name: i for i, (name, _) in enumerate(V.OBS_FEATURES)}
LOG_FEATURES = ("weight", "creatinine", "crcl_cockcroft_gault", "last_dose", "last_level")
LOG_DOSE_RANGE = (float(np.log(10.0)), float(np.log(V.DOSE_MAX_MG)))
STATS_KEY_SEED = 7  # the clinician-like rollout whose mean and sd standardise the inputs
# iql_continuous.EVAL_KEY_SEED + 1: its final evaluation's patients (keys split per 25,000-patient chunk, as
# V.policy_value does), so the ceiling and the learners' values are on the same patients
LEARNER_PATIENTS_KEY_SEED = 20_211_007


N_FEATURES = V.OBS_DIM + len(LOG_FEATURES)  # the policy's inputs per observation
HISTORY_ROW = N_FEATURES + 2  # a previous step: its features, its log dose and a 'present' flag


def observation_features(obs: jax.Array, obs_mean: jax.Array, obs_std: jax.Array) -> jax.Array:
    logs = jnp.log(jnp.maximum(obs[jnp.array([FEATURE[n] for n in LOG_FEATURES])], 0.5))
    return jnp.concatenate([(obs - obs_mean) / obs_std, logs - 5.0])


def squashed_dose(net_output: jax.Array, obs: jax.Array, within_clinician_sd: float) -> jax.Array:
    """The dose (mg): anywhere in [10, DOSE_MAX_MG] mg, or with `within_clinician_sd` K > 0 the clinician's rule
    dose scaled within exp(+-K x the clinician's log-sd)."""
    if within_clinician_sd > 0:
        rule = jnp.log(jnp.clip(V.clinician_rule_dose(obs), 1.0, V.DOSE_MAX_MG))
        spread = within_clinician_sd * V.CLINICIAN_LOG_SD
        return jnp.minimum(jnp.exp(rule + spread * jnp.tanh(net_output[0])), V.DOSE_MAX_MG)
    low, high = LOG_DOSE_RANGE
    return jnp.exp(low + (high - low) * jax.nn.sigmoid(net_output[0]))


class ObsPolicy(eqx.Module):
    """Observation (OBS_DIM,) -> dose in mg, deterministic."""

    net: MLP
    obs_mean: jax.Array
    obs_std: jax.Array
    within_clinician_sd: float = eqx.field(static=True, default=0.0)

    def features(self, obs: jax.Array) -> jax.Array:
        return observation_features(obs, self.obs_mean, self.obs_std)

    def __call__(self, obs: jax.Array) -> jax.Array:
        return squashed_dose(self.net(self.features(obs)), obs, self.within_clinician_sd)


class HistoryPolicy(eqx.Module):
    """(observation, the episode's `lags` previous steps (lags, HISTORY_ROW), newest first) -> dose in mg."""

    net: MLP
    obs_mean: jax.Array
    obs_std: jax.Array
    lags: int = eqx.field(static=True)
    within_clinician_sd: float = eqx.field(static=True, default=0.0)

    def features(self, obs: jax.Array) -> jax.Array:
        return observation_features(obs, self.obs_mean, self.obs_std)

    def __call__(self, obs: jax.Array, history: jax.Array) -> jax.Array:
        net_output = self.net(jnp.concatenate([self.features(obs), history.reshape(-1)]))
        return squashed_dose(net_output, obs, self.within_clinician_sd)

    def history_row(self, obs: jax.Array, dose: jax.Array) -> jax.Array:
        log_dose = jnp.log(jnp.maximum(dose, 1.0))[None] - 7.0  # log(1,100 mg) ~ 7: centred like the logs above
        return jnp.concatenate([self.features(obs), log_dose, jnp.ones((1,), jnp.float32)])


def observation_stats(sim: V.VancoParams, n_patients: int = 5_000) -> tuple[jax.Array, jax.Array]:
    obs = V.rollout_jit(jax.random.PRNGKey(STATS_KEY_SEED), sim, V.clinician_policy, n_patients)["obs"]
    obs = np.asarray(obs, np.float64).reshape(-1, V.OBS_DIM)
    std = obs.std(0)
    return jnp.asarray(obs.mean(0), jnp.float32), jnp.asarray(np.where(std > 1e-6, std, 1.0), jnp.float32)


def init_policy(key: jax.Array, hidden: tuple[int, ...], obs_mean: jax.Array, obs_std: jax.Array,
                start_dose_mg: float = 1000.0, history_lags: int = 0,
                within_clinician_sd: float = 0.0) -> ObsPolicy | HistoryPolicy:
    """A network whose every dose starts near `start_dose_mg` (small last layer, bias at that dose), or with
    `within_clinician_sd` > 0 at the clinician's rule dose; with `history_lags` > 0 a HistoryPolicy reading
    that many previous steps."""
    net = MLP(N_FEATURES + history_lags * HISTORY_ROW, 1, hidden, key)
    low, high = LOG_DOSE_RANGE
    frac = (np.log(start_dose_mg) - low) / (high - low)
    start_bias = 0.0 if within_clinician_sd > 0 else float(np.log(frac / (1 - frac)))
    last = net.layers[-1]
    net = eqx.tree_at(lambda n: (n.layers[-1].weight, n.layers[-1].bias), net,
                      (last.weight * 0.01, jnp.full_like(last.bias, start_bias)))
    if history_lags:
        return HistoryPolicy(net, obs_mean, obs_std, history_lags, within_clinician_sd)
    return ObsPolicy(net, obs_mean, obs_std, within_clinician_sd)


def as_policy(model: ObsPolicy) -> V.Policy:
    def policy(key, obs, state, params):
        del key, state, params
        return model(obs), jnp.zeros((), jnp.float32)

    return policy


def history_rollout(key: jax.Array, sim: V.VancoParams, model: HistoryPolicy, n_patients: int) -> dict[str, jax.Array]:
    """`V.rollout` for a policy of the episode's history (its memory: the previous steps, newest first): the
    same keys for the same patients, the same records."""

    def policy(k_act, obs, state, params, history):
        del k_act, state, params  # deterministic, and it reads only what a clinician sees
        dose = model(obs, history)
        return dose, jnp.zeros((), jnp.float32), jnp.concatenate([model.history_row(obs, dose)[None], history[:-1]])

    return V.rollout_with_memory(key, sim, policy, jnp.zeros((model.lags, HISTORY_ROW), jnp.float32), n_patients)


def rollout_of(key: jax.Array, sim: V.VancoParams, model: ObsPolicy | HistoryPolicy, n_patients: int):
    if isinstance(model, HistoryPolicy):
        return history_rollout(key, sim, model, n_patients)
    return V.rollout(key, sim, as_policy(model), n_patients)


def surrogate_returns(records: dict[str, jax.Array], sim: V.VancoParams) -> jax.Array:
    """(n_patients,) returns with each sampled AKI penalty replaced by its expectation given AUC24."""
    hazard = sim.aki_rate_per_day * (V.DECISION_HOURS / 24.0) * (records["auc24"] / 600.0) ** sim.aki_power
    no_dialysis = records["obs"][..., FEATURE["dialysis"]] < 0.5
    expected_aki = jnp.where(no_dialysis, -jnp.expm1(-hazard), 0.0)
    reward = records["reward"] + sim.aki_penalty * (records["aki"] - expected_aki)
    return reward.sum(-1)


def make_search(sim: V.VancoParams, static: Any, batch_patients: int, steps: int, learning_rate: float):
    """A pure search(key, params) -> (params, per-step surrogate mean returns) over `steps` Adam steps."""
    optimiser = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def loss(params, key):
        records = rollout_of(key, sim, eqx.combine(params, static), batch_patients)
        return -surrogate_returns(records, sim).mean()

    def search(key, params):
        def update(carry, step_key):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss)(params, step_key)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), -value

        (params, _), curve = jax.lax.scan(update, (params, optimiser.init(params)), jax.random.split(key, steps))
        return params, curve

    return search


def value_of(model: ObsPolicy | HistoryPolicy, sim: V.VancoParams, key: jax.Array, n_patients: int,
             chunk: int = 25_000) -> tuple[float, float]:
    """Monte Carlo value and its standard error, on the patients `V.policy_value` would draw from `key`."""
    if isinstance(model, ObsPolicy):
        return V.policy_value(key, sim, as_policy(model), n_patients, chunk)
    params, static = eqx.partition(model, eqx.is_array)
    rewards = jax.jit(lambda k, p, size: history_rollout(k, sim, eqx.combine(p, static), size)["reward"],
                      static_argnames="size")  # fmt: skip
    return V.monte_carlo_value(key, lambda k, size: rewards(k, params, size), n_patients, chunk)


def dose_vs_rule(records: dict[str, jax.Array]) -> dict[str, Any]:
    """How far the policy's doses are from the clinician's rule at the same observations, in units of the
    clinician's log-sd (0.2): where the logged doses are (|z| <= 2 holds 95% of them) or not."""
    rule = jnp.clip(jax.vmap(V.clinician_rule_dose)(records["obs"].reshape(-1, V.OBS_DIM)), 1.0, V.DOSE_MAX_MG)
    dose = jnp.maximum(records["dose"].reshape(-1), 1e-6)
    z = np.asarray(jnp.log(dose / rule) / V.CLINICIAN_LOG_SD, np.float64)
    return {
        "z_quantiles_5_25_50_75_95": [float(q) for q in np.quantile(z, [0.05, 0.25, 0.5, 0.75, 0.95])],
        "share_within_2_sd": float(np.mean(np.abs(z) <= 2.0)),
        "share_within_3_sd": float(np.mean(np.abs(z) <= 3.0)),
    }


def checkpoint_policies(paths: list[str]) -> list[tuple[str, V.Policy]]:
    """Checkpoints as simulator policies acting by their mean dose, as the learners' evaluation does (the FQE
    validation's adapter, `bench_fqe_continuous.checkpoint_targets`)."""
    if not paths:
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_fqe_continuous import checkpoint_targets

    targets = checkpoint_targets(tuple(Path(path) for path in paths))
    return [(str(path), policy) for path, (_, _, policy) in zip(paths, targets, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--history-lags", type=int, default=0,
                        help="the policy also reads this many previous (observation, dose) steps (7: all)")
    parser.add_argument("--within-clinician-sd", type=float, default=0.0,
                        help="only scale the clinician's rule dose within exp(+-K x its log-sd 0.2): the ceiling of "
                             "a learner that stays where the logged doses are (0: any dose)")
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--batch-patients", type=int, default=2_048)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--final-patients", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the network's initialisation and the search")
    parser.add_argument("--final-key-seed", type=int, default=LEARNER_PATIENTS_KEY_SEED,
                        help="key of the final patients (default: iql_continuous.py's final patients)")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="continuous-policy checkpoint folders (iql_continuous.py, its BC) to report beside the "
                             "ceiling on the same patients: value and how far their doses are from the clinician's rule")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if (args.steps < 1 or args.batch_patients < 2 or args.final_patients < 2 or args.history_lags < 0
            or not args.within_clinician_sd >= 0):
        parser.error("--steps must be at least 1, --batch-patients and --final-patients at least 2, "
                     "--history-lags and --within-clinician-sd at least 0")
    sim = V.VancoParams()
    start = time.perf_counter()
    key_init, key_search = jax.random.split(jax.random.PRNGKey(args.seed))
    model = init_policy(key_init, tuple(args.hidden), *observation_stats(sim), history_lags=args.history_lags,
                        within_clinician_sd=args.within_clinician_sd)
    params, static = eqx.partition(model, eqx.is_array)
    search = jax.jit(make_search(sim, static, args.batch_patients, args.steps, args.learning_rate))
    params, curve = search(key_search, params)
    curve = np.asarray(curve)
    search_seconds = time.perf_counter() - start
    model = eqx.combine(params, static)
    final_key = jax.random.PRNGKey(args.final_key_seed)  # patients the search never saw
    result: dict[str, Any] = {
        "search_surrogate_return": {"first_100_steps": float(curve[:100].mean()),
                                    "last_100_steps": float(curve[-100:].mean())},
        "search_seconds": search_seconds,
    }
    ceiling_name = "history_ceiling" if args.history_lags else "obs_ceiling"
    if args.within_clinician_sd > 0:
        ceiling_name += "_within_clinician_support"
    values = {ceiling_name: value_of(model, sim, final_key, args.final_patients)}
    for name, policy in (("clinician", V.clinician_policy), ("oracle", V.oracle_policy)):
        values[name] = V.policy_value(final_key, sim, policy, args.final_patients)
    for name, (mean, stderr) in values.items():
        result[name] = {"value": mean, "stderr": stderr, "ci95": [mean - 1.96 * stderr, mean + 1.96 * stderr]}
    n_summary = min(args.final_patients, 25_000)
    records = jax.jit(lambda key, p: rollout_of(key, sim, eqx.combine(p, static), n_summary))(final_key, params)
    result[f"{ceiling_name}_outcomes"] = V.summarize_rollout(records)
    result["dose_vs_clinician_rule"] = dose_vs_rule(records)
    for path, policy in checkpoint_policies(args.checkpoints):
        mean, stderr = V.policy_value(final_key, sim, policy, args.final_patients)
        records = V.rollout_jit(final_key, sim, policy, n_summary)
        result[f"checkpoint {path}"] = {"value": mean, "stderr": stderr, "ci95": [mean - 1.96 * stderr, mean + 1.96 * stderr],
                                        "dose_vs_clinician_rule": dose_vs_rule(records)}
    clinician, oracle, ceiling = (result[k]["value"] for k in ("clinician", "oracle", ceiling_name))
    result["share_of_clinician_oracle_gap"] = (ceiling - clinician) / (oracle - clinician)
    result["half_gap_value"] = clinician + 0.5 * (oracle - clinician)
    result["seconds"] = time.perf_counter() - start
    result["args"] = vars(args)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
