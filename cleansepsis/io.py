"""Atomic file and folder writes: a reader sees the old output or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cleansepsis import interrupts


class OutputExistsError(FileExistsError):
    """The output exists and overwriting was not asked for."""


class OutputPathError(OutputExistsError):
    """An output path that cannot be written: a folder where a file goes (or a file where a folder goes), or a
    location that is not writable. A subclass of OutputExistsError, so every CLI that reports the one reports
    the other as one `error:` line."""


# Temporaries are named `.<target name>.<host>-<pid>.<random>.tmp` beside the target (folders also hold
# TMP_MARKER), so that a later run can tell a leftover of a killed run of this project (same host, owner
# process gone) from anything else, and remove only those.
TMP_MARKER = ".cleansepsis-tmp"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.([0-9a-f]{{8}})-(\d+)\.[A-Za-z0-9_]{{8}}\.(tmp|old)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_leftovers(target: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed runs left beside `target` (a SIGKILL skips every cleanup): only
    entries named by this module's pattern, made on this host by a process that no longer runs (folders
    must also hold the marker). Says so on stderr; returns what it removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern, removed = _tmp_pattern(target), []
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or match.group(1) != _HOST or _alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if match.group(3) == "tmp" and not (entry / TMP_MARKER).is_file():
                continue  # a .tmp folder of ours holds the marker until its rename
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        print(f"removed {entry}, left by an interrupted run (process {match.group(2)})", file=sys.stderr)
    return removed


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path: str | os.PathLike, kind: str | None = None, overwrite: bool = False) -> Path:
    """Check, before any work, that `path` can receive an output of `kind` ("file", "dir" or None for
    either): it does not exist (or `overwrite`), it is not the other kind, and its folder (the nearest
    existing one) is writable. Raises OutputExistsError or OutputPathError naming `path`. Creates nothing."""
    path = Path(path)
    if path.is_dir() and kind == "file":
        raise OutputPathError(f"{path} is a folder; give a file name for the output")
    if path.exists() and not path.is_dir() and kind == "dir":
        raise OutputPathError(f"{path} is a file; give a folder name for the output")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {path}: {folder} is not a folder")
    try:  # os.access says yes to root even on a read-only mount: try it
        fd, probe = tempfile.mkstemp(prefix=".cleansepsis-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: {folder} is not writable ({err.strerror})") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(path: Path, overwrite: bool, kind: str) -> None:
    check_output(path, kind, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: {err.strerror} ({err.filename})") from None
    remove_leftovers(path)


def _tmp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error (or Ctrl-C, even one
    swallowed on the way) delete it."""
    path = Path(path)
    _check_target(path, overwrite, "file")
    tmp = _tmp_name(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any output
    os.close(fd)
    try:
        yield tmp
        interrupts.check()
        os.replace(tmp, path)
        interrupts.note_written(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success move it to `path`, on error (or Ctrl-C) delete
    it."""
    path = Path(path)
    _check_target(path, overwrite, "dir")
    tmp = _tmp_name(path, "tmp")
    tmp.mkdir(0o777)  # the umask applies
    (tmp / TMP_MARKER).write_text(f"{os.getpid()}\n")
    try:
        yield tmp
        (tmp / TMP_MARKER).unlink()
        interrupts.check()
        if path.exists():
            old = _tmp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        interrupts.note_written(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> None:
    """Write JSON atomically, with sorted keys so equal content gives equal bytes."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
