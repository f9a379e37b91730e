"""`data_prep.py export-minari`: a replay written as a Minari dataset and read back by minari, offline."""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import polars as pl
import pytest

import data_prep
from cleansepsis import replay as replay_module
from cleansepsis.minari_export import ExportMinariArgs, MinariExportError, datasets_path, export_minari
from cleansepsis.replay import write_replay

minari = pytest.importorskip("minari")
from minari.dataset.minari_storage import MinariStorage  # noqa: E402

OBS_DIM, N_ACTIONS = 4, 25


def chained_replay(lengths=(3, 1, 5, 2), seed=0) -> tuple[pl.DataFrame, dict]:
    """Episodes whose next_obs is the next step's obs, with optional and extra columns, rows shuffled."""
    rng = np.random.default_rng(seed)
    parts = []
    for e, length in enumerate(lengths):
        states = rng.normal(size=(length + 1, OBS_DIM)).astype(np.float32)
        last = np.arange(length) == length - 1
        truncated = last & (e % 2 == 1)
        action = rng.integers(0, N_ACTIONS, length)
        mask = rng.random((length, N_ACTIONS)) < 0.8
        mask[np.arange(length), action] = True  # a replay's mask admits the logged action
        parts.append(
            pl.DataFrame(
                [
                    pl.Series("episode_id", np.full(length, 1000 + 7 * e), pl.Int64),
                    pl.Series("t", np.arange(length), pl.Int32),
                    pl.Series("obs", states[:-1], pl.Array(pl.Float32, OBS_DIM)),
                    pl.Series("action", action, pl.Int32),
                    pl.Series("reward", rng.normal(size=length).astype(np.float32), pl.Float32),
                    pl.Series("next_obs", states[1:], pl.Array(pl.Float32, OBS_DIM)),
                    pl.Series("terminated", last & ~truncated, pl.Boolean),
                    pl.Series("truncated", truncated, pl.Boolean),
                    pl.Series("split", [("train", "val", "test")[e % 3]] * length, pl.String),
                    pl.Series("behavior_prob", rng.uniform(0.1, 1, length).astype(np.float32), pl.Float32),
                    pl.Series("state_index", 100 * e + np.arange(length), pl.Int32),  # one obs per state
                    pl.Series("action_mask", mask, pl.Array(pl.Boolean, N_ACTIONS)),
                    pl.Series("map_mmhg", np.where(rng.random(length) < 0.3, np.nan, 70.0), pl.Float32),
                ]
            )
        )
    frame = pl.concat(parts)
    frame = frame.sample(fraction=1.0, shuffle=True, seed=seed)  # file order is not episode order
    meta = {
        "obs_dim": OBS_DIM,
        "n_actions": N_ACTIONS,
        "feature_names": [f"x{i}" for i in range(OBS_DIM)],
        "normalisation": {"x0": {"kind": "z", "mean": 1.5, "std": 2.0}},
        "source": "tests",
        "env_id": None,
        "reward": "random",
        "args": {"seed": seed},
    }
    return frame, meta


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_transition_round_trips_through_minari(tmp_path, offline, monkeypatch):
    frame, meta = chained_replay()
    written = write_replay(tmp_path / "tiny.parquet", frame, meta)
    monkeypatch.delenv("MINARI_DATASETS_PATH", raising=False)
    code = data_prep.main(["export-minari", str(tmp_path / "tiny.parquet"), "--out", str(tmp_path / "m")])
    assert code == 0
    assert (tmp_path / "m" / "cleansepsis" / "tiny-v0" / "data" / "metadata.json").is_file()
    # the export leaves the environment and minari as they were
    assert "MINARI_DATASETS_PATH" not in os.environ
    assert MinariStorage.get_size.__name__ == "get_size"
    with datasets_path(tmp_path / "m"):
        dataset = minari.load_dataset("cleansepsis/tiny-v0")
        episode_meta = list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))
        episodes = list(dataset.iterate_episodes())
    rows = frame.sort("episode_id", "t")
    ids = rows.get_column("episode_id").unique(maintain_order=True).to_list()
    assert dataset.total_episodes == len(ids) and dataset.total_steps == frame.height
    assert dataset.action_space.n == N_ACTIONS and dataset.observation_space.shape == (OBS_DIM,)
    for episode, info, episode_id in zip(episodes, episode_meta, ids, strict=True):
        ep = rows.filter(pl.col("episode_id") == episode_id)
        assert info["options"] == {"episode_id": episode_id, "split": ep.get_column("split")[0]}
        obs = ep.get_column("obs").to_numpy()
        next_obs = ep.get_column("next_obs").to_numpy()
        assert episode.observations.dtype == np.float32
        np.testing.assert_array_equal(episode.observations[:-1], obs)
        np.testing.assert_array_equal(episode.observations[1:], next_obs)
        np.testing.assert_array_equal(episode.actions, ep.get_column("action").to_numpy())
        np.testing.assert_array_equal(episode.rewards, ep.get_column("reward").to_numpy())
        np.testing.assert_array_equal(episode.terminations, ep.get_column("terminated").to_numpy())
        np.testing.assert_array_equal(episode.truncations, ep.get_column("truncated").to_numpy())
        for name in ("behavior_prob", "state_index", "action_mask", "map_mmhg"):
            want = ep.get_column(name).to_numpy()
            got = np.asarray(episode.infos[name])
            np.testing.assert_array_equal(got[:-1].reshape(want.shape), want)  # NaN == NaN here
    carried = json.loads((tmp_path / "m" / "cleansepsis" / "tiny-v0" / "data" / "metadata.json").read_text())[
        "cleansepsis"
    ]
    assert carried == json.loads(json.dumps(written))  # feature names, normalisation, content hash, ...
    assert dataset.storage.metadata["cleansepsis"]["content_hash"] == written["content_hash"]


def test_refusals_are_one_clear_error(tmp_path, capsys, monkeypatch):
    frame, meta = chained_replay(seed=1)
    write_replay(tmp_path / "r.parquet", frame, meta)
    args = ["export-minari", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "m")]
    assert data_prep.main(args) == 0
    capsys.readouterr()
    assert data_prep.main(args) == 1  # exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert data_prep.main([*args, "--overwrite"]) == 0
    assert data_prep.main([*args, "--dataset-id", "Not An Id!"]) == 1
    assert "--dataset-id 'Not An Id!'" in capsys.readouterr().err
    # steps that do not chain cannot become one observation sequence: named, nothing written
    broken = frame.with_columns(
        pl.when((pl.col("episode_id") == 1000) & (pl.col("t") == 1))
        .then(pl.col("next_obs") * 2)
        .otherwise(pl.col("next_obs"))
        .alias("next_obs")
    )
    with monkeypatch.context() as patched:  # write_replay refuses it; a file from elsewhere need not
        patched.setattr(replay_module, "check_structure", lambda frame, meta, path=None: frame)
        write_replay(tmp_path / "broken.parquet", broken, meta)
    assert (
        data_prep.main(["export-minari", str(tmp_path / "broken.parquet"), "--out", str(tmp_path / "b")]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "episode 1000: the next_obs at t=1" in err and err.count("\n") == 1
    assert not (tmp_path / "b" / "cleansepsis" / "broken-v0").exists()


def test_missing_minari_says_how_to_install(tmp_path, monkeypatch):
    frame, meta = chained_replay(seed=2)
    write_replay(tmp_path / "r.parquet", frame, meta)
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari -> ImportError
    with pytest.raises(MinariExportError, match=r"minari is not installed.*--extra minari"):
        export_minari(ExportMinariArgs(replay=tmp_path / "r.parquet", out=tmp_path / "m"))
