"""cql.py: loss terms against numpy, probe problems with known answers, seeds, retracing, smoke runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest

import cql
from cleansepsis import runs
from cleansepsis.checkpoint import load_checkpoint, network_forward
from cleansepsis.full_batch import full_batch as make_full_batch
from cleansepsis.networks import MLP, export_mlp
from cleansepsis.replay import Transitions, distinct_transitions, write_replay


def make_transitions(obs, action, reward, next_obs, terminated, action_mask=None, next_action_mask=None):
    obs = np.asarray(obs, np.float32)
    n, n_actions = obs.shape[0], 4
    if action_mask is not None:
        n_actions = np.asarray(action_mask).shape[1]
    full = np.ones((n, n_actions), bool)
    return Transitions(
        obs=jnp.asarray(obs),
        action=jnp.asarray(action, jnp.int32),
        reward=jnp.asarray(reward, jnp.float32),
        next_obs=jnp.asarray(next_obs, jnp.float32),
        terminated=jnp.asarray(terminated, bool),
        truncated=jnp.zeros(n, bool),
        episode_id=jnp.arange(n, dtype=jnp.int32),
        t=jnp.zeros(n, jnp.int32),
        split=jnp.zeros(n, jnp.int8),
        state_index=jnp.full(n, -1, jnp.int32),
        next_state_index=jnp.full(n, -1, jnp.int32),
        behavior_prob=jnp.full(n, jnp.nan, jnp.float32),
        action_mask=jnp.asarray(full if action_mask is None else action_mask),
        next_action_mask=jnp.asarray(full if next_action_mask is None else next_action_mask),
    )


def hparams(alpha=0.0, learning_rate=1e-3, gamma=1.0):
    return {k: jnp.float32(v) for k, v in dict(alpha=alpha, learning_rate=learning_rate, gamma=gamma).items()}


def small_args(**kw):
    base = dict(num_updates=1500, eval_every=500, batch_size=256, hidden=(32, 32), target_update_every=50,
                lr_schedule="cosine")
    return dataclasses.replace(cql.Args(), **{**base, **kw})


def q_values(args, params, n_actions, obs):
    static = cql.network_static(obs.shape[1], n_actions, args.hidden)
    return np.asarray(jax.vmap(eqx.combine(params, static))(jnp.asarray(obs, jnp.float32)))


# ----- loss terms against numpy --------------------------------------------------------------------------


def test_double_dqn_target_matches_numpy_with_mask_and_terminal():
    rng = np.random.default_rng(0)
    batch, n_actions = 64, 6
    q_online, q_target = rng.normal(size=(2, batch, n_actions)).astype(np.float32)
    reward = rng.normal(size=batch).astype(np.float32)
    terminated = rng.random(batch) < 0.3
    mask = rng.random((batch, n_actions)) < 0.5
    mask[np.arange(batch), rng.integers(0, n_actions, batch)] = True  # at least one admissible action
    gamma = 0.9
    expected = np.empty(batch, np.float32)
    for i in range(batch):
        admissible = np.flatnonzero(mask[i])
        best = admissible[np.argmax(q_online[i, admissible])]
        expected[i] = reward[i] + (0.0 if terminated[i] else gamma * q_target[i, best])
    got = cql.double_dqn_target(q_online, q_target, reward, terminated, mask, jnp.float32(gamma))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    # the masked target differs from the unmasked one somewhere, so the mask is really used
    unmasked = cql.double_dqn_target(
        q_online, q_target, reward, terminated, np.ones_like(mask), jnp.float32(gamma)
    )
    assert not np.allclose(np.asarray(unmasked), expected)


def test_cql_penalty_matches_numpy_over_admissible_actions():
    rng = np.random.default_rng(1)
    batch, n_actions = 50, 5
    q = rng.normal(size=(batch, n_actions)).astype(np.float32) * 3
    action = rng.integers(0, n_actions, batch)
    mask = rng.random((batch, n_actions)) < 0.6
    mask[np.arange(batch), action] = True  # the logged action is admissible
    expected = np.array(
        [np.log(np.sum(np.exp(q[i, mask[i]]))) - q[i, action[i]] for i in range(batch)], np.float32
    )
    got = cql.cql_penalty(jnp.asarray(q), jnp.asarray(action, jnp.int32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    assert (np.asarray(got) >= -1e-6).all()  # logsumexp >= any admissible value


def random_replay_with_repeats(seed=0, n=600, n_obs=7, n_actions=5, n_kinds=45):
    """n transitions drawn (with repeats) from n_kinds distinct ones; each observation has its own
    admissible actions, which include every action the data take there."""
    rng = np.random.default_rng(seed)
    obs_values = rng.normal(size=(n_obs, 3)).astype(np.float32)
    mask = rng.random((n_obs, n_actions)) < 0.6
    state, next_state = rng.integers(0, n_obs, (2, n_kinds))
    action = rng.integers(0, n_actions, n_kinds)
    mask[state, action] = True
    reward = rng.normal(size=n_kinds).astype(np.float32)
    terminated = rng.random(n_kinds) < 0.3
    kind = rng.integers(0, n_kinds, n)
    data = make_transitions(
        obs_values[state[kind]], action[kind], reward[kind], obs_values[next_state[kind]], terminated[kind],
        mask[state[kind]], mask[next_state[kind]],
    )
    return data, len(np.unique(kind))


def test_full_batch_loss_equals_the_minibatch_loss_over_the_whole_replay():
    data, n_kinds = random_replay_with_repeats()
    distinct = make_full_batch(distinct_transitions(data))
    assert distinct.size == n_kinds and abs(float(distinct.weight.sum()) - 1.0) < 1e-6
    static = cql.network_static(3, 5, (16,))
    params, _ = eqx.partition(MLP(3, 5, (16,), jax.random.PRNGKey(0)), eqx.is_array)
    target_params, _ = eqx.partition(MLP(3, 5, (16,), jax.random.PRNGKey(1)), eqx.is_array)
    hp = hparams(alpha=0.7, gamma=0.9)
    value_and_grad = eqx.filter_jit(jax.value_and_grad(cql.cql_loss, has_aux=True))  # one program, not op by op
    (loss, terms), grads = value_and_grad(params, static, target_params, data, hp)
    (full_loss, full_terms), full_grads = eqx.filter_jit(jax.value_and_grad(cql.full_batch_cql_loss, has_aux=True))(
        params, static, target_params, distinct, hp
    )
    np.testing.assert_allclose(full_loss, loss, rtol=1e-5)
    for name in ("td_loss", "cql_loss", "q_data"):
        np.testing.assert_allclose(full_terms[name], terms[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for got, want in zip(jax.tree.leaves(full_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ----- probe problems with known answers -----------------------------------------------------------------


def bandit(n=3000, seed=0):
    """One step, one state, actions 0..2 logged uniformly with mean rewards 0.2, 0.8, 0.5; action 3 never."""
    rng = np.random.default_rng(seed)
    action = rng.integers(0, 3, n)
    mean = np.array([0.2, 0.8, 0.5, 0.0])
    reward = (rng.random(n) < mean[action]).astype(np.float32)
    obs = np.ones((n, 2), np.float32)
    return make_transitions(obs, action, reward, np.zeros_like(obs), np.ones(n, bool)), mean


def test_bandit_learns_mean_rewards_and_penalty_pushes_unseen_action_down_seeds_and_no_retrace(counted_seed_sweep):
    """One compiled program (seeds 0, 1, 0 side by side) for both alphas: new hyperparameter values do not
    retrace; every seed learns the mean rewards without the penalty and pushes the unseen action down with
    it; seeds differ, the same seed repeats exactly."""
    data, _ = bandit()
    args = small_args()
    sweep, keys, traces = counted_seed_sweep(cql.make_train(args, 2, 4))
    params0, metrics0, _ = sweep(keys, hparams(alpha=0.0), (data, None))
    params1, _, _ = sweep(keys, hparams(alpha=1.0), (data, None))  # new hyperparameter values: no new trace
    assert len(traces) == 1
    empirical = [float(data.reward[data.action == a].mean()) for a in range(3)]
    for seed in range(3):
        q0 = q_values(args, jax.tree.map(lambda a, i=seed: a[i], params0), 4, np.ones((1, 2)))[0]
        q1 = q_values(args, jax.tree.map(lambda a, i=seed: a[i], params1), 4, np.ones((1, 2)))[0]
        np.testing.assert_allclose(q0[:3], empirical, atol=0.05)
        assert q1[3] < q1[:3].min() - 0.5, q1  # never-logged action made pessimistic
        assert q1[3] < q0[3] - 0.5
        assert int(np.argmax(q1)) == 1
    first = params0.layers[0].weight
    assert not np.allclose(first[0], first[1])  # different seeds, different networks
    np.testing.assert_array_equal(first[0], first[2])  # same seed, identical numbers
    np.testing.assert_array_equal(metrics0["td_loss"][0], metrics0["td_loss"][2])
    assert not np.allclose(params1.layers[-1].weight[0], params0.layers[-1].weight[0])  # alpha is used


def chain(n=4000, seed=0):
    """Two copies of a two-state chain in one replay; copy c has observations [A, B, c].
    State A: action 0 -> B (reward 0), action 1 -> end (reward 0.3).
    State B: action 0 -> end (reward 1), action 1 -> end (reward 0); every action logged uniformly.
    In copy 1, action 0 is inadmissible at B (in next_action_mask). With gamma = 1, Q(A, 0) is the
    best admissible value at B: 1 in copy 0, 0 in copy 1."""
    rng = np.random.default_rng(seed)
    a_state = rng.random(n) < 0.5
    copy = (rng.random(n) < 0.5).astype(np.float32)
    action = rng.integers(0, 2, n)
    obs = np.stack([a_state, ~a_state, copy], 1).astype(np.float32)
    to_b = a_state & (action == 0)
    next_obs = np.stack([np.zeros(n), to_b, copy * to_b], 1).astype(np.float32)
    reward = np.where(a_state, np.where(action == 1, 0.3, 0.0), np.where(action == 0, 1.0, 0.0))
    next_mask = np.ones((n, 2), bool)
    next_mask[to_b & (copy == 1), 0] = False
    return make_transitions(obs, action, reward, next_obs, ~to_b, np.ones((n, 2), bool), next_mask)


@pytest.mark.parametrize("full_batch", [False, True])
def test_two_state_chain_bootstraps_through_admissible_actions(full_batch):
    data = chain()
    args = small_args(num_updates=2000, eval_every=1000, full_batch=full_batch)
    if full_batch:  # the next-state mask differs from the state's own: two table rows for B in copy 1
        data = make_full_batch(distinct_transitions(data))
        assert data.obs_table.shape[0] == 6 and data.size == 8
    params, metrics, _ = jax.jit(cql.make_train(args, 3, 2))(
        jax.random.PRNGKey(1), hparams(alpha=0.0), (data, None)
    )
    q = q_values(args, params, 2, np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]], np.float32))
    np.testing.assert_allclose(q[0], [1.0, 0.3], atol=0.06)  # copy 0: best action at B is admissible
    np.testing.assert_allclose(q[2], [0.0, 0.3], atol=0.06)  # copy 1: bootstrap only over admissible
    np.testing.assert_allclose(q[[1, 3]], [[1.0, 0.0], [1.0, 0.0]], atol=0.06)
    assert metrics["td_loss"].shape == (args.num_evals,)


def test_exported_checkpoint_forward_equals_network(tmp_path):
    from cleansepsis.checkpoint import save_checkpoint

    args = small_args()
    net = MLP(2, 4, args.hidden, jax.random.PRNGKey(3))
    params, static = eqx.partition(net, eqx.is_array)
    tensors, network = export_mlp(params, static)
    save_checkpoint(
        tmp_path / "ckpt", tensors, {"network": network, "outputs": "q_values", "obs_dim": 2, "n_actions": 4}
    )
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    obs = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(network_forward(loaded, config["network"], obs)), np.asarray(jax.vmap(net)(obs)), atol=1e-5
    )


# ----- subprocess smoke runs -----------------------------------------------------------------------------


def write_bandit_replay(path: Path, n=400) -> Path:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    frame = pl.DataFrame(
        {
            "episode_id": np.arange(n, dtype=np.int64),
            "t": np.zeros(n, np.int32),
            "obs": obs,
            "action": rng.integers(0, 25, n).astype(np.int32),
            "reward": rng.random(n).astype(np.float32),
            "next_obs": np.zeros_like(obs),
            "terminated": np.ones(n, bool),
            "truncated": np.zeros(n, bool),
            "split": np.where(np.arange(n) < 300, "train", "test"),
        },
        schema_overrides={"obs": pl.Array(pl.Float32, 3), "next_obs": pl.Array(pl.Float32, 3)},
    )
    meta = dict(
        obs_dim=3,
        n_actions=25,
        feature_names=["a", "b", "c"],
        normalisation={},
        source="test",
        env_id=None,
        reward="test",
        args={},
    )
    write_replay(path, frame, meta)
    return path


@pytest.mark.parametrize("full_batch", [False, True])
def test_smoke_run_writes_run_folder(tmp_path, full_batch, capsys):
    """In-process through the same runs.cli_main the script runs under (a subprocess would pay the imports
    again; tests/test_runs.py's fork test runs a learner script in its own process)."""
    replay = write_bandit_replay(tmp_path / "bandit.parquet")
    out = tmp_path / "run"
    argv = [
        "--replay", str(replay), "--alpha", "0.1", "1", "--num-seeds", "2", "--num-updates", "40",
        "--eval-every", "20", "--batch-size", "16", "--hidden", "8", "--run-dir", str(out),
        *(["--full-batch"] if full_batch else []),
    ]  # fmt: skip
    runs.cli_main(lambda: cql.main(argv))  # raises SystemExit on a failure
    result = capsys.readouterr()
    assert ("cql: full batch (--full-batch" in result.err) == full_batch
    assert ("cql: minibatch (" in result.err) != full_batch
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 4
    assert sorted(round(r["hparams"]["alpha"], 4) for r in summary["runs"]) == [0.1, 0.1, 1.0, 1.0]
    frame = pl.read_parquet(out / "metrics.parquet")
    assert {"td_loss", "cql_loss", "alpha", "seed", "step"} <= set(frame.columns)
    assert frame.height == 2 * 2 * 2
    assert (out / "curves.png").stat().st_size > 0
    tensors, config = load_checkpoint(out / summary["runs"][0]["checkpoint"])
    assert config["algo"] == "cql" and config["outputs"] == "q_values" and config["obs_dim"] == 3
    assert tensors["output.weight"].shape == (25, 8) and abs(config["hparams"]["alpha"] - 0.1) < 1e-6


def test_bad_arguments_give_a_clear_error(tmp_path, capsys):
    """In-process through the same runs.cli_main the script runs under (the errors come before any work)."""
    replay = write_bandit_replay(tmp_path / "bandit.parquet")
    for argv, what in ((["--replay", str(replay), "--num-updates", "30", "--eval-every", "20"], "--eval-every"),
                       (["--replay", str(tmp_path / "missing.parquet")], "missing.parquet")):
        with pytest.raises(SystemExit) as exit_info:
            runs.cli_main(lambda argv=argv: cql.main(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error: ") and "Traceback" not in err
        assert what in err
