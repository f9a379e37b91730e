"""IQL: loss terms against numpy, a two-state chain with a known answer, seeds, checkpoints, CLI smoke runs."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cql import random_replay_with_repeats
from test_runs import write_probe_replay

import iql
from cleansepsis import runs
from cleansepsis.checkpoint import load_checkpoint, network_forward, save_checkpoint
from cleansepsis.full_batch import full_batch
from cleansepsis.networks import export_mlp
from cleansepsis.replay import distinct_transitions, load_replay, write_replay


def test_expectile_loss_matches_numpy():
    rng = np.random.default_rng(0)
    diff = rng.normal(size=64).astype(np.float32)
    for tau in (0.5, 0.7, 0.95):
        expected = np.mean(np.where(diff < 0, 1 - tau, tau) * diff**2)
        np.testing.assert_allclose(iql.expectile_loss(jnp.asarray(diff), tau), expected, rtol=1e-5)
    # tau = 0.5 is half the squared error; an upper expectile punishes under-estimates more
    assert float(iql.expectile_loss(jnp.asarray([1.0]), 0.9)) > float(iql.expectile_loss(jnp.asarray([-1.0]), 0.9))


def test_learning_rate_schedule_is_a_cosine_from_the_traced_peak_to_zero():
    counts = np.array([0, 250, 500, 750, 1000])
    decayed = jax.jit(lambda peak: runs.learning_rate_at(peak, counts, 1000, "cosine"))(2e-3)
    np.testing.assert_allclose(decayed, 2e-3 * 0.5 * (1 + np.cos(np.pi * counts / 1000)), rtol=1e-6)
    assert decayed[-1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(runs.learning_rate_at(2e-3, counts, 1000, "constant"), 2e-3)


def test_awr_weights_and_masked_log_prob_match_numpy():
    adv = np.array([-1.0, 0.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(iql.awr_weights(jnp.asarray(adv), 2.0, 100.0), np.minimum(np.exp(2 * adv), 100), rtol=1e-6)
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
    mask = np.array([[True, False, True], [False, True, False]])
    action = np.array([0, 0])  # the second row's action is outside its mask: it still counts
    got = np.asarray(iql.masked_log_prob(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(action)))
    row0 = logits[0, 0] - np.log(np.exp(logits[0, [0, 2]]).sum())
    row1 = logits[1, 0] - np.log(np.exp(logits[1, [0, 1]]).sum())
    np.testing.assert_allclose(got, [row0, row1], rtol=1e-5)


def _chain_replay(tmp_path, n=400, seed=0):
    """A: action 0 -> B (reward 0), action 1 -> end (reward 0.5). B: action 0 -> end (1), action 1 -> end (0).
    Actions uniform. With gamma 1, V(B) = the tau-expectile of {0, 1} = tau, so Q(A, 0) = tau > 0.5."""
    rng = np.random.default_rng(seed)
    a_state, b_state = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    obs, action, reward, next_obs, terminated = [], [], [], [], []
    for _ in range(n):
        first = int(rng.integers(2))
        obs.append(a_state), action.append(first)
        if first == 0:
            reward.append(0.0), next_obs.append(b_state), terminated.append(False)
            second = int(rng.integers(2))
            obs.append(b_state), action.append(second), reward.append(1.0 - second)
            next_obs.append(np.zeros(2)), terminated.append(True)
        else:
            reward.append(0.5), next_obs.append(np.zeros(2)), terminated.append(True)
    episode = np.cumsum([0, *[t for t in terminated[:-1]]])
    return write_probe_replay(tmp_path / "chain.parquet", np.array(obs), action, reward, np.array(next_obs),
                              terminated, episode, n_actions=2)


def test_full_batch_losses_equal_the_minibatch_losses_over_the_whole_replay():
    data, n_kinds = random_replay_with_repeats(seed=3)
    distinct = full_batch(distinct_transitions(data))
    assert distinct.size == n_kinds and distinct.continue_next is not None
    args = iql.Args(hidden=(16,), reward_scale=10.0, gamma=0.9, num_updates=1000)
    _, _, (losses, full_batch_losses) = iql.make_train(args, data, None)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)

    def arrays(model):
        return eqx.filter(model, eqx.is_array)

    q = arrays(eqx.filter_vmap(lambda k: iql.make_mlp(3, 5, args, k))(keys[:2]))
    q_target = arrays(eqx.filter_vmap(lambda k: iql.make_mlp(3, 5, args, k))(keys[2:4]))
    v, pi = arrays(iql.make_mlp(3, "scalar", args, keys[4])), arrays(iql.make_mlp(3, 5, args, keys[3]))
    params = iql.Params(q=q, q_target=q_target, v=v, pi=pi)
    hp = {"tau": jnp.float32(0.8), "beta": jnp.float32(2.0), "learning_rate": jnp.float32(1e-3)}
    (loss, terms), grads = eqx.filter_jit(jax.value_and_grad(losses, has_aux=True))(params, data, hp)
    full_value_and_grad = eqx.filter_jit(jax.value_and_grad(full_batch_losses, has_aux=True))
    (full_loss, full_terms), full_grads = full_value_and_grad(params, distinct, hp)
    np.testing.assert_allclose(full_loss, loss, rtol=1e-5)
    for name in terms:
        np.testing.assert_allclose(full_terms[name], terms[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for got, want in zip(jax.tree.leaves(full_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _small_args(**kw) -> iql.Args:
    base = dict(hidden=(32, 32), batch_size=128, num_updates=3000, eval_every=1000, reward_scale=1.0,
                target_update_rate=0.01, learning_rate=(3e-3,), lr_schedule="constant")
    return iql.Args(**{**base, **kw})


def test_chain_answer_seeds_no_retrace_and_checkpoint(tmp_path):
    """One compiled sweep: seeds 0, 1, 0 (the repeated seed must give identical numbers, the other seed
    different ones), each reaching the chain's known values and policy; then a checkpoint round trip."""
    replay = load_replay(_chain_replay(tmp_path))
    data = replay.split("train")
    args = _small_args()
    train, statics, _ = iql.make_train(args, data, None)
    traces = []

    def counted(key, hparams, inputs):
        traces.append(1)
        return train(key, hparams, inputs)

    settings, hparams = runs.make_hparam_grid({"tau": [0.9], "beta": [10.0], "learning_rate": [3e-3]})
    seeds = [0, 1, 0]
    (params, metrics, saved), _ = runs.run_sweep(counted, seeds, hparams, n_ticks=args.num_evals, inputs=(data, None))
    # two traces: run_sweep's probe, which stops at runs.scan_evaluations to learn the carry's shapes, and
    # the chunk program's; running its chunks must not trace again
    assert len(traces) == 2 and saved is None
    runs.check_finite(metrics, settings, seeds)
    states = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    for seed_index in range(len(seeds)):
        p = runs.index_run(params, 0, seed_index)
        v = jax.vmap(eqx.combine(p.v, statics["v"]))(states)
        q = eqx.filter_vmap(lambda net: jax.vmap(net)(states))(eqx.combine(p.q, statics["q"])).min(0)
        logits = jax.vmap(eqx.combine(p.pi, statics["pi"]))(states)
        np.testing.assert_allclose(v[1], 0.9, atol=0.06)  # expectile of {0, 1}
        np.testing.assert_allclose(q[1], [1.0, 0.0], atol=0.06)
        np.testing.assert_allclose(q[0], [0.9, 0.5], atol=0.08)
        np.testing.assert_array_equal(np.argmax(logits, axis=1), [0, 0])
    w = np.asarray(params.pi.layers[0].weight)  # (settings, seeds, hidden, obs)
    assert not np.allclose(w[0, 0], w[0, 1])
    np.testing.assert_array_equal(w[0, 0], w[0, 2])
    np.testing.assert_array_equal(np.asarray(metrics["q_loss"])[0, 0], np.asarray(metrics["q_loss"])[0, 2])

    pi = runs.index_run(params.pi, 0, 1)
    tensors, network = export_mlp(pi, statics["pi"])
    path = save_checkpoint(tmp_path / "ckpt", tensors, {"network": network, "outputs": "logits", "obs_dim": 2,
                                                        "n_actions": 2})
    tensors, config = load_checkpoint(path)
    obs = jax.random.normal(jax.random.key(3), (8, 2))
    expected = jax.vmap(eqx.combine(pi, statics["pi"]))(obs)
    np.testing.assert_allclose(network_forward(tensors, config["network"], obs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_on_a_small_icu_sepsis_replay_writes_the_run_folder(icu_replay_small, tmp_path, capsys, monkeypatch):
    """With minibatches; the full-batch CLI run, as a script in its own process, is tests/test_runs.py's fork
    test. Here in-process through the same runs.cli_main the script runs under (a subprocess would pay the
    imports again), on the session's clinician replay (drawing one here would compile the env's rollout)."""
    frame, meta = icu_replay_small
    write_replay(tmp_path / "icu.parquet", frame, meta)
    monkeypatch.chdir(tmp_path)
    argv = ["--replay", "icu.parquet", "--tau", "0.7", "0.9", "--num-seeds", "2", "--num-updates", "20",
            "--eval-every", "10", "--hidden", "16", "--run-dir", "run", "--minibatch"]
    runs.cli_main(lambda: iql.main(argv))  # raises SystemExit on a failure
    printed = capsys.readouterr()
    assert "clinician" in printed.out and "tau=0.9" in printed.out
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"summary.json", "metrics.parquet", "curves.png", "checkpoints"}
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and summary["args"]["tau"] == [0.7, 0.9]
    assert summary["reference"]["optimal"] == pytest.approx(0.8751, abs=1e-3)
    for entry in summary["runs"]:
        assert 0.0 < entry["exact_return"] < 0.8752 and entry["mean_length"] > 1
        _, config = load_checkpoint(run / entry["checkpoint"])
        assert config["algo"] == "iql" and config["outputs"] == "logits" and config["env_id"] == meta["env_id"]
        assert config["hparams"]["tau"] == entry["hparams"]["tau"] and config["exact_return"] == entry["exact_return"]


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    """In-process through the same runs.cli_main the script runs under (the errors come before any work)."""
    monkeypatch.chdir(tmp_path)
    for argv, what in ((["--replay", "missing.parquet", "--num-updates", "10", "--eval-every", "10"], "missing.parquet"),
                       (["--tau", "1.5"], "--tau")):
        with pytest.raises(SystemExit) as exit_info:
            runs.cli_main(lambda argv=argv: iql.main(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error: ") and "Traceback" not in err
        assert what in err
