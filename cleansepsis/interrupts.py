"""Ctrl-C that always stops a command, with one line and status 130, and never leaves half an output.

Why Python's own handling is not enough here: SIGINT raises KeyboardInterrupt in whatever Python code the
main thread runs next, and two places in a JAX program lose it.
- JAX registers a garbage-collector callback (`_xla_gc_callback`). An exception raised inside a gc callback
  is printed as "Exception ignored in ..." and dropped, so the run goes on and writes its output.
- On the CPU, compiled programs run in the main thread, and host callbacks (the progress bar's
  `jax.debug.callback`) run Python inside them: a KeyboardInterrupt there aborts the program but reaches the
  caller as a JaxRuntimeError, a traceback and status 1.
So the handler installed here records the interrupt before raising it, and the places where an interrupt
must stop the work check the record: `stop_point()` around a compiled call turns whatever the call raised
(or its normal return) into KeyboardInterrupt once SIGINT has arrived, `check()` raises it at a cancellation
point (the progress callback, the atomic rename of an output), and `run_cli` turns any exit of a CLI's main
into "error: interrupted; nothing was written" and status 130 once SIGINT has arrived.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

_state: dict[str, Any] = {"requested": False, "written": []}


def requested() -> bool:
    """Whether SIGINT arrived since the handler was installed (or since `clear()`)."""
    return bool(_state["requested"])


def clear() -> None:
    _state["requested"] = False
    _state["written"] = []


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived, even if the first one was swallowed."""
    if _state["requested"]:
        raise KeyboardInterrupt


def note_written(path: str | Path) -> None:
    """Record an output this process has finished writing (called by cleansepsis.io after its rename)."""
    _state["written"].append(str(path))


class _DropInterrupts(logging.Filter):
    """JAX logs a host callback's exception with its traceback before aborting the program; for a Ctrl-C that
    is noise (the interrupt is reported once, by run_cli)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc_type = record.exc_info[0] if record.exc_info else None
        return not (exc_type is not None and issubclass(exc_type, KeyboardInterrupt))


_DROP_INTERRUPTS = _DropInterrupts()
JAX_CALLBACK_LOGGERS = ("jax._src.debugging", "jax._src.callback")


def _quiet_jax_callback_logs() -> None:
    for name in JAX_CALLBACK_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_INTERRUPTS not in logger.filters:
            logger.addFilter(_DROP_INTERRUPTS)


def _handler(signum: int, frame: Any) -> None:
    _state["requested"] = True
    raise KeyboardInterrupt


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt) or requested():
        if not _state.get("reported"):
            print(f"error: {interrupted_message()}", file=sys.stderr, flush=True)
            _state["reported"] = True
        if not issubclass(exc_type, KeyboardInterrupt):
            # the interrupt came back as another error (a C extension's import turns it into ImportError):
            # end as Python ends on an uncaught KeyboardInterrupt, killed by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return
    _state["previous_excepthook"](exc_type, exc, tb)


def _unraisablehook(unraisable: Any) -> None:
    # a KeyboardInterrupt raised inside a gc callback or __del__ cannot propagate; it is recorded in the flag
    # and acted on at the next check, so Python's "Exception ignored in ..." traceback is only noise
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and requested():
        return
    _state["previous_unraisablehook"](unraisable)


def _install_hooks() -> None:
    if sys.excepthook is not _excepthook:
        _state["previous_excepthook"] = sys.excepthook
        sys.excepthook = _excepthook
    if sys.unraisablehook is not _unraisablehook:
        _state["previous_unraisablehook"] = sys.unraisablehook
        sys.unraisablehook = _unraisablehook


def install() -> None:
    """Record SIGINT before raising KeyboardInterrupt, and print an uncaught KeyboardInterrupt (for example
    while modules are still importing) as one line instead of a traceback; Python then exits as killed by
    SIGINT (status 130 in a shell). Call it first thing in a script, before the heavy imports. Only from the
    main thread, and only over Python's default handler."""
    _quiet_jax_callback_logs()
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _handler):
        signal.signal(signal.SIGINT, _handler)
    _install_hooks()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """`install()` for the duration of a block, then restore the previous SIGINT handler and forget the
    interrupt (so that calling a CLI's main in-process, as the tests do, leaves the process as it was)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    _state["written"] = []  # not the interrupt flag: a Ctrl-C while the script was importing counts
    _quiet_jax_callback_logs()
    if in_main:
        _install_hooks()
    if in_main and previous in (signal.default_int_handler, _handler):
        signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        if in_main and previous in (signal.default_int_handler, _handler):
            signal.signal(signal.SIGINT, previous)
        _state["requested"] = False  # handled inside the block; later code in this process starts afresh


@contextlib.contextmanager
def stop_point() -> Iterator[None]:
    """Around a compiled call: once SIGINT has arrived, leave the block with KeyboardInterrupt, whether the
    call raised something else (a host callback's KeyboardInterrupt comes back as a JaxRuntimeError) or
    returned normally (the interrupt was swallowed by a gc callback)."""
    try:
        yield
    except Exception:
        if requested():
            raise KeyboardInterrupt from None
        raise
    check()


def interrupted_message() -> str:
    written = _state["written"]
    if not written:
        return "interrupted; nothing was written"
    return f"interrupted after writing {', '.join(written)}; nothing else was written"


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run a CLI's main(): 0 when it finishes; the project's errors as one `error:` line and 1; Ctrl-C at any
    point (also when swallowed or wrapped on the way) as one `error: interrupted ...` line and 130."""
    with handling():
        try:
            main()
        except KeyboardInterrupt:
            _state["requested"] = True  # also when raised without our handler (another thread's, a test's)
        except user_errors as err:
            if not requested():
                print(f"error: {err}", file=sys.stderr)
                return 1
        except Exception:
            if not requested():
                raise
        if not requested():
            return 0
        print(f"error: {interrupted_message()}", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
