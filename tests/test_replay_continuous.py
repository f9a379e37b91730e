"""Continuous-action replays (issue #17): the action space in the metadata, float32 doses, behaviour log
densities, one clear error per bad dose or action space, and learners refusing the other kind of replay."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import make_tiny_replay

from cleansepsis import replay as R
from cleansepsis import runs

OBS_DIM = 2
SPACE = {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0, "high": 3000.0}


def make_dose_replay(n_episodes: int = 3, steps: int = 4, seed: int = 0) -> tuple[pl.DataFrame, dict]:
    """A valid continuous replay: doses in mg within [0, 3000], with behaviour log densities."""
    rng = np.random.default_rng(seed)
    n = n_episodes * steps
    episode = np.repeat(np.arange(n_episodes), steps)
    t = np.tile(np.arange(steps), n_episodes)
    last = t == steps - 1
    obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs[:-1][~last[:-1]] = obs[1:][~last[:-1]]
    frame = pl.DataFrame([
        pl.Series("episode_id", episode, pl.Int64),
        pl.Series("t", t, pl.Int32),
        pl.Series("obs", obs, pl.Array(pl.Float32, OBS_DIM)),
        pl.Series("action", rng.uniform(0, 3000, n).astype(np.float32), pl.Float32),
        pl.Series("reward", rng.normal(size=n).astype(np.float32), pl.Float32),
        pl.Series("next_obs", next_obs, pl.Array(pl.Float32, OBS_DIM)),
        pl.Series("terminated", last, pl.Boolean),
        pl.Series("truncated", np.zeros(n, bool), pl.Boolean),
        pl.Series("split", np.where(episode == n_episodes - 1, "test", "train"), pl.String),
        pl.Series("behavior_log_density", np.full(n, -np.log(3000.0), np.float32), pl.Float32),
    ])
    meta = {
        "obs_dim": OBS_DIM, "feature_names": ["a", "b"], "normalisation": "none (test data)", "source": "tests",
        "env_id": None, "reward": "random", "args": {"seed": seed}, "action_space": dict(SPACE),
    }
    return frame, meta


def test_continuous_round_trip(tmp_path):
    frame, meta = make_dose_replay()
    written = R.write_replay(tmp_path / "dose.parquet", frame, meta)
    assert written["n_actions"] == 0 and written["action_encoding"] == "continuous"
    replay = R.load_replay(tmp_path / "dose.parquet")
    assert replay.is_continuous and replay.action_space == SPACE
    assert replay.data.action.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(replay.data.action), frame.get_column("action").to_numpy())
    np.testing.assert_allclose(np.asarray(replay.data.behavior_log_density), -np.log(3000.0), rtol=1e-6)
    assert replay.has["behavior_log_density"] and not replay.has["action_mask"] and not replay.has["behavior_prob"]
    assert replay.data.action_mask.shape == (frame.height, 0)
    assert replay.split("train").action.dtype == np.float32  # take_rows keeps every field, the density too
    assert replay.split("test").behavior_log_density.shape == (4,)


def test_discrete_replay_without_action_space_is_unchanged(tmp_path):
    """A replay written before continuous actions: discrete by default, same metadata keys, same hash."""
    frame, meta = make_tiny_replay()
    written = R.write_replay(tmp_path / "d.parquet", frame, meta)
    assert "action_space" not in written and written["action_encoding"] == R.ACTION_ENCODING
    replay = R.load_replay(tmp_path / "d.parquet")
    assert not replay.is_continuous
    assert replay.action_space == {"kind": "discrete", "n": 25, "encoding": "5*fluid+vaso"}
    assert replay.data.action.dtype == np.int32 and replay.content_hash == R.content_hash(frame)
    assert "behavior_log_density" not in replay.has  # the keys discrete replays always had
    # an explicit discrete action space is accepted and changes nothing in the rows' hash
    explicit = R.write_replay(tmp_path / "e.parquet", frame, {**meta, "action_space": replay.action_space})
    assert explicit["content_hash"] == written["content_hash"]


def _nth(frame: pl.DataFrame, row: int, value: float) -> pl.DataFrame:
    action = frame.get_column("action").to_numpy().copy()
    action[row] = value
    return frame.with_columns(pl.Series("action", action, pl.Float32))


BAD_DOSES = {
    "negative": (lambda f: _nth(f, 5, -10.0), {}, "value -10.0 (episode 1, t 1) is negative"),
    "nan": (lambda f: _nth(f, 2, float("nan")), {}, "value nan (episode 0, t 2) is not finite"),
    "inf": (lambda f: _nth(f, 7, float("inf")), {}, "value inf (episode 1, t 3) is not finite"),
    "above high": (lambda f: _nth(f, 0, 3500.0), {}, "value 3500.0 (episode 0, t 0) is outside the metadata bounds"),
    "below low": (lambda f: _nth(f, 4, 10.0), {"low": 50.0}, "value 10.0 (episode 1, t 0) is outside"),
    "integer doses": (lambda f: f.with_columns(pl.col("action").cast(pl.Int32)), {}, "'action' has type Int32"),
    "mask on doses": (
        lambda f: f.with_columns(pl.Series("action_mask", np.ones((f.height, 1), bool), pl.Array(pl.Boolean, 1))),
        {}, "column 'action_mask' is for discrete actions",
    ),
    "non-finite density": (
        lambda f: f.with_columns(pl.when(pl.col("t") == 1).then(float("-inf")).otherwise(pl.col("behavior_log_density"))
                                 .cast(pl.Float32).alias("behavior_log_density")),
        {}, "'behavior_log_density' has 3 non-finite value(s) (NaN or inf); the first at episode 0, t 1",
    ),
    "unknown unit": (lambda f: f, {"unit": "furlongs"}, "unit 'furlongs' is unknown"),
    "unknown kind": (lambda f: f, {"kind": "hybrid"}, "kind 'hybrid' is unknown"),
    "no bounds": (lambda f: f, {"high": None}, "bounds [0.0, None]"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOSES))
def test_bad_continuous_replay_is_refused_on_write_and_load(tmp_path, case):
    change_frame, change_space, message = BAD_DOSES[case]
    frame, meta = make_dose_replay()
    frame, meta = change_frame(frame), {**meta, "action_space": {**SPACE, **change_space}}
    path = tmp_path / "bad.parquet"
    with pytest.raises(R.ReplayError, match=r"bad\.parquet") as err:
        R.write_replay(path, frame, meta)
    assert message in str(err.value)
    assert not path.exists()  # nothing half-written
    # the same file written past the checks is refused on load with the same message
    full = {"schema_version": 1, "n_actions": 0, "action_encoding": "continuous", **meta,
            "content_hash": "not checked"}
    frame.write_parquet(path, metadata={R.METADATA_KEY: json.dumps(full)})
    with pytest.raises(R.ReplayError) as err:
        R.load_replay(path, verify_hash=False)
    assert message in str(err.value) and str(path) in str(err.value)


def test_density_column_refused_in_a_discrete_replay(tmp_path):
    frame, meta = make_tiny_replay()
    frame = frame.with_columns(pl.lit(0.0, pl.Float32).alias("behavior_log_density"))
    with pytest.raises(R.ReplayError, match="'behavior_log_density' is for continuous actions"):
        R.write_replay(tmp_path / "d.parquet", frame, meta)


def test_continuous_space_must_match_n_actions(tmp_path):
    frame, meta = make_dose_replay()
    with pytest.raises(R.ReplayError, match="continuous actions need n_actions 0"):
        R.write_replay(tmp_path / "x.parquet", frame, {**meta, "n_actions": 25})


@pytest.mark.parametrize("learner", ["iql", "cql", "dqn", "bc"])
def test_discrete_learners_refuse_a_continuous_replay(tmp_path, learner):
    """One clear error from main(), before the replay's rows are read or anything compiled."""
    import importlib

    frame, meta = make_dose_replay()
    path = tmp_path / "dose.parquet"
    R.write_replay(path, frame, meta)
    module = importlib.import_module(learner)
    with pytest.raises(runs.RunError) as err:
        module.main(["--replay", str(path), "--run-dir", str(tmp_path / "run"), "--num-updates", "10",
                     "--eval-every", "10"])
    assert str(err.value) == f"{path} has continuous actions (vancomycin_dose, mg); use iql_continuous.py"
    assert not (tmp_path / "run").exists()


def test_continuous_loader_refuses_a_discrete_replay(tmp_path):
    frame, meta = make_tiny_replay()
    path = tmp_path / "d.parquet"
    R.write_replay(path, frame, meta)
    with pytest.raises(runs.RunError) as err:
        runs.load_training_data(path, "train", continuous=True)
    assert str(err.value) == f"{path} has discrete actions (25, 5*fluid+vaso); use iql.py, cql.py, dqn.py or bc.py"
    _, data, env_params = runs.load_training_data(path, "train")  # the discrete loader still takes it
    assert data.action.dtype == np.int32 and env_params is None
