"""Behaviour cloning of the logged policy: the clinician baseline, and a behaviour model for off-policy
evaluation.

A softmax policy network is fitted by maximum likelihood to the data's actions (softmax over the admissible
actions when the replay has action masks; the data's own action always counts). It acts stochastically
(softmax restricted to admissible actions); its greedy value (argmax over admissible actions) is reported
beside it. Held-out accuracy and log-likelihood per transition are reported on `val`/`test` when present.

    python bc.py                                   # 5 seeds on the ICU-Sepsis clinician replay
    python bc.py --learning-rate 1e-3 3e-4 --weight-decay 0 1e-4 --replay data/icu100k.parquet

Every `--learning-rate` and `--weight-decay` value is crossed with the others and the seeds, and all of
them train in one compiled program.
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
from cleansepsis.networks import MLP, export_mlp, structure
from cleansepsis.replay import SPLITS, Transitions


@dataclass(frozen=True)
class Args:
    replay: str | None = None
    """replay parquet to train on; default: the built-in ICU-Sepsis clinician replay (10,000 episodes, seed 0)"""
    split: str = "train"
    """replay split to train on (train, val or test); the others present are held out"""
    weight_decay: tuple[float, ...] = (0.0,)
    """decoupled weight decay (AdamW); several values are swept"""
    learning_rate: tuple[float, ...] | None = None
    """AdamW learning rate; several values are swept. Default: AUTO below"""
    lr_schedule: Literal["auto", "cosine", "constant"] = "auto"
    """cosine: decay the learning rate to zero over the run; auto: AUTO below"""
    hidden: tuple[int, ...] | None = None
    """hidden layer widths, e.g. --hidden 256 256. Default: AUTO below"""
    batch_size: int = 256
    """transitions per update"""
    num_updates: int | None = None
    """gradient updates per policy. Default: AUTO below"""
    eval_every: int = 1_000
    """updates between evaluations (exact on ICU-Sepsis replays, held-out likelihood when other splits exist)"""
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


# Defaults (BC trains on minibatches only; its clone is within 0.001 of the clinician at these values).
AUTO = {"minibatch": {"learning_rate": (1e-3,), "lr_schedule": "constant", "hidden": (64, 64), "num_updates": 5_000}}


def check_args(args: Args) -> None:
    """This algorithm's own options; the shared ones are checked by runs.check_common_args."""
    for decay in args.weight_decay:
        runs.require(decay >= 0, f"--weight-decay values must be at least 0, got {decay}")


def make_mlp(in_size: int, out_size: int, args: Args, key: jax.Array) -> MLP:
    return MLP(in_size, out_size, args.hidden, key)


def masked_log_probs(logits: jnp.ndarray, mask: jnp.ndarray, action: jnp.ndarray) -> jnp.ndarray:
    """log pi(.|s) over the admissible actions plus the data's own action; (batch, n_actions)."""
    mask = mask | jax.nn.one_hot(action, logits.shape[-1], dtype=bool)
    return jax.nn.log_softmax(jnp.where(mask, logits, -1e9), axis=-1)


def nll_and_accuracy(logits: jnp.ndarray, mask: jnp.ndarray, action: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Per-transition negative log-likelihood of the data's actions, and whether the argmax hits them."""
    chex.assert_rank(logits, 2)
    log_pi = masked_log_probs(logits, mask, action)
    nll = -jnp.take_along_axis(log_pi, action[:, None], axis=1)[:, 0]
    hit = jnp.argmax(log_pi, axis=-1) == action
    return nll, hit.astype(jnp.float32)


def make_train(args: Args, data: Transitions, held_out: dict[str, Transitions], env_params: Any):
    """A pure train(key, hparams[, inputs]) -> (final params, metrics (num_evals,), params saved every
    --save-every updates or None) for one seed and one setting; inputs defaults to (data, held_out,
    env_params)."""
    obs_dim, n_actions = data.obs.shape[1], data.action_mask.shape[1]
    static = structure(lambda: make_mlp(obs_dim, n_actions, args, jax.random.PRNGKey(0)))

    def logits_of(params, obs):  # (batch, n_actions)
        return jax.vmap(eqx.combine(params, static))(obs)

    def loss(params, batch: Transitions):
        nll, hit = nll_and_accuracy(logits_of(params, batch.obs), batch.action_mask, batch.action)
        return nll.mean(), {"nll": nll.mean(), "train_accuracy": hit.mean()}

    def train(key: jax.Array, hparams: dict, inputs=(data, held_out, env_params)) -> tuple[Any, dict]:
        data, held_out, env_params = inputs  # passed as arguments by run_sweep: not compiled in as constants
        key, init_key = jax.random.split(key)
        params = eqx.filter(make_mlp(obs_dim, n_actions, args, init_key), eqx.is_array)
        optimiser = optax.adamw(
            lambda count: runs.learning_rate_at(hparams["learning_rate"], count, args.num_updates, args.lr_schedule),
            weight_decay=hparams["weight_decay"],
        )
        opt_state = optimiser.init(params)

        def update(carry, _):
            params, opt_state, key = carry
            key, batch_key = jax.random.split(key)
            batch = runs.sample_batch(batch_key, data, args.batch_size)
            (_, info), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), info

        def evaluate(carry, _):
            carry, infos = jax.lax.scan(update, carry, None, length=args.eval_every)
            metrics = jax.tree.map(jnp.mean, infos)
            params = carry[0]
            for name, split in held_out.items():
                nll, hit = nll_and_accuracy(logits_of(params, split.obs), split.action_mask, split.action)
                metrics |= {f"{name}_nll": nll.mean(), f"{name}_accuracy": hit.mean()}
            if env_params is not None:
                logits = logits_of(params, env_params.state_vectors)
                result = runs.exact_evaluations(env_params, {"stochastic": (logits, "softmax"),
                                                             "greedy": (logits, "greedy")})
                (ret, length), (greedy_ret, _) = result["stochastic"], result["greedy"]
                metrics |= {"exact_return": ret, "mean_length": length, "greedy_return": greedy_ret}
            return carry, metrics

        (params, _, _), metrics, saved = runs.scan_evaluations(
            evaluate, (params, opt_state, key), args.num_evals, args.evals_per_save, lambda carry: carry[0]
        )
        return params, metrics, saved

    return train, static


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    runs.check_common_args(args)  # everything that can be checked before any work
    check_args(args)
    run_dir = runs.check_run_dir(args, __file__)
    runs.use_host_devices(args.num_seeds)  # before JAX's first operation
    runs.enable_compilation_cache()
    replay, data, env_params = runs.load_training_data(args.replay, args.split)
    args, defaults = runs.resolve_defaults(args, AUTO, full_batch=False)
    runs.print_plan("bc", args, defaults, "behaviour cloning trains on minibatches")
    present = set(np.unique(np.asarray(replay.data.split)).tolist())
    held_out = {name: replay.split(name) for name in SPLITS if name != args.split and SPLITS.index(name) in present}
    settings, hparams = runs.make_hparam_grid({"learning_rate": args.learning_rate, "weight_decay": args.weight_decay})
    seeds = runs.seed_list(args.seed, args.num_seeds)
    train, static = make_train(args, data, held_out, env_params)
    (params, metrics, saved), timing = runs.run_sweep(
        train, seeds, hparams, n_ticks=args.num_evals, desc="bc", inputs=(data, held_out, env_params)
    )
    steps = np.arange(1, args.num_evals + 1) * args.eval_every
    runs.check_finite(metrics, settings, seeds, steps)
    reference = runs.reference_values(env_params)
    columns = ["exact_return", "greedy_return"] + [f"{n}_{m}" for n in held_out for m in ("accuracy", "nll")]
    runs.print_results_table("bc", settings, seeds, metrics, reference, columns=columns)
    path = runs.finish_run(
        algo="bc", script=__file__, args=args, replay=replay, settings=settings, seeds=seeds, steps=steps,
        metrics=metrics, outputs="logits", timing=timing, n_updates=args.num_updates,
        export=lambda s, i, k: export_mlp(runs.policy_at(params, saved, s, i, k), static),
        saved_updates=runs.updates_at_saves(args.num_updates, args.save_every), reference=reference,
        run_dir=run_dir, overwrite=args.overwrite, extra_summary={"defaults": defaults},
    )
    runs.print_timing(timing, path)


if __name__ == "__main__":
    runs.cli_main(main)
