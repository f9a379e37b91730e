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
from cleansepsis.networks import MLP, export_mlp, structure
from cleansepsis.replay import Transitions


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """replay parquet to train on; default: the built-in ICU-Sepsis clinician replay (10,000 episodes, seed 0)"""
    split: str = "train"
    """replay split to train on (train, val or test)"""
    tau: tuple[float, ...] | None = None
    """expectile of V over the data's Q values (0.5 = mean, towards 1 = max); several values are swept.
    Default: chosen with the batch mode (AUTO below)"""
    beta: tuple[float, ...] | None = None
    """inverse temperature of advantage-weighted policy extraction; several values are swept. Default:
    chosen with the batch mode (AUTO below)"""
    target_update_rate: float = 0.005
    """Polyak rate of the target Q-networks"""
    gamma: float = 1.0
    """discount; ICU-Sepsis is episodic with short episodes, and its return is the survival probability"""
    reward_scale: float = 100.0
    """rewards are multiplied by this while learning, so that advantages (tiny on ICU-Sepsis) are on the
    scale that --beta expects; reported returns are unscaled"""
    max_weight: float = 100.0
    """clip of the advantage weight exp(beta * advantage)"""
    learning_rate: tuple[float, ...] | None = None
    """Adam learning rate of every network; several values are swept. Default: chosen with the batch mode
    (AUTO below)"""
    lr_schedule: Literal["auto", "cosine", "constant"] = "auto"
    """cosine: decay the learning rate to zero over the run (less SGD noise at the end); auto: chosen with
    the batch mode (AUTO below)"""
    hidden: tuple[int, ...] | None = None
    """hidden layer widths of every network, e.g. --hidden 256 256. Default: chosen with the batch mode"""
    batch_size: int = 256
    """transitions per update with minibatches"""
    full_batch: bool = False
    """every update uses the whole replay (its distinct transitions, weighted by count): the exact gradient
    of the losses that minibatches estimate, free of sampling noise. Default: chosen from the replay's
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


FULL_BATCH_SMALL = 200_000  # transitions; the built-in replay has 91,125, the 100k replay 926,212

# Defaults for each batch mode (docs/learners.md has the measurements behind them). Full batch: no SGD
# noise, so a large cosine-decayed learning rate converges in few updates, and a high expectile with a
# sharp extraction (0.8707 on the 100k ICU-Sepsis replay) is safe. A large replay pins the values more
# finely (action gaps of 0.005 on 100k episodes): it takes the wider network and three times the updates
# that the built-in 10k replay needs. Minibatches (MIMIC-IV): the defaults this learner has always had.
AUTO = {
    "full batch": {"tau": (0.99,), "beta": (30.0,), "lr_schedule": "cosine",
                   "learning_rate": runs.BySize(small=(1e-2,), large=(3e-3,), up_to=FULL_BATCH_SMALL),
                   "hidden": runs.BySize(small=(64, 64), large=(128, 128), up_to=FULL_BATCH_SMALL),
                   "num_updates": runs.BySize(small=4_000, large=12_000, up_to=FULL_BATCH_SMALL)},
    "minibatch": {"tau": (0.7,), "beta": (3.0,), "learning_rate": (1e-3,), "lr_schedule": "constant",
                  "hidden": (64, 64), "num_updates": 5_000},
}


def check_args(args: Args) -> None:
    """This algorithm's own options; the shared ones are checked by runs.check_common_args."""
    for tau in args.tau or ():
        runs.require(0 < tau < 1, f"--tau values must be in (0, 1), got {tau}")
    for beta in args.beta or ():
        runs.require(beta >= 0, f"--beta values must be at least 0, got {beta}")
    runs.require(0 < args.target_update_rate <= 1, f"--target-update-rate must be in (0, 1], got {args.target_update_rate}")
    runs.require(0 <= args.gamma <= 1, f"--gamma must be in [0, 1], got {args.gamma}")
    runs.require(args.reward_scale > 0, f"--reward-scale must be positive, got {args.reward_scale}")
    runs.require(args.max_weight > 0, f"--max-weight must be positive, got {args.max_weight}")


def make_mlp(in_size: int, out_size: int | str, args: Args, key: jax.Array) -> MLP:
    return MLP(in_size, out_size, args.hidden, key)


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


def masked_log_prob(logits: jnp.ndarray, mask: jnp.ndarray, action: jnp.ndarray) -> jnp.ndarray:
    """log pi(a|s) with pi a softmax over the admissible actions (the data's own action always counts)."""
    n_actions = logits.shape[-1]
    mask = mask | jax.nn.one_hot(action, n_actions, dtype=bool)
    log_pi = jax.nn.log_softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return jnp.take_along_axis(log_pi, action[:, None], axis=-1)[:, 0]


def network_statics(args: Args, obs_dim: int, n_actions: int) -> dict[str, Any]:
    """The non-array parts of the twin Q, V and policy networks; train carries only their arrays."""
    key = jax.random.PRNGKey(0)  # only fixes the structure; values come from train's own key
    return {
        "q": structure(
            lambda: eqx.filter_vmap(lambda k: make_mlp(obs_dim, n_actions, args, k))(jax.random.split(key, 2))
        ),
        "v": structure(lambda: make_mlp(obs_dim, "scalar", args, key)),
        "pi": structure(lambda: make_mlp(obs_dim, n_actions, args, key)),
    }


def make_train(args: Args, data: Transitions | FullBatch, env_params: Any):
    """A pure train(key, hparams[, inputs]) -> (final params, metrics (num_evals,), policy params saved every
    --save-every updates or None) for one seed and one setting; inputs defaults to (data, env_params), with
    data `FullBatch` under full batch.
    Also returns the networks' static parts and the two loss functions (minibatch, full batch)."""
    obs_dim = (data.obs_table if isinstance(data, FullBatch) else data.obs).shape[1]
    n_actions = (data.mask_table if isinstance(data, FullBatch) else data.action_mask).shape[1]
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

    def full_batch_losses(params: Params, data: FullBatch, hparams):
        """`losses` with the whole replay as the batch, written over (observation, action) cells: each term
        is a sum over transitions of a function of the networks at (s, a), so each network runs once per
        distinct observation and no gradient scatters back through per-transition rows."""
        obs, cell_weight = data.obs_table, data.pair_weight  # (rows, obs_dim), (rows, n_actions)
        q_data = q_values(params.q_target, obs).min(0)  # (rows, n_actions)
        v = v_value(params.v, obs)  # (rows,)
        v_loss = expectile_loss(jax.lax.stop_gradient(q_data) - v[:, None], hparams["tau"], cell_weight)

        # r * reward_scale + gamma * V(s') per transition, summed over the cells (cleansepsis.full_batch)
        q_error = data.td_squared_error(q_values(params.q, obs), args.reward_scale, args.gamma, jax.lax.stop_gradient(v))
        q_loss = jnp.mean(q_error)  # mean over the twins

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

    def train(key: jax.Array, hparams: dict, inputs=(data, env_params)) -> tuple[Params, dict, Any]:
        data, env_params = inputs  # passed as arguments by run_sweep, so they are not compiled in as constants
        key, q_key, v_key, pi_key = jax.random.split(key, 4)
        q = eqx.filter(eqx.filter_vmap(lambda k: make_mlp(obs_dim, n_actions, args, k))(jax.random.split(q_key, 2)),
                       eqx.is_array)
        v = eqx.filter(make_mlp(obs_dim, "scalar", args, v_key), eqx.is_array)
        pi = eqx.filter(make_mlp(obs_dim, n_actions, args, pi_key), eqx.is_array)
        params = Params(q=q, q_target=q, v=v, pi=pi)
        optimiser = optax.adam(
            lambda count: runs.learning_rate_at(hparams["learning_rate"], count, args.num_updates, args.lr_schedule)
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
            return carry, metrics

        (state, _), metrics, saved = runs.scan_evaluations(
            evaluate, (state, key), args.num_evals, args.evals_per_save, lambda carry: carry[0].params.pi
        )
        return state.params, metrics, saved

    return train, statics, (losses, full_batch_losses)


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
    runs.print_plan("iql", args, defaults, why)
    settings, hparams = runs.make_hparam_grid(
        {"tau": args.tau, "beta": args.beta, "learning_rate": args.learning_rate}
    )
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train, statics, _ = make_train(args, data, env_params)
    (params, metrics, saved), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="iql", inputs=(data, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    reference = runs.reference_values(env_params)
    runs.print_results_table("iql", settings, seeds, metrics, reference,
                             columns=("exact_return", "q_greedy_return", "mean_length"))
    path = runs.finish_run(
        algo="iql", script=__file__, args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
        metrics=metrics, outputs="logits", timing=timing, n_updates=args.num_updates,
        export=lambda s, i, k: export_mlp(runs.policy_at(params.pi, saved, s, i, k), statics["pi"]),
        saved_updates=runs.updates_at_saves(args.num_updates, args.save_every), reference=reference,
        run_dir=run_dir, overwrite=args.overwrite, extra_summary={"defaults": defaults},
    )
    runs.print_timing(timing, path)


if __name__ == "__main__":
    runs.cli_main(main)
