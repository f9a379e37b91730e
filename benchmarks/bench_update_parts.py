"""Where cql.py's update spends its time: the update with one part removed or changed at a time.

The update is cql.py's own (47 -> 256 -> 256 -> 25, batch 256, Adam with clipping, cosine learning rate,
hard target copies, 200,000 random transitions on the device), one seed on one XLA device using every core.
Each variant is a jitted `lax.scan` of `--updates` updates; the variants are timed in interleaved rounds
(every variant once per round) and the median per update is reported, with two references measured in the
same rounds: jitted loops of 1024^3 and 256^3 float32 matmuls. A part's share is
(full - without it) / full. The evaluation hook (exact evaluation of the greedy policy on ICU-Sepsis and the
progress-bar callback, once per `--eval-every` updates) is timed on its own and spread over its updates.

    CLEANSEPSIS_HOST_DEVICES=1 uv run python benchmarks/bench_update_parts.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cql import HIDDEN, N_ACTIONS, OBS_DIM, random_transitions, update_flops  # noqa: E402

import cql  # noqa: E402
from cleansepsis import runs  # noqa: E402
from cleansepsis.networks import MLP  # noqa: E402


@dataclass(frozen=True)
class Args:
    updates: int = 300
    """Updates per timed call."""
    rounds: int = 5
    """Interleaved rounds; every figure is the median over them."""
    batch_size: int = 256
    """Transitions per update."""
    eval_every: int = 1000
    """Updates per evaluation in cql.py (to spread the evaluation hook's cost)."""
    seeds: int = 1
    """Seeds updated side by side (`vmap`, as `CLEANSEPSIS_VMAP_WIDTH` runs them): the matmuls become
    batched matmuls over the seeds; FLOPs count every seed."""


VARIANTS = {
    "full": "cql.py's update",
    "no_gather": "the same batch every update (no random rows gathered from the 200k transitions)",
    "fused_forward": "online network on obs and next_obs in one 512-row pass instead of two 256-row passes",
    "stacked_next_forward": "online and target networks on next_obs as one batched matmul (params stacked)",
    "no_target_forward": "the online network's next-state values stand in for the target network's",
    "sgd": "plain SGD instead of clipping + Adam",
    "no_target_copy": "no hard target copy (the jnp.where over every parameter each update)",
    "no_cql_terms": "TD loss only (no logsumexp / argmax / take_along_axis terms)",
    "matmuls_only": "the same matmuls forward and backward, squared error, SGD, fixed batch",
}


def make_update(variant: str, batch_size: int, total: int) -> Callable:
    """A scan step (state, data) -> state for one variant of cql.py's update."""
    static = cql.network_static(OBS_DIM, N_ACTIONS, HIDDEN)
    adam = optax.chain(optax.clip_by_global_norm(10.0), optax.scale_by_adam())
    use_sgd = variant in ("sgd", "matmuls_only")

    def loss_fn(params, target_params, batch, hparams):
        if variant in ("full", "no_gather", "sgd", "no_target_copy"):
            return cql.cql_loss(params, static, target_params, batch, hparams)[0]
        net = eqx.combine(params, static)
        if variant == "fused_forward":
            both = jax.vmap(net)(jnp.concatenate([batch.obs, batch.next_obs]))  # (2 batch, n_actions)
            q, next_q_online = both[:batch_size], jax.lax.stop_gradient(both[batch_size:])
        else:
            q = jax.vmap(net)(batch.obs)
            next_q_online = jax.lax.stop_gradient(jax.vmap(net)(batch.next_obs))  # replaced when stacked
        if variant == "stacked_next_forward":
            stacked = jax.tree.map(lambda a, b: jnp.stack([jax.lax.stop_gradient(a), b]), params, target_params)
            both = jax.vmap(lambda p: jax.vmap(eqx.combine(p, static))(batch.next_obs))(stacked)
            next_q_online, next_q_target = both[0], both[1]
        elif variant == "no_target_forward":
            next_q_target = next_q_online
        else:
            next_q_target = jax.vmap(eqx.combine(target_params, static))(batch.next_obs)
        if variant == "matmuls_only":
            return jnp.mean((q - next_q_online - next_q_target) ** 2)
        target = cql.double_dqn_target(
            next_q_online, next_q_target, batch.reward, batch.terminated, batch.next_action_mask, hparams["gamma"]
        )
        q_data = jnp.take_along_axis(q, batch.action[:, None], axis=-1)[:, 0]
        td = jnp.mean((q_data - target) ** 2)
        if variant == "no_cql_terms":
            return td
        return td + hparams["alpha"] * jnp.mean(cql.cql_penalty(q, batch.action, batch.action_mask))

    hparams = {"alpha": jnp.float32(1.0), "gamma": jnp.float32(0.99), "learning_rate": jnp.float32(1e-3)}

    def update(carry, data):
        params, target_params, opt_state, step, key, fixed = carry
        key, sample_key = jax.random.split(key)
        if variant in ("no_gather", "matmuls_only"):
            batch = fixed
        else:
            batch = runs.sample_batch(sample_key, data, batch_size)
        grads = jax.grad(loss_fn)(params, target_params, batch, hparams)
        if use_sgd:
            updates = grads
        else:
            updates, opt_state = adam.update(grads, opt_state, params)
        lr = hparams["learning_rate"] * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total))
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        step = step + 1
        if variant != "no_target_copy":
            copy = step % 100 == 0
            target_params = jax.tree.map(lambda t, p: jnp.where(copy, p, t), target_params, params)
        return (params, target_params, opt_state, step, key, fixed)

    def init(data, key):
        net_key, batch_key, run_key = jax.random.split(key, 3)
        params, _ = eqx.partition(MLP(OBS_DIM, N_ACTIONS, HIDDEN, net_key), eqx.is_array)
        fixed = runs.sample_batch(batch_key, data, batch_size)
        return (params, params, adam.init(params), jnp.zeros((), jnp.int32), run_key, fixed)

    return init, update


def timed_program(variant: str, args: Args, data) -> Callable[[], float]:
    init, update = make_update(variant, args.batch_size, args.updates)

    step = update if args.seeds == 1 else jax.vmap(update, in_axes=(0, None))

    @jax.jit
    def run(carry, data):
        return jax.lax.scan(lambda c, _: (step(c, data), None), carry, None, length=args.updates)[0]

    keys = jax.random.split(jax.random.key(0), args.seeds)
    carry = init(data, keys[0]) if args.seeds == 1 else jax.vmap(init, in_axes=(None, 0))(data, keys)
    jax.block_until_ready(run(carry, data))  # compile and warm up

    def once() -> tuple[float, float]:
        return clocked(lambda: jax.block_until_ready(run(carry, data)), args.updates)

    return once


def clocked(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) per unit of one call of fn doing n units. CPU
    time counts only the cycles this process got, so it moves less than wall time when other jobs share
    the cores (it still counts cycles lost to cache contention and to threads spinning while they wait)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def matmul_loop(n: int) -> Callable[[], tuple[float, float]]:
    """Seconds per FLOP (wall, CPU) of a jitted loop of n x n @ n x n float32 matmuls (bench_cql's reference)."""
    loops = 20 * (1024 // n) ** 3
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    chain = jax.jit(lambda x: jax.lax.fori_loop(0, loops, lambda _, y: (y @ a) * (1.0 / n**0.5), x))
    jax.block_until_ready(chain(a))
    return lambda: clocked(lambda: jax.block_until_ready(chain(a)), 2 * n**3 * loops)


def eval_hook_seconds(rounds: int) -> float:
    """One exact evaluation of a 256-wide Q network's greedy policy on ICU-Sepsis plus the tick callback."""
    from cleansepsis import env

    env_params = env.load_params()
    params, static = eqx.partition(MLP(OBS_DIM, N_ACTIONS, HIDDEN, jax.random.key(0)), eqx.is_array)

    @jax.jit
    def evaluate(params, env_params):
        q = jax.vmap(eqx.combine(params, static))(env_params.state_vectors)
        ret, _ = runs.exact_evaluation(env_params, q, "greedy")
        runs.tick(ret)
        return ret

    jax.block_until_ready(evaluate(params, env_params))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(params, env_params))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import tyro

    args = tyro.cli(Args, description=__doc__)
    n_devices = runs.use_host_devices(1)
    print(f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}, XLA CPU devices: {n_devices}")
    data = random_transitions(200_000)
    programs = {name: timed_program(name, args, data) for name in VARIANTS}
    programs["matmul 1024^3"] = matmul_loop(1024)
    programs["matmul 256^3"] = matmul_loop(256)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, once in programs.items():
            samples[name].append(once())
    wall = {name: statistics.median(w for w, _ in values) for name, values in samples.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
    flops = update_flops(args.batch_size) * args.seeds
    cores = len(os.sched_getaffinity(0))
    # machine throughput from the loops: FLOPs per wall second, and FLOPs per CPU second times the cores
    peak_wall = {n: 1 / wall[f"matmul {n}^3"] / 1e9 for n in (1024, 256)}
    peak_cpu = {n: cores / cpu[f"matmul {n}^3"] / 1e9 for n in (1024, 256)}
    print(
        f"matmul loops (median of {args.rounds} rounds): {peak_wall[1024]:.1f} / {peak_wall[256]:.1f} GFLOP/s "
        f"wall at 1024^3 / 256^3; {peak_cpu[1024]:.1f} / {peak_cpu[256]:.1f} per {cores} busy cores (CPU time); "
        f"update {flops / 1e6:.1f} MFLOP ({args.seeds} seed(s))"
    )
    print(f"{'variant':<20} {'wall ms':>8} {'share':>6} {'of 1024^3':>9} {'CPU ms':>7} {'share':>6} {'of 1024^3':>9} "
          f"{'of 256^3':>8}  what")  # fmt: skip
    for name in VARIANTS:
        rate_wall, rate_cpu = flops / wall[name] / 1e9, cores * flops / cpu[name] / 1e9
        print(
            f"{name:<20} {wall[name] * 1e3:>8.3f} {(wall['full'] - wall[name]) / wall['full']:>6.1%} "
            f"{rate_wall / peak_wall[1024]:>9.1%} {cpu[name] * 1e3:>7.3f} {(cpu['full'] - cpu[name]) / cpu['full']:>6.1%} "
            f"{rate_cpu / peak_cpu[1024]:>9.1%} {rate_cpu / peak_cpu[256]:>8.1%}  {VARIANTS[name]}"
        )
    eval_seconds = eval_hook_seconds(args.rounds)
    per_update = eval_seconds / args.eval_every
    print(
        f"evaluation hook (wall): {eval_seconds * 1e3:.1f} ms per evaluation, {per_update * 1e3:.3f} ms per update "
        f"at --eval-every {args.eval_every} ({per_update / (wall['full'] + per_update):.1%} of an update)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
