"""Where the time of one batched env step goes: random words against table lookups, per env-step.

Times, in one process and in interleaved rounds (medians), a `lax.scan` of `--n-steps` steps of
`--n-envs` auto-resetting envs with random actions, split into its parts:
- the whole step as `env_sepsis.py bench` times it (one action word + `step_autoreset_batch`),
- the random words alone: 3 per env-step from `mdp.batch_words` (XLA's ThreeFry, what the step uses
  now) and 6 from `jax.random.bits` (what the step and the bench's `randint` actions took before),
- the step with free words (one word of the key broadcast to every env): the table lookups alone,
- the plain per-step Python rules of the simulator (`sepsis_sim.python_rollout_steps`), the reference
  of the 100x goal.

    uv run python benchmarks/bench_step_parts.py --mdp sepsis-sim
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import tyro

import env_sepsis
from cleansepsis import mdp
from cleansepsis import sepsis_sim as S


@dataclass(frozen=True)
class Args:
    mdp: str = "sepsis-sim"
    """'sepsis-sim', 'sepsis-sim-original' or 'icu-sepsis'."""
    n_envs: int = 8192
    n_steps: int = 500
    repeats: int = 5
    reference_steps: int = 50_000
    """Steps per timed run of the plain Python rules (simulator only)."""


def scan_runner(fn, state, n_steps: int):
    """A jitted scan of `fn(key, state) -> (state, checksum)` over `n_steps` keys."""

    @jax.jit
    def run(key, state):
        def body(carry, k):
            state, total = carry
            state, checksum = fn(k, state)
            return (state, total + checksum), None

        return jax.lax.scan(body, (state, jnp.zeros((), jnp.float32)), jax.random.split(key, n_steps))[0]

    return run


def main() -> None:
    args = tyro.cli(Args)
    params = env_sepsis.load_mdp(args.mdp, obs_mode="index")
    _, state = mdp.reset_batch(jax.random.key(0), params, args.n_envs)
    b, n_actions = args.n_envs, params.n_actions
    step_batch = jax.vmap(mdp._autoreset_transition_words, in_axes=(0, 0, 0, None))

    def whole_step(key, st):
        action_key, step_key = jax.random.split(key)
        actions = (mdp.batch_words(action_key, (b,)) % jnp.uint32(n_actions)).astype(jnp.int32)
        _, st, reward, *_ = mdp.step_autoreset_batch(step_key, st, actions, params)
        return st, reward.sum()

    def words_xla(key, st):
        return st, mdp.batch_words(key, (b, 3)).sum().astype(jnp.float32)

    def words_jax(key, st):
        return st, jax.random.bits(key, (b, 6), jnp.uint32).sum().astype(jnp.float32)

    def free_words(key, st):
        words = jnp.broadcast_to(jax.random.bits(key, (1, 3), jnp.uint32), (b, 3))
        actions = (words[:, 0] % jnp.uint32(n_actions)).astype(jnp.int32)
        new, _, reward, *_ = step_batch(words[:, 1:], st, actions, params)
        return new, reward.sum()

    runners = {
        "whole step (bench): 1 action word + step_autoreset_batch": whole_step,
        "words alone: 3 per env-step, batch_words (XLA ThreeFry)": words_xla,
        "words alone: 6 per env-step, jax.random.bits (before)": words_jax,
        "step with free words: table lookups alone": free_words,
    }
    compiled = {name: scan_runner(fn, state, args.n_steps) for name, fn in runners.items()}
    for run in compiled.values():
        jax.block_until_ready(run(jax.random.key(1), state))
    rates = {name: [] for name in compiled}
    python_rates = []
    for round_index in range(args.repeats):
        for name, run in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(run(jax.random.key(2 + round_index), state))
            rates[name].append(b * args.n_steps / (time.perf_counter() - start))
        if args.mdp.startswith("sepsis-sim"):
            start = time.perf_counter()
            S.python_rollout_steps(args.reference_steps, seed=round_index)
            python_rates.append(args.reference_steps / (time.perf_counter() - start))
        print(f"round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    reference = statistics.median(python_rates) if python_rates else None
    print(f"{args.mdp}: {b} envs x {args.n_steps} steps, medians of {args.repeats} interleaved rounds, "
          f"1-minute load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| part | steps/s | ns per env-step |{' ratio to Python |' if reference else ''}")
    print(f"|---|---|---|{'---|' if reference else ''}")
    if reference:
        print(f"| plain Python rules, per step | {reference:,.0f} | {1e9 / reference:,.0f} | 1x |")
    for name, values in rates.items():
        rate = statistics.median(values)
        ratio = f" {rate / reference:.0f}x |" if reference else ""
        print(f"| {name} | {rate:,.0f} | {1e9 / rate:.1f} |{ratio}")


if __name__ == "__main__":
    main()
