"""Discrete Implicit Q-Learning (IQL; Kostrikov, Nair, Levine 2021, arXiv 2110.06169) on a cleansepsis replay.

Twin Q-networks learn r + gamma * V(s'); V learns an upper expectile (`--tau`) of min(Q1, Q2) over the data's
actions, so no action outside the data is ever queried; the policy is extracted by advantage-weighted
regression: maximise exp(beta * (Q - V)) (clipped) times log pi(a|s) over the data, with `--beta` the inverse
temperature. The agent acts by the argmax of the policy network over admissible actions.

    python iql.py --tau 0.7 --beta 3                      # 5 seeds on the ICU-Sepsis clinician replay
    python iql.py --tau 0.7 0.9 --beta 1 3 10 --num-seeds 3 --replay data/icu100k.parquet

Every `--tau`, `--beta` and `--learning-rate` value on the command line is crossed with the others and with
the seeds, and all of them train in one compiled program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from cleansepsis import runs
from cleansepsis.checkpoint import linear_layers
from cleansepsis.replay import DistinctTransitions, Transitions, distinct_transitions


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """replay parquet to train on; default: the built-in ICU-Sepsis clinician replay (10,000 episodes)"""
    tau: tuple[float, ...] = (0.7,)
    """expectile of V over the data's Q values (0.5 = mean, towards 1 = max); several values are swept"""
    beta: tuple[float, ...] = (3.0,)
    """inverse temperature of advantage-weighted policy extraction; several values are swept"""
    learning_rate: tuple[float, ...] = (1e-3,)
    """Adam learning rate of all three networks; several values are swept"""
    lr_decay: bool = False
    """cosine-decay the learning rate to zero over the run: less SGD noise at the end of long runs (off by
    default: the default 5,000-update run is still improving, and decay cost it 0.005)"""
    target_update_rate: float = 0.005
    """Polyak rate of the target Q-networks"""
    gamma: float = 1.0
    """discount; ICU-Sepsis is episodic with short episodes, and its return is the survival probability"""
    reward_scale: float = 100.0
    """rewards are multiplied by this while learning, so that advantages (tiny on ICU-Sepsis) are on the
    scale that --beta expects; reported returns are unscaled"""
    max_weight: float = 100.0
    """clip of the advantage weight exp(beta * advantage)"""
    hidden: int = 64
    """width of the hidden layers of every network"""
    depth: int = 2
    """number of hidden layers"""
    batch_size: int = 256
    """transitions per update"""
    full_batch: bool = False
    """every update uses the whole replay (its distinct transitions, weighted by count; --batch-size is
    ignored): the exact gradient of the losses that minibatches estimate, free of sampling noise; an update
    costs one pass over the distinct observations, so on ICU-Sepsis it is as cheap as a small batch"""
    num_updates: int = 5_000
    """gradient updates per policy"""
    eval_every: int = 1_000
    """updates between exact evaluations (ICU-Sepsis replays) and logged metrics"""
    seed: int = 0
    """first seed; seeds are seed, seed+1, ..."""
    num_seeds: int = 5
    """number of seeds trained at once"""
    name: str = "default"
    """run name, part of the run folder's name"""
    run_dir: str | None = None
    """run folder; default runs/iql__<name>__<time>"""
    overwrite: bool = False
    """replace an existing --run-dir"""

    @property
    def num_evals(self) -> int:
        return self.num_updates // self.eval_every


def make_mlp(in_size: int, out_size: int | str, args: Args, key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(in_size, out_size, args.hidden, args.depth, activation=jax.nn.relu, key=key)


class Params(eqx.Module):
    """The arrays of all networks (structure lives in the closure); q and q_target hold the twin ensemble."""

    q: Any
    q_target: Any
    v: Any
    pi: Any


class TrainState(eqx.Module):
    params: Params
    opt_state: Any
    step: jnp.ndarray


def expectile_loss(diff: jnp.ndarray, tau: jnp.ndarray, batch_weight: jnp.ndarray | None = None) -> jnp.ndarray:
    """mean |tau - 1[diff < 0]| * diff^2 for diff = target - prediction; with batch_weight, the sum of
    batch_weight times it instead."""
    weight = jnp.where(diff < 0, 1.0 - tau, tau)
    if batch_weight is not None:
        return jnp.sum(batch_weight * weight * diff**2)
    return jnp.mean(weight * diff**2)


def awr_weights(advantage: jnp.ndarray, beta: jnp.ndarray, max_weight: float) -> jnp.ndarray:
    """exp(beta * advantage), clipped above at max_weight."""
    return jnp.minimum(jnp.exp(beta * advantage), max_weight)


def learning_rate_schedule(peak: jnp.ndarray, num_updates: int, decay: bool):
    """count -> learning rate: cosine from the (traced) peak to zero over num_updates, or constant."""
    return optax.cosine_decay_schedule(peak, num_updates) if decay else peak


def masked_log_prob(logits: jnp.ndarray, mask: jnp.ndarray, action: jnp.ndarray) -> jnp.ndarray:
    """log pi(a|s) with pi a softmax over the admissible actions (the data's own action always counts)."""
    n_actions = logits.shape[-1]
    mask = mask | jax.nn.one_hot(action, n_actions, dtype=bool)
    log_pi = jax.nn.log_softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return jnp.take_along_axis(log_pi, action[:, None], axis=-1)[:, 0]


def network_statics(args: Args, obs_dim: int, n_actions: int) -> dict[str, Any]:
    """The non-array parts of the twin Q, V and policy networks; train carries only their arrays."""
    key = jax.random.PRNGKey(0)  # only fixes the structure; values come from train's own key

    def static(model):
        return eqx.partition(model, eqx.is_array)[1]

    twin = eqx.filter_vmap(lambda k: make_mlp(obs_dim, n_actions, args, k))(jax.random.split(key, 2))
    return {
        "q": static(twin),
        "v": static(make_mlp(obs_dim, "scalar", args, key)),
        "pi": static(make_mlp(obs_dim, n_actions, args, key)),
    }


def make_train(args: Args, data: Transitions | DistinctTransitions, env_params: Any):
    """A pure train(key, hparams[, inputs]) -> (final params, metrics (num_evals,)) for one seed and one
    setting; inputs defaults to (data, env_params), with data `DistinctTransitions` under --full-batch.
    Also returns the networks' static parts and the two loss functions (minibatch, full batch)."""
    obs_dim = (data.obs_table if isinstance(data, DistinctTransitions) else data.obs).shape[1]
    n_actions = (data.mask_table if isinstance(data, DistinctTransitions) else data.action_mask).shape[1]
    statics = network_statics(args, obs_dim, n_actions)
    q_static, v_static, pi_static = statics["q"], statics["v"], statics["pi"]

    def q_values(q_params, obs):  # (2, batch, n_actions)
        q = eqx.combine(q_params, q_static)
        return eqx.filter_vmap(lambda net: jax.vmap(net)(obs))(q)

    def v_value(v_params, obs):  # (batch,)
        return jax.vmap(eqx.combine(v_params, v_static))(obs)

    def pi_logits(pi_params, obs):  # (batch, n_actions)
        return jax.vmap(eqx.combine(pi_params, pi_static))(obs)

    def losses(params: Params, batch: Transitions, hparams):
        chex.assert_rank(batch.obs, 2)
        q_target = q_values(params.q_target, batch.obs)  # (2, batch, n_actions)
        q_data = jnp.take_along_axis(q_target.min(0), batch.action[:, None], axis=1)[:, 0]  # (batch,)
        v = v_value(params.v, batch.obs)
        v_loss = expectile_loss(jax.lax.stop_gradient(q_data) - v, hparams["tau"])

        next_v = jax.lax.stop_gradient(v_value(params.v, batch.next_obs))
        not_done = 1.0 - batch.terminated.astype(jnp.float32)
        target = batch.reward * args.reward_scale + args.gamma * not_done * next_v  # (batch,)
        q = q_values(params.q, batch.obs)
        q_taken = jnp.take_along_axis(q, jnp.broadcast_to(batch.action[None, :, None], (2, q.shape[1], 1)), axis=2)
        q_loss = jnp.mean((q_taken[..., 0] - target[None]) ** 2)

        advantage = jax.lax.stop_gradient(q_data - v)
        weight = awr_weights(advantage, hparams["beta"], args.max_weight)
        log_prob = masked_log_prob(pi_logits(params.pi, batch.obs), batch.action_mask, batch.action)
        pi_loss = -jnp.mean(weight * log_prob)
        total = v_loss + q_loss + pi_loss
        return total, {"q_loss": q_loss, "v_loss": v_loss, "pi_loss": pi_loss, "mean_weight": weight.mean()}

    def full_batch_losses(params: Params, data: DistinctTransitions, hparams):
        """`losses` with the whole replay as the batch, written over (observation, action) cells: each term
        is a sum over transitions of a function of the networks at (s, a), so each network runs once per
        distinct observation and no gradient scatters back through per-transition rows."""
        obs, cell_weight = data.obs_table, data.pair_weight  # (rows, obs_dim), (rows, n_actions)
        q_data = q_values(params.q_target, obs).min(0)  # (rows, n_actions)
        v = v_value(params.v, obs)  # (rows,)
        v_loss = expectile_loss(jax.lax.stop_gradient(q_data) - v[:, None], hparams["tau"], cell_weight)

        next_v = jax.lax.stop_gradient(v)[data.next_obs_index]  # (transitions,)
        not_done = 1.0 - data.terminated.astype(jnp.float32)
        target = data.reward * args.reward_scale + args.gamma * not_done * next_v  # (transitions,)
        q_loss = jnp.mean(data.squared_error(q_values(params.q, obs), target))  # mean over the twins

        advantage = jax.lax.stop_gradient(q_data - v[:, None])
        weight = awr_weights(advantage, hparams["beta"], args.max_weight)  # (rows, n_actions)
        # the data's actions always count, as in `losses` (which adds each transition's own action only; the
        # two differ only if a replay logs two or more inadmissible actions at one observation)
        allowed = data.mask_table | (cell_weight > 0)
        log_pi = jax.nn.log_softmax(jnp.where(allowed, pi_logits(params.pi, obs), -1e9), axis=-1)
        pi_loss = -jnp.sum(cell_weight * weight * log_pi)
        total = v_loss + q_loss + pi_loss
        mean_weight = jnp.sum(cell_weight * weight)
        return total, {"q_loss": q_loss, "v_loss": v_loss, "pi_loss": pi_loss, "mean_weight": mean_weight}

    def train(key: jax.Array, hparams: dict, inputs=(data, env_params)) -> tuple[Params, dict]:
        data, env_params = inputs  # passed as arguments by run_sweep, so they are not compiled in as constants
        key, q_key, v_key, pi_key = jax.random.split(key, 4)
        q = eqx.filter(eqx.filter_vmap(lambda k: make_mlp(obs_dim, n_actions, args, k))(jax.random.split(q_key, 2)),
                       eqx.is_array)
        v = eqx.filter(make_mlp(obs_dim, "scalar", args, v_key), eqx.is_array)
        pi = eqx.filter(make_mlp(obs_dim, n_actions, args, pi_key), eqx.is_array)
        params = Params(q=q, q_target=q, v=v, pi=pi)
        optimiser = optax.inject_hyperparams(optax.adam)(
            learning_rate=learning_rate_schedule(hparams["learning_rate"], args.num_updates, args.lr_decay)
        )
        trainable = (params.q, params.v, params.pi)
        state = TrainState(params=params, opt_state=optimiser.init(trainable), step=jnp.zeros((), jnp.int32))

        def update(carry, _):
            state, key = carry
            key, batch_key = jax.random.split(key)
            batch = data if args.full_batch else runs.sample_batch(batch_key, data, args.batch_size)
            loss_fn = full_batch_losses if args.full_batch else losses

            def loss_of(trainable):
                q, v, pi = trainable
                return loss_fn(Params(q=q, q_target=state.params.q_target, v=v, pi=pi), batch, hparams)

            trainable = (state.params.q, state.params.v, state.params.pi)
            (_, info), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
            updates, opt_state = optimiser.update(grads, state.opt_state, trainable)
            q, v, pi = optax.apply_updates(trainable, updates)
            q_target = optax.incremental_update(q, state.params.q_target, args.target_update_rate)
            params = Params(q=q, q_target=q_target, v=v, pi=pi)
            return (TrainState(params=params, opt_state=opt_state, step=state.step + 1), key), info

        def evaluate(carry, _):
            carry, infos = jax.lax.scan(update, carry, None, length=args.eval_every)
            metrics = jax.tree.map(jnp.mean, infos)
            if env_params is not None:
                params = carry[0].params
                states = env_params.state_vectors
                result = runs.exact_evaluations(env_params, {
                    "policy": (pi_logits(params.pi, states), "greedy"),
                    "q": (q_values(params.q, states).min(0), "greedy"),
                })
                (ret, length), (q_ret, _) = result["policy"], result["q"]
                metrics |= {"exact_return": ret, "mean_length": length, "q_greedy_return": q_ret}
            runs.tick(metrics.get("exact_return"))
            return carry, metrics

        (state, _), metrics = jax.lax.scan(evaluate, (state, key), None, length=args.num_evals)
        return state.params, metrics

    return train, statics, (losses, full_batch_losses)


def export_policy(pi_params: Any, pi_static: Any, depth: int) -> tuple[dict[str, np.ndarray], dict]:
    names = [f"hidden_{i}" for i in range(depth)] + ["output"]
    network = {"kind": "mlp", "activation": "relu", "hidden": names[:-1], "output": "output"}
    return linear_layers(eqx.combine(pi_params, pi_static), names), network


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    if args.num_evals < 1:
        raise runs.RunError(f"--num-updates {args.num_updates} is smaller than --eval-every {args.eval_every}")
    if any(not 0 < t < 1 for t in args.tau):
        raise runs.RunError(f"--tau values must be in (0, 1), got {args.tau}")
    replay, data, env_params = runs.load_training_data(args.replay)
    if args.full_batch:
        data = distinct_transitions(data)
    settings, hparams = runs.make_hparam_grid(
        {"tau": args.tau, "beta": args.beta, "learning_rate": args.learning_rate}
    )
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train, statics, _ = make_train(args, data, env_params)
    (params, metrics), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="iql", inputs=(data, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    reference = runs.reference_values(env_params)
    runs.print_results_table("iql", settings, seeds, metrics, reference,
                             columns=("exact_return", "q_greedy_return", "mean_length"))
    path = runs.finish_run(
        algo="iql", args=args, replay=replay, settings=settings, seeds=seeds, steps=steps, metrics=metrics,
        export=lambda s, i: export_policy(runs.index_run(params.pi, s, i), statics["pi"], args.depth),
        outputs="logits", timing=timing, n_updates=args.num_updates, reference=reference,
        run_dir=args.run_dir, name=args.name, overwrite=args.overwrite,
    )
    print(f"compile {timing['compile_seconds']:.1f} s, train {timing['train_seconds']:.1f} s; wrote {path}")


if __name__ == "__main__":
    runs.cli_main(main)
