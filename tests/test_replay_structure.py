"""Replay structure: each episode a run of steps from t=0 that ends once, at its last row, with next_* equal
to the next row's values, masks that admit the logged action and state indices that name one observation.
Every test starts from a valid replay, breaks one thing, and checks that write_replay refuses it and that
load_replay refuses it (written as another tool would, with a recomputed content hash), naming the file,
the episode and the rule."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from cleansepsis import replay as R


def _write_raw(path, frame: pl.DataFrame, meta: dict) -> None:
    full = {"schema_version": R.SCHEMA_VERSION, "action_encoding": R.ACTION_ENCODING, **meta,
            "content_hash": R.content_hash(frame)}
    frame.write_parquet(path, metadata={R.METADATA_KEY: json.dumps(full)})


def _set(frame: pl.DataFrame, name: str, values: np.ndarray) -> pl.DataFrame:
    return frame.with_columns(pl.Series(name, values, frame.schema[name]))


def _edit(frame: pl.DataFrame, name: str, row: int, value) -> pl.DataFrame:
    values = frame.get_column(name).to_numpy().copy()
    values[row] = value
    return _set(frame, name, values)


def _rows_of(frame: pl.DataFrame, episode: int) -> np.ndarray:
    return np.flatnonzero(frame.get_column("episode_id").to_numpy() == episode)


def _long_episode(frame: pl.DataFrame) -> int:
    """An episode of at least 3 rows."""
    lengths = frame.group_by("episode_id").len().filter(pl.col("len") >= 3).sort("episode_id")
    return int(lengths.get_column("episode_id")[0])


def _refused(tmp_path, frame: pl.DataFrame, meta: dict, message: str, episode: int | None = None) -> None:
    path = tmp_path / "broken.parquet"
    with pytest.raises(R.ReplayError, match=message) as err:
        R.write_replay(path, frame, meta)
    assert not path.exists()
    _write_raw(path, frame, meta)
    with pytest.raises(R.ReplayError, match=message) as err:
        R.load_replay(path)
    assert str(err.value).startswith(f"{path}: ")
    if episode is not None:
        assert f"episode {episode}:" in str(err.value)


# --- episode boundaries ---------------------------------------------------------------------------------


def test_every_row_terminated(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    broken = frame.with_columns(pl.lit(True).alias("terminated"))
    _refused(tmp_path, broken, meta, r"t=0 is terminated, but 2 row\(s\) follow .*every row of the file", 0)


def test_episode_that_never_ends(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    last = int(_rows_of(frame, 1)[-1])
    _refused(tmp_path, _edit(frame, "terminated", last, False), meta, "never ends: its last row", 1)


def test_rows_after_the_end(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    rows = _rows_of(frame, 2)
    _refused(tmp_path, _edit(frame, "truncated", int(rows[0]), True), meta, r"t=0 is truncated, but 2 row", 2)


def test_duplicated_rows(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    broken = pl.concat([frame, frame.slice(4, 1)])
    _refused(tmp_path, broken, meta, r"t=1 is duplicated \(2 identical rows\)", 1)


def test_repeated_t_with_different_rows(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    _refused(tmp_path, _edit(frame, "t", 4, 0), meta, "t=0 occurs in 2 different rows", 1)


def test_gap_in_t(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    _refused(tmp_path, _edit(frame, "t", 5, 5), meta, "t jumps from 1 to 5", 1)


def test_episode_not_starting_at_zero(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    broken = frame.filter(~((pl.col("episode_id") == 3) & (pl.col("t") == 0)))
    _refused(tmp_path, broken, meta, "starts at t=1", 3)


def test_negative_t(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    _refused(tmp_path, _edit(frame, "t", 0, -1), meta, "t is -1", 0)


def test_rows_in_another_order_are_sorted(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    path = tmp_path / "shuffled.parquet"
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3)
    _write_raw(path, shuffled, meta)
    replay = R.load_replay(path)
    np.testing.assert_array_equal(np.asarray(replay.data.obs), frame.get_column("obs").to_numpy())
    np.testing.assert_array_equal(np.asarray(replay.data.t), frame.get_column("t").to_numpy())
    written = R.write_replay(tmp_path / "sorted.parquet", shuffled, meta)  # written sorted
    assert written["content_hash"] == R.content_hash(frame)


def test_next_obs_differing_from_the_next_obs(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    next_obs = frame.get_column("next_obs").to_numpy().copy()
    next_obs[3, 1] += 0.5  # episode 1, t=0: no longer the obs at t=1
    _refused(tmp_path, _set(frame, "next_obs", next_obs), meta, "next_obs at t=0 differs from the obs at t=1", 1)


# --- masks and states (the ICU-Sepsis replay has them all) ---------------------------------------------------


@pytest.fixture
def icu(icu_replay_small):
    frame, meta = icu_replay_small
    return frame, meta, _long_episode(frame)


def test_icu_fixture_is_valid(tmp_path, icu):
    frame, meta, _ = icu
    R.write_replay(tmp_path / "ok.parquet", frame, meta)
    assert R.load_replay(tmp_path / "ok.parquet").data.size == frame.height


def test_action_mask_excluding_the_logged_action(tmp_path, icu):
    frame, meta, _ = icu
    mask = frame.get_column("action_mask").to_numpy().copy()
    row = int(np.flatnonzero(mask.sum(axis=1) >= 2)[0])  # another action stays admissible
    mask[row, frame.get_column("action")[row]] = False
    t, episode = frame.get_column("t")[row], frame.get_column("episode_id")[row]
    _refused(tmp_path, _set(frame, "action_mask", mask), meta, f"action_mask at t={t} excludes the logged action",
             episode)


def test_action_mask_admitting_nothing(tmp_path, icu):
    frame, meta, episode = icu
    row = int(_rows_of(frame, episode)[0])
    mask = frame.get_column("action_mask").to_numpy().copy()
    mask[row] = False
    _refused(tmp_path, _set(frame, "action_mask", mask), meta, "action_mask at t=0 admits no action", episode)


def test_next_action_mask_admitting_nothing_mid_episode(tmp_path, icu):
    frame, meta, episode = icu
    row = int(_rows_of(frame, episode)[0])
    mask = frame.get_column("next_action_mask").to_numpy().copy()
    mask[row] = False
    _refused(tmp_path, _set(frame, "next_action_mask", mask), meta, "next_action_mask at t=0 admits no action",
             episode)


def test_next_action_mask_inconsistent_with_the_next_row(tmp_path, icu):
    frame, meta, episode = icu
    row = int(_rows_of(frame, episode)[0])
    mask = frame.get_column("next_action_mask").to_numpy().copy()
    action_next = frame.get_column("action")[row + 1]
    mask[row, (action_next + 1) % mask.shape[1]] ^= True  # flip an action the next row does not take
    _refused(tmp_path, _set(frame, "next_action_mask", mask), meta,
             "next_action_mask at t=0 differs from the action_mask at t=1", episode)


@pytest.mark.parametrize("value", [-3, 716, 10_000])
def test_state_index_outside_the_env(tmp_path, icu, value):
    frame, meta, episode = icu
    row = int(_rows_of(frame, episode)[0])  # t=0: no previous next_state_index to disagree with
    _refused(tmp_path, _edit(frame, "state_index", row, value), meta,
             rf"state_index {value} at t=0 is not a state of the env \(expected 0..715\)", episode)


def test_state_index_naming_two_observations(tmp_path, icu):
    frame, meta, episode = icu
    rows = _rows_of(frame, episode)
    state = frame.get_column("state_index").to_numpy().copy()
    other = next(s for s in np.unique(state) if s != state[rows[0]])
    state[rows[0]] = other  # row's obs stays that of its old state
    _refused(tmp_path, _set(frame, "state_index", state), meta,
             f"state {other} has a different obs at t=0 than elsewhere", episode)


def test_next_state_index_inconsistent_with_the_next_row(tmp_path, icu):
    frame, meta, episode = icu
    rows = _rows_of(frame, episode)
    next_state = frame.get_column("next_state_index").to_numpy().copy()
    next_state[rows[0]] = (next_state[rows[0]] + 1) % 713
    _refused(tmp_path, _set(frame, "next_state_index", next_state), meta,
             "next_state_index at t=0 .* differs from the state_index at t=1", episode)


def test_state_count_from_the_metadata(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    state = np.arange(frame.height, dtype=np.int32)  # every row its own state
    with_states = frame.with_columns(pl.Series("state_index", state, pl.Int32))
    R.write_replay(tmp_path / "ok.parquet", with_states, {**meta, "n_states": frame.height})
    _refused(tmp_path, with_states, {**meta, "n_states": frame.height - 1}, "is not a state of the env")


# --- column types and the content hash -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pl.Series("doses", [[1.0, 2.0]] * 12, pl.List(pl.Float64)),
        pl.Series("info", [{"a": 1}] * 12),
        pl.Series("blob", [b"x"] * 12, pl.Binary),
    ],
    ids=["list", "struct", "binary"],
)
def test_extra_columns_without_a_fixed_byte_form_are_refused_at_write(tmp_path, tiny_replay, extra):
    frame, meta = tiny_replay
    path = tmp_path / "extra.parquet"
    with pytest.raises(R.ReplayError, match=f"column '{extra.name}' has type"):
        R.write_replay(path, frame.with_columns(extra), meta)
    assert not path.exists()


def test_boolean_extra_with_nulls_is_refused_at_write(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    flag = pl.Series("flag", [True, None] * 6, pl.Boolean)
    with pytest.raises(R.ReplayError, match=r"'flag'.*fill its nulls"):
        R.write_replay(tmp_path / "x.parquet", frame.with_columns(flag), meta)


def test_supported_extra_columns_hash_the_same_in_a_new_process(tmp_path, tiny_replay):
    import subprocess
    import sys

    frame, meta = tiny_replay
    extras = frame.with_columns(
        pl.Series("dose", np.arange(12, dtype=np.float32)),
        pl.Series("unit", ["mL"] * 12, pl.Categorical),
        pl.Series("when", np.arange(12).astype("datetime64[ms]")),
        pl.Series("pair", np.ones((12, 2), np.int16), pl.Array(pl.Int16, 2)),
        pl.Series("count", [1, None] * 6, pl.Int64),
    ).with_columns(pl.col("split").cast(pl.Categorical))
    path = tmp_path / "extras.parquet"
    written = R.write_replay(path, extras, meta)
    code = f"from cleansepsis.replay import load_replay; print(load_replay({str(path)!r}).content_hash)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == written["content_hash"] == R.load_replay(path).content_hash
