"""What can be learned from an ICU-Sepsis clinician replay: planners counted from the replay, and the
noise-free limit of the Q-learners, each scored by the exact return of its greedy policy on the true MDP.

Every figure here uses the true MDP only to score a policy, never to choose it; but a row's
hyperparameter (penalty, shrinkage, training length) is picked by looking at all of them, so the best row
is an optimistic ceiling, not a method.

- Certainty-equivalence (CE): count the replay into a tabular model, plan over admissible actions seen in
  the data, act greedily (states never seen: the greedy clinician).
  - `--penalties c`: subtract c / sqrt(n(s, a)) from every backup (count-based pessimism).
  - `--shrinkage k`: add k pseudo-transitions drawn from the state's pooled (all-action) next-state
    distribution to every (s, a) row (empirical-Bayes smoothing across actions).
- Noise-free Q-learning (`--neural`): the expected minibatch loss of cql.py (Double-DQN TD + alpha x CQL
  penalty) is a count-weighted sum over the (s, a) pairs of the replay, because an ICU-Sepsis observation
  is a function of its state. Full-batch Adam on that sum, with hard target copies, is what cql.py's SGD
  approaches as its batch grows; it shows whether a gap is SGD noise or the data.

    uv run python benchmarks/offline_ceiling.py                                  # built-in 10k replay
    uv run python benchmarks/offline_ceiling.py --replay data/icu100k.parquet --no-neural
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import polars as pl
import tyro

from cleansepsis import env
from cleansepsis.icu_replay import default_replay_path


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """ICU-Sepsis replay parquet (needs state_index, action, next_state_index); default: the built-in 10k."""
    penalties: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)
    """Count-penalty weights c of pessimistic CE (c / sqrt(n) per backup)."""
    shrinkage: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    """Pseudo-counts k of the action-pooled prior in smoothed CE."""
    neural: bool = True
    """Also train the noise-free (full-batch, count-weighted) Q-learner."""
    alphas: tuple[float, ...] = (0.0, 0.02)
    """CQL weights of the noise-free learner."""
    hidden: tuple[int, ...] = (128, 128)
    """Hidden widths of its Q network (cql.py's default)."""
    steps: int = 6_000
    """Full-batch Adam steps (cosine-decayed learning rate)."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate."""
    target_every: int = 100
    """Steps between hard target copies."""
    report_every: int = 1_500
    """Steps between scored policies."""
    seed: int = 0
    """Network initialisation seed."""


def replay_counts(path: str) -> np.ndarray:
    """counts[s, a, s'] of the replay's transitions (float64, (716, 25, 716))."""
    columns = ["state_index", "action", "next_state_index"]
    try:
        frame = pl.read_parquet(path, columns=columns)
    except (pl.exceptions.ColumnNotFoundError, pl.exceptions.SchemaError) as error:
        sys.exit(
            f"{path}: needs columns {columns} (an ICU-Sepsis replay from data_prep.py icu-sepsis): {error}"
        )
    counts = np.zeros((env.N_STATES, env.N_ACTIONS, env.N_STATES))
    np.add.at(counts, tuple(frame[c].to_numpy() for c in columns), 1.0)
    return counts


class Scorer:
    """Exact return on the true MDP of the greedy policy of a (716, 25) score table."""

    def __init__(self) -> None:
        self.params = env.load_params("mean")
        self.mask = np.asarray(self.params.admissible_mask)
        self._evaluate = jax.jit(lambda policy: env.policy_evaluation(policy, self.params)[0])

    def __call__(self, scores: np.ndarray) -> float:
        policy = env.greedy_admissible(jnp.asarray(scores, jnp.float32), self.params.admissible_mask)
        return float(self._evaluate(policy))


def plan(counts: np.ndarray, mask: np.ndarray, fallback: np.ndarray, prior_weight: float, penalty: float):
    """Value iteration (gamma = 1) on the counted model over admissible, seen pairs; returns Q scores."""
    n = counts.sum(-1)  # (716, 25)
    pooled = counts.sum(1)
    pooled /= np.maximum(pooled.sum(-1, keepdims=True), 1.0)
    model = (counts + prior_weight * pooled[:, None, :]) / np.maximum(n + prior_weight, 1e-12)[..., None]
    usable = mask & (n > 0)
    usable[list(env.TERMINAL_STATES)] = False
    backup_penalty = penalty / np.sqrt(np.maximum(n, 1.0))
    values = np.zeros(env.N_STATES)
    for _ in range(1_000):
        q = model[:, :, env.SURVIVAL] + model @ values - backup_penalty
        new_values = np.where(usable.any(1), np.where(usable, q, -np.inf).max(1), 0.0)
        if np.abs(new_values - values).max() < 1e-10:
            break
        values = new_values
    unseen = ~usable.any(1)
    scores = np.where(usable, q, -np.inf)
    scores[unseen] = fallback[unseen]
    return scores


def noise_free_q_learning(counts: np.ndarray, scorer: Scorer, args: Args, alpha: float) -> list[float]:
    """Full-batch Adam on cql.py's expected loss; exact returns every `report_every` steps."""
    params_env = scorer.params
    n = counts.sum(-1)
    weight = jnp.asarray(n / n.sum(), jnp.float32)  # (716, 25) share of each pair in a uniform batch
    model = jnp.asarray(counts / np.maximum(n[..., None], 1.0), jnp.float32)
    reward = model[:, :, env.SURVIVAL]
    obs = params_env.state_vectors
    mask = params_env.admissible_mask
    widths = [env.OBS_DIM, *args.hidden, env.N_ACTIONS]
    keys = jax.random.split(jax.random.key(args.seed), len(widths) - 1)
    layers = [eqx.nn.Linear(i, o, key=k) for i, o, k in zip(widths[:-1], widths[1:], keys, strict=True)]
    params, static = eqx.partition(layers, eqx.is_array)

    def q_table(params):
        x = obs
        layers = eqx.combine(params, static)
        for layer in layers[:-1]:
            x = jax.nn.relu(jax.vmap(layer)(x))
        return jax.vmap(layers[-1])(x)  # (716, 25)

    def loss(params, target_params):
        q = q_table(params)
        best_next = jnp.argmax(jnp.where(mask, jax.lax.stop_gradient(q), -jnp.inf), axis=1)
        next_value = jnp.take_along_axis(q_table(target_params), best_next[:, None], axis=1)[:, 0]
        target = reward + model @ jnp.where(params_env.terminal, 0.0, next_value)
        td = jnp.sum(weight * (q - target) ** 2)
        logsumexp = jax.nn.logsumexp(jnp.where(mask, q, -jnp.inf), axis=1)
        penalty = jnp.sum(weight.sum(1) * logsumexp) - jnp.sum(weight * q)
        return td + alpha * penalty

    optimiser = optax.chain(
        optax.clip_by_global_norm(10.0),
        optax.adam(optax.cosine_decay_schedule(args.learning_rate, args.steps)),
    )

    @jax.jit
    def target_period(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = optimiser.update(jax.grad(loss)(params, target_params), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        target_params = params
        return jax.lax.scan(step, (params, opt_state), None, length=args.target_every)[0]

    opt_state = optimiser.init(params)
    returns = []
    for period in range(1, args.steps // args.target_every + 1):
        params, opt_state = target_period(params, opt_state)
        if (period * args.target_every) % args.report_every == 0:
            returns.append(scorer(np.asarray(q_table(params))))
    return returns


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if args.steps % args.target_every or args.report_every % args.target_every:
        sys.exit(
            f"--steps ({args.steps}) and --report-every ({args.report_every}) must be multiples of "
            f"--target-every ({args.target_every})"
        )
    path = args.replay or str(default_replay_path())
    counts = replay_counts(path)
    scorer = Scorer()
    clinician = np.asarray(env.clinician_policy(scorer.params))
    n = counts.sum(-1)
    print(
        f"{path}: {int(n.sum())} transitions, {int(((n > 0) & scorer.mask).sum())} of "
        f"{int(scorer.mask[: env.N_PATIENT_STATES].sum())} admissible (state, action) pairs seen"
    )
    print(f"reference: greedy clinician {scorer(clinician):.4f}, optimal 0.8751")
    print("\nplanner                              exact return")
    for penalty in args.penalties:
        print(
            f"CE, count penalty {penalty:<18g} {scorer(plan(counts, scorer.mask, clinician, 0.0, penalty)):.4f}"
        )
    for prior in args.shrinkage:
        print(
            f"CE, action-pooled prior k={prior:<10g} {scorer(plan(counts, scorer.mask, clinician, prior, 0.0)):.4f}"
        )
    if args.neural:
        steps = list(range(args.report_every, args.steps + 1, args.report_every))
        print(f"\nnoise-free Q-learner {args.hidden}, exact return after {steps} full-batch steps")
        for alpha in args.alphas:
            start = time.perf_counter()
            returns = noise_free_q_learning(counts, scorer, args, alpha)
            print(
                f"alpha {alpha:<6g} "
                + "  ".join(f"{r:.4f}" for r in returns)
                + f"   ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
