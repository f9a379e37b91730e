"""Shared test fixtures: a tiny hand-made replay (no JAX) and a small ICU-Sepsis clinician replay."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

OBS_DIM, N_ACTIONS = 3, 25

# The learners keep compiled programs in a persistent cache under the user's cache folder; tests (and the
# scripts they start as subprocesses, which inherit this) must not fill it. A test that checks the cache
# points it at its own tmp folder.
os.environ["CLEANSEPSIS_COMPILATION_CACHE"] = "off"


def pytest_addoption(parser):
    parser.addoption(
        "--profile-suite",
        metavar="PATH",
        default=None,
        help="write each test's CPU seconds (this process and its children) and resident-memory growth to "
        "PATH as CSV, and print the costliest modules and tests at the end",
    )


def pytest_configure(config):
    """Start JAX on one CPU device for the whole test process, so that a script's main() called in-process
    cannot split the CPU into several devices halfway through the session (subprocess runs still do).

    Also give the process Python's default SIGINT handler: a shell starts a background job (`pytest &`) with
    SIGINT ignored, and cleansepsis.interrupts deliberately leaves a handler it did not install alone, so the
    Ctrl-C tests would see no interrupt at all."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    import jax

    jax.devices()
    if config.getoption("--profile-suite"):
        from suite_profile import SuiteProfile

        config.pluginmanager.register(SuiteProfile(config.getoption("--profile-suite")), "suite_profile")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
    """Drop JAX's in-memory compiled programs and traces when a test module ends. They are kept for the
    whole process otherwise, and the suite's peak memory grew by every module's programs; a module's own
    tests still share them (and tests that count traces count within one module). Then hand the freed heap
    back to the system: glibc keeps it otherwise, and the process's resident memory only ever grew."""
    yield
    import gc

    import jax

    jax.clear_caches()
    _clear_loader_caches()
    gc.collect()
    _release_free_heap()


def _clear_loader_caches() -> None:
    """Forget the MDP arrays that cleansepsis's loaders keep for the process (functools.cache): ICU-Sepsis,
    the simulator and cohort MDPs hold 0.1-0.3 GB each in float64 and device copies, and a module that
    needs them again rebuilds them in about a second."""
    import sys

    for name, module in list(sys.modules.items()):
        if name == "cleansepsis" or name.startswith("cleansepsis."):
            for value in list(vars(module).values()):
                if (
                    callable(getattr(value, "cache_clear", None))
                    and getattr(value, "__module__", None) == name
                ):
                    value.cache_clear()


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system (nothing on other C libraries)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_tiny_replay(n_episodes: int = 4, steps: int = 3, seed: int = 0) -> tuple[pl.DataFrame, dict]:
    """A valid replay of `n_episodes` x `steps` transitions with random observations, and its metadata."""
    rng = np.random.default_rng(seed)
    n = n_episodes * steps
    episode = np.repeat(np.arange(n_episodes), steps)
    t = np.tile(np.arange(steps), n_episodes)
    last = t == steps - 1
    obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs[:-1][~last[:-1]] = obs[1:][~last[:-1]]  # within an episode, next_obs is the next row's obs
    frame = pl.DataFrame(
        [
            pl.Series("episode_id", episode, pl.Int64),
            pl.Series("t", t, pl.Int32),
            pl.Series("obs", obs, pl.Array(pl.Float32, OBS_DIM)),
            pl.Series("action", rng.integers(0, N_ACTIONS, n), pl.Int32),
            pl.Series("reward", last.astype(np.float32), pl.Float32),
            pl.Series("next_obs", next_obs, pl.Array(pl.Float32, OBS_DIM)),
            pl.Series("terminated", last, pl.Boolean),
            pl.Series("truncated", np.zeros(n, bool), pl.Boolean),
            pl.Series("split", np.where(episode == n_episodes - 1, "test", "train"), pl.String),
        ]
    )
    meta = {
        "obs_dim": OBS_DIM,
        "n_actions": N_ACTIONS,
        "feature_names": [f"x{i}" for i in range(OBS_DIM)],
        "normalisation": "none (test data)",
        "source": "tests",
        "env_id": None,
        "reward": "1 at the last step",
        "args": {"seed": seed},
    }
    return frame, meta


@pytest.fixture
def tiny_replay() -> tuple[pl.DataFrame, dict]:
    return make_tiny_replay()


@pytest.fixture
def tiny_replay_factory():
    """`make_tiny_replay` itself, for tests that need several different replays."""
    return make_tiny_replay


@pytest.fixture(scope="session")
def icu_replay_small() -> tuple[pl.DataFrame, dict]:
    """200 clinician episodes on ICU-Sepsis (seed 0), with 20% val and 20% test episodes."""
    from cleansepsis.icu_replay import make_clinician_replay

    return make_clinician_replay(200, seed=0, val_frac=0.2, test_frac=0.2)


@pytest.fixture
def counted_seed_sweep():
    """`make(train)` -> (sweep, keys, traces): a learner's `train(key, hparams, inputs)` vmapped over the keys
    of seeds 0, 1, 0 (the repeated seed must repeat exactly, the other differ) under one jit, each trace of
    `train` appended to `traces` (so a test can check that new hyperparameter values do not retrace)."""
    import jax
    import jax.numpy as jnp

    def make(train):
        traces = []

        def counted(key, hparams, inputs):
            traces.append(1)
            return train(key, hparams, inputs)

        keys = jnp.stack([jax.random.PRNGKey(seed) for seed in (0, 1, 0)])
        return jax.jit(jax.vmap(counted, in_axes=(0, None, None))), keys, traces

    return make
