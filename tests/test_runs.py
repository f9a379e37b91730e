"""Shared run machinery: grids, seeds, the compiled sweep, finite-loss check, table and run folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest

from cleansepsis import run_folder, runs
from cleansepsis.checkpoint import linear_layers, load_checkpoint, network_forward
from cleansepsis.replay import load_replay, write_replay

NETWORK = {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0"], "output": "output"}


def write_probe_replay(path, obs, action, reward, next_obs, terminated, episode_id, n_actions,
                       split=None, action_mask=None, next_action_mask=None, source="probe"):
    """A small replay from numpy arrays, written with the project's own writer (shared by the learner tests)."""
    obs = np.asarray(obs, np.float32)
    n, obs_dim = obs.shape
    episode = np.asarray(episode_id, np.int64)
    order = np.argsort(episode, kind="stable")  # t: the row's step within its episode, in file order
    starts = np.r_[True, episode[order][1:] != episode[order][:-1]]
    t = np.empty(n, np.int32)
    t[order] = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    columns = {
        "episode_id": episode,
        "t": t,
        "obs": obs,
        "action": np.asarray(action, np.int32),
        "reward": np.asarray(reward, np.float32),
        "next_obs": np.asarray(next_obs, np.float32),
        "terminated": np.asarray(terminated, bool),
        "truncated": np.zeros(n, bool),
        "split": list(split) if split is not None else ["train"] * n,
    }
    schema = {"obs": pl.Array(pl.Float32, obs_dim), "next_obs": pl.Array(pl.Float32, obs_dim)}
    if action_mask is not None:
        columns["action_mask"] = np.asarray(action_mask, bool)
        columns["next_action_mask"] = np.asarray(next_action_mask, bool)
        schema |= {"action_mask": pl.Array(pl.Boolean, n_actions), "next_action_mask": pl.Array(pl.Boolean, n_actions)}
    frame = pl.DataFrame({k: v for k, v in columns.items()}).with_columns(
        [pl.col(k).cast(v) for k, v in schema.items()]
    )
    meta = {
        "obs_dim": obs_dim,
        "n_actions": n_actions,
        "feature_names": [f"x{i}" for i in range(obs_dim)],
        "normalisation": None,
        "source": source,
        "env_id": None,
        "reward": "probe",
        "args": {},
    }
    write_replay(path, frame, meta)
    return path


def test_grid_is_the_cartesian_product_first_key_slowest():
    settings, stacked = runs.make_hparam_grid({"alpha": [0.1, 1.0], "lr": [1e-3, 3e-4, 1e-4]})
    assert len(settings) == 6
    assert [s["alpha"] for s in settings] == [0.1] * 3 + [1.0] * 3
    assert settings[4] == {"alpha": 1.0, "lr": pytest.approx(3e-4)}
    assert stacked["lr"].shape == (6,) and stacked["lr"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(stacked["alpha"]), [s["alpha"] for s in settings])
    settings, stacked = runs.make_hparam_grid({"tau": 0.7})
    assert settings == [{"tau": pytest.approx(0.7)}]


@pytest.mark.parametrize("bad", [{"tau": []}, {"tau": [float("nan")]}])
def test_grid_rejects_empty_and_non_finite_values(bad):
    with pytest.raises(runs.RunError, match="--tau"):
        runs.make_hparam_grid(bad)


def test_seeds_are_consecutive_and_keys_differ():
    assert runs.seed_list(3, 2) == [3, 4]
    with pytest.raises(runs.RunError, match="num-seeds"):
        runs.seed_list(0, 0)
    keys = runs.seed_keys([3, 4])
    assert not np.array_equal(keys[0], keys[1])
    np.testing.assert_array_equal(runs.seed_keys([4])[0], keys[1])


def _toy_train(n_evals: int, traces: list):
    """Fits w to a per-setting target by gradient steps; one metric per evaluation."""

    def train(key, hparams):
        traces.append(1)
        w0 = jax.random.normal(key, (3,))

        def evaluate(w, _):
            def update(w, _):
                return w - hparams["lr"] * 2 * (w - hparams["target"]), None

            w, _ = jax.lax.scan(update, w, None, length=5)
            runs.tick()
            return w, {"loss": jnp.sum((w - hparams["target"]) ** 2), "w0": w[0]}

        return jax.lax.scan(evaluate, w0, None, length=n_evals)

    return train


def test_sweep_vmaps_settings_and_seeds_compiles_once_and_repeats():
    traces: list = []
    _, hparams = runs.make_hparam_grid({"lr": [0.1, 0.2], "target": [1.0, -1.0, 0.0]})
    train = _toy_train(4, traces)
    (w, metrics), timing = runs.run_sweep(train, [0, 1, 2], hparams, n_ticks=4)
    assert len(traces) == 1
    assert w.shape == (6, 3, 3) and metrics["loss"].shape == (6, 3, 4)
    assert timing["compile_seconds"] > 0 and timing["train_seconds"] > 0
    # setting 1 is lr=0.1, target=-1: w moves towards -1 and the loss falls
    np.testing.assert_array_less(np.abs(np.asarray(w[1]) + 1), 1.0)
    assert np.all(np.diff(np.asarray(metrics["loss"]), axis=-1) < 0)
    # seeds differ in initial parameters, the same seed repeats exactly
    assert not np.allclose(w[0, 0], w[0, 1])
    (w_again, _), _ = runs.run_sweep(train, [1], hparams, n_ticks=4)
    np.testing.assert_array_equal(np.asarray(w_again[:, 0]), np.asarray(w[:, 1]))


@pytest.mark.parametrize("bad", ["two", "0"])
def test_host_devices_variable_is_checked(monkeypatch, bad):
    monkeypatch.setenv(runs.HOST_DEVICES_VARIABLE, bad)
    with pytest.raises(runs.RunError, match=runs.HOST_DEVICES_VARIABLE):
        runs.use_host_devices()


def test_check_finite_names_step_setting_seed_and_term():
    settings = [{"alpha": 0.1}, {"alpha": 5.0}]
    loss = np.ones((2, 2, 3))
    loss[1, 1, 2] = np.nan
    runs.check_finite({"loss": np.ones((2, 2, 3))}, settings, [7, 8], steps=[10, 20, 30])
    with pytest.raises(runs.NonFiniteError) as err:
        runs.check_finite({"td_loss": loss}, settings, [7, 8], steps=[10, 20, 30])
    message = str(err.value)
    for part in ("td_loss", "step 30", "seed 8", "alpha"):
        assert part in message
    # the policy's return is not a loss; NaN there is left to the table
    runs.check_finite({"exact_return": loss}, settings, [7, 8])


def test_results_table_has_mean_and_std_per_setting_and_references():
    settings = [{"tau": 0.7}, {"tau": 0.9}]
    ret = np.array([[[0.1, 0.80], [0.2, 0.84]], [[0.0, 0.5], [0.0, 0.5]]])
    table = runs.results_table("iql", settings, [0, 1], {"exact_return": ret}, {"clinician": 0.782})
    assert "0.8200 +- 0.0200" in table
    assert "0.5000 +- 0.0000" in table
    assert "tau=0.9" in table and "clinician" in table


def test_metrics_frame_is_long_and_checks_shapes():
    settings = [{"tau": 0.7}, {"tau": 0.9}]
    metrics = {"loss": np.arange(12.0).reshape(2, 2, 3)}
    frame = run_folder.metrics_frame(settings, [5, 6], [100, 200, 300], metrics)
    assert frame.columns == ["setting", "seed", "tau", "step", "loss"]
    assert frame.height == 12
    row = frame.filter((pl.col("setting") == 1) & (pl.col("seed") == 5) & (pl.col("step") == 200)).row(0, named=True)
    assert row["loss"] == metrics["loss"][1, 0, 1] and row["tau"] == pytest.approx(0.9)
    with pytest.raises(run_folder.RunFolderError, match="loss"):
        run_folder.metrics_frame(settings, [5], [100, 200, 300], metrics)


def test_finish_run_writes_a_complete_folder_atomically(tmp_path):
    path = write_probe_replay(
        tmp_path / "r.parquet", obs=np.eye(2), action=[0, 1], reward=[1.0, 0.0], next_obs=np.zeros((2, 2)),
        terminated=[True, True], episode_id=[0, 1], n_actions=2,
    )
    replay = load_replay(path)
    settings, _ = runs.make_hparam_grid({"beta": [1.0, 3.0]})
    seeds = [0, 1]
    mlps = [[eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(10 * s + i)) for i in range(2)] for s in range(2)]

    def export(s, i, k):
        assert k is None
        return linear_layers(mlps[s][i], ["hidden_0", "output"]), NETWORK

    metrics = {"loss": np.ones((2, 2, 3)), "exact_return": np.full((2, 2, 3), 0.8)}
    kwargs = dict(
        algo="toy", script=__file__, args={"lr": 1e-3}, replay=replay, settings=settings, seeds=seeds, steps=[1, 2, 3],
        metrics=metrics, export=export, outputs="logits", timing={"compile_seconds": 1.0, "train_seconds": 2.0},
        n_updates=3, reference={"clinician": 0.782}, run_dir=tmp_path / "run",
    )
    run = runs.finish_run(**kwargs)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "curves.png", "metrics.parquet", "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and summary["updates_per_second"] == pytest.approx(3 * 4 / 2.0)
    assert summary["reference"] == {"clinician": 0.782}
    entry = summary["runs"][3]
    assert entry["setting"] == 1 and entry["seed"] == 1 and entry["hparams"] == {"beta": 3.0}
    assert entry["exact_return"] == pytest.approx(0.8)
    tensors, config = load_checkpoint(run / entry["checkpoint"])
    assert config["algo"] == "toy" and config["outputs"] == "logits" and config["replay_hash"] == replay.content_hash
    obs = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
    np.testing.assert_allclose(network_forward(tensors, config["network"], obs), jax.vmap(mlps[1][1])(obs), atol=1e-6)
    assert pl.read_parquet(run / "metrics.parquet").height == 12
    # an existing folder is not overwritten; a failing export leaves nothing behind
    with pytest.raises(runs.OutputExistsError):
        runs.finish_run(**kwargs)
    assert summary["format"] == "cleansepsis-run" and summary["script"] == "test_runs.py"
    assert config["script_sha256"] == summary["script_sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert config["updates"] == 3 and "checkpoints" not in entry

    def broken(s, i, k):
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        runs.finish_run(**{**kwargs, "export": broken, "run_dir": tmp_path / "run2"})
    assert not (tmp_path / "run2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run2")] == []


# --------------------------------------------------------------------------------------------------
# One interface, arguments checked before any work, forks, --save-every, batch mode, compilation cache

LEARNERS = ("iql", "cql", "dqn", "bc")


def _learner(name):
    import importlib

    return importlib.import_module(name)


def _fields(module):
    import dataclasses

    return {f.name: f for f in dataclasses.fields(module.Args)}


def test_learners_share_the_same_options_in_the_same_order_with_the_same_defaults():
    reference = _fields(_learner("iql"))
    for name in LEARNERS:
        fields = _fields(_learner(name))
        shared = [f for f in fields if f in runs.COMMON_OPTIONS]
        expected = [f for f in reference if f in runs.COMMON_OPTIONS and (f in fields or f not in ("full_batch", "minibatch"))]
        assert shared == expected, name  # same names, same order
        for option in shared:
            if name == "dqn" and option == "replay":
                continue  # dqn's default (no replay) means online
            assert fields[option].default == reference[option].default, (name, option)
            assert str(fields[option].type) == str(reference[option].type), (name, option)
        assert "total_updates" not in fields and "depth" not in fields and "name" not in fields
        assert hasattr(_learner(name), "AUTO") and hasattr(_learner(name), "check_args")


class _Loaded(Exception):
    """Raised instead of loading data: the argument checks came first."""


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(runs, "load_training_data", refuse)
    monkeypatch.setattr(runs, "use_host_devices", refuse)


BAD_VALUES = [
    (["--eval-every", "0"], "--eval-every"),
    (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "-1e-3"], "--learning-rate"),
    (["--num-updates", "150", "--eval-every", "100"], "multiple of --eval-every"),
    (["--num-updates", "400", "--eval-every", "100", "--save-every", "300"], "--save-every"),
    (["--save-every", "150", "--eval-every", "100"], "--save-every"),
    (["--hidden", "0", "8"], "--hidden"),
    (["--num-seeds", "0"], "--num-seeds"),
    (["--split", "dev"], "--split"),
    (["--run-name", "a/b"], "--run-name"),
]
OWN_BAD_VALUES = {
    "iql": [(["--beta", "-1"], "--beta"), (["--tau", "1.5"], "--tau"), (["--reward-scale", "0"], "--reward-scale")],
    "cql": [(["--alpha", "-0.1"], "--alpha"), (["--gamma", "1.5"], "--gamma")],
    "dqn": [(["--num-envs", "0"], "--num-envs"), (["--epsilon-end", "2"], "--epsilon-end")],
    "bc": [(["--weight-decay", "-1"], "--weight-decay")],
}


@pytest.mark.parametrize("name", LEARNERS)
def test_bad_values_give_one_error_line_before_any_work(name, no_work, tmp_path, capsys):
    module = _learner(name)
    replay = ["--replay", str(write_probe_replay(tmp_path / "r.parquet", np.eye(2), [0, 1], [1.0, 0.0],
                                                 np.zeros((2, 2)), [True, True], [0, 1], n_actions=2))]
    for argv, what in BAD_VALUES + OWN_BAD_VALUES[name]:
        with pytest.raises(SystemExit) as exit_info:
            runs.cli_main(lambda argv=argv: module.main([*replay, *argv, "--run-dir", str(tmp_path / "run")]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert what in err, (argv, err)
    with pytest.raises(_Loaded):  # good values get as far as loading the data
        module.main([*replay, "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("name", LEARNERS)
def test_run_dir_is_checked_before_any_work_and_overwrite_replaces_only_run_folders(name, no_work, tmp_path):
    module = _learner(name)
    existing = tmp_path / "thesis"
    existing.mkdir()
    (existing / "chapter1.tex").write_text("years of work")
    with pytest.raises(runs.OutputExistsError, match="--overwrite"):
        module.main(["--run-dir", str(existing)])
    with pytest.raises(runs.RunFolderError, match="not one"):
        module.main(["--run-dir", str(existing), "--overwrite"])
    assert (existing / "chapter1.tex").read_text() == "years of work"
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    (old_run / "summary.json").write_text(json.dumps({"format": "cleansepsis-run", "runs": []}))
    with pytest.raises(_Loaded):  # a run folder may be replaced
        module.main(["--run-dir", str(old_run), "--overwrite"])
    with pytest.raises(runs.RunFolderError):  # a summary.json without the marker is not enough
        (old_run / "summary.json").write_text(json.dumps({"runs": []}))
        module.main(["--run-dir", str(old_run), "--overwrite"])


def test_defaults_are_filled_per_batch_mode_and_rounded_to_the_evaluation_interval():
    import iql

    args, defaults = runs.resolve_defaults(iql.Args(eval_every=3000), iql.AUTO, True, n_transitions=91_125)
    assert args.full_batch and not args.minibatch and args.hidden == (64, 64) and args.learning_rate == (1e-2,)
    assert args.num_updates == 6000 and defaults["chosen"]["num_updates"] == 6000  # 4,000 rounded up
    assert defaults["batch_mode"] == "full batch" and args.lr_schedule == "cosine"
    assert defaults["n_transitions"] == 91_125
    # a large replay (the 100k ICU-Sepsis one) gets the wider network and more updates
    args, _ = runs.resolve_defaults(iql.Args(eval_every=1000), iql.AUTO, True, n_transitions=926_212)
    assert args.hidden == (128, 128) and args.num_updates == 12_000 and args.learning_rate == (3e-3,)
    with pytest.raises(runs.RunError, match="n_transitions"):
        runs.resolve_defaults(iql.Args(), iql.AUTO, full_batch=True)
    args, defaults = runs.resolve_defaults(iql.Args(hidden=(7,), learning_rate=(0.1,)), iql.AUTO, full_batch=False)
    assert args.hidden == (7,) and args.learning_rate == (0.1,) and args.minibatch
    assert "hidden" not in defaults["chosen"] and args.num_updates == iql.AUTO["minibatch"]["num_updates"]


def test_batch_mode_follows_the_distinct_observations(icu_replay_small, tmp_path):
    from cleansepsis.full_batch import FullBatch

    frame, meta = icu_replay_small
    write_replay(tmp_path / "icu.parquet", frame, meta)
    icu = load_replay(tmp_path / "icu.parquet").split("train")
    icu_env = meta["env_id"]
    data, full, why = runs.choose_batch_mode(icu, False, False, icu_env)
    assert full and isinstance(data, FullBatch) and "few" in why
    assert runs.choose_batch_mode(icu, False, True, icu_env)[1] is False  # --minibatch
    # the same few observations from an env the full-batch defaults were not tuned on: minibatches
    data, full, why = runs.choose_batch_mode(icu, False, False, "CleanSepsis/SepsisSim-v0")
    assert not full and data is icu and "SepsisSim-v0" in why and "--full-batch" in why
    assert isinstance(runs.choose_batch_mode(icu, True, False, "CleanSepsis/SepsisSim-v0")[0], FullBatch)
    # observations that never repeat, as on MIMIC-IV: minibatches, unless --full-batch
    rng = np.random.default_rng(0)
    n = 200
    path = write_probe_replay(tmp_path / "mimic_like.parquet", rng.normal(size=(n, 4)), rng.integers(0, 3, n),
                              np.zeros(n), rng.normal(size=(n, 4)), np.ones(n, bool), np.arange(n), n_actions=3)
    unique = load_replay(path).split("train")
    data, full, why = runs.choose_batch_mode(unique, False, False, icu_env)
    assert not full and data is unique and "minibatches" in why
    assert isinstance(runs.choose_batch_mode(unique, True, False, None)[0], FullBatch)


def test_scan_evaluations_saves_the_carry_of_a_shorter_run():
    def evaluate(carry, _):
        carry = carry * 1.5 + 1.0
        return carry, {"value": carry.sum()}

    start = jnp.arange(3.0)
    final, metrics, saved = runs.scan_evaluations(evaluate, start, 6, 2, lambda c: c * 1.0)
    assert metrics["value"].shape == (6,) and saved.shape == (2, 3)  # after 2 and 4 of 6 evaluations
    for k, evals in enumerate((2, 4)):
        shorter, _, none = runs.scan_evaluations(evaluate, start, evals, 0, lambda c: c)
        assert none is None
        np.testing.assert_array_equal(saved[k], shorter)
    np.testing.assert_array_equal(final, runs.scan_evaluations(evaluate, start, 6, 0, lambda c: c)[0])
    assert runs.updates_at_saves(6000, 2000) == [2000, 4000] and runs.updates_at_saves(6000, 0) == []


def test_a_fork_names_its_runs_and_saves_checkpoints_along_training(icu_replay_small, tmp_path):
    """`cp iql.py my_iql.py`: runs are named my_iql__..., summary.json and every checkpoint record the
    fork's file and hash; --save-every keeps the policy every N updates; a second identical run loads its
    program from the persistent compilation cache."""
    import shutil

    frame, meta = icu_replay_small
    write_replay(tmp_path / "icu.parquet", frame, meta)
    fork = tmp_path / "my_iql.py"
    shutil.copy(Path(__file__).resolve().parents[1] / "iql.py", fork)
    fork.write_text(fork.read_text() + "\n# a fork\n")
    env = {**os.environ, "CLEANSEPSIS_COMPILATION_CACHE": str(tmp_path / "jax-cache"), runs.HOST_DEVICES_VARIABLE: "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, str(fork), "--replay", "icu.parquet", "--num-updates", "30", "--eval-every", "10",
            "--save-every", "10", "--hidden", "8", "--num-seeds", "2", "--tau", "0.7", "0.9"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full batch (" in done.stderr and "clinician" in done.stdout and "tau=0.9" in done.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my_iql__default__")
    assert {p.name for p in run.iterdir()} == {"summary.json", "metrics.parquet", "curves.png", "checkpoints"}
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and summary["args"]["tau"] == [0.7, 0.9]
    assert summary["reference"]["optimal"] == pytest.approx(0.8751, abs=1e-3)
    digest = hashlib.sha256(fork.read_bytes()).hexdigest()
    assert summary["script"] == "my_iql.py" and summary["script_sha256"] == digest and summary["algo"] == "iql"
    assert summary["args"]["num_updates"] == 30 and summary["args"]["full_batch"] is True
    assert summary["defaults"]["batch_mode"] == "full batch"
    returns = pl.read_parquet(run / "metrics.parquet")
    for entry in summary["runs"]:
        listed = entry["checkpoints"]
        assert [c["updates"] for c in listed] == [10, 20, 30]
        assert [c["checkpoint"] for c in listed] == [
            f"checkpoints/s{entry['setting']}_seed{entry['seed']}_u0000010",
            f"checkpoints/s{entry['setting']}_seed{entry['seed']}_u0000020",
            f"checkpoints/s{entry['setting']}_seed{entry['seed']}"]
        assert 0.0 < entry["exact_return"] < 0.8752 and entry["mean_length"] > 1
        for c in listed:
            _, config = load_checkpoint(run / c["checkpoint"])
            assert config["updates"] == c["updates"] and config["script"] == "my_iql.py"
            assert config["algo"] == "iql" and config["outputs"] == "logits" and config["env_id"] == meta["env_id"]
            assert config["hparams"] == entry["hparams"] and config["seed"] == entry["seed"]
            assert config["script_sha256"] == digest
            logged = returns.filter((pl.col("seed") == entry["seed"]) & (pl.col("step") == c["updates"])
                                    & (pl.col("setting") == entry["setting"]))
            assert c["exact_return"] == pytest.approx(logged["exact_return"][0])
            assert config["exact_return"] == pytest.approx(c["exact_return"])
        # the saved policies differ along training (they are not copies of the final one)
        first, _ = load_checkpoint(run / listed[0]["checkpoint"])
        last, _ = load_checkpoint(run / listed[-1]["checkpoint"])
        assert not np.allclose(first["output.weight"], last["output.weight"])
    assert any(p.name.startswith("jit_train") for p in (tmp_path / "jax-cache").iterdir())
    again = subprocess.run([*argv, "--run-name", "again"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(next((tmp_path / "runs").glob("my_iql__again__*/summary.json")).read_text())
    assert second["runs"][0]["exact_return"] == summary["runs"][0]["exact_return"]
    assert second["compile_seconds"] < summary["compile_seconds"]
