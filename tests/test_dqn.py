"""dqn.py: TD target and prioritised sampling against numpy, an offline probe with known values, seeds and
retracing, the dueling checkpoint, and an online smoke run on the ICU-Sepsis JAX env."""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from test_cql import chain

import dqn
from cleansepsis import online, runs
from cleansepsis.checkpoint import load_checkpoint, network_forward, save_checkpoint


def test_td_target_matches_numpy_double_and_plain_with_mask():
    rng = np.random.default_rng(0)
    batch, n_actions, gamma = 40, 5, 0.95
    q_online, q_target = rng.normal(size=(2, batch, n_actions)).astype(np.float32)
    reward = rng.normal(size=batch).astype(np.float32)
    terminated = rng.random(batch) < 0.25
    mask = rng.random((batch, n_actions)) < 0.5
    mask[:, 0] = True
    for double in (True, False):
        expected = np.empty(batch, np.float32)
        for i in range(batch):
            admissible = np.flatnonzero(mask[i])
            chooser = q_online if double else q_target
            best = admissible[np.argmax(chooser[i, admissible])]
            expected[i] = reward[i] + (0.0 if terminated[i] else gamma * q_target[i, best])
        got = dqn.td_target(q_online, q_target, reward, terminated, mask, jnp.float32(gamma), double)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_prioritized_sampling_follows_priorities_with_numpy_weights():
    priorities = jnp.asarray([0.0, 1.0, 3.0, 0.5, 0.5, 0.0, 0.0, 0.0], jnp.float32)  # slots 5.. empty
    size, batch, beta = 5, 4096, 0.5
    rows, weight = jax.jit(lambda k: online.sample_rows(k, priorities, size, batch, beta, True))(
        jax.random.PRNGKey(0)
    )
    rows, weight = np.asarray(rows), np.asarray(weight)
    assert rows.min() >= 0 and rows.max() < size
    freq = np.bincount(rows, minlength=size) / batch
    prob = np.asarray(priorities[:size]) / float(priorities.sum())
    np.testing.assert_allclose(freq, prob, atol=0.02)  # stratified draws: close to the exact shares
    expected = (size * prob[rows]) ** -beta
    np.testing.assert_allclose(weight, expected / expected.max(), rtol=1e-5)
    uniform_rows, uniform_weight = online.sample_rows(jax.random.PRNGKey(1), priorities, size, 512, beta, False)
    assert np.asarray(uniform_rows).max() < size and np.all(np.asarray(uniform_weight) == 1.0)


def offline_args(**kw):
    base = dict(
        replay="probe", num_updates=2000, eval_every=1000, batch_size=256, hidden=(32, 32),
        target_update_every=50, learning_rate=(1e-3,), lr_schedule="cosine",
    )  # fmt: skip
    return dataclasses.replace(dqn.Args(), **{**base, **kw})


def test_offline_chain_probe_seeds_and_no_retrace(counted_seed_sweep):
    """Double + dueling DQN offline on the two-state chain reaches the known values; seeds differ, the
    same seed repeats exactly, and new hyperparameter values do not retrace."""
    data = chain()
    args = offline_args(dueling=True)
    sweep, keys, traces = counted_seed_sweep(dqn.make_train(args, 3, 2))
    hp = {"learning_rate": jnp.float32(1e-3), "gamma": jnp.float32(1.0)}
    params, metrics, _ = sweep(keys, hp, (data, None))
    _, metrics_again, _ = sweep(keys, {**hp, "gamma": jnp.float32(0.5)}, (data, None))
    assert len(traces) == 1
    static = dqn.network_static(3, 2, args)
    obs = jnp.asarray([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]], jnp.float32)
    q = np.asarray(jax.vmap(lambda p: jax.vmap(eqx.combine(p, static))(obs))(params))  # (3 seeds, 4, 2)
    for seed in range(3):
        np.testing.assert_allclose(q[seed, 0], [1.0, 0.3], atol=0.06)
        np.testing.assert_allclose(q[seed, 2], [0.0, 0.3], atol=0.06)  # bootstrap over admissible actions
        np.testing.assert_allclose(q[seed, [1, 3]], [[1.0, 0.0], [1.0, 0.0]], atol=0.06)
    weights = params.layers[0].weight
    assert not np.allclose(weights[0], weights[1])
    np.testing.assert_array_equal(weights[0], weights[2])
    np.testing.assert_array_equal(metrics["td_loss"][0], metrics["td_loss"][2])
    assert not np.allclose(metrics_again["q_data"], metrics["q_data"])  # gamma is really used


def test_dueling_checkpoint_forward_equals_network(tmp_path):
    args = offline_args(dueling=True, hidden=(16, 8))
    net = dqn.QNetwork(47, 25, args.hidden, True, jax.random.PRNGKey(2))
    params, static = eqx.partition(net, eqx.is_array)
    tensors, network = dqn.export_policy(params, static)
    save_checkpoint(
        tmp_path / "c", tensors, {"network": network, "outputs": "q_values", "obs_dim": 47, "n_actions": 25}
    )
    loaded, config = load_checkpoint(tmp_path / "c")
    obs = np.random.default_rng(0).normal(size=(10, 47)).astype(np.float32)
    assert config["network"]["kind"] == "dueling_mlp"
    np.testing.assert_allclose(
        np.asarray(network_forward(loaded, config["network"], obs)), np.asarray(jax.vmap(net)(obs)), atol=1e-5
    )


def test_online_smoke_run_writes_run_folder(tmp_path):
    """In-process through the same runs.cli_main the script runs under (a subprocess would pay the imports
    again; tests/test_runs.py's fork test runs a learner script in its own process)."""
    out = tmp_path / "run"
    argv = ["--num-envs", "16", "--learning-starts", "160", "--total-env-steps", "800", "--eval-every", "20",
            "--hidden", "16", "--num-seeds", "2", "--batch-size", "32", "--buffer-size", "480", "--prioritized",
            "--dueling", "--run-dir", str(out)]  # fmt: skip
    runs.cli_main(lambda: dqn.main(argv))  # raises SystemExit on a failure
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2
    for run in summary["runs"]:
        assert 0.0 < run["exact_return"] < 0.8752  # a real policy on ICU-Sepsis, never above optimal
    frame = pl.read_parquet(out / "metrics.parquet")
    assert {"td_loss", "exact_return", "behaviour_return", "epsilon", "step"} <= set(frame.columns)
    assert frame.height == 2 * 2
    assert (out / "curves.png").is_file()
    tensors, config = load_checkpoint(out / summary["runs"][1]["checkpoint"])
    assert config["network"]["kind"] == "dueling_mlp" and config["algo"] == "dqn" and config["seed"] == 1
    assert network_forward(tensors, config["network"], np.zeros((3, 47), np.float32)).shape == (3, 25)


def test_bad_arguments_give_a_clear_error(capsys):
    """In-process through the same runs.cli_main the script runs under (the errors come before any work)."""
    for argv, what in ((["--num-envs", "0"], "--num-envs"), (["--num-updates", "5000"], "--num-updates")):
        with pytest.raises(SystemExit) as exit_info:
            runs.cli_main(lambda argv=argv: dqn.main(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error: ") and "Traceback" not in err
        assert what in err
