"""DQN (Mnih et al. 2015) with Double (van Hasselt et al. 2016), Dueling (Wang et al. 2016) and prioritised
replay (Schaul et al. 2016) as options, many seeds and hyperparameter settings per compiled run.

Online by default: `--num-envs` ICU-Sepsis JAX envs are stepped inside the compiled scan, epsilon-greedy over
each state's admissible actions, into an on-device replay buffer (it stores state indices, not vectors).
With `--replay PATH` it trains offline on a replay instead (the naive offline baseline: no conservatism).
Actions are `5 * fluid_level + vaso_level`. Every `--eval-every` updates the greedy policy over all 716
states is evaluated exactly on the ICU-Sepsis MDP (when the data come from ICU-Sepsis).

    uv run python dqn.py                                    # online, 5 seeds, 2,000,000 env steps each
    uv run python dqn.py --replay data/icu100k.parquet      # offline Double DQN

The buffer, env stepping and prioritised sampling live in `cleansepsis.online`; this file holds the
network, the TD loss and the update.
"""

from __future__ import annotations

from cleansepsis import interrupts

if __name__ == "__main__":  # first, so that a Ctrl-C while jax loads also ends in one line and status 130
    interrupts.install()

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from cleansepsis import online, runs
from cleansepsis.networks import structure
from cleansepsis.online import Batch, masked_argmax


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """train offline on this replay parquet; default: online on the ICU-Sepsis JAX env"""
    split: str = "train"
    """offline: replay split to train on (train, val or test)"""
    gamma: tuple[float, ...] = (1.0,)
    """discount; several values are swept. ICU-Sepsis rewards survival once, so gamma = 1 values the
    survival probability"""
    double: bool = True
    """Double DQN target: the online network picks the next action, the target network values it"""
    dueling: bool = False
    """dueling head: Q = V + A - mean(A)"""
    prioritized: bool = False
    """proportional prioritised replay with importance weights"""
    priority_exponent: float = 0.6
    """prioritised replay: priorities are |TD error|^exponent"""
    importance_exponent: float = 0.4
    """prioritised replay: importance-weight exponent at the start, annealed linearly to 1"""
    target_update_every: int = 200
    """updates between hard copies of the online network into the target network"""
    max_grad_norm: float = 10.0
    """gradients are clipped to this global norm"""
    num_envs: int = 16
    """online: envs stepped in parallel; one iteration steps each of them once. Fewer envs give more
    updates per env step (16: 120,000 updates in 2,000,000 env steps)"""
    total_env_steps: int = 2_000_000
    """online: env steps per policy (all envs together), including --learning-starts; they set the number
    of updates (whole evaluation periods that fit)"""
    updates_per_iteration: int = 1
    """online: gradient updates after each step of the --num-envs envs"""
    learning_starts: int = 25_600
    """online: env steps of uniform random admissible actions that fill the buffer before learning"""
    buffer_size: int = 2_000_000
    """online: replay buffer capacity in transitions (rounded up to a multiple of --num-envs)"""
    epsilon_start: float = 1.0
    """online: exploration rate at the first update"""
    epsilon_end: float = 0.1
    """online: exploration rate after --exploration-fraction of the updates"""
    exploration_fraction: float = 0.5
    """online: share of the updates over which epsilon decays linearly"""
    learning_rate: tuple[float, ...] | None = None
    """Adam learning rate; several values are swept. Default: AUTO below"""
    lr_schedule: Literal["auto", "cosine", "constant"] = "auto"
    """cosine: decay the learning rate to zero over the run (less noise in the final values); auto: AUTO below"""
    hidden: tuple[int, ...] | None = None
    """hidden layer widths, e.g. --hidden 256 256. Default: AUTO below"""
    batch_size: int = 256
    """transitions per update"""
    num_updates: int | None = None
    """offline: gradient updates per policy (default: AUTO below). Online they follow from --total-env-steps"""
    eval_every: int = 1_000
    """updates between logged metrics and exact evaluations"""
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
    def online(self) -> bool:
        return self.replay is None

    @property
    def online_updates(self) -> int:
        """Online: the whole evaluation periods that fit in the env-step budget (the rest is not used)."""
        available = (self.total_env_steps - self.learning_starts) // self.num_envs * self.updates_per_iteration
        return available // self.eval_every * self.eval_every

    @property
    def num_evals(self) -> int:
        return self.num_updates // self.eval_every

    @property
    def evals_per_save(self) -> int:
        return self.save_every // self.eval_every

    @property
    def iterations_per_eval(self) -> int:
        """Online: env-step iterations between evaluations (offline: updates)."""
        return self.eval_every // self.updates_per_iteration if self.online else self.eval_every

    @property
    def capacity(self) -> int:
        return -(-self.buffer_size // self.num_envs) * self.num_envs


# Defaults (DQN trains on minibatches only; online they reach 0.871, docs/learners.md).
AUTO = {"minibatch": {"learning_rate": (5e-4,), "lr_schedule": "cosine", "hidden": (128, 128), "num_updates": 20_000}}


def check_args(args: Args) -> None:
    """This algorithm's own options; the shared ones are checked by runs.check_common_args."""
    for name in ("target_update_every", "num_envs", "updates_per_iteration"):
        value = getattr(args, name)
        runs.require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for gamma in args.gamma:
        runs.require(0 <= gamma <= 1, f"--gamma values must be in [0, 1], got {gamma}")
    runs.require(args.max_grad_norm > 0, f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    runs.require(args.priority_exponent >= 0, f"--priority-exponent must be at least 0, got {args.priority_exponent}")
    runs.require(0 <= args.importance_exponent <= 1,
                 f"--importance-exponent must be in [0, 1], got {args.importance_exponent}")
    for name in ("epsilon_start", "epsilon_end", "exploration_fraction"):
        value = getattr(args, name)
        runs.require(0 <= value <= 1, f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if not args.online:
        return
    runs.require(args.num_updates is None or args.num_updates == args.online_updates,
                 "--num-updates is for offline runs (--replay); online, --total-env-steps sets the updates")
    runs.require(args.eval_every % args.updates_per_iteration == 0,
                 f"--eval-every ({args.eval_every}) must be a multiple of --updates-per-iteration")
    runs.require(args.learning_starts >= args.num_envs,
                 f"--learning-starts ({args.learning_starts}) must be at least --num-envs ({args.num_envs})")
    runs.require(args.capacity >= args.learning_starts,
                 f"--buffer-size ({args.buffer_size}) must hold at least --learning-starts transitions")
    runs.require(args.online_updates >= args.eval_every,
                 f"(--total-env-steps - --learning-starts) / --num-envs * --updates-per-iteration gives "
                 f"{args.online_updates} updates, fewer than --eval-every ({args.eval_every})")


# ---------------------------------------------------------------------------------------------------------
# Network


class QNetwork(eqx.Module):
    """MLP from one observation (obs_dim,) to action values (n_actions,); optionally a dueling head."""

    layers: list[eqx.nn.Linear]  # hidden layers, then the output layer (plain) or the value head (dueling)
    advantage: eqx.nn.Linear | None

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...], dueling: bool, key: jax.Array):
        widths = [obs_dim, *hidden]
        keys = jax.random.split(key, len(widths) + 1)
        self.layers = [
            eqx.nn.Linear(i, o, key=k) for i, o, k in zip(widths[:-1], widths[1:], keys, strict=False)
        ]
        self.layers.append(eqx.nn.Linear(widths[-1], 1 if dueling else n_actions, key=keys[-2]))
        self.advantage = eqx.nn.Linear(widths[-1], n_actions, key=keys[-1]) if dueling else None

    def __call__(self, obs: jax.Array) -> jax.Array:
        x = obs
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        if self.advantage is None:
            return self.layers[-1](x)
        advantage = self.advantage(x)
        return self.layers[-1](x) + advantage - advantage.mean()


def network_static(obs_dim: int, n_actions: int, args: Args):
    return structure(lambda: QNetwork(obs_dim, n_actions, args.hidden, args.dueling, jax.random.key(0)))


def export_policy(params, static) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, network) of one trained Q network, as `cleansepsis.checkpoint.save_checkpoint` takes them."""
    net = eqx.combine(params, static)
    hidden = [f"hidden_{i}" for i in range(len(net.layers) - 1)]
    tensors = {}
    head = ["value"] if net.advantage is not None else ["output"]
    for name, layer in zip(hidden + head, net.layers, strict=True):
        tensors[f"{name}.weight"] = np.asarray(layer.weight, np.float32)
        tensors[f"{name}.bias"] = np.asarray(layer.bias, np.float32)
    if net.advantage is None:
        return tensors, {"kind": "mlp", "activation": "relu", "hidden": hidden, "output": "output"}
    tensors["advantage.weight"] = np.asarray(net.advantage.weight, np.float32)
    tensors["advantage.bias"] = np.asarray(net.advantage.bias, np.float32)
    network = {
        "kind": "dueling_mlp",
        "activation": "relu",
        "hidden": hidden,
        "value": "value",
        "advantage": "advantage",
    }
    return tensors, network


# ---------------------------------------------------------------------------------------------------------
# Losses (pure; shapes in comments)


def td_target(
    next_q_online: jax.Array,  # (batch, n_actions)
    next_q_target: jax.Array,  # (batch, n_actions)
    reward: jax.Array,  # (batch,)
    terminated: jax.Array,  # (batch,) bool
    next_mask: jax.Array,  # (batch, n_actions) bool
    gamma: jax.Array,  # ()
    double: bool,
) -> jax.Array:
    """r + gamma * Q_target(s', a*), a* = argmax over admissible a' of Q_online (double) or Q_target."""
    chex.assert_equal_shape([next_q_online, next_q_target, next_mask])
    best = masked_argmax(next_q_online if double else next_q_target, next_mask)  # (batch,)
    bootstrap = jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]  # (batch,)
    return reward + gamma * jnp.where(terminated, 0.0, bootstrap)


def td_loss(params, static, target_params, batch: Batch, gamma: jax.Array, double: bool):
    net = eqx.combine(params, static)
    q = jax.vmap(net)(batch.obs)  # (batch, n_actions)
    next_q_online = jax.lax.stop_gradient(jax.vmap(net)(batch.next_obs))  # (batch, n_actions)
    next_q_target = jax.vmap(eqx.combine(target_params, static))(batch.next_obs)  # (batch, n_actions)
    target = td_target(
        next_q_online, next_q_target, batch.reward, batch.terminated, batch.next_action_mask, gamma, double
    )
    q_data = jnp.take_along_axis(q, batch.action[:, None], axis=-1)[:, 0]  # (batch,)
    error = q_data - target  # (batch,)
    loss = jnp.mean(batch.weight * error**2)
    return loss, (error, {"td_loss": jnp.mean(error**2), "q_data": q_data.mean()})


# ---------------------------------------------------------------------------------------------------------
# Training


class TrainState(eqx.Module):
    """Arrays only, so it can be a scan carry; the network's static parts live in make_train's closure."""

    params: Any
    target_params: Any
    opt_state: Any
    step: jax.Array  # () int32 updates done
    key: jax.Array
    priorities: Any  # online: the Buffer (its priorities inside); offline: (N,) priorities of the replay
    env_state: Any  # batched cleansepsis.env.EnvState online; None offline
    max_priority: jax.Array


def make_train(args: Args, obs_dim: int, n_actions: int):
    """Pure `train(key, hparams, inputs) -> (params, metrics, saved)` for one seed and one setting, where
    inputs = (transitions or None, env params or None) are passed as arguments (as constants they would slow
    compilation). Online when the transitions are None. Metrics are arrays of shape (num_evals,); `saved`
    stacks the params every --save-every updates (None without)."""
    optimiser = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.scale_by_adam())
    static = network_static(obs_dim, n_actions, args)

    def q_fn(params, obs):  # (batch, n_actions)
        return jax.vmap(eqx.combine(params, static))(obs)

    def train(key: jax.Array, hparams: dict[str, jax.Array], inputs) -> tuple[Any, dict[str, jax.Array], Any]:
        data, env_params = inputs
        if data is None and env_params is None:
            raise runs.RunError("online DQN needs the ICU-Sepsis env params")

        def init(key: jax.Array) -> TrainState:
            net_key, reset_key, key = jax.random.split(key, 3)
            params = eqx.filter(QNetwork(obs_dim, n_actions, args.hidden, args.dueling, net_key), eqx.is_array)
            state = TrainState(params, params, optimiser.init(params), jnp.zeros((), jnp.int32), key,
                               None, None, jnp.ones(()))  # fmt: skip
            if data is not None:
                return dataclasses.replace(state, priorities=jnp.ones(data.size, jnp.float32))
            state = dataclasses.replace(state, priorities=online.empty_buffer(args.capacity),
                                        env_state=online.reset_envs(reset_key, args.num_envs, env_params))
            prefill = args.learning_starts // args.num_envs  # uniform random admissible actions
            state, _ = jax.lax.scan(lambda s, _: act(s, jnp.float32(1.0)), state, None, length=prefill)
            return state

        def act(state: TrainState, epsilon: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
            key, act_key = jax.random.split(state.key)
            env_state, buffer, stats = online.act_and_store(
                act_key, state.env_state, state.priorities, state.max_priority,
                lambda obs: q_fn(state.params, obs), epsilon, env_params,
            )  # fmt: skip
            return dataclasses.replace(state, key=key, priorities=buffer, env_state=env_state), stats

        def make_batch(state: TrainState, key: jax.Array) -> tuple[jax.Array, Batch]:
            beta = args.importance_exponent + (1.0 - args.importance_exponent) * state.step / args.num_updates
            if data is not None:
                rows, weight = online.sample_rows(key, state.priorities, data.size, args.batch_size, beta,
                                                  args.prioritized)  # fmt: skip
                return rows, online.replay_batch(data, rows, weight)
            buffer = state.priorities
            rows, weight = online.sample_rows(key, buffer.priority, buffer.size, args.batch_size, beta,
                                              args.prioritized)  # fmt: skip
            return rows, online.buffer_batch(buffer, env_params, rows, weight)

        def update(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
            key, sample_key = jax.random.split(state.key)
            rows, batch = make_batch(state, sample_key)
            grads, (error, metrics) = jax.grad(td_loss, has_aux=True)(
                state.params, static, state.target_params, batch, hparams["gamma"], args.double
            )
            updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
            lr = runs.learning_rate_at(hparams["learning_rate"], state.step, args.num_updates, args.lr_schedule)
            params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
            step = state.step + 1
            copy = step % args.target_update_every == 0
            target_params = jax.tree.map(lambda t, p: jnp.where(copy, p, t), state.target_params, params)
            priorities, max_priority = state.priorities, state.max_priority
            if args.prioritized:
                new_priority = (jnp.abs(error) + 1e-6) ** args.priority_exponent
                priorities = online.set_priorities(priorities, rows, new_priority)
                max_priority = jnp.maximum(max_priority, new_priority.max())
            state = dataclasses.replace(state, params=params, target_params=target_params, opt_state=opt_state,
                                        step=step, key=key, priorities=priorities, max_priority=max_priority)
            return state, metrics

        def iteration(state: TrainState, _) -> tuple[TrainState, dict[str, jax.Array]]:
            if data is not None:
                return update(state)
            progress = state.step / (args.num_updates * args.exploration_fraction)
            epsilon = args.epsilon_start + (args.epsilon_end - args.epsilon_start) * jnp.clip(progress, 0.0, 1.0)
            state, stats = act(state, epsilon)
            state, metrics = jax.lax.scan(lambda s, _: update(s), state, None, length=args.updates_per_iteration)
            return state, {**{k: v.mean() for k, v in metrics.items()}, **stats, "epsilon": epsilon}

        def evaluate(state: TrainState, _) -> tuple[TrainState, dict[str, jax.Array]]:
            state, metrics = jax.lax.scan(iteration, state, None, length=args.iterations_per_eval)
            out = {k: metrics[k].mean() for k in ("td_loss", "q_data")}
            if data is None:
                out["epsilon"] = metrics["epsilon"][-1]
                # share of the episodes that ended in this period that survived (the behaviour policy's return)
                out["behaviour_return"] = metrics["survivals"].sum() / jnp.maximum(metrics["episodes"].sum(), 1)
            if env_params is not None:
                q = q_fn(state.params, env_params.state_vectors)  # (716, n_actions)
                out["exact_return"], out["mean_length"] = runs.exact_evaluation(env_params, q, "greedy")
            return state, out

        state, metrics, saved = runs.scan_evaluations(
            evaluate, init(key), args.num_evals, args.evals_per_save, lambda state: state.params
        )
        return state.params, metrics, saved

    return train


# ---------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    if args.online:  # online, the env-step budget sets the updates
        check_args(args)
        args = dataclasses.replace(args, num_updates=args.online_updates)
    runs.check_common_args(args)  # everything that can be checked before any work
    check_args(args)
    run_dir = runs.check_run_dir(args, __file__)
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    runs.enable_compilation_cache()
    if args.online:
        from cleansepsis import env as sepsis_env

        env_params, replay, data = sepsis_env.load_params(), online.online_source(), None
        why = f"online on {sepsis_env.ENV_ID}, {args.num_envs} envs, {args.total_env_steps} env steps"
    else:
        replay, data, env_params = runs.load_training_data(args.replay, args.split)
        why = f"offline on {data.size} transitions from {replay.path}"
    args, defaults = runs.resolve_defaults(args, AUTO, full_batch=False)
    runs.print_plan("dqn", args, defaults, why)
    settings, hparams = runs.make_hparam_grid({"learning_rate": args.learning_rate, "gamma": args.gamma})
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train = make_train(args, replay.obs_dim, replay.n_actions)
    (params, metrics, saved), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="dqn", inputs=(data, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    reference = runs.reference_values(env_params)
    runs.print_results_table("dqn", settings, seeds, metrics, reference)
    static = network_static(replay.obs_dim, replay.n_actions, args)
    extra: dict[str, Any] = {"defaults": defaults}
    if args.online:
        extra["env_steps_at_evals"] = (args.learning_starts + steps // args.updates_per_iteration * args.num_envs).tolist()
    path = runs.finish_run(
        algo="dqn", script=__file__, args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
        metrics=metrics, outputs="q_values", timing=timing, n_updates=args.num_updates,
        export=lambda s, i, k: export_policy(runs.policy_at(params, saved, s, i, k), static),
        saved_updates=runs.updates_at_saves(args.num_updates, args.save_every), reference=reference,
        run_dir=run_dir, overwrite=args.overwrite, extra_summary=extra,
    )
    runs.print_timing(timing, path)


if __name__ == "__main__":
    runs.cli_main(main)
