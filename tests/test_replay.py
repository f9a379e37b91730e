"""The replay format: round trip, and a clear error naming the file and problem for each malformed replay."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from cleansepsis import replay as R
from cleansepsis.io import OutputExistsError


def _write_raw(path, frame: pl.DataFrame, meta: dict | None) -> None:
    """Write a parquet file as-is (no validation), with or without replay metadata."""
    metadata = None if meta is None else {R.METADATA_KEY: json.dumps(meta)}
    frame.write_parquet(path, metadata=metadata)


def _full_meta(frame: pl.DataFrame, meta: dict) -> dict:
    return {
        "schema_version": R.SCHEMA_VERSION,
        "action_encoding": R.ACTION_ENCODING,
        **meta,
        "content_hash": R.content_hash(frame),
    }


def test_round_trip(tmp_path, icu_replay_small):
    frame, meta = icu_replay_small
    path = tmp_path / "replay.parquet"
    written = R.write_replay(path, frame, meta)
    replay = R.load_replay(path)
    assert replay.meta["content_hash"] == written["content_hash"] == R.content_hash(frame)
    assert replay.obs_dim == 47 and replay.n_actions == 25
    assert all(replay.has.values())
    np.testing.assert_array_equal(np.asarray(replay.data.obs), frame.get_column("obs").to_numpy())
    np.testing.assert_array_equal(np.asarray(replay.data.action), frame.get_column("action").to_numpy())
    np.testing.assert_array_equal(
        np.asarray(replay.data.next_state_index), frame.get_column("next_state_index").to_numpy()
    )
    np.testing.assert_array_equal(np.asarray(replay.data.behavior_prob), frame.get_column("behavior_prob").to_numpy())
    sizes = {name: replay.split(name).size for name in R.SPLITS}
    assert sum(sizes.values()) == frame.height and all(sizes.values())
    assert replay.meta["n_episodes"] == 200 and replay.meta["source"] == "icu-sepsis"


def test_tiny_round_trip_without_optional_columns(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    path = tmp_path / "tiny.parquet"
    R.write_replay(path, frame, meta)
    replay = R.load_replay(path)
    assert not any(replay.has.values())
    assert bool(np.all(np.asarray(replay.data.state_index) == -1))
    assert replay.data.size == frame.height


BAD_FRAMES = {
    "missing column": (lambda f: f.drop("reward"), "missing column"),
    "wrong dtype": (lambda f: f.with_columns(pl.col("action").cast(pl.Int64)), "'action' has type Int64"),
    "wrong obs length": (
        lambda f: f.with_columns(pl.Series("obs", np.zeros((f.height, 2), np.float32), pl.Array(pl.Float32, 2))),
        "'obs' has type",
    ),
    "action out of range": (lambda f: f.with_columns(pl.lit(25, pl.Int32).alias("action")), "outside 0..24"),
    "non-finite": (
        lambda f: f.with_columns(pl.when(pl.col("t") == 1).then(float("nan")).otherwise(pl.col("reward"))
                                 .cast(pl.Float32).alias("reward")),
        "non-finite",
    ),
    "episode in two splits": (
        lambda f: f.with_columns(pl.when((pl.col("episode_id") == 0) & (pl.col("t") == 0)).then(pl.lit("val"))
                                 .otherwise(pl.col("split")).alias("split")),
        "more than one split",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frames_are_refused_on_write_and_load(tmp_path, tiny_replay, case):
    frame, meta = tiny_replay
    change, message = BAD_FRAMES[case]
    bad = change(frame)
    path = tmp_path / "bad.parquet"
    with pytest.raises(R.ReplayError, match=message) as err:
        R.write_replay(path, bad, meta)
    assert str(path) in str(err.value)
    assert not path.exists()
    _write_raw(path, bad, _full_meta(bad, meta))  # as if another tool had written it
    with pytest.raises(R.ReplayError, match=message) as err:
        R.load_replay(path)
    assert str(path) in str(err.value)


def test_unknown_schema_version(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    path = tmp_path / "future.parquet"
    _write_raw(path, frame, {**_full_meta(frame, meta), "schema_version": 99})
    with pytest.raises(R.ReplayError, match=r"unknown schema version 99"):
        R.load_replay(path)


@pytest.mark.parametrize("key", ["feature_names", "obs_dim", "source"])
def test_missing_metadata_key(tmp_path, tiny_replay, key):
    frame, meta = tiny_replay
    path = tmp_path / "nometa.parquet"
    full = _full_meta(frame, meta)
    del full[key]
    _write_raw(path, frame, full)
    with pytest.raises(R.ReplayError, match=f"metadata key '{key}' is missing"):
        R.load_replay(path)


def test_no_replay_metadata_at_all(tmp_path, tiny_replay):
    frame, _ = tiny_replay
    path = tmp_path / "plain.parquet"
    _write_raw(path, frame, None)
    with pytest.raises(R.ReplayError, match="not written by cleansepsis") as err:
        R.load_replay(path)
    assert str(path) in str(err.value)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("episode_id,t\n0,0\n")
    with pytest.raises(R.ReplayError, match="not a readable parquet file") as err:
        R.load_replay(path)
    assert str(path) in str(err.value)
    with pytest.raises(R.ReplayError, match="no such file"):
        R.load_replay(tmp_path / "missing.parquet")


def test_hash_mismatch(tmp_path, tiny_replay):
    frame, meta = tiny_replay
    path = tmp_path / "edited.parquet"
    written = R.write_replay(path, frame, meta)
    edited = frame.with_columns((pl.col("reward") * 0).alias("reward"))
    _write_raw(path, edited, written)  # rows changed, metadata (and its hash) kept
    with pytest.raises(R.ReplayError, match="content hash does not match") as err:
        R.load_replay(path)
    assert str(path) in str(err.value)
    assert R.load_replay(path, verify_hash=False).data.size == frame.height


def test_existing_output_refused_without_overwrite(tmp_path, tiny_replay, tiny_replay_factory):
    frame, meta = tiny_replay
    path = tmp_path / "out.parquet"
    first = R.write_replay(path, frame, meta)
    other, _ = tiny_replay_factory(seed=1)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        R.write_replay(path, other, meta)
    assert R.load_replay(path).content_hash == first["content_hash"]
    second = R.write_replay(path, other, meta, overwrite=True)
    assert R.load_replay(path).content_hash == second["content_hash"] != first["content_hash"]


def test_failed_write_leaves_no_partial_file(tmp_path, tiny_replay, monkeypatch):
    frame, meta = tiny_replay
    path = tmp_path / "out.parquet"

    def half_write(self, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_write)
    with pytest.raises(OSError, match="disk full"):
        R.write_replay(path, frame, meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8])
def test_group_rows_agrees_with_numpy_unique(dtype):
    rng = np.random.default_rng(4)
    kinds = rng.integers(0, 50, (40, 7)).astype(dtype)
    rows = kinds[rng.integers(0, 40, 3000)]
    first, inverse, counts = R._group_rows(rows)
    np.testing.assert_array_equal(rows[first][inverse], rows)  # every row maps to an equal representative
    assert counts.sum() == len(rows) and len(np.unique(rows[first], axis=0)) == len(first)  # groups distinct
    expected_counts = np.unique(rows, axis=0, return_counts=True)[1]
    np.testing.assert_array_equal(np.sort(counts), np.sort(expected_counts))


def test_group_rows_falls_back_to_exact_grouping_on_a_hash_collision():
    # two different rows of two uint64 words, (c1, 0) and (0, c0), hash to c0 * c1 under the coefficients
    # (c0, c1) that _group_rows draws; the check must notice and group them apart
    c = np.random.default_rng(0).integers(1, 2**63, 2, dtype=np.uint64) * 2 + 1
    rows = np.array([[c[1], 0], [0, c[0]], [c[1], 0]], np.uint64)
    first, inverse, counts = R._group_rows(rows)
    assert len(first) == 2 and sorted(counts.tolist()) == [1, 2]
    np.testing.assert_array_equal(rows[first][inverse], rows)
