"""BC: likelihood and accuracy against numpy, a bandit whose cloned policy is known, CLI smoke runs."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from test_runs import write_probe_replay

import bc
from cleansepsis import runs
from cleansepsis.checkpoint import load_checkpoint, network_forward
from cleansepsis.replay import load_replay, write_replay


def test_nll_and_accuracy_match_numpy():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0], [1.0, 1.0, 5.0]], np.float32)
    mask = np.array([[True, True, False], [True, True, True], [True, True, False]])
    action = np.array([0, 2, 1])
    nll, hit = bc.nll_and_accuracy(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(action))
    expected = []
    for row, m, a in zip(logits, mask, action, strict=True):
        allowed = m.copy()
        allowed[a] = True
        expected.append(-(row[a] - np.log(np.exp(row[allowed]).sum())))
    np.testing.assert_allclose(nll, expected, rtol=1e-5)
    # row 2: action 2 is inadmissible and not the data's, so the argmax over admissible is a tie 0/1 -> 0
    np.testing.assert_array_equal(hit, [1.0, 0.0, 0.0])


def test_bandit_clone_reaches_the_logged_probabilities(tmp_path):
    """One state, actions logged with probabilities 0.6 / 0.3 / 0.1 (action 3 inadmissible): the cloned
    softmax must give those probabilities."""
    rng = np.random.default_rng(0)
    n = 3000
    action = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    mask = np.tile([True, True, True, False], (n, 1))
    split = np.where(np.arange(n) < 2400, "train", "val")
    path = write_probe_replay(
        tmp_path / "bandit.parquet", obs=np.ones((n, 2)), action=action, reward=np.zeros(n), next_obs=np.zeros((n, 2)),
        terminated=np.ones(n, bool), episode_id=np.arange(n), n_actions=4, split=split,
        action_mask=mask, next_action_mask=mask,
    )
    replay = load_replay(path)
    data, held_out = replay.split("train"), {"val": replay.split("val")}
    args = bc.Args(hidden=(16, 16), num_updates=1500, eval_every=500, batch_size=256, lr_schedule="constant")
    train, static = bc.make_train(args, data, held_out, None)
    settings, hparams = runs.make_hparam_grid({"learning_rate": [3e-3], "weight_decay": [0.0]})
    (params, metrics, _), _ = runs.run_sweep(train, [0, 1], hparams, n_ticks=args.num_evals, inputs=(data, held_out, None))
    runs.check_finite(metrics, settings, [0, 1])
    logged = np.bincount(action, minlength=4) / n
    for i in range(2):
        logits = eqx.combine(runs.index_run(params, 0, i), static)(jnp.ones(2))
        probs = np.asarray(runs.admissible_softmax(logits, jnp.asarray([True, True, True, False])))
        np.testing.assert_allclose(probs, logged, atol=0.03)
    # held-out likelihood is the entropy of the logged distribution, accuracy the majority share
    entropy = -np.sum(logged[:3] * np.log(logged[:3]))
    np.testing.assert_allclose(np.asarray(metrics["val_nll"])[0, :, -1], entropy, atol=0.05)
    np.testing.assert_allclose(np.asarray(metrics["val_accuracy"])[0, :, -1], np.mean(action[2400:] == 0), atol=1e-6)


@pytest.mark.slow
def test_cli_on_a_small_icu_sepsis_replay_reports_held_out_metrics_and_checkpoints(
    icu_replay_small, tmp_path, capsys, monkeypatch
):
    """In-process through the same runs.cli_main the script runs under (a subprocess would pay the imports
    again; tests/test_runs.py's fork test runs a learner script in its own process), on the session's
    clinician replay with val and test episodes (drawing one here would compile the env's rollout)."""
    frame, meta = icu_replay_small
    write_replay(tmp_path / "icu.parquet", frame, meta)
    monkeypatch.chdir(tmp_path)
    argv = ["--replay", "icu.parquet", "--learning-rate", "1e-3", "3e-3", "--num-seeds", "2", "--num-updates",
            "40", "--eval-every", "20", "--hidden", "16", "--run-dir", "run"]
    runs.cli_main(lambda: bc.main(argv))  # raises SystemExit on a failure
    printed = capsys.readouterr()
    for word in ("val_accuracy", "test_nll", "greedy_return", "clinician"):
        assert word in printed.out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and summary["updates_per_policy"] == 40
    metrics = pl.read_parquet(run / "metrics.parquet")
    assert {"setting", "seed", "learning_rate", "weight_decay", "step", "val_nll", "exact_return"} <= set(metrics.columns)
    assert metrics.height == 4 * 2
    entry = summary["runs"][0]
    tensors, config = load_checkpoint(run / entry["checkpoint"])
    assert config["algo"] == "bc" and config["outputs"] == "logits" and config["replay_source"] == "icu-sepsis"
    # the stochastic clone of a barely trained net is near the random/clinician values, far from 0 or optimal
    assert 0.7 < entry["exact_return"] < 0.85
    logits = network_forward(tensors, config["network"], jnp.asarray(frame["obs"].to_numpy()[:5]))
    assert logits.shape == (5, 25) and bool(jnp.all(jnp.isfinite(logits)))


def test_cli_rejects_bad_arguments_cleanly(capsys):
    """In-process through the same runs.cli_main the script runs under (the errors come before any work)."""
    with pytest.raises(SystemExit) as exit_info:
        runs.cli_main(lambda: bc.main(["--num-updates", "5", "--eval-every", "10"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and "--eval-every" in err and "Traceback" not in err


def test_softmax_policy_restricted_to_admissible_actions():
    logits = jnp.asarray([[0.0, 1.0, 2.0]])
    probs = np.asarray(runs.admissible_softmax(logits, jnp.asarray([[True, False, True]])))
    np.testing.assert_allclose(probs, [[1 / (1 + np.e**2), 0.0, np.e**2 / (1 + np.e**2)]], rtol=1e-6)
    assert jax.numpy.allclose(probs.sum(), 1.0)
