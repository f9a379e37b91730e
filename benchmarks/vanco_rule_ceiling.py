"""How well can a policy that sees only the observation do on the vancomycin simulator? A ceiling by direct
search over a simple, model-informed dose-rule family, evaluated by simulation.

The family (4 numbers): the clearance a clinician would predict from the observation with Goti 2018's
typical values (CL_pred = 4.5 (CrCL / 120)^0.8 0.7^DIAL L/h, CrCL from today's measured creatinine), then
    first dose:  load * weight (mg/kg);
    later doses: scale * 250 * CL_pred, the dose whose 12 h AUC is 250 at the predicted clearance, times
                 (level_target / last level)^gain when a level has been drawn (clipped to [0.25, 4]).
Random search (seeded) on `--search-patients` patients, then the best rule re-evaluated on
`--final-patients` other patients, beside the clinician-like and oracle policies on those patients.

    python benchmarks/vanco_rule_ceiling.py --candidates 400 --search-patients 20000 --final-patients 100000
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import vancomycin as V

FEATURE = {name: i for i, (name, _) in enumerate(V.OBS_FEATURES)}


def rule_policy(theta: jax.Array) -> V.Policy:
    load, scale, level_target, gain = theta[0], theta[1], theta[2], theta[3]

    def policy(key, obs, state, params):
        del key, state
        crcl = obs[FEATURE["crcl_cockcroft_gault"]]
        dial = obs[FEATURE["dialysis"]]
        cl_pred = params.cl_typical * (crcl / 120.0) ** params.cl_crcl_exponent * params.cl_dialysis_factor**dial
        maintenance = scale * 250.0 * cl_pred
        has_level = obs[FEATURE["hours_since_last_level"]] < V.NO_LEVEL_HOURS
        level = jnp.maximum(obs[FEATURE["last_level"]], 0.5)
        adjust = jnp.where(has_level, jnp.clip((level_target / level) ** gain, 0.25, 4.0), 1.0)
        first = obs[FEATURE["doses_given"]] < 1
        dose = jnp.where(first, load * obs[FEATURE["weight"]], maintenance * adjust)
        return jnp.clip(dose, 0.0, V.DOSE_MAX_MG), jnp.zeros((), jnp.float32)

    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--search-patients", type=int, default=20_000)
    parser.add_argument("--final-patients", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    sim = V.VancoParams()
    start = time.perf_counter()
    value_of = jax.jit(
        lambda key, theta: V.rollout(key, sim, rule_policy(theta), args.search_patients)["reward"].sum(-1).mean()
    )
    rng = np.random.default_rng(args.seed)
    low, high = np.array([10.0, 0.5, 5.0, 0.0]), np.array([40.0, 1.5, 25.0, 1.0])
    candidates = np.vstack([
        [25.0, 1.0, 15.0, 0.0],  # no level feedback, predicted-clearance dosing
        rng.uniform(low, high, (args.candidates - 1, 4)),
    ]).astype(np.float32)
    search_key = jax.random.PRNGKey(args.seed + 101)
    values = np.array([float(value_of(search_key, jnp.asarray(theta))) for theta in candidates])
    best = candidates[int(values.argmax())]
    # refine around the best: a smaller box, same patients
    box = (high - low) * 0.1
    local = np.clip(best + rng.uniform(-box, box, (args.candidates // 2, 4)), low, high).astype(np.float32)
    local_values = np.array([float(value_of(search_key, jnp.asarray(theta))) for theta in local])
    if local_values.max() > values.max():
        best = local[int(local_values.argmax())]
    final_key = jax.random.PRNGKey(args.seed + 202)  # other patients than the search's
    result = {"rule": dict(zip(("load_mg_per_kg", "scale", "level_target", "gain"), map(float, best), strict=True)),
              "search_value": float(max(values.max(), local_values.max())),
              "n_candidates": int(len(candidates) + len(local))}
    for name, policy in (("rule", rule_policy(jnp.asarray(best))), ("clinician", V.clinician_policy),
                         ("oracle", V.oracle_policy)):
        mean, stderr = V.policy_value(final_key, sim, policy, args.final_patients)
        result[name] = {"value": mean, "stderr": stderr, "ci95": [mean - 1.96 * stderr, mean + 1.96 * stderr]}
    result["seconds"] = time.perf_counter() - start
    result["args"] = vars(args)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
