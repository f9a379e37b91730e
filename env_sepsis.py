"""ICU-Sepsis in JAX: the env API, its registration with Gymnasium, and a small CLI.

    python env_sepsis.py baselines [--json] [--mdp NAME|DIR]  # exact return and length of reference policies
    python env_sepsis.py bench [--json] [--mdp NAME|DIR]      # steps/s of the JAX env vs a Python reference

--mdp: 'icu-sepsis' (default), 'sepsis-sim' (Oberst-Sontag, sim-v2), 'sepsis-sim-original' (its master
dynamics, glucose bug) or a cohort MDP directory written by `data_prep.py mdp`.

Importing this file (or `cleansepsis.env`) registers "CleanSepsis/ICUSepsis-v0" with Gymnasium. The
implementation lives in cleansepsis/mdp.py (the core) and cleansepsis/env.py (ICU-Sepsis); this file
re-exports the ICU-Sepsis API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from cleansepsis.env import (  # re-exported API
    ABSORBING,
    DEATH,
    ENV_ID,
    FEATURE_NAMES,
    N_ACTIONS,
    N_PATIENT_STATES,
    N_STATES,
    OBS_DIM,
    STRATEGIES,
    SURVIVAL,
    EnvParams,
    EnvState,
    ICUSepsisEnv,
    clinician_policy,
    greedy_admissible,
    load_params,
    observe,
    optimal_policy,
    policy_evaluation,
    random_policy,
    reference_values,
    reset,
    reset_batch,
    rollout_episodes,
    step,
    step_autoreset,
    step_autoreset_batch,
    value_iteration,
)
from cleansepsis.mdp import batch_words

__all__ = [
    "ABSORBING",
    "DEATH",
    "ENV_ID",
    "FEATURE_NAMES",
    "N_ACTIONS",
    "N_PATIENT_STATES",
    "N_STATES",
    "OBS_DIM",
    "SURVIVAL",
    "EnvParams",
    "EnvState",
    "ICUSepsisEnv",
    "clinician_policy",
    "greedy_admissible",
    "load_params",
    "observe",
    "optimal_policy",
    "policy_evaluation",
    "random_policy",
    "reference_values",
    "reset",
    "reset_batch",
    "rollout_episodes",
    "step",
    "step_autoreset",
    "step_autoreset_batch",
    "value_iteration",
]

JsonFlag = Annotated[bool, tyro.conf.arg(name="json")]

POLICY_LABELS = {
    "random": "uniform random over 25 actions",
    "random_admissible": "uniform random over admissible actions",
    "clinician": "clinician (as shipped)",
    "clinician_renormalised": "clinician renormalised to admissible",
    "greedy_clinician": "greedy clinician (argmax, admissible)",
    "optimal": "optimal (policy iteration, admissible)",
}


# ---------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------


def baseline_table() -> dict[str, dict[str, dict[str, float]]]:
    """strategy -> policy -> expected_return, mean_length (float64) and expected_return_float32 (the
    jitted float32 `policy_evaluation` of the same policy, all policies in one batched call)."""
    table = {}
    evaluate = jax.jit(policy_evaluation)
    optimal = None
    for strategy in STRATEGIES:
        params = load_params(strategy)
        exact = reference_values(params)
        if optimal is None:  # admissible actions only: the same optimal policy under both strategies
            optimal = greedy_admissible(jax.jit(value_iteration)(params)[0], params.admissible_mask)
        renormalised = clinician_policy(params)
        policies = {
            "random": random_policy(params),
            "random_admissible": random_policy(params, admissible_only=True),
            "clinician": clinician_policy(params, renormalise=False),
            "clinician_renormalised": renormalised,
            "greedy_clinician": greedy_admissible(renormalised, params.admissible_mask),
            "optimal": optimal,
        }
        returns, _ = evaluate(jnp.stack(list(policies.values())), params)
        for name, value in zip(policies, np.asarray(returns), strict=True):
            exact[name]["expected_return_float32"] = float(value)
        table[strategy] = exact
    return table


def load_mdp(name: str, **options) -> EnvParams:
    """Params of an MDP named on the command line (see the module docstring)."""
    from cleansepsis import mdp

    if name == "sepsis-sim-original":
        return mdp.load("sepsis-sim", version="original", **options)
    return mdp.load(name, **options)


def mdp_baseline_table(name: str) -> dict[str, dict[str, dict[str, float]]]:
    """The baseline table of another MDP than ICU-Sepsis: {'': policy -> expected_return, mean_length,
    expected_return_float32}; for the simulator also the published checks."""
    from cleansepsis import mdp

    params = load_mdp(name)
    exact = mdp.reference_values(params)
    policies = {
        "random": random_policy(params),
        "random_admissible": random_policy(params, admissible_only=True),
        "clinician": clinician_policy(params, renormalise=False),
        "clinician_renormalised": clinician_policy(params),
        "greedy_clinician": greedy_admissible(clinician_policy(params), params.admissible_mask),
    }
    returns, _ = jax.jit(policy_evaluation)(jnp.stack(list(policies.values())), params)
    for key, value in zip(policies, np.asarray(returns), strict=True):
        exact[key]["expected_return_float32"] = float(value)
    _, v = jax.jit(value_iteration)(params)
    exact["optimal"]["expected_return_float32"] = float(params.start_dist @ v)
    return {params.spec[0] if len(params.spec) < 2 else "/".join(map(str, params.spec)): exact}


def baselines(json_output: JsonFlag = False, mdp: str = "icu-sepsis") -> None:
    """Exact expected return and mean episode length of the reference policies (ICU-Sepsis: under both
    inadmissible-action strategies; gamma 1, so the return is the survival probability).

    Args:
        json_output: print JSON instead of a table.
        mdp: 'icu-sepsis', 'sepsis-sim', 'sepsis-sim-original' or a cohort MDP directory.
    """
    table = baseline_table() if mdp == "icu-sepsis" else mdp_baseline_table(mdp)
    if json_output:
        print(json.dumps(table, indent=2, sort_keys=True))
        return
    for strategy, rows in table.items():
        print(f"strategy '{strategy}'" if mdp == "icu-sepsis" else f"MDP {strategy}")
        print(f"  {'policy':42s} {'return':>9s} {'length':>7s} {'float32 jit':>12s}")
        for name, row in rows.items():
            print(
                f"  {POLICY_LABELS.get(name, name):42s} {row['expected_return']:9.6f} {row['mean_length']:7.3f} "
                f"{row['expected_return_float32']:12.6f}"
            )


# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("n_steps", "batched"))
def _jax_rollout(key, state: EnvState, params: EnvParams, n_steps: int, batched: bool = True):
    """`n_steps` steps of a batch of auto-resetting envs with uniform random actions, through the public
    `step_autoreset_batch` (batched=True) or `vmap(step_autoreset)` over split keys; returns the final
    state and checksums so that nothing is optimised away."""

    def body(carry, step_key):
        state, reward_sum, obs_sum = carry
        action_key, step_key = jax.random.split(step_key)
        batch = state.state_index.shape[0]
        # uniform actions from one word each (n_actions divides 2^32 or its bias is below 1e-8)
        actions = (batch_words(action_key, (batch,)) % jnp.uint32(params.n_actions)).astype(jnp.int32)
        if batched:
            obs, state, reward, *_ = step_autoreset_batch(step_key, state, actions, params)
        else:
            obs, state, reward, *_ = jax.vmap(step_autoreset, in_axes=(0, 0, 0, None))(
                jax.random.split(step_key, batch), state, actions, params
            )
        return (state, reward_sum + reward.sum(), obs_sum + obs.sum()), None

    zero = jnp.zeros((), jnp.float32)
    obs_zero = jnp.zeros((), jnp.int32 if params.obs_mode == "index" else jnp.float32)
    (state, reward_sum, obs_sum), _ = jax.lax.scan(
        body, (state, zero, obs_zero), jax.random.split(key, n_steps)
    )
    return state, reward_sum, obs_sum


def _sharded_rollout(params: EnvParams, n_steps: int, batched: bool, prng: str, n_devices: int):
    """`_jax_rollout` with the envs split over the first `n_devices` devices (one slice per device, each
    stepping its own envs with its own key: seed x n_devices + device index). Returns (seed, state) ->
    the same outputs, the checksums summed over devices."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n_devices]), ("envs",))
    spec = jax.sharding.PartitionSpec("envs")

    def one_device(seeds, state):
        key = jax.random.key(seeds[0], impl=prng)
        state, reward_sum, obs_sum = _jax_rollout(key, state, params, n_steps, batched)
        return state, reward_sum[None], obs_sum[None]

    sharded = jax.jit(
        jax.shard_map(
            one_device, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec, spec), check_vma=False
        )
    )

    def rollout(seed: int, state: EnvState):
        seeds = jnp.arange(n_devices, dtype=jnp.uint32) + jnp.uint32(seed * n_devices)
        state, reward_sums, obs_sums = sharded(seeds, state)
        return state, reward_sums.sum(), obs_sums.sum()

    return rollout


def jax_bench_runner(
    n_envs: int,
    n_steps: int,
    obs_mode: str = "index",
    batched: bool = True,
    mdp: str = "icu-sepsis",
    prng: str = "threefry2x32",
    n_devices: int = 1,
):
    """A function that times one run of the JAX env and returns its steps per second (compiled here).
    With `n_devices` > 1 the envs are split evenly over that many XLA devices (CPU cores, or GPUs)."""
    params = load_params(obs_mode=obs_mode) if mdp == "icu-sepsis" else load_mdp(mdp, obs_mode=obs_mode)
    _, state = reset_batch(jax.random.key(0), params, n_envs)
    if n_devices == 1:

        def rollout(seed: int, state: EnvState):
            return _jax_rollout(jax.random.key(seed, impl=prng), state, params, n_steps, batched)

    else:
        rollout = _sharded_rollout(params, n_steps, batched, prng, n_devices)
    jax.block_until_ready(rollout(1, state))
    runs = iter(range(2, 1 << 30))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(rollout(next(runs), state))
        return n_envs * n_steps / (time.perf_counter() - start)

    return run


def _reference_env_class():
    """icu_sepsis.envs.sepsis.ICUSepsisEnv, imported with its legacy-gym warnings silenced."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        from icu_sepsis.envs.sepsis import ICUSepsisEnv as ReferenceEnv
    return ReferenceEnv


def reference_bench_runner(n_steps: int):
    """A function that times one run of the reference icu-sepsis Gymnasium env (Python loop, random
    actions, reset on episode end) and returns its steps per second."""
    env = _reference_env_class()()
    return _gymnasium_loop_runner(env, np.random.default_rng(0).integers(0, 5, size=(n_steps, 2)))


def _gymnasium_loop_runner(env, actions: np.ndarray):
    """A function that steps `env` through `actions` in a Python loop (reset on episode end) and returns
    its steps per second."""
    env.reset(seed=0)

    def run() -> float:
        env.reset()
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return len(actions) / (time.perf_counter() - start)

    return run


def python_rules_bench_runner(n_steps: int, version: str):
    """Times the plain per-step Python implementation of the simulator's rules (random actions)."""
    from cleansepsis import sepsis_sim

    def run() -> float:
        start = time.perf_counter()
        sepsis_sim.python_rollout_steps(n_steps, seed=0, version=version)
        return n_steps / (time.perf_counter() - start)

    return run


def gymnasium_bench_runner(n_steps: int, mdp: str):
    """Times the core's Gymnasium class (numpy alias sampling, Python loop, random actions)."""
    from cleansepsis.mdp import FiniteMDPEnv

    env = FiniteMDPEnv(load_mdp(mdp, obs_mode="index"))
    return _gymnasium_loop_runner(env, np.random.default_rng(0).integers(0, env.action_space.n, size=n_steps))


def bench_results(
    n_envs: int,
    n_steps: int,
    repeats: int,
    reference_steps: int,
    mdp: str = "icu-sepsis",
    prng: str = "threefry2x32",
    n_devices: int = 1,
) -> dict[str, float]:
    """Medians of `repeats` interleaved timed runs of each env in this one process, and their ratios. The
    reference: the icu-sepsis package's env (ICU-Sepsis), the plain-Python rules (the simulator) or the
    core's Gymnasium class (a cohort MDP). With `n_devices` > 1, one more JAX variant splits the batch
    over that many devices."""
    if n_envs % n_devices:
        raise SystemExit(f"error: --n-envs {n_envs} must be a multiple of the {n_devices} devices")
    if mdp == "icu-sepsis":
        reference = reference_bench_runner(reference_steps)
    elif mdp.startswith("sepsis-sim"):
        reference = python_rules_bench_runner(
            reference_steps, "original" if mdp.endswith("original") else "v2"
        )
    else:
        reference = gymnasium_bench_runner(reference_steps, mdp)
    runners = {
        "reference_steps_per_s": reference,
        "jax_batch_index_steps_per_s": jax_bench_runner(n_envs, n_steps, "index", True, mdp, prng),
        "jax_batch_vector_steps_per_s": jax_bench_runner(n_envs, n_steps, "vector", True, mdp, prng),
        "jax_vmap_keys_index_steps_per_s": jax_bench_runner(n_envs, n_steps, "index", False, mdp, prng),
    }
    if n_devices > 1:
        runners["jax_batch_index_devices_steps_per_s"] = jax_bench_runner(
            n_envs, n_steps, "index", True, mdp, prng, n_devices
        )
    # Interleaved rounds, so that a change in the machine's load hits every variant alike.
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(repeats):
        for name, run in runners.items():
            rates[name].append(run())
        print(f"bench: round {round_index + 1}/{repeats} done", file=sys.stderr, flush=True)
    result = {name: statistics.median(values) for name, values in rates.items()}
    reference = result["reference_steps_per_s"]
    for name in [k for k in result if k.startswith("jax_")]:
        result[name.replace("_steps_per_s", "_ratio")] = result[name] / reference
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result.update(
        n_envs=n_envs,
        n_steps=n_steps,
        repeats=repeats,
        load_average_1min=load,
        mdp=mdp,
        prng=prng,
        n_devices=n_devices,
    )
    return result


def host_devices(wanted: int) -> int:
    """Ask for `wanted` XLA CPU devices (0: one per core) before JAX's first operation; returns how many
    the bench can use (fewer when JAX already runs, for example inside a test)."""
    if wanted == 0:
        wanted = len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # JAX already ran something: its devices are fixed
        pass
    return max(1, min(wanted, len(jax.devices())))


def bench(
    json_output: JsonFlag = False,
    n_envs: int = 8192,
    n_steps: int = 500,
    repeats: int = 5,
    reference_steps: int = 20_000,
    mdp: str = "icu-sepsis",
    prng: str = "threefry2x32",
    devices: int = 0,
) -> None:
    """Steps per second of the JAX env (a batch of auto-resetting envs in `lax.scan`, random actions)
    and of the reference icu-sepsis env (Python loop, random actions), measured in the same process in
    interleaved rounds; medians over the rounds and the ratios.

    Args:
        json_output: print JSON instead of text.
        n_envs: JAX envs stepped together.
        n_steps: scan steps per timed JAX run.
        repeats: timed runs of each env (the median is reported).
        reference_steps: steps per timed run of the reference env.
        mdp: 'icu-sepsis' (reference: the icu-sepsis package's env), 'sepsis-sim' / 'sepsis-sim-original'
            (reference: the plain per-step Python rules) or a cohort MDP directory (reference: the
            Gymnasium class).
        prng: jax PRNG implementation of the JAX runs: 'threefry2x32' (jax's default) or 'rbg' (XLA's
            RngBitGenerator; about 2x faster on CPU here).
        devices: XLA devices for one more JAX variant that splits the envs over them (0: one per CPU
            core, as the learners do; 1: no such variant). The reference runs on one core either way.
    """
    if devices < 0:
        raise SystemExit(f"error: --devices must be 0 (one per core) or more, got {devices}")
    n_devices = host_devices(devices)
    result = bench_results(n_envs, n_steps, repeats, reference_steps, mdp, prng, n_devices)
    if json_output:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    labels = {
        "reference": "reference icu-sepsis env, Python loop"
        if mdp == "icu-sepsis"
        else (
            "plain Python rules, per step" if mdp.startswith("sepsis-sim") else "Gymnasium class, Python loop"
        ),
        "jax_batch_index": f"JAX step_autoreset_batch, {n_envs} envs, obs index",
        "jax_batch_vector": f"JAX step_autoreset_batch, {n_envs} envs, obs vector",
        "jax_vmap_keys_index": f"JAX vmap(step_autoreset) over keys, {n_envs} envs, obs index",
    }
    if n_devices > 1:
        labels["jax_batch_index_devices"] = f"JAX step_autoreset_batch, {n_envs} envs on {n_devices} devices"
    for key, label in labels.items():
        ratio = "" if key == "reference" else f"  ({result[key + '_ratio']:.0f}x)"
        print(f"{label:58s} {result[key + '_steps_per_s']:>12,.0f} steps/s{ratio}")
    print(
        f"medians of {repeats} runs in this process; 1-minute load average {result['load_average_1min']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    tyro.extras.subcommand_cli_from_dict(
        {"baselines": baselines, "bench": bench}, args=argv, description=__doc__.splitlines()[0]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
