"""iql_continuous.py: refusals before any work, loss terms against numpy, learning on a constructed dosing
problem with a known best dose, the run folder on a simulator replay, and continuous checkpoints through
cleansepsis.load_policy (doses in mg, within the bounds)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from conftest import make_tiny_replay

import iql_continuous as IC
from cleansepsis import load_policy, runs
from cleansepsis.checkpoint import network_forward
from cleansepsis.policy import PolicyError
from cleansepsis.replay import load_replay, write_replay
from cleansepsis.vancomycin_replay import VancomycinSimArgs, make_vancomycin_replay

SPACE = {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0, "high": 3000.0}


def best_dose(x: np.ndarray) -> np.ndarray:
    """The constructed problem's best dose at observation x in [-1, 1]: 750 to 2250 mg."""
    return 1500.0 + 750.0 * x


def dose_problem(n: int = 4000, seed: int = 0) -> tuple[pl.DataFrame, dict]:
    """One-step episodes: x ~ U(-1, 1), a uniformly random logged dose, reward -((dose - best(x)) / 1000)^2.
    A good policy doses best(x); the untrained actor (mean 1500 mg everywhere) is off by 750 |x|."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n).astype(np.float32)
    dose = rng.uniform(0, 3000, n).astype(np.float32)
    obs = np.stack([x, np.ones(n, np.float32)], 1)
    frame = pl.DataFrame([
        pl.Series("episode_id", np.arange(n), pl.Int64),
        pl.Series("t", np.zeros(n, np.int32), pl.Int32),
        pl.Series("obs", obs, pl.Array(pl.Float32, 2)),
        pl.Series("action", dose, pl.Float32),
        pl.Series("reward", -(((dose - best_dose(x)) / 1000.0) ** 2).astype(np.float32), pl.Float32),
        pl.Series("next_obs", obs, pl.Array(pl.Float32, 2)),
        pl.Series("terminated", np.ones(n, bool), pl.Boolean),
        pl.Series("truncated", np.zeros(n, bool), pl.Boolean),
        pl.Series("split", np.full(n, "train"), pl.String),
        pl.Series("behavior_log_density", np.full(n, -np.log(3000.0), np.float32), pl.Float32),
    ])
    meta = {"obs_dim": 2, "feature_names": ["x", "one"], "normalisation": "none", "source": "tests",
            "env_id": None, "reward": "-((dose - best) / 1000)^2", "args": {"seed": seed}, "action_space": SPACE}
    return frame, meta


def test_losses_match_numpy():
    diff = np.array([-2.0, -0.5, 0.0, 1.0, 3.0], np.float32)
    tau = 0.8
    expected = np.mean(np.where(diff < 0, 1 - tau, tau) * diff**2)
    np.testing.assert_allclose(IC.expectile_loss(jnp.asarray(diff), tau), expected, rtol=1e-6)
    mean, log_std, action = np.array([0.1, -0.3]), np.array([-1.0]), np.array([0.4, -0.9])
    sd = np.exp(log_std)
    expected = -0.5 * ((action - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(IC.gaussian_log_prob(jnp.asarray(mean), jnp.asarray(log_std), jnp.asarray(action)),
                               expected, rtol=1e-5)
    np.testing.assert_allclose(IC.awr_weights(jnp.asarray([0.0, 1.0, 10.0]), 3.0, 100.0), [1.0, np.e**3, 100.0],
                               rtol=1e-5)


def test_short_training_learns_the_best_dose_and_bc_does_not(tmp_path):
    """IQL on the constructed problem moves the mean dose from 1500 mg everywhere to near best(x); BC (beta
    0) fits the uniform logging policy, whose mean stays near 1500 mg. The checkpoint export, with the
    normalisation folded into its first layer, gives the same doses as the training code."""
    frame, meta = dose_problem()
    write_replay(tmp_path / "d.parquet", frame, meta)
    replay = load_replay(tmp_path / "d.parquet")
    data = replay.split("train")
    args = IC.Args(hidden=(32, 32), num_updates=1500, eval_every=1500, batch_size=256, learning_rate=(3e-3,),
                   num_seeds=1)
    norm = IC.make_normaliser(data, replay.action_space)
    train, statics, _ = IC.make_train(args, data, norm, sim=None)
    x = np.linspace(-1, 1, 41, dtype=np.float32)
    obs = np.stack([x, np.ones_like(x)], 1)
    train = jax.jit(train)  # one compiled program for both betas (the hyperparameters are traced)

    def doses(beta: float) -> np.ndarray:
        hparams = {"tau": jnp.float32(0.9), "beta": jnp.float32(beta), "learning_rate": jnp.float32(3e-3)}
        params, metrics, _ = train(jax.random.PRNGKey(0), hparams)
        assert np.isfinite(np.asarray(metrics["q_loss"])).all()
        policy = IC.make_policy(params.pi, statics["pi"], norm)
        dose = np.asarray(jax.vmap(lambda o: policy(None, o, None, None)[0])(jnp.asarray(obs)))
        tensors, network = IC.export_actor(params.pi, statics["pi"], norm)
        z = np.asarray(network_forward(tensors, network, obs))[:, 0]
        np.testing.assert_allclose(1500.0 * (np.tanh(z) + 1.0), dose, rtol=1e-4, atol=0.5)
        return dose

    untrained_error = np.abs(1500.0 - best_dose(x)).mean()  # 375 mg
    iql_error = np.abs(doses(10.0) - best_dose(x)).mean()
    bc_error = np.abs(doses(0.0) - best_dose(x)).mean()
    assert iql_error < 0.4 * untrained_error, (iql_error, untrained_error)
    assert bc_error > 0.7 * untrained_error, (bc_error, untrained_error)


def test_refuses_a_discrete_replay_before_any_work(tmp_path):
    frame, meta = make_tiny_replay()
    write_replay(tmp_path / "d.parquet", frame, meta)
    with pytest.raises(runs.RunError, match=r"has discrete actions \(25, 5\*fluid\+vaso\); use iql.py, cql.py"):
        IC.main(["--replay", str(tmp_path / "d.parquet"), "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--tau", "1.2"], "--tau values must be in (0, 1), got 1.2"),
    (["--bc", "--beta", "1"], "give --bc or --beta, not both"),
    (["--bc", "--beta", "3"], "give --bc or --beta, not both"),  # the old default is no longer implied
    (["--log-std-min", "3"], "--log-std-min 3.0 must be below --log-std-max 2.0"),
    (["--num-updates", "1500", "--eval-every", "1000"], "not a multiple of --eval-every"),
    (["--hidden", "0"], "--hidden needs positive widths"),
    (["--final-eval-patients", "1"], "--final-eval-patients must be 0 (skip) or at least 2"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, flags, message):
    (tmp_path / "r.parquet").write_bytes(b"")  # never read: the arguments are refused first
    with pytest.raises(runs.RunError) as err:
        IC.main(["--replay", str(tmp_path / "r.parquet"), "--run-dir", str(tmp_path / "run"), *flags])
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def simulator_run(tmp_path_factory):
    """A tiny grid (2 tau x 1 beta x 2 seeds) on a 40-patient simulator replay, evaluated by simulation on 40
    patients: the replay's clinician rollout program is the final evaluation's (one compile, not two)."""
    root = tmp_path_factory.mktemp("vanco")
    frame, meta = make_vancomycin_replay(VancomycinSimArgs(out=root / "v.parquet", episodes=40, seed=1))
    write_replay(root / "v.parquet", frame, meta)
    IC.main(["--replay", str(root / "v.parquet"), "--run-dir", str(root / "run"), "--tau", "0.6", "0.8",
             "--num-seeds", "2", "--hidden", "8", "--num-updates", "20", "--eval-every", "10", "--save-every", "10",
             "--batch-size", "16", "--eval-patients", "8", "--final-eval-patients", "40"])
    return root


def test_run_folder_on_the_simulator(simulator_run):
    run = simulator_run / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == "iql_continuous" and summary["n_policies"] == 4
    assert summary["device"]["sweep"]["n_runs"] == 4  # one compiled program for the grid and the seeds
    simulation = summary["simulation"]
    assert simulation["n_patients"] == 40 and np.shape(simulation["value"]) == (2, 2)
    assert set(summary["reference"]) == {"clinician", "oracle"}
    assert summary["reference"]["oracle"] > summary["reference"]["clinician"]
    metrics = pl.read_parquet(run / "metrics.parquet")
    assert metrics.height == 2 * 2 * 2 and {"sim_return", "q_loss", "pi_loss"} <= set(metrics.columns)
    assert (run / "curves.png").stat().st_size > 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["s0_seed0", "s0_seed0_u0000010", "s0_seed1", "s0_seed1_u0000010", "s1_seed0",
                     "s1_seed0_u0000010", "s1_seed1", "s1_seed1_u0000010"]
    # a model card in each final checkpoint folder, with its simulated value from this summary
    card = (run / "checkpoints" / "s1_seed0" / "README.md").read_text()
    assert "continuous dose" in card and "bounds [0, 3000] mg" in card and "For research only" in card
    assert f"**{simulation['value'][1][0]:.4f} +- {simulation['stderr'][1][0]:.4f}**" in card
    assert "ICU-Sepsis" not in card and not (run / "checkpoints" / "s1_seed0_u0000010" / "README.md").exists()


def test_load_policy_gives_doses_in_mg_within_bounds(simulator_run):
    replay = load_replay(simulator_run / "v.parquet")
    policy = load_policy(simulator_run / "run" / "checkpoints" / "s1_seed0", replay=replay)
    assert policy.is_continuous and policy.action_space == SPACE
    obs = np.asarray(replay.data.obs)
    one = policy.select_action(obs[0])
    batch = policy.select_action(obs)
    assert isinstance(one, float) and batch.shape == (obs.shape[0],)
    assert (batch >= 0).all() and (batch <= 3000).all() and batch[0] == pytest.approx(one)
    with pytest.raises(PolicyError, match="for discrete policies"):
        policy.action_probs(obs[0])
    _, meta = make_tiny_replay()
    with pytest.raises(PolicyError, match="gives continuous actions"):
        load_policy(simulator_run / "run" / "checkpoints" / "s1_seed0", replay={**meta, "obs_dim": 14,
                                                                                   "feature_names": replay.meta["feature_names"]})


def test_continuous_checkpoint_config(simulator_run):
    """A continuous checkpoint's config: the action space its doses are in, no discrete actions."""
    config = json.loads(Path(simulator_run / "run" / "checkpoints" / "s0_seed0" / "config.json").read_text())
    assert config["outputs"] == "action_mean" and config["n_actions"] == 0
    assert config["action_space"] == SPACE and config["env_id"] == "CleanSepsis/Vancomycin-v0"


@pytest.mark.parametrize("change, message", [
    (lambda c: {k: v for k, v in c.items() if k != "action_space"}, "a continuous policy needs"),
    (lambda c: {**c, "n_actions": 1}, "n_actions is 1; a continuous policy has 0"),
    (lambda c: {**c, "action_space": {**SPACE, "high": -1.0}}, "bounds [0.0, -1.0]"),
])
def test_bad_continuous_checkpoint_config_is_refused(tmp_path, change, message):
    from cleansepsis.checkpoint import CheckpointError, save_checkpoint

    tensors = {"hidden_0.weight": np.zeros((4, 3), np.float32), "hidden_0.bias": np.zeros(4, np.float32),
               "output.weight": np.zeros((1, 4), np.float32), "output.bias": np.zeros(1, np.float32)}
    config = {"network": {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0"], "output": "output"},
              "outputs": "action_mean", "obs_dim": 3, "n_actions": 0, "action_space": SPACE}
    save_checkpoint(tmp_path / "ok", tensors, config)
    assert load_policy(tmp_path / "ok").select_action(np.zeros(3)) == pytest.approx(1500.0)  # tanh(0): the middle
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        save_checkpoint(tmp_path / "bad", tensors, change(config))
