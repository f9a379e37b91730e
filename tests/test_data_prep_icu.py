"""data_prep.py icu-sepsis and cleansepsis.icu_replay: determinism, consistency with the MDP, the CLI."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import data_prep
from cleansepsis import env as E
from cleansepsis import icu_replay
from cleansepsis.replay import ReplayError, content_hash, load_replay


def test_same_seed_same_rows_different_seed_different(icu_replay_small):
    frame, _ = icu_replay_small
    again, _ = icu_replay.make_clinician_replay(200, seed=0, val_frac=0.2, test_frac=0.2)
    other, _ = icu_replay.make_clinician_replay(200, seed=1, val_frac=0.2, test_frac=0.2)
    assert content_hash(again) == content_hash(frame)
    assert content_hash(other) != content_hash(frame)


def test_rows_are_consistent_with_the_mdp(icu_replay_small):
    frame, meta = icu_replay_small
    raw = E.shipped_arrays()
    state = frame.get_column("state_index").to_numpy()
    next_state = frame.get_column("next_state_index").to_numpy()
    action = frame.get_column("action").to_numpy()
    episode = frame.get_column("episode_id").to_numpy()
    t = frame.get_column("t").to_numpy()
    terminated = frame.get_column("terminated").to_numpy()
    truncated = frame.get_column("truncated").to_numpy()
    mask = raw["admissible_mask"]

    assert sorted(set(episode)) == list(range(200))
    renormalised = np.where(mask, raw["expert_policy"], 0.0)
    renormalised /= np.maximum(renormalised.sum(1, keepdims=True), 1e-300)
    np.testing.assert_allclose(frame.get_column("behavior_prob").to_numpy(), renormalised[state, action], rtol=1e-5)
    assert mask[state, action].all()  # the renormalised clinician never takes an inadmissible action
    assert raw["tx_mat"][state, action, next_state].min() > 0  # every logged transition is possible

    same_episode = episode[1:] == episode[:-1]
    np.testing.assert_array_equal(next_state[:-1][same_episode], state[1:][same_episode])
    np.testing.assert_array_equal(t[1:][same_episode], t[:-1][same_episode] + 1)
    np.testing.assert_array_equal(t[1:][~same_episode], 0)
    assert t[0] == 0
    episode_end = np.append(~same_episode, True)
    np.testing.assert_array_equal(terminated | truncated, episode_end)  # ends exactly at each episode's last row
    np.testing.assert_array_equal(terminated, np.isin(next_state, [E.DEATH, E.SURVIVAL]))
    np.testing.assert_array_equal(frame.get_column("reward").to_numpy(), (next_state == E.SURVIVAL).astype(np.float32))

    vectors = raw["state_cluster_centers"].astype(np.float32)
    np.testing.assert_array_equal(frame.get_column("obs").to_numpy(), vectors[state])
    np.testing.assert_array_equal(frame.get_column("next_obs").to_numpy()[terminated], 0.0)
    np.testing.assert_array_equal(frame.get_column("action_mask").to_numpy(), mask[state])

    per_episode = frame.group_by("episode_id").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert per_episode.get_column("n").max() == 1
    counts = per_episode.get_column("split").value_counts().sort("split")
    assert dict(counts.iter_rows()) == {"test": 40, "train": 120, "val": 40}
    assert meta["source"] == "icu-sepsis" and meta["env_id"] == E.ENV_ID
    assert meta["feature_names"] == list(E.FEATURE_NAMES)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="val_frac"):
        icu_replay.make_clinician_replay(10, 0, val_frac=1.5)
    with pytest.raises(ValueError, match="test_frac"):
        icu_replay.make_clinician_replay(10, 0, test_frac=-0.1)
    with pytest.raises(ValueError, match="at most 1"):
        icu_replay.make_clinician_replay(10, 0, val_frac=0.6, test_frac=0.5)


@pytest.mark.parametrize(("val_frac", "test_frac", "expected"), [
    (0.0, 1.0, {"test": 11}), (1.0, 0.0, {"val": 11}), (0.5, 0.5, {"test": 6, "val": 5}),
    (0.3, 0.7, {"test": 8, "val": 3}),
])  # fmt: skip
def test_any_fractions_summing_to_at_most_one_are_accepted(val_frac, test_frac, expected):
    splits = icu_replay.episode_splits(11, 0, val_frac, test_frac)
    assert {name: int((splits == name).sum()) for name in ("train", "val", "test") if (splits == name).any()} == expected


def test_cli_writes_an_all_test_replay(tmp_path):
    out = tmp_path / "heldout.parquet"
    assert data_prep.main(["icu-sepsis", "--episodes", "20", "--test-frac", "1.0", "--out", str(out)]) == 0
    replay = load_replay(out)
    assert replay.split("test").size == replay.meta["n_transitions"]
    with pytest.raises(ReplayError, match="no transitions"):
        replay.split("train")


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "icu.parquet"
    argv = ["icu-sepsis", "--episodes", "60", "--seed", "3", "--out", str(out)]
    assert data_prep.main(argv) == 0
    replay = load_replay(out)
    assert replay.meta["n_episodes"] == 60 and replay.meta["args"]["seed"] == 3
    first_hash = replay.content_hash

    assert data_prep.main(argv) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(out) in err and "--overwrite" in err and "Traceback" not in err
    assert load_replay(out).content_hash == first_hash

    assert data_prep.main([*argv, "--overwrite"]) == 0
    assert load_replay(out).content_hash == first_hash  # same seed, same rows

    assert data_prep.main(["icu-sepsis", "--episodes", "10", "--val-frac", "2", "--out", str(tmp_path / "x")]) == 1
    assert "val_frac" in capsys.readouterr().err


def test_default_replay_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANSEPSIS_CACHE", str(tmp_path / "cache"))
    path = icu_replay.default_replay_path(episodes=40, seed=0)
    assert path.parent == tmp_path / "cache" and load_replay(path).meta["n_episodes"] == 40
    stamp = path.stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cached replay should have been reused")

    monkeypatch.setattr(icu_replay, "make_clinician_replay", must_not_build)
    assert icu_replay.default_replay_path(episodes=40, seed=0) == path
    assert path.stat().st_mtime_ns == stamp

    path.write_bytes(b"damaged")  # a damaged cache file is rebuilt
    monkeypatch.undo()
    monkeypatch.setenv("CLEANSEPSIS_CACHE", str(tmp_path / "cache"))
    assert load_replay(icu_replay.default_replay_path(episodes=40, seed=0)).meta["n_episodes"] == 40


def test_default_replay_race_keeps_the_finished_file(tmp_path, monkeypatch):
    """If another process finishes the file while this one builds, both end with that finished file."""
    monkeypatch.setenv("CLEANSEPSIS_CACHE", str(tmp_path))
    real_make = icu_replay.make_clinician_replay
    target = icu_replay.default_replay_file(episodes=30, seed=0)
    assert target.parent == tmp_path

    def make_while_other_process_writes(episodes, seed):
        frame, meta = real_make(episodes, seed)
        icu_replay.write_replay(target, frame, meta)  # the other process wins the race
        return frame, meta

    monkeypatch.setattr(icu_replay, "make_clinician_replay", make_while_other_process_writes)
    assert icu_replay.default_replay_path(episodes=30, seed=0) == target
    assert load_replay(target).meta["n_episodes"] == 30
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary files left


def test_heldout_replay_is_all_in_its_split_cached_and_distinct_per_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANSEPSIS_CACHE", str(tmp_path))
    path = icu_replay.heldout_replay_path("test", episodes=25, seed=7)
    replay = load_replay(path)
    assert replay.meta["n_episodes"] == 25 and replay.meta["args"]["seed"] == 7
    assert replay.split("test").size == replay.meta["n_transitions"]
    stamp = path.stat().st_mtime_ns
    assert icu_replay.heldout_replay_path("test", episodes=25, seed=7) == path and path.stat().st_mtime_ns == stamp
    other = icu_replay.heldout_replay_path("val", episodes=25, seed=8)
    assert other != path and load_replay(other).split("val").size == load_replay(other).meta["n_transitions"]
    with pytest.raises(ValueError, match="'val' or 'test'"):
        icu_replay.heldout_replay_path("train", episodes=5, seed=1)
