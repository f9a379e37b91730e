"""DQN (Mnih et al. 2015) with Double (van Hasselt et al. 2016), Dueling (Wang et al. 2016) and prioritised
replay (Schaul et al. 2016) as options, many seeds and hyperparameter settings per compiled run.

Online by default: `--num-envs` ICU-Sepsis JAX envs are stepped inside the compiled scan, epsilon-greedy over
each state's admissible actions, into an on-device replay buffer (it stores state indices, not vectors).
With `--replay PATH` it trains offline on a replay instead (the naive offline baseline: no conservatism).
Actions are `5 * fluid_level + vaso_level`. Every `--eval-every` updates the greedy policy over all 716
states is evaluated exactly on the ICU-Sepsis MDP (when the data come from ICU-Sepsis).

    uv run python dqn.py --num-seeds 5                      # online, 2,000,000 env steps per seed
    uv run python dqn.py --replay data/icu100k.parquet      # offline Double DQN
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from cleansepsis import runs
from cleansepsis.replay import ACTION_ENCODING, Replay, Transitions

ALGO = "dqn"


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """Train offline on this replay parquet; default: online on the ICU-Sepsis JAX env."""
    learning_rate: tuple[float, ...] = (5e-4,)
    """Adam learning rate(s); several values train one setting each in the same compiled program."""
    gamma: tuple[float, ...] = (1.0,)
    """Discount(s). ICU-Sepsis rewards survival once, so gamma = 1 values the survival probability."""
    num_seeds: int = 5
    """Seeds per setting, trained side by side under one vmap."""
    seed: int = 0
    """First seed; the run trains seeds seed, seed+1, ..., the same seeds in every setting."""
    double: bool = True
    """Double DQN target: the online network picks the next action, the target network values it."""
    dueling: bool = False
    """Dueling head: Q = V + A - mean(A)."""
    prioritized: bool = False
    """Proportional prioritised replay with importance weights."""
    priority_exponent: float = 0.6
    """Prioritised replay: priorities are |TD error|^exponent."""
    importance_exponent: float = 0.4
    """Prioritised replay: importance-weight exponent at the start, annealed linearly to 1."""
    num_envs: int = 16
    """Online: envs stepped in parallel; one iteration steps each of them once. Fewer envs give more updates
    per env step (16: 120,000 updates in 2,000,000 env steps)."""
    total_env_steps: int = 2_000_000
    """Online: env steps per policy (all envs together), including --learning-starts."""
    updates_per_iteration: int = 1
    """Online: gradient updates after each step of the --num-envs envs."""
    learning_starts: int = 25_600
    """Online: env steps of uniform random admissible actions that fill the buffer before learning."""
    buffer_size: int = 2_000_000
    """Online: replay buffer capacity in transitions (rounded up to a multiple of --num-envs)."""
    epsilon_start: float = 1.0
    """Online: exploration rate at the first update."""
    epsilon_end: float = 0.1
    """Online: exploration rate after --exploration-fraction of the updates."""
    exploration_fraction: float = 0.5
    """Online: share of the updates over which epsilon decays linearly."""
    total_updates: int = 20_000
    """Offline (--replay): gradient updates per policy. Online, updates follow from the env steps."""
    eval_every: int = 1_000
    """Updates between logged metrics and exact evaluations."""
    batch_size: int = 256
    """Transitions per update."""
    hidden: tuple[int, ...] = (128, 128)
    """Hidden layer widths (ReLU)."""
    target_update_every: int = 200
    """Updates between hard copies of the online network into the target network."""
    lr_decay: bool = True
    """Cosine-decay the learning rate to zero over the run (less noise in the final values)."""
    max_grad_norm: float = 10.0
    """Gradients are clipped to this global norm."""
    split: str = "train"
    """Offline: replay split to train on."""
    run_dir: str | None = None
    """Run folder to write; default `runs/dqn__<name>__<YYYYmmdd-HHMMSS>`."""
    name: str = "default"
    """Name used in the default run folder."""

    @property
    def online(self) -> bool:
        return self.replay is None

    @property
    def num_updates(self) -> int:
        if not self.online:
            return self.total_updates
        # whole evaluation periods that fit in the env-step budget (the rest of the budget is not used)
        available = (
            (self.total_env_steps - self.learning_starts) // self.num_envs * self.updates_per_iteration
        )
        return available // self.eval_every * self.eval_every

    @property
    def num_evals(self) -> int:
        return self.num_updates // self.eval_every

    @property
    def iterations_per_eval(self) -> int:
        """Online: env-step iterations between evaluations (offline: updates)."""
        return self.eval_every // self.updates_per_iteration if self.online else self.eval_every

    @property
    def capacity(self) -> int:
        return -(-self.buffer_size // self.num_envs) * self.num_envs


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
    return eqx.partition(
        QNetwork(obs_dim, n_actions, args.hidden, args.dueling, jax.random.key(0)), eqx.is_array
    )[1]


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
# Losses and replay sampling (pure; shapes in comments)


def masked_argmax(q: jax.Array, mask: jax.Array) -> jax.Array:
    """argmax over admissible actions. q, mask: (..., n_actions) -> (...)."""
    return jnp.argmax(jnp.where(mask, q, -jnp.inf), axis=-1)


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


class Batch(eqx.Module):
    obs: jax.Array  # (batch, obs_dim)
    action: jax.Array  # (batch,)
    reward: jax.Array  # (batch,)
    next_obs: jax.Array  # (batch, obs_dim)
    terminated: jax.Array  # (batch,) bool
    next_action_mask: jax.Array  # (batch, n_actions) bool
    weight: jax.Array  # (batch,) importance weight, 1 without prioritised replay


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


def sample_rows(
    key: jax.Array, priorities: jax.Array, size: jax.Array, batch_size: int, beta, prioritized: bool
):
    """Rows to train on and their importance weights. priorities: (capacity,), zero beyond `size`.
    Prioritised: P(i) proportional to priorities[i], weight (size * P(i))^-beta / max weight of the batch."""
    if not prioritized:
        rows = jax.random.randint(key, (batch_size,), 0, size)
        return rows, jnp.ones(batch_size, jnp.float32)
    cumulative = jnp.cumsum(priorities)  # (capacity,)
    total = cumulative[-1]
    # one draw per stratum of the total mass, as in Schaul et al.
    u = (jnp.arange(batch_size) + jax.random.uniform(key, (batch_size,))) * (total / batch_size)
    rows = jnp.clip(jnp.searchsorted(cumulative, u, side="right"), 0, size - 1)
    prob = priorities[rows] / total
    weight = (size * prob) ** (-beta)
    return rows, weight / weight.max()


# ---------------------------------------------------------------------------------------------------------
# Training


class Buffer(eqx.Module):
    """Online replay buffer of ICU-Sepsis state indices (observations are looked up when sampling)."""

    state: jax.Array  # (capacity,) int32
    action: jax.Array  # (capacity,) int32
    reward: jax.Array  # (capacity,) float32
    next_state: jax.Array  # (capacity,) int32
    terminated: jax.Array  # (capacity,) bool
    priority: jax.Array  # (capacity,) float32, zero where empty
    position: jax.Array  # () int32, next slot to write
    size: jax.Array  # () int32


class TrainState(eqx.Module):
    """Arrays only, so it can be a scan carry; the network's static parts live in make_train's closure."""

    params: Any
    target_params: Any
    opt_state: Any
    step: jax.Array  # () int32 updates done
    key: jax.Array
    buffer: Any  # Buffer online; priorities (N,) offline
    env_state: Any  # batched cleansepsis.env.EnvState online; None offline
    max_priority: jax.Array


def make_train(args: Args, obs_dim: int, n_actions: int):
    """Pure `train(key, hparams, inputs) -> (params, metrics)` for one seed and one setting, where inputs =
    (transitions or None, env params or None) are passed as arguments (as constants they would slow
    compilation). Online when the transitions are None. Metrics are arrays of shape (num_evals,)."""

    def train(key: jax.Array, hparams: dict[str, jax.Array], inputs) -> tuple[Any, dict[str, jax.Array]]:
        data, env_params = inputs
        return _train_fn(args, obs_dim, n_actions, data, env_params)(key, hparams)

    return train


def _train_fn(args: Args, obs_dim: int, n_actions: int, data: Transitions | None, env_params: Any):
    from cleansepsis import env as sepsis_env

    if data is None and env_params is None:
        raise runs.RunError("online DQN needs the ICU-Sepsis env params")
    optimiser = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.scale_by_adam())
    static = network_static(obs_dim, n_actions, args)
    q_fn = lambda params, obs: jax.vmap(eqx.combine(params, static))(obs)  # noqa: E731
    num_updates = args.num_updates

    def init(key: jax.Array) -> TrainState:
        net_key, key = jax.random.split(key)
        params, _ = eqx.partition(
            QNetwork(obs_dim, n_actions, args.hidden, args.dueling, net_key), eqx.is_array
        )
        if data is not None:
            return TrainState(params, params, optimiser.init(params), jnp.zeros((), jnp.int32), key,
                              jnp.ones(data.size, jnp.float32), None, jnp.ones(()))  # fmt: skip
        reset_key, key = jax.random.split(key)
        _, env_state = jax.vmap(sepsis_env.reset, in_axes=(0, None))(
            jax.random.split(reset_key, args.num_envs), env_params
        )
        cap = args.capacity
        buffer = Buffer(
            jnp.zeros(cap, jnp.int32), jnp.zeros(cap, jnp.int32), jnp.zeros(cap, jnp.float32),
            jnp.zeros(cap, jnp.int32), jnp.zeros(cap, bool), jnp.zeros(cap, jnp.float32),
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
        )  # fmt: skip
        state = TrainState(params, params, optimiser.init(params), jnp.zeros((), jnp.int32), key, buffer,
                           env_state, jnp.ones(()))  # fmt: skip
        prefill = args.learning_starts // args.num_envs
        state, _ = jax.lax.scan(lambda s, _: act_and_store(s, jnp.float32(1.0)), state, None, length=prefill)
        return state

    def act_and_store(state: TrainState, epsilon: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """Step every env once, epsilon-greedy over admissible actions, and add the transitions."""
        key, explore_key, pick_key, step_key = jax.random.split(state.key, 4)
        s = state.env_state.state_index  # (num_envs,)
        mask = env_params.admissible_mask[s]  # (num_envs, n_actions)
        greedy = masked_argmax(q_fn(state.params, env_params.state_vectors[s]), mask)
        random_action = jax.random.categorical(pick_key, jnp.where(mask, 0.0, -jnp.inf))  # uniform admissible
        explore = jax.random.uniform(explore_key, (args.num_envs,)) < epsilon
        action = jnp.where(explore, random_action, greedy)
        _, env_state, reward, terminated, truncated, info = jax.vmap(
            sepsis_env.step_autoreset, in_axes=(0, 0, 0, None)
        )(jax.random.split(step_key, args.num_envs), state.env_state, action, env_params)
        b = state.buffer
        at = b.position
        put = lambda arr, x: jax.lax.dynamic_update_slice(arr, x.astype(arr.dtype), (at,))  # noqa: E731
        buffer = Buffer(
            put(b.state, s), put(b.action, action), put(b.reward, reward), put(b.next_state, info["next_state_index"]),
            put(b.terminated, terminated), put(b.priority, jnp.full(args.num_envs, state.max_priority)),
            (at + args.num_envs) % args.capacity, jnp.minimum(b.size + args.num_envs, args.capacity),
        )  # fmt: skip
        done = terminated | truncated
        stats = {"episodes": done.sum(), "survivals": (reward * done).sum()}
        return dataclasses.replace(state, key=key, buffer=buffer, env_state=env_state), stats

    def make_batch(state: TrainState, key: jax.Array) -> tuple[jax.Array, Batch]:
        beta = args.importance_exponent + (1.0 - args.importance_exponent) * state.step / num_updates
        if data is not None:
            rows, weight = sample_rows(key, state.buffer, data.size, args.batch_size, beta, args.prioritized)
            return rows, Batch(data.obs[rows], data.action[rows], data.reward[rows], data.next_obs[rows],
                               data.terminated[rows], data.next_action_mask[rows], weight)  # fmt: skip
        b = state.buffer
        rows, weight = sample_rows(key, b.priority, b.size, args.batch_size, beta, args.prioritized)
        s, s_next = b.state[rows], b.next_state[rows]
        return rows, Batch(env_params.state_vectors[s], b.action[rows], b.reward[rows],
                           env_params.state_vectors[s_next], b.terminated[rows],
                           env_params.admissible_mask[s_next], weight)  # fmt: skip

    def update(state: TrainState, hparams) -> tuple[TrainState, dict[str, jax.Array]]:
        key, sample_key = jax.random.split(state.key)
        rows, batch = make_batch(state, sample_key)
        grads, (error, metrics) = jax.grad(td_loss, has_aux=True)(
            state.params, static, state.target_params, batch, hparams["gamma"], args.double
        )
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        lr = hparams["learning_rate"]
        if args.lr_decay:
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * state.step / num_updates))
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        step = state.step + 1
        copy = step % args.target_update_every == 0
        target_params = jax.tree.map(lambda t, p: jnp.where(copy, p, t), state.target_params, params)
        buffer, max_priority = state.buffer, state.max_priority
        if args.prioritized:
            new_priority = (jnp.abs(error) + 1e-6) ** args.priority_exponent
            if data is not None:
                buffer = buffer.at[rows].set(new_priority)
            else:
                buffer = dataclasses.replace(buffer, priority=buffer.priority.at[rows].set(new_priority))
            max_priority = jnp.maximum(max_priority, new_priority.max())
        state = dataclasses.replace(state, params=params, target_params=target_params, opt_state=opt_state,
                                    step=step, key=key, buffer=buffer, max_priority=max_priority)  # fmt: skip
        return state, metrics

    def iteration(state: TrainState, hparams) -> tuple[TrainState, dict[str, jax.Array]]:
        if data is not None:
            return update(state, hparams)
        progress = state.step / (num_updates * args.exploration_fraction)
        epsilon = args.epsilon_start + (args.epsilon_end - args.epsilon_start) * jnp.clip(progress, 0.0, 1.0)
        state, stats = act_and_store(state, epsilon)
        state, metrics = jax.lax.scan(
            lambda s, _: update(s, hparams), state, None, length=args.updates_per_iteration
        )
        return state, {**{k: v.mean() for k, v in metrics.items()}, **stats, "epsilon": epsilon}

    def eval_period(state: TrainState, hparams) -> tuple[TrainState, dict[str, jax.Array]]:
        state, metrics = jax.lax.scan(
            lambda s, _: iteration(s, hparams), state, None, length=args.iterations_per_eval
        )
        out = {k: metrics[k].mean() for k in ("td_loss", "q_data")}
        if data is None:
            out["epsilon"] = metrics["epsilon"][-1]
            # share of the episodes that ended in this period that survived (the behaviour policy's return)
            out["behaviour_return"] = metrics["survivals"].sum() / jnp.maximum(metrics["episodes"].sum(), 1)
        if env_params is not None:
            q = q_fn(state.params, env_params.state_vectors)  # (716, n_actions)
            out["exact_return"], out["mean_length"] = runs.exact_evaluation(env_params, q, "greedy")
        runs.tick(out.get("exact_return"))
        return state, out

    def train(key: jax.Array, hparams: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        state, metrics = jax.lax.scan(
            lambda s, _: eval_period(s, hparams), init(key), None, length=args.num_evals
        )
        return state.params, metrics

    return train


def check_args(args: Args) -> None:
    def fail(message: str):
        raise runs.RunError(message)

    for name in ("batch_size", "target_update_every", "num_envs", "updates_per_iteration"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_every < 1:
        fail(f"--eval-every must be at least 1, got {args.eval_every}")
    if args.num_updates < args.eval_every or args.num_updates % args.eval_every:
        what = "(--total-env-steps - --learning-starts) / --num-envs * --updates-per-iteration" if args.online else (
            "--total-updates")  # fmt: skip
        fail(
            f"{what} = {args.num_updates} updates must be a positive multiple of --eval-every ({args.eval_every})"
        )
    if args.online and args.eval_every % args.updates_per_iteration:
        fail(f"--eval-every ({args.eval_every}) must be a multiple of --updates-per-iteration")
    if args.online and args.learning_starts < args.num_envs:
        fail(f"--learning-starts ({args.learning_starts}) must be at least --num-envs ({args.num_envs})")
    if args.online and args.capacity < args.learning_starts:
        fail(f"--buffer-size ({args.buffer_size}) must hold at least --learning-starts transitions")
    if not 0.0 <= args.epsilon_end <= 1.0 or not 0.0 <= args.epsilon_start <= 1.0:
        fail("--epsilon-start and --epsilon-end must be in [0, 1]")
    if not args.hidden or min(args.hidden) < 1:
        fail(f"--hidden needs positive widths, got {args.hidden}")


def online_source(env_params: Any) -> Replay:
    """A stand-in for the replay that checkpoints describe when the data came from the env itself."""
    from cleansepsis import env as sepsis_env

    meta = {
        "action_encoding": ACTION_ENCODING,
        "feature_names": list(sepsis_env.FEATURE_NAMES),
        "normalisation": sepsis_env.NORMALISATION if hasattr(sepsis_env, "NORMALISATION") else None,
        "content_hash": None,
        "source": "icu-sepsis-online",
        "env_id": sepsis_env.ENV_ID,
        "action_bins": None,
        "obs_dim": sepsis_env.OBS_DIM,
        "n_actions": sepsis_env.N_ACTIONS,
    }
    return Replay(
        path=Path(f"online:{sepsis_env.ENV_ID}"), data=None, meta=meta, has={}, episode_ids=np.empty(0)
    )


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__)
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    check_args(args)
    if args.online:
        from cleansepsis import env as sepsis_env

        env_params = sepsis_env.load_params()
        replay, data = online_source(env_params), None
        what = f"online on {sepsis_env.ENV_ID}, {args.num_envs} envs, {args.total_env_steps} env steps"
    else:
        replay, data, env_params = runs.load_training_data(args.replay, args.split)
        what = f"offline on {data.size} transitions from {replay.path}"
    settings, hparams = runs.make_hparam_grid({"learning_rate": args.learning_rate, "gamma": args.gamma})
    seeds = runs.seed_list(args.seed, args.num_seeds)
    reference = runs.reference_values(env_params)
    train = make_train(args, replay.obs_dim, replay.n_actions)
    print(f"{ALGO}: {len(settings)} setting(s) x {len(seeds)} seed(s), {args.num_updates} updates each, {what}",
          file=sys.stderr)  # fmt: skip
    (params, metrics), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc=ALGO, inputs=(data, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    runs.print_results_table(ALGO, settings, seeds, metrics, reference)
    static = network_static(replay.obs_dim, replay.n_actions, args)
    extra = {}
    if args.online:
        env_steps = args.learning_starts + steps // args.updates_per_iteration * args.num_envs
        extra["env_steps_at_evals"] = env_steps.tolist()
    path = runs.finish_run(
        algo=ALGO,
        args=args,
        replay=replay,
        settings=settings,
        seeds=seeds,
        steps=steps,
        metrics=metrics,
        export=lambda s, i: export_policy(runs.index_run(params, s, i), static),
        outputs="q_values",
        timing=timing,
        n_updates=args.num_updates,
        reference=reference,
        run_dir=args.run_dir,
        name=args.name,
        extra_summary=extra,
    )
    print(f"compile {timing['compile_seconds']:.1f} s, train {timing['train_seconds']:.1f} s; wrote {path}",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    runs.cli_main(main)
