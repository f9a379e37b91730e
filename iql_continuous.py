"""Implicit Q-Learning with a continuous action (IQL; Kostrikov, Nair, Levine 2021, arXiv 2110.06169).

Twin Q-networks Q(s, a) learn r + gamma * V(s'); V(s) learns an upper expectile (`--tau`) of min(Q1, Q2) at
the data's actions, so no action outside the data is ever queried; a Gaussian actor is extracted by
advantage-weighted regression: maximise exp(beta * (Q - V)) (clipped) times log pi(a|s) over the data. The
agent acts by the actor's mean. `--bc` is behaviour cloning: beta = 0 makes every weight 1, so the actor's loss
is the plain Gaussian likelihood of the logged doses (the critics still train; the actor never reads them).

    python iql_continuous.py --replay data/vanco_sim.parquet --tau 0.9 --beta 10
    python iql_continuous.py --replay data/vanco_sim.parquet --tau 0.5 0.7 0.9 --beta 1 3 10   # 5 seeds x 9
    python iql_continuous.py --replay data/vanco_sim.parquet --bc --run-name bc

Every `--tau`, `--beta` and `--learning-rate` value is crossed with the others and with the seeds, and all of
them train in one compiled program. On a replay of the vancomycin simulator (env id CleanSepsis/Vancomycin-v0)
every policy is evaluated by simulation, acting by its mean: during training on `--eval-patients` patients,
at the end on `--final-eval-patients` (100,000) patients, beside the clinician-like and oracle policies on the
same patients. Choices against the reference implementations: docs/iql_continuous.md.
"""

from __future__ import annotations

import sys
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
from cleansepsis import vancomycin as V
from cleansepsis.model_card import write_continuous_run_cards
from cleansepsis.networks import MLP, layer_names, structure
from cleansepsis.replay import Transitions


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """replay parquet with continuous actions; default: the built-in vancomycin simulator replay (10,000
    clinician-like episodes, seed 0)"""
    split: str = "train"
    """replay split to train on (train, val or test)"""
    tau: tuple[float, ...] = (0.9,)
    """expectile of V over the data's Q values (0.5 = mean, towards 1 = max); several values are swept.
    0.9: best on the vancomycin simulator replay with beta 10 (docs/iql_continuous.md; locomotion's is 0.7)"""
    beta: tuple[float, ...] = (10.0,)
    """inverse temperature of advantage-weighted policy extraction; several values are swept. 10: measured on
    the vancomycin simulator replay, +0.22 over CORL's 3 (docs/iql_continuous.md)"""
    bc: bool = False
    """behaviour cloning: beta 0 (every advantage weight 1), the Gaussian likelihood of the logged actions"""
    target_update_rate: float = 0.005
    """Polyak rate of the target Q-networks"""
    gamma: float = 1.0
    """discount; the simulator's episodes are 8 decisions and its value is the undiscounted return"""
    reward_scale: float = 1.0
    """rewards are multiplied by this while learning; the simulator's rewards are already of order 1"""
    max_weight: float = 100.0
    """clip of the advantage weight exp(beta * advantage), as CORL"""
    log_std_min: float = -5.0
    """lower bound of the actor's state-independent log standard deviation (normalised action units), as
    JAX-CORL"""
    log_std_max: float = 2.0
    """upper bound of the actor's log standard deviation"""
    learning_rate: tuple[float, ...] = (3e-4,)
    """Adam learning rate of every network; several values are swept"""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """cosine: decay the learning rate to zero over the run (CORL decays its actor's); constant: keep it"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every network, e.g. --hidden 256 256 (the reference implementations')"""
    batch_size: int = 256
    """transitions per update"""
    num_updates: int = 20_000
    """gradient updates per policy"""
    eval_every: int = 1_000
    """updates between logged metrics (and simulated evaluations on simulator replays)"""
    eval_patients: int = 2_000
    """simulated patients per evaluation during training (the same patients at every evaluation)"""
    final_eval_patients: int = 100_000
    """simulated patients for each final policy's value and standard error (the same for every policy and
    for the clinician and oracle references); 0 skips it"""
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

    @property
    def betas(self) -> tuple[float, ...]:
        return (0.0,) if self.bc else self.beta


# The patients every policy is evaluated on (common random numbers: differences between policies are not
# differences between patient draws). Not a training seed, so it never varies with --seed.
EVAL_KEY_SEED = 20_211_006
FINAL_EVAL_CHUNK = 25_000


def check_args(args: Args) -> None:
    """This algorithm's own options; the shared ones are checked by runs.check_common_args."""
    for tau in args.tau:
        runs.require(0 < tau < 1, f"--tau values must be in (0, 1), got {tau}")
    for beta in args.beta:
        runs.require(beta >= 0, f"--beta values must be at least 0, got {beta}")
    runs.require(not (args.bc and args.beta != Args.beta),
                 "--bc is beta 0 (behaviour cloning); give --bc or --beta, not both")
    runs.require(0 < args.target_update_rate <= 1, f"--target-update-rate must be in (0, 1], got {args.target_update_rate}")
    runs.require(0 <= args.gamma <= 1, f"--gamma must be in [0, 1], got {args.gamma}")
    runs.require(args.reward_scale > 0, f"--reward-scale must be positive, got {args.reward_scale}")
    runs.require(args.max_weight > 0, f"--max-weight must be positive, got {args.max_weight}")
    runs.require(args.log_std_min < args.log_std_max,
                 f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}")
    runs.require(args.eval_patients >= 2, f"--eval-patients must be at least 2, got {args.eval_patients}")
    runs.require(args.final_eval_patients == 0 or args.final_eval_patients >= 2,
                 f"--final-eval-patients must be 0 (skip) or at least 2, got {args.final_eval_patients}")


def make_mlp(in_size: int, out_size: int | str, args: Args, key: jax.Array) -> MLP:
    return MLP(in_size, out_size, args.hidden, key)


class Actor(eqx.Module):
    """Gaussian policy over the normalised action: mean tanh(MLP(obs)) in (-1, 1), a state-independent
    log standard deviation (clipped to [log_std_min, log_std_max] where it is used)."""

    mean_net: MLP
    log_std: jax.Array  # (1,)

    def __init__(self, obs_dim: int, args: Args, key: jax.Array):
        self.mean_net = make_mlp(obs_dim, 1, args, key)
        self.log_std = jnp.zeros((1,), jnp.float32)

    def __call__(self, obs: jax.Array) -> jax.Array:  # (obs_dim,) -> () the pre-tanh mean
        return self.mean_net(obs)[0]


class Normaliser(eqx.Module):
    """Observation mean and std of the training split, and the action bounds: the networks see
    (obs - mean) / std and actions mapped to [-1, 1] by a = 2 (dose - low) / (high - low) - 1."""

    obs_mean: jax.Array  # (obs_dim,)
    obs_std: jax.Array  # (obs_dim,)
    low: jax.Array  # ()
    high: jax.Array  # ()

    def obs(self, obs: jax.Array) -> jax.Array:
        return (obs - self.obs_mean) / self.obs_std

    def action(self, dose: jax.Array) -> jax.Array:
        return 2.0 * (dose - self.low) / (self.high - self.low) - 1.0

    def dose(self, action: jax.Array) -> jax.Array:
        return self.low + 0.5 * (action + 1.0) * (self.high - self.low)


def make_normaliser(data: Transitions, space: dict[str, Any]) -> Normaliser:
    obs = np.asarray(data.obs, np.float64)
    std = obs.std(0)
    return Normaliser(
        obs_mean=jnp.asarray(obs.mean(0), jnp.float32),
        obs_std=jnp.asarray(np.where(std > 1e-6, std, 1.0), jnp.float32),  # constant features stay as they are
        low=jnp.asarray(float(space["low"]), jnp.float32),
        high=jnp.asarray(float(space["high"]), jnp.float32),
    )


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


def expectile_loss(diff: jnp.ndarray, tau: jnp.ndarray) -> jnp.ndarray:
    """mean |tau - 1[diff < 0]| * diff^2 for diff = target - prediction."""
    weight = jnp.where(diff < 0, 1.0 - tau, tau)
    return jnp.mean(weight * diff**2)


def awr_weights(advantage: jnp.ndarray, beta: jnp.ndarray, max_weight: float) -> jnp.ndarray:
    """exp(beta * advantage), clipped above at max_weight."""
    return jnp.minimum(jnp.exp(beta * advantage), max_weight)


def gaussian_log_prob(mean: jnp.ndarray, log_std: jnp.ndarray, action: jnp.ndarray) -> jnp.ndarray:
    """log N(action; mean, exp(log_std)^2), elementwise."""
    z = (action - mean) * jnp.exp(-log_std)
    return -0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi)


def network_statics(args: Args, obs_dim: int) -> dict[str, Any]:
    """The non-array parts of the twin Q, V and actor networks; train carries only their arrays."""
    key = jax.random.PRNGKey(0)  # only fixes the structure; values come from train's own key
    return {
        "q": structure(
            lambda: eqx.filter_vmap(lambda k: make_mlp(obs_dim + 1, "scalar", args, k))(jax.random.split(key, 2))
        ),
        "v": structure(lambda: make_mlp(obs_dim, "scalar", args, key)),
        "pi": structure(lambda: Actor(obs_dim, args, key)),
    }


def make_policy(pi_params: Any, pi_static: Any, norm: Normaliser) -> V.Policy:
    """The simulator policy of an actor: its mean dose in mg at the observation (deterministic)."""
    actor = eqx.combine(pi_params, pi_static)

    def policy(key, obs, state, params):
        del key, state, params
        return norm.dose(jnp.tanh(actor(norm.obs(obs)))), jnp.zeros((), jnp.float32)

    return policy


def make_train(args: Args, data: Transitions, norm: Normaliser, sim: V.VancoParams | None):
    """A pure train(key, hparams[, inputs]) -> (final params, metrics (num_evals,), actor params saved every
    --save-every updates or None) for one seed and one setting; inputs defaults to (data, norm).
    Also returns the networks' static parts and the loss function."""
    obs_dim = data.obs.shape[1]
    statics = network_statics(args, obs_dim)
    q_static, v_static, pi_static = statics["q"], statics["v"], statics["pi"]
    eval_key = jax.random.PRNGKey(EVAL_KEY_SEED)

    def q_values(q_params, obs, action):  # (2, batch)
        q = eqx.combine(q_params, q_static)
        inputs = jnp.concatenate([obs, action[:, None]], axis=1)
        return eqx.filter_vmap(lambda net: jax.vmap(net)(inputs))(q)

    def v_value(v_params, obs):  # (batch,)
        return jax.vmap(eqx.combine(v_params, v_static))(obs)

    def actor_mean_and_log_std(pi_params, obs):  # (batch,), (1,)
        actor = eqx.combine(pi_params, pi_static)
        return jnp.tanh(jax.vmap(actor)(obs)), jnp.clip(actor.log_std, args.log_std_min, args.log_std_max)

    def losses(params: Params, batch: Transitions, norm: Normaliser, hparams):
        chex.assert_rank(batch.obs, 2)
        chex.assert_rank(batch.action, 1)
        obs, next_obs = norm.obs(batch.obs), norm.obs(batch.next_obs)
        action = jnp.clip(norm.action(batch.action), -1.0, 1.0)  # (batch,) in [-1, 1]
        q_data = q_values(params.q_target, obs, action).min(0)  # (batch,)
        v = v_value(params.v, obs)
        v_loss = expectile_loss(jax.lax.stop_gradient(q_data) - v, hparams["tau"])

        next_v = jax.lax.stop_gradient(v_value(params.v, next_obs))
        not_done = 1.0 - batch.terminated.astype(jnp.float32)
        target = batch.reward * args.reward_scale + args.gamma * not_done * next_v  # (batch,)
        q = q_values(params.q, obs, action)  # (2, batch)
        q_loss = jnp.mean((q - target[None]) ** 2)

        advantage = jax.lax.stop_gradient(q_data - v)
        weight = awr_weights(advantage, hparams["beta"], args.max_weight)
        mean, log_std = actor_mean_and_log_std(params.pi, obs)
        log_prob = gaussian_log_prob(mean, log_std, action)
        pi_loss = -jnp.mean(weight * log_prob)
        total = v_loss + q_loss + pi_loss
        return total, {"q_loss": q_loss, "v_loss": v_loss, "pi_loss": pi_loss, "mean_weight": weight.mean(),
                       "log_std": log_std[0]}

    def train(key: jax.Array, hparams: dict, inputs=(data, norm)) -> tuple[Params, dict, Any]:
        data, norm = inputs  # passed as arguments by run_sweep, so they are not compiled in as constants
        key, q_key, v_key, pi_key = jax.random.split(key, 4)
        q = eqx.filter(eqx.filter_vmap(lambda k: make_mlp(obs_dim + 1, "scalar", args, k))(jax.random.split(q_key, 2)),
                       eqx.is_array)
        v = eqx.filter(make_mlp(obs_dim, "scalar", args, v_key), eqx.is_array)
        pi = eqx.filter(Actor(obs_dim, args, pi_key), eqx.is_array)
        params = Params(q=q, q_target=q, v=v, pi=pi)
        optimiser = optax.adam(
            lambda count: runs.learning_rate_at(hparams["learning_rate"], count, args.num_updates, args.lr_schedule)
        )
        trainable = (params.q, params.v, params.pi)
        state = TrainState(params=params, opt_state=optimiser.init(trainable), step=jnp.zeros((), jnp.int32))

        def update(carry, _):
            state, key = carry
            key, batch_key = jax.random.split(key)
            batch = runs.sample_batch(batch_key, data, args.batch_size)

            def loss_of(trainable):
                q, v, pi = trainable
                return losses(Params(q=q, q_target=state.params.q_target, v=v, pi=pi), batch, norm, hparams)

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
            if sim is not None:  # by simulation, acting by the mean, on the same patients every time
                policy = make_policy(carry[0].params.pi, pi_static, norm)
                records = V.rollout(eval_key, sim, policy, args.eval_patients)
                metrics |= {"sim_return": records["reward"].sum(-1).mean(), "mean_dose_mg": records["dose"].mean()}
            runs.tick(metrics.get("sim_return"))
            return carry, metrics

        (state, _), metrics, saved = runs.scan_evaluations(
            evaluate, (state, key), args.num_evals, args.evals_per_save, lambda carry: carry[0].params.pi
        )
        return state.params, metrics, saved

    return train, statics, losses


def export_actor(pi_params: Any, pi_static: Any, norm: Normaliser) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, network) of an actor's mean network for a checkpoint, with the observation normalisation
    folded into the first layer (W' = W / std, b' = b - W' mean), so the checkpoint takes raw observations."""
    actor = eqx.combine(pi_params, pi_static)
    layers = actor.mean_net.layers
    names = layer_names(len(layers) - 1)
    std, mean = np.asarray(norm.obs_std, np.float64), np.asarray(norm.obs_mean, np.float64)
    tensors = {}
    for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
        weight, bias = np.asarray(layer.weight, np.float64), np.asarray(layer.bias, np.float64)
        if i == 0:
            weight = weight / std[None, :]
            bias = bias - weight @ mean
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = weight.astype(np.float32), bias.astype(np.float32)
    network = {"kind": "mlp", "activation": "relu", "hidden": names[:-1], "output": names[-1]}
    return tensors, network


def final_values(sim: V.VancoParams, references: list[V.Policy], actors: list[Any], n_patients: int,
                 actor_policy) -> np.ndarray:
    """(n_references + n_actors, n_patients) returns by simulation, every policy on the same patients: the
    simulator policies `references`, then the actor parameters `actors` (through `actor_policy`, one
    compiled program for all of them)."""
    n_chunks = -(-n_patients // FINAL_EVAL_CHUNK)
    keys = jax.random.split(jax.random.PRNGKey(EVAL_KEY_SEED + 1), n_chunks)
    sizes = [min(FINAL_EVAL_CHUNK, n_patients - i * FINAL_EVAL_CHUNK) for i in range(n_chunks)]
    returns_of_actor = jax.jit(
        lambda key, pi, size: V.rollout(key, sim, actor_policy(pi), size)["reward"].sum(-1), static_argnums=2
    )
    out = []
    for policy in references:
        parts = [V.rollout_jit(key, sim, policy, size)["reward"].sum(-1) for key, size in zip(keys, sizes, strict=True)]
        out.append(np.concatenate([np.asarray(p, np.float64) for p in parts]))
    for pi in actors:
        parts = [returns_of_actor(key, pi, size) for key, size in zip(keys, sizes, strict=True)]
        out.append(np.concatenate([np.asarray(p, np.float64) for p in parts]))
    return np.stack(out)


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    runs.check_common_args(args)  # everything that can be checked before any work
    check_args(args)
    run_dir = runs.check_run_dir(args, __file__)
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    runs.enable_compilation_cache()
    from cleansepsis.vancomycin_replay import default_replay_path, simulator_params_from_meta

    replay_path = args.replay if args.replay is not None else default_replay_path()
    replay, data, _ = runs.load_training_data(replay_path, args.split, continuous=True)
    sim = simulator_params_from_meta(replay.meta)  # None: no known dynamics (MIMIC-IV), losses only
    norm = make_normaliser(data, replay.action_space)
    algo = "iql_continuous (bc)" if args.bc else "iql_continuous"
    print(f"{algo}: {data.size} transitions of {replay.path} split {args.split}; {args.num_updates} updates per "
          f"policy; " + ("evaluated by simulation" if sim is not None else "no simulator: losses only"),
          file=sys.stderr, flush=True)
    settings, hparams = runs.make_hparam_grid(
        {"tau": args.tau, "beta": args.betas, "learning_rate": args.learning_rate}
    )
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train, statics, _ = make_train(args, data, norm, sim)
    (params, metrics, saved), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="iql_continuous", inputs=(data, norm)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)

    reference, simulation = {}, None
    if sim is not None and args.final_eval_patients:
        actors = [runs.index_run(params.pi, s, i) for s in range(len(settings)) for i in range(len(seeds))]
        returns = final_values(sim, [V.clinician_policy, V.oracle_policy], actors, args.final_eval_patients,
                               lambda pi: make_policy(pi, statics["pi"], norm))
        mean, stderr = returns.mean(1), returns.std(1, ddof=1) / np.sqrt(returns.shape[1])
        reference = {"clinician": float(mean[0]), "oracle": float(mean[1])}
        shape = (len(settings), len(seeds))
        simulation = {
            "n_patients": args.final_eval_patients, "acting": "by the actor's mean",
            "patients": f"the same for every policy (key {EVAL_KEY_SEED + 1})",
            "clinician": {"value": float(mean[0]), "stderr": float(stderr[0])},
            "oracle": {"value": float(mean[1]), "stderr": float(stderr[1])},
            "value": mean[2:].reshape(shape).tolist(), "stderr": stderr[2:].reshape(shape).tolist(),
        }
        runs.print_results_table(algo, settings, seeds, {"sim_return_final": mean[2:].reshape(shape)[..., None]},
                                 reference, columns=("sim_return_final",))
        print(f"(per policy: standard error over {args.final_eval_patients} patients about "
              f"{float(np.median(stderr[2:])):.4f}; clinician {mean[0]:.4f} +- {stderr[0]:.4f}, "
              f"oracle {mean[1]:.4f} +- {stderr[1]:.4f})", flush=True)
    else:
        runs.print_results_table(algo, settings, seeds, metrics, reference, columns=("sim_return",))
    path = runs.finish_run(
        algo=algo, script=__file__, args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
        metrics=metrics, outputs="action_mean", timing=timing, n_updates=args.num_updates,
        export=lambda s, i, k: export_actor(runs.policy_at(params.pi, saved, s, i, k), statics["pi"], norm),
        saved_updates=runs.updates_at_saves(args.num_updates, args.save_every), reference=reference,
        run_dir=run_dir, overwrite=args.overwrite,
        extra_summary={"simulation": simulation, "action_space": replay.action_space,
                       "observation_normalisation": "training-split mean and std, folded into each checkpoint's "
                       "first layer (checkpoints take raw observations)"},
    )
    write_continuous_run_cards(path)  # README.md model card in each final checkpoint folder
    runs.print_timing(timing, path)


if __name__ == "__main__":
    runs.cli_main(main)
