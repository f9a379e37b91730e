"""Ctrl-C and kill -9: every interrupt stops the command with one line and status 130 and writes nothing,
also when the KeyboardInterrupt is swallowed or wrapped on the way; leftovers of a killed write are removed
by the next run of the same output, and nothing else is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import polars as pl
import pytest

from cleansepsis import interrupts, io, runs, sweep

ROOT = Path(__file__).resolve().parents[1]


def _driver(code: str, *argv: str, rollout_from: Path | None = None) -> subprocess.Popen:
    """A data_prep run in a subprocess, with `code` run first (to patch in a marker or a swallowing step).
    With `rollout_from` (the `stored_rollout` folder), the run's clinician rollout returns those rows and
    metadata instead of compiling and running the JAX rollout: for the tests of what happens after the
    rollout, whose rows do not matter, this saves the subprocess about half of its CPU time."""
    if rollout_from is not None:
        code = textwrap.dedent(code) + textwrap.dedent(f"""
            import json as _json
            import polars as _pl
            import cleansepsis.icu_replay as _icu
            def _stored_rollout(*args, **kwargs):
                folder = {str(rollout_from)!r}
                return _pl.read_parquet(folder + "/rows.parquet"), _json.load(open(folder + "/meta.json"))
            _icu.make_clinician_replay = _stored_rollout
        """)
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import sys
        import data_prep
        sys.exit(data_prep.main(sys.argv[1:]))
        """
    )
    return subprocess.Popen([sys.executable, "-c", script, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def stored_rollout(tmp_path_factory) -> Path:
    """The rows and metadata of a tiny valid replay (no JAX), for `_driver(..., rollout_from=...)`."""
    from conftest import make_tiny_replay

    folder = tmp_path_factory.mktemp("stored_rollout")
    frame, meta = make_tiny_replay()
    frame.write_parquet(folder / "rows.parquet")
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.strip() == marker:
            return
        assert time.monotonic() < deadline
    raise AssertionError(f"never printed {marker!r}; stderr: {proc.stderr.read()}")


def _ended_interrupted(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == -signal.SIGINT or [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted; nothing was written"
    ], err
    return err


MARK_IN = {
    # one marker per point of a run, printed there before sleeping, so the signal lands exactly there
    # while jax and polars load: data_prep installs the handler before them (the few milliseconds of Python's
    # own start-up before that are Python's)
    "imports": "from cleansepsis import interrupts\ninterrupts.install()\nprint('here', flush=True)\n",
    "rollout": "import cleansepsis.icu_replay as m; f = m.make_clinician_replay\n"
    "def g(*a, **k):\n    print('here', flush=True); __import__('time').sleep(30); return f(*a, **k)\n"
    "m.make_clinician_replay = g\n",
    "write": "import polars as pl; f = pl.DataFrame.write_parquet\n"
    "def g(self, target, **k):\n    open(target, 'wb').write(b'PAR1 half'); print('here', flush=True)\n"
    "    __import__('time').sleep(30)\n"
    "pl.DataFrame.write_parquet = g\n",
}


@pytest.mark.parametrize("point", sorted(MARK_IN))
def test_ctrl_c_at_any_point_of_data_prep_ends_in_one_line_and_writes_nothing(tmp_path, point, stored_rollout):
    out = tmp_path / "replay.parquet"
    rollout_from = stored_rollout if point == "write" else None  # the write point: the rows do not matter
    proc = _driver(MARK_IN[point], "icu-sepsis", "--episodes", "50", "--out", str(out), rollout_from=rollout_from)
    _wait_for(proc, "here")
    proc.send_signal(signal.SIGINT)
    _ended_interrupted(proc)
    assert list(tmp_path.iterdir()) == []


SLOW_JAX_IMPORT = """
import builtins, runpy, sys, time
real_import = builtins.__import__
def slow(name, *args, **kwargs):
    if name.split(".")[0] in ("jax", "chex", "equinox", "optax"):
        builtins.__import__ = real_import
        print("here", flush=True)
        time.sleep(30)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("learner", ["iql.py", "cql.py", "dqn.py", "bc.py"])
def test_ctrl_c_while_a_learner_imports_jax_ends_in_one_line(learner):
    """The learners install the handler before their heavy imports, as data_prep does (a traceback of
    importlib frames before)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_JAX_IMPORT, learner], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(proc, "here")
    proc.send_signal(signal.SIGINT)
    _ended_interrupted(proc)


SWALLOWERS = {
    # a callee that catches the KeyboardInterrupt and carries on
    "except": """
        def swallow():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
    """,
    # JAX's case: the signal lands in a gc callback, where Python prints "Exception ignored" and carries on
    "gc callback": """
        def swallow():
            def in_gc(*_):
                gc.callbacks.remove(in_gc)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            gc.callbacks.append(in_gc)
            gc.collect()
    """,
}


@pytest.mark.parametrize("how", sorted(SWALLOWERS))
def test_ctrl_c_swallowed_by_a_callee_still_stops_the_run(tmp_path, how, stored_rollout):
    code = "import gc, os, signal, time\n" + textwrap.dedent(SWALLOWERS[how]) + textwrap.dedent("""
        import polars as pl
        f = pl.DataFrame.write_parquet
        def g(self, target, **k):
            swallow()
            print("swallowed", flush=True)
            return f(self, target, **k)
        pl.DataFrame.write_parquet = g
    """)
    out = tmp_path / "replay.parquet"
    proc = _driver(code, "icu-sepsis", "--episodes", "50", "--out", str(out), rollout_from=stored_rollout)
    _wait_for(proc, "swallowed")
    _ended_interrupted(proc)
    assert list(tmp_path.iterdir()) == []


def _ticking_train(key, hparams):
    """20 steps, each ticking the progress bar from inside the compiled program."""

    def step(carry, _):
        runs.tick()
        return carry + 1.0, carry

    return jax.lax.scan(step, jnp.float32(0), None, length=20)


def _sweep_interrupted_at_a_tick(on_tick) -> None:
    """Run `_ticking_train` with `on_tick` called at every progress tick; the sweep must end in
    KeyboardInterrupt."""
    with interrupts.handling():
        original = sweep._advance
        sweep._advance = lambda *a: (on_tick(), original(*a))
        try:
            with pytest.raises(KeyboardInterrupt):
                runs.run_sweep(_ticking_train, [0], {"x": jnp.zeros(1)}, n_ticks=20)
        finally:
            sweep._advance = original


def test_ctrl_c_inside_a_compiled_programs_callback_is_an_interrupt_not_a_runtime_error():
    calls = []

    def interrupt_once():  # a Ctrl-C arriving while the progress callback runs, inside the program
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    _sweep_interrupted_at_a_tick(interrupt_once)
    assert len(calls) < 20  # stopped early, not at the end


def test_ctrl_c_swallowed_inside_a_compiled_program_stops_it_at_the_next_tick():
    calls = []

    def swallow_once():
        calls.append(1)
        if len(calls) == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # as JAX's gc callback does

    _sweep_interrupted_at_a_tick(swallow_once)
    assert len(calls) == 3  # stopped at the tick where it arrived, not after all 20


def test_cli_main_reports_an_interrupt_wrapped_in_another_error(capsys):
    def main():
        os.kill(os.getpid(), signal.SIGINT)  # recorded by the handler
        raise RuntimeError("XLA wrapped it")

    def raising():
        try:
            main()
        except KeyboardInterrupt:
            raise RuntimeError("wrapped") from None

    with pytest.raises(SystemExit) as status:
        runs.cli_main(raising)
    assert status.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; nothing was written"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards


def test_sigkill_during_a_data_prep_write_is_cleaned_by_the_next_run(tmp_path, capsys, monkeypatch, stored_rollout):
    out = tmp_path / "replay.parquet"
    proc = _driver(MARK_IN["write"], "icu-sepsis", "--episodes", "20", "--out", str(out), rollout_from=stored_rollout)
    _wait_for(proc, "here")
    proc.kill()
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".replay.parquet.")]
    assert len(leftovers) == 1 and not out.exists()
    mine = tmp_path / ".replay.parquet.abcdef12.tmp"  # a name of the old scheme: not provably ours, kept
    mine.write_text("x")
    import data_prep  # the next run, in-process (its imports are already paid for)
    from cleansepsis import icu_replay

    rows = pl.read_parquet(stored_rollout / "rows.parquet")  # its rows do not matter here either
    meta = json.loads((stored_rollout / "meta.json").read_text())
    monkeypatch.setattr(icu_replay, "make_clinician_replay", lambda *args, **kwargs: (rows, meta))
    assert data_prep.main(["icu-sepsis", "--episodes", "20", "--out", str(out)]) == 0
    assert f"removed {leftovers[0]}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, mine.name])


def test_leftovers_of_a_live_process_or_another_pattern_are_kept(tmp_path):
    target = tmp_path / "run"
    alive = tmp_path / f".run.{io._HOST}-{os.getpid()}.0123abcd.tmp"  # this process still runs
    alive.mkdir()
    (alive / io.TMP_MARKER).write_text("")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    unmarked = tmp_path / f".run.{io._HOST}-{dead_pid}.0123abcd.tmp"  # a folder without the marker
    unmarked.mkdir()
    other_host = tmp_path / f".run.00000000-{dead_pid}.0123abcd.tmp"
    other_host.write_text("")
    killed = tmp_path / f".run.{io._HOST}-{dead_pid}.4567cdef.tmp"
    killed.mkdir()
    (killed / io.TMP_MARKER).write_text("")
    old = tmp_path / f".run.{io._HOST}-{dead_pid}.89abcdef.old"
    old.mkdir()
    with io.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", alive.name, unmarked.name, other_host.name]
    )
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # the marker is not part of the output


def test_atomic_write_refuses_to_commit_after_a_swallowed_interrupt(tmp_path):
    with interrupts.handling():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt), io.atomic_file(tmp_path / "out.txt") as tmp:
            tmp.write_text("complete, but the user asked to stop")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}"], "is a folder; give a file name"),
        (["--out", "{tmp}", "--overwrite"], "is a folder; give a file name"),
        (["--out", "{tmp}/file.txt/replay.parquet"], "file.txt is not a folder"),
        (["--out", "/proc/replay.parquet"], "cannot write /proc/replay.parquet"),
    ],
)
def test_unusable_out_is_refused_before_the_work(tmp_path, capsys, args, message):
    import data_prep

    (tmp_path / "file.txt").write_text("x")
    argv = ["icu-sepsis", "--episodes", "100000", *[a.format(tmp=tmp_path) for a in args]]
    start = time.perf_counter()
    assert data_prep.main(argv) == 1
    assert time.perf_counter() - start < 5  # refused before rolling out 100,000 episodes
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
