"""Discrete Conservative Q-Learning (Kumar et al. 2020, "Conservative Q-Learning for Offline RL") on a
Double DQN, trained offline on a cleansepsis replay, many seeds and hyperparameter settings per compiled run.

Loss per batch = TD + alpha * CQL, where
    TD  = mean (Q(s, a) - [r + gamma * Q_target(s', argmax_{a' admissible} Q(s', a'))])^2   (Double DQN)
    CQL = mean logsumexp_{a admissible} Q(s, a) - Q(s, a_data)
The two terms are logged separately. Actions are `5 * fluid_level + vaso_level`.

    uv run python cql.py --replay data/icu100k.parquet      # 5 seeds; whole-replay updates chosen from the data
    uv run python cql.py --alpha 0.001 0.01 0.1 --num-seeds 3

With no `--replay`, trains on the built-in ICU-Sepsis clinician replay and evaluates every greedy policy
exactly on the ICU-Sepsis MDP inside the compiled program. On a replay whose observations repeat
(ICU-Sepsis) every update uses the whole replay; on MIMIC-IV, minibatches (docs/learners.md).
"""

from __future__ import annotations

from cleansepsis import interrupts

if __name__ == "__main__":  # first, so that a Ctrl-C while jax loads also ends in one line and status 130
    interrupts.install()

from dataclasses import dataclass
from typing import Any, Literal

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from cleansepsis import runs
from cleansepsis.full_batch import FullBatch
from cleansepsis.networks import MLP, array_part, export_mlp, structure
from cleansepsis.replay import Transitions


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """replay parquet to train on; default: the built-in ICU-Sepsis clinician replay (10,000 episodes, seed 0)"""
    split: str = "train"
    """replay split to train on (train, val or test)"""
    alpha: tuple[float, ...] | None = None
    """CQL weight; several values are swept (0 is plain Double DQN). Default: chosen with the batch mode
    (AUTO below): small under full batch, where on ICU-Sepsis every admissible action is in the data"""
    gamma: tuple[float, ...] = (1.0,)
    """discount; several values are swept. ICU-Sepsis rewards survival once, so gamma = 1 values the
    survival probability"""
    target_update_every: int = 100
    """updates between hard copies of the online network into the target network"""
    max_grad_norm: float = 10.0
    """gradients are clipped to this global norm"""
    learning_rate: tuple[float, ...] | None = None
    """Adam learning rate; several values are swept. Default: chosen with the batch mode (AUTO below)"""
    lr_schedule: Literal["auto", "cosine", "constant"] = "auto"
    """cosine: decay the learning rate to zero over the run (less SGD noise at the end); auto: chosen with
    the batch mode (AUTO below)"""
    hidden: tuple[int, ...] | None = None
    """hidden layer widths of the Q network, e.g. --hidden 256 256. Default: chosen with the batch mode"""
    batch_size: int = 256
    """transitions per update with minibatches"""
    full_batch: bool = False
    """every update uses the whole replay (its distinct transitions, weighted by count): the exact gradient
    of the loss that minibatches estimate, free of sampling noise. Default: chosen from the replay's
    distinct observations (full batch when they repeat, as on ICU-Sepsis; minibatches on MIMIC-IV)"""
    minibatch: bool = False
    """train on minibatches of --batch-size even where the full batch would be chosen"""
    num_updates: int | None = None
    """gradient updates per policy. Default: chosen with the batch mode"""
    eval_every: int = 1_000
    """updates between logged metrics (and exact evaluations on ICU-Sepsis replays)"""
    save_every: int = 0
    """also keep a checkpoint of every policy every this many updates (0: only the final one)"""
    seed: int = 0
    """first seed; the run trains seeds seed, seed+1, ..., the same seeds in every setting"""
    num_seeds: int = 5
    """seeds per setting, trained side by side in one compiled program"""
    run_dir: str | None = None
    """run folder to write; default runs/<script>__<run name>__<YYYYmmdd-HHMMSS>"""
    run_name: str = "default"
    """run name, part of the default run folder's name"""
    overwrite: bool = False
    """replace an existing --run-dir (only a folder a learner wrote)"""

    @property
    def num_evals(self) -> int:
        return self.num_updates // self.eval_every

    @property
    def evals_per_save(self) -> int:
        return self.save_every // self.eval_every


# Defaults for each batch mode (docs/learners.md has the measurements behind them). Full batch: no SGD
# noise, so a large cosine-decayed learning rate converges in few updates. Minibatches (MIMIC-IV): the
# defaults this learner has always had.
AUTO = {
    "full batch": {"alpha": (0.001,), "learning_rate": (3e-3,), "lr_schedule": "cosine", "hidden": (128, 128),
                   "num_updates": 6_000},
    "minibatch": {"alpha": (0.02,), "learning_rate": (1e-3,), "lr_schedule": "cosine", "hidden": (128, 128),
                  "num_updates": 20_000},
}


def check_args(args: Args) -> None:
    """This algorithm's own options; the shared ones are checked by runs.check_common_args."""
    for alpha in args.alpha or ():
        runs.require(alpha >= 0, f"--alpha values must be at least 0, got {alpha}")
    for gamma in args.gamma:
        runs.require(0 <= gamma <= 1, f"--gamma values must be in [0, 1], got {gamma}")
    runs.require(args.target_update_every >= 1, f"--target-update-every must be at least 1, got {args.target_update_every}")
    runs.require(args.max_grad_norm > 0, f"--max-grad-norm must be positive, got {args.max_grad_norm}")


# ---------------------------------------------------------------------------------------------------------
# Losses (pure; shapes in comments)


def masked_argmax(q: jax.Array, mask: jax.Array) -> jax.Array:
    """argmax over admissible actions. q, mask: (..., n_actions) -> (...)."""
    return jnp.argmax(jnp.where(mask, q, -jnp.inf), axis=-1)


def double_dqn_target(
    next_q_online: jax.Array,  # (batch, n_actions)
    next_q_target: jax.Array,  # (batch, n_actions)
    reward: jax.Array,  # (batch,)
    terminated: jax.Array,  # (batch,) bool
    next_mask: jax.Array,  # (batch, n_actions) bool
    gamma: jax.Array,  # ()
) -> jax.Array:
    """r + gamma * Q_target(s', argmax_{admissible a'} Q_online(s', a')), no bootstrap past a terminal state."""
    bootstrap = double_dqn_bootstrap(next_q_online, next_q_target, next_mask)  # (batch,)
    return reward + gamma * jnp.where(terminated, 0.0, bootstrap)


def double_dqn_bootstrap(
    next_q_online: jax.Array, next_q_target: jax.Array, next_mask: jax.Array
) -> jax.Array:
    """Q_target(s', argmax_{admissible a'} Q_online(s', a')). Each (batch, n_actions) -> (batch,)."""
    chex.assert_equal_shape([next_q_online, next_q_target, next_mask])
    best = masked_argmax(next_q_online, next_mask)  # (batch,)
    return jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]


def masked_logsumexp(q: jax.Array, mask: jax.Array) -> jax.Array:
    """logsumexp over admissible actions. q, mask: (..., n_actions) -> (...)."""
    return jax.nn.logsumexp(jnp.where(mask, q, -jnp.inf), axis=-1)


def cql_penalty(q: jax.Array, action: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample logsumexp over admissible actions of Q(s, .) minus Q(s, a_data). q: (batch, n_actions)."""
    chex.assert_equal_shape([q, mask])
    logsumexp = masked_logsumexp(q, mask)  # (batch,)
    q_data = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]  # (batch,)
    return logsumexp - q_data


def cql_loss(params, static, target_params, batch: Transitions, hparams: dict[str, jax.Array]):
    net = eqx.combine(params, static)
    target_net = eqx.combine(target_params, static)
    q = jax.vmap(net)(batch.obs)  # (batch, n_actions)
    next_q_online = jax.vmap(net)(batch.next_obs)  # (batch, n_actions)
    next_q_target = jax.vmap(target_net)(batch.next_obs)  # (batch, n_actions)
    target = double_dqn_target(
        jax.lax.stop_gradient(next_q_online),
        jax.lax.stop_gradient(next_q_target),
        batch.reward,
        batch.terminated,
        batch.next_action_mask,
        hparams["gamma"],
    )
    q_data = jnp.take_along_axis(q, batch.action[:, None], axis=-1)[:, 0]  # (batch,)
    td = jnp.mean((q_data - target) ** 2)
    conservative = jnp.mean(cql_penalty(q, batch.action, batch.action_mask))
    return td + hparams["alpha"] * conservative, {
        "td_loss": td,
        "cql_loss": conservative,
        "q_data": q_data.mean(),
    }


def full_batch_cql_loss(
    params, static, target_params, data: FullBatch, hparams: dict[str, jax.Array]
):
    """`cql_loss` with the whole replay as the batch, written over (observation, action) cells: each term is
    a sum over transitions of a function of Q(s, a), so Q runs once per distinct observation and the
    gradient never scatters back through per-transition rows."""
    q = jax.vmap(eqx.combine(params, static))(data.obs_table)  # (rows, n_actions)
    q_target = jax.vmap(eqx.combine(target_params, static))(data.obs_table)  # (rows, n_actions)
    bootstrap = double_dqn_bootstrap(jax.lax.stop_gradient(q), q_target, data.mask_table)  # (rows,)
    # r + gamma * bootstrap(s') per transition, summed over the cells (cleansepsis.full_batch)
    td = data.td_squared_error(q, 1.0, hparams["gamma"], jax.lax.stop_gradient(bootstrap))
    logsumexp = masked_logsumexp(q, data.mask_table)  # (rows,)
    conservative = jnp.sum(data.pair_weight * (logsumexp[:, None] - q))
    return td + hparams["alpha"] * conservative, {
        "td_loss": td,
        "cql_loss": conservative,
        "q_data": jnp.sum(data.pair_weight * q),
    }


# ---------------------------------------------------------------------------------------------------------
# Training


class TrainState(eqx.Module):
    """Arrays only, so it can be a scan carry; the network's static parts live in make_train's closure."""

    params: Any
    target_params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_train(args: Args, obs_dim: int, n_actions: int):
    """Pure `train(key, hparams, inputs) -> (params, metrics, saved)` for one seed and one setting, where
    inputs = (transitions, env params or None) are passed as arguments (as constants they would slow
    compilation); under full batch the transitions are a `FullBatch`. Metrics are arrays of shape
    (num_evals,); with env params each logged step includes the exact return of the greedy policy. `saved`
    stacks the params every --save-every updates (None without)."""
    optimiser = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.scale_by_adam())
    static = network_static(obs_dim, n_actions, args.hidden)

    def init(key: jax.Array) -> TrainState:
        net_key, key = jax.random.split(key)
        params = array_part(MLP(obs_dim, n_actions, args.hidden, net_key))
        return TrainState(params, params, optimiser.init(params), jnp.zeros((), jnp.int32), key)

    def update(state: TrainState, hparams, data: Transitions | FullBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        key, sample_key = jax.random.split(state.key)
        if args.full_batch:
            grads, metrics = jax.grad(full_batch_cql_loss, has_aux=True)(
                state.params, static, state.target_params, data, hparams
            )
        else:
            batch = runs.sample_batch(sample_key, data, args.batch_size)
            grads, metrics = jax.grad(cql_loss, has_aux=True)(
                state.params, static, state.target_params, batch, hparams
            )
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        lr = runs.learning_rate_at(hparams["learning_rate"], state.step, args.num_updates, args.lr_schedule)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        step = state.step + 1
        copy = step % args.target_update_every == 0
        target_params = jax.tree.map(lambda t, p: jnp.where(copy, p, t), state.target_params, params)
        return TrainState(params, target_params, opt_state, step, key), metrics

    def train(key: jax.Array, hparams: dict[str, jax.Array], inputs) -> tuple[Any, dict[str, jax.Array], Any]:
        data, env_params = inputs

        def evaluate(state: TrainState, _) -> tuple[TrainState, dict[str, jax.Array]]:
            state, metrics = jax.lax.scan(lambda s, _: update(s, hparams, data), state, None, length=args.eval_every)
            metrics = {k: v.mean() for k, v in metrics.items()}  # mean over the period's updates
            if env_params is not None:
                q = jax.vmap(eqx.combine(state.params, static))(env_params.state_vectors)  # (716, n_actions)
                metrics["exact_return"], metrics["mean_length"] = runs.exact_evaluation(env_params, q, "greedy")
            return state, metrics

        state, metrics, saved = runs.scan_evaluations(
            evaluate, init(key), args.num_evals, args.evals_per_save, lambda state: state.params
        )
        return state.params, metrics, saved

    return train


def network_static(obs_dim: int, n_actions: int, hidden: tuple[int, ...]):
    """The non-array parts of the Q network (its structure), to combine with trained params."""
    return structure(lambda: MLP(obs_dim, n_actions, hidden, jax.random.key(0)))


# ---------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    runs.check_common_args(args)  # everything that can be checked before any work
    check_args(args)
    run_dir = runs.check_run_dir(args, __file__)
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    runs.enable_compilation_cache()
    replay, data, env_params = runs.load_training_data(args.replay, args.split)
    n_transitions, env_id = data.size, replay.meta.get("env_id")
    data, full_batch, why = runs.choose_batch_mode(data, args.full_batch, args.minibatch, env_id)
    args, defaults = runs.resolve_defaults(args, AUTO, full_batch, n_transitions)
    check_args(args)
    runs.print_plan("cql", args, defaults, why)
    settings, hparams = runs.make_hparam_grid(
        {"alpha": args.alpha, "learning_rate": args.learning_rate, "gamma": args.gamma}
    )
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train = make_train(args, replay.obs_dim, replay.n_actions)
    (params, metrics, saved), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="cql", inputs=(data, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    reference = runs.reference_values(env_params)
    runs.print_results_table("cql", settings, seeds, metrics, reference)
    static = network_static(replay.obs_dim, replay.n_actions, args.hidden)
    path = runs.finish_run(
        algo="cql", script=__file__, args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
        metrics=metrics, outputs="q_values", timing=timing, n_updates=args.num_updates,
        export=lambda s, i, k: export_mlp(runs.policy_at(params, saved, s, i, k), static),
        saved_updates=runs.updates_at_saves(args.num_updates, args.save_every), reference=reference,
        run_dir=run_dir, overwrite=args.overwrite, extra_summary={"defaults": defaults},
    )
    runs.print_timing(timing, path)


if __name__ == "__main__":
    runs.cli_main(main)
