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

Whatever it finds is achievable from the observation, so its value is a lower bound on the observation-only
optimum; the oracle (which reads the hidden PK parameters) is not.
"""

from __future__ import annotations

import argparse
import json
import time
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


class ObsPolicy(eqx.Module):
    """Observation (OBS_DIM,) -> dose in mg, deterministic."""

    net: MLP
    obs_mean: jax.Array
    obs_std: jax.Array

    def features(self, obs: jax.Array) -> jax.Array:
        logs = jnp.log(jnp.maximum(obs[jnp.array([FEATURE[n] for n in LOG_FEATURES])], 0.5))
        return jnp.concatenate([(obs - self.obs_mean) / self.obs_std, logs - 5.0])

    def __call__(self, obs: jax.Array) -> jax.Array:
        low, high = LOG_DOSE_RANGE
        return jnp.exp(low + (high - low) * jax.nn.sigmoid(self.net(self.features(obs))[0]))


def observation_stats(sim: V.VancoParams, n_patients: int = 5_000) -> tuple[jax.Array, jax.Array]:
    obs = V.rollout_jit(jax.random.PRNGKey(STATS_KEY_SEED), sim, V.clinician_policy, n_patients)["obs"]
    obs = np.asarray(obs, np.float64).reshape(-1, V.OBS_DIM)
    std = obs.std(0)
    return jnp.asarray(obs.mean(0), jnp.float32), jnp.asarray(np.where(std > 1e-6, std, 1.0), jnp.float32)


def init_policy(key: jax.Array, hidden: tuple[int, ...], obs_mean: jax.Array, obs_std: jax.Array,
                start_dose_mg: float = 1000.0) -> ObsPolicy:
    """A network whose every dose starts near `start_dose_mg` (small last layer, bias at that dose)."""
    net = MLP(V.OBS_DIM + len(LOG_FEATURES), 1, hidden, key)
    low, high = LOG_DOSE_RANGE
    frac = (np.log(start_dose_mg) - low) / (high - low)
    last = net.layers[-1]
    net = eqx.tree_at(lambda n: (n.layers[-1].weight, n.layers[-1].bias), net,
                      (last.weight * 0.01, jnp.full_like(last.bias, float(np.log(frac / (1 - frac))))))
    return ObsPolicy(net, obs_mean, obs_std)


def as_policy(model: ObsPolicy) -> V.Policy:
    def policy(key, obs, state, params):
        del key, state, params
        return model(obs), jnp.zeros((), jnp.float32)

    return policy


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
        model = eqx.combine(params, static)
        records = V.rollout(key, sim, as_policy(model), batch_patients)
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


def value_of(model: ObsPolicy, sim: V.VancoParams, key: jax.Array, n_patients: int) -> tuple[float, float]:
    return V.policy_value(key, sim, as_policy(model), n_patients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--batch-patients", type=int, default=2_048)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--final-patients", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the network's initialisation and the search")
    parser.add_argument("--final-key-seed", type=int, default=LEARNER_PATIENTS_KEY_SEED,
                        help="key of the final patients (default: iql_continuous.py's final patients)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_patients < 2 or args.final_patients < 2:
        parser.error("--steps must be at least 1, --batch-patients and --final-patients at least 2")
    sim = V.VancoParams()
    start = time.perf_counter()
    key_init, key_search = jax.random.split(jax.random.PRNGKey(args.seed))
    model = init_policy(key_init, tuple(args.hidden), *observation_stats(sim))
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
    for name, policy in (("obs_ceiling", as_policy(model)), ("clinician", V.clinician_policy),
                         ("oracle", V.oracle_policy)):
        mean, stderr = V.policy_value(final_key, sim, policy, args.final_patients)
        result[name] = {"value": mean, "stderr": stderr, "ci95": [mean - 1.96 * stderr, mean + 1.96 * stderr]}
    records = V.rollout_jit(final_key, sim, as_policy(model), min(args.final_patients, 25_000))
    result["obs_ceiling_outcomes"] = V.summarize_rollout(records)
    clinician, oracle, ceiling = (result[k]["value"] for k in ("clinician", "oracle", "obs_ceiling"))
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
