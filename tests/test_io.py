"""Atomic writes: old content or all of the new, never a half-written output, never a silent overwrite."""

import json

import pytest

from cleansepsis.io import OutputExistsError, atomic_dir, atomic_file, write_json


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_existing_file_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match=r"out\.txt already exists"), atomic_file(target):
        pass
    assert target.read_text() == "old"


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_dir_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_dir(tmp_path / "run") as tmp:
        (tmp / "a").write_text("1")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_deterministic(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    first = (tmp_path / "a.json").read_bytes()
    write_json(tmp_path / "a.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == first
    assert json.loads(first) == {"a": [1, 2], "b": 1}


def test_outputs_get_the_usual_permissions_not_private_temp_ones(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
