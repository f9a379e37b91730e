"""run_sweep over devices and processes: a seed's result is the same bytes on 1 or 2 host devices, in one
process or two (jax.distributed over a localhost coordinator), and whatever the other seeds of the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleansepsis import runs, sweep

TESTS = Path(__file__).parent
SEEDS = [5, 6, 7]
DECAYS = [0.0, 1e-3, 1e-2]


def toy_train(n_evals: int = 2, updates: int = 10, batch: int = 32, width: int = 16):
    """A small regression MLP trained as the learners train: minibatches gathered on the device, gradients
    clipped by global norm, Adam, a cosine learning rate, an inner scan of updates and an outer one of
    evaluations that ticks the progress bar. The clipping and the schedule are what made the old sweep's
    results differ between 1 and 2 host devices."""
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())

    def train(key, hparams, data):
        x, y = data
        k1, k2, key = jax.random.split(key, 3)
        params = {
            "w1": jax.random.normal(k1, (x.shape[1], width)) / 3,
            "w2": jax.random.normal(k2, (width, y.shape[1])) / 6,
        }

        def loss(p, xb, yb):
            fit = jnp.mean((jnp.tanh(xb @ p["w1"]) @ p["w2"] - yb) ** 2)
            return fit + hparams["decay"] * jnp.sum(p["w1"] ** 2)

        def update(carry, _):
            p, state, key = carry
            key, sub = jax.random.split(key)
            rows = jax.random.randint(sub, (batch,), 0, x.shape[0])
            value, grads = jax.value_and_grad(loss)(p, x[rows], y[rows])
            steps, state = optimiser.update(grads, state, p)
            lr = 1e-2 * 0.5 * (1.0 + jnp.cos(jnp.pi * state[1].count / 100.0))
            return (jax.tree.map(lambda a, b: a - lr * b, p, steps), state, key), value

        def evaluate(carry, _):
            carry, losses = jax.lax.scan(update, carry, None, length=updates)
            runs.tick()
            return carry, {"loss": losses.mean()}

        init = (params, optimiser.init(params), key)
        (params, _, _), metrics = jax.lax.scan(evaluate, init, None, length=n_evals)
        return params, metrics

    return train


def toy_data():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.normal(size=(512, 12)), jnp.float32),
        jnp.asarray(rng.normal(size=(512, 6)), jnp.float32),
    )


def toy_sweep(seeds: list[int], **kwargs) -> dict:
    """The sweep's outputs as hex bytes per (setting, seed), with the layout it ran on."""
    _, hparams = runs.make_hparam_grid({"decay": DECAYS})
    (params, metrics), _ = runs.run_sweep(toy_train(), seeds, hparams, n_ticks=2, inputs=toy_data(), **kwargs)
    leaves = [np.asarray(x) for x in jax.tree.leaves((params, metrics))]
    return {
        "bytes": [[b"".join(x[s, i].tobytes() for x in leaves).hex() for i in range(len(seeds))] for s in range(3)],
        "shape": list(leaves[0].shape),
        "layout": runs.device_info()["sweep"],
        "main": runs.is_main_process(),
        "devices": len(jax.devices()),
        "shards": len(jax.tree.leaves(params)[0].sharding.device_set),
    }


SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from cleansepsis import runs
asked = runs.use_host_devices()
from test_sweep import toy_sweep
print("RESULT " + json.dumps({**toy_sweep([5, 6, 7]), "asked": asked}), flush=True)
"""


def _result(stdout: str) -> dict:
    return json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "CLEANSEPSIS_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture(scope="module")
def one_device() -> dict:
    """This test process (one CPU device, see conftest): seeds 5, 6, 7 of three settings."""
    assert len(jax.devices()) == 1
    return toy_sweep(SEEDS)


def test_seed_bytes_do_not_depend_on_the_other_seeds(one_device):
    alone = toy_sweep([6])
    assert alone["shape"][:2] == [3, 1]
    assert [row[0] for row in alone["bytes"]] == [row[1] for row in one_device["bytes"]]
    # seeds and settings differ
    assert len({b for row in one_device["bytes"] for b in row}) == 9


def test_seed_bytes_do_not_depend_on_the_number_of_host_devices(one_device):
    """9 runs over 2 devices: 5 each, the 10th a padding run that is dropped; same bytes as on 1 device.
    (This also covers what tests/test_runs.py asserted in a subprocess of its own: use_host_devices gives
    the process the devices asked for, and the sweep's result spans both.)"""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TESTS)], env=_env(CLEANSEPSIS_HOST_DEVICES="2"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two = _result(done.stdout)
    assert two["asked"] == 2 and two["devices"] == 2 and two["shards"] == 2
    assert two["layout"] == {
        "n_runs": 9, "n_padded_runs": 10, "n_devices": 2, "n_processes": 1, "runs_per_device": 5, "vmap_width": 1,
    }  # fmt: skip
    assert two["bytes"] == one_device["bytes"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_every_process_the_one_process_result(one_device):
    """jax.distributed over a localhost coordinator, 2 processes with 1 CPU device each: both get the
    whole result, equal to the bytes of the one-process run; only process 0 is the main process."""
    port = _free_port()
    def start(rank: int) -> subprocess.Popen:
        env = _env(
            CLEANSEPSIS_HOST_DEVICES="1", CLEANSEPSIS_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
        )  # fmt: skip
        return subprocess.Popen([sys.executable, "-c", SCRIPT, str(TESTS)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    procs = [start(rank) for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            outputs.append(_result(stdout))
    finally:
        for proc in procs:
            proc.kill()
    assert [out["main"] for out in outputs] == [True, False]
    for out in outputs:
        assert out["layout"]["n_processes"] == 2 and out["layout"]["n_devices"] == 2
        assert out["bytes"] == one_device["bytes"]


def test_vmap_width_trains_runs_side_by_side(one_device):
    """The GPU layout (several runs of a device under one vmap), here on CPU: the same runs, rounded
    differently at most."""
    wide = toy_sweep(SEEDS, vmap_width=2)
    assert wide["layout"]["vmap_width"] == 2 and wide["layout"]["n_padded_runs"] == 10
    for row_wide, row_one in zip(wide["bytes"], one_device["bytes"], strict=True):
        for a, b in zip(row_wide, row_one, strict=True):
            np.testing.assert_allclose(
                np.frombuffer(bytes.fromhex(a), np.float32), np.frombuffer(bytes.fromhex(b), np.float32), rtol=1e-3
            )


def test_learners_reach_the_sweep_through_runs():
    assert runs.run_sweep is sweep.run_sweep and runs.use_host_devices is sweep.use_host_devices
    assert runs.tick is sweep.tick and runs.device_info is sweep.device_info


def test_distributed_variable_is_checked(monkeypatch):
    monkeypatch.setenv(sweep.DISTRIBUTED_VARIABLE, "maybe")
    with pytest.raises(runs.RunError, match=sweep.DISTRIBUTED_VARIABLE):
        runs.use_host_devices()


def test_vmap_width_variable_is_checked(monkeypatch):
    monkeypatch.setenv(sweep.VMAP_WIDTH_VARIABLE, "0")
    with pytest.raises(runs.RunError, match=sweep.VMAP_WIDTH_VARIABLE):
        toy_sweep([0])


def test_distributed_without_a_coordinator_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(sweep.DISTRIBUTED_VARIABLE, "1")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(runs.RunError, match="could not join"):
        runs.use_host_devices()


# --------------------------------------------------------------------------------------------------
# Chunks of evaluations: a train that goes through runs.scan_evaluations (every learner) runs as one
# compiled call per chunk, and the progress bar advances between calls, also with the compilation cache on


def chunked_train(n_evals: int = 6, evals_per_save: int = 0):
    """The toy regression of `toy_train`, with its evaluations scanned by runs.scan_evaluations."""
    optimiser = optax.adam(1e-2)

    def train(key, hparams, data):
        x, y = data
        w = jax.random.normal(key, (x.shape[1], y.shape[1])) / 3

        def evaluate(carry, _):
            def update(carry, _):
                w, state, key = carry
                key, sub = jax.random.split(key)
                rows = jax.random.randint(sub, (32,), 0, x.shape[0])
                value, grads = jax.value_and_grad(
                    lambda w: jnp.mean((x[rows] @ w - y[rows]) ** 2) + hparams["decay"] * jnp.sum(w**2))(w)
                steps, state = optimiser.update(grads, state, w)
                return (optax.apply_updates(w, steps), state, key), value

            carry, losses = jax.lax.scan(update, carry, None, length=5)
            return carry, {"loss": losses.mean(), "exact_return": -losses[-1]}

        (w, _, _), metrics, saved = runs.scan_evaluations(
            evaluate, (w, optimiser.init(w), key), n_evals, evals_per_save, lambda carry: carry[0]
        )
        return w, metrics, saved

    return train


class _RecordingBar:
    """Stands in for tqdm: records every advance."""

    updates: ClassVar[list] = []

    def __init__(self, total=None, **_):
        self.total, self.n = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def update(self, n=1):
        self.n += n
        _RecordingBar.updates.append(n)

    def set_postfix_str(self, *_, **__):
        pass


@pytest.fixture
def cache_on_progress(monkeypatch):
    """The progress bar as it is with the persistent compilation cache on (no host-callback ticks), recorded."""
    import tqdm.auto

    monkeypatch.setitem(sweep._progress, "ticks", False)  # what runs.enable_compilation_cache sets
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.updates = []
    return _RecordingBar.updates


def test_progress_advances_with_every_evaluation_when_the_compilation_cache_is_on(cache_on_progress):
    _, hparams = runs.make_hparam_grid({"decay": [0.0, 1e-2]})
    (_, metrics, saved), _ = runs.run_sweep(chunked_train(6), [0, 1], hparams, n_ticks=6, inputs=toy_data())
    assert metrics["loss"].shape == (2, 2, 6) and saved is None
    assert cache_on_progress == [4] * 6  # one chunk of one evaluation of each of the 4 runs at a time


def test_chunked_runs_give_the_bytes_of_one_scan_over_every_evaluation():
    """run_sweep cuts the evaluations into chunks; the result (and every saved policy) is the one of the
    whole scan, which is what runs.scan_evaluations does outside run_sweep."""
    _, hparams = runs.make_hparam_grid({"decay": [0.0, 1e-2]})
    assert sweep.evals_per_chunk(6, 2) == 1 and sweep.evals_per_chunk(400, 0) == 4
    assert sweep.evals_per_chunk(7, 0, max_chunks=3) == 7
    (w, metrics, saved), _ = runs.run_sweep(chunked_train(6, 2), [3, 4], hparams, n_ticks=6, inputs=toy_data())
    assert saved.shape[:3] == (2, 2, 2)  # after 2 and 4 of 6 evaluations, the final one apart
    single = jax.jit(chunked_train(6, 2))
    for s, decay in enumerate([0.0, 1e-2]):
        for i, seed in enumerate([3, 4]):
            w1, metrics1, saved1 = single(jax.random.PRNGKey(seed), {"decay": jnp.float32(decay)}, toy_data())
            np.testing.assert_array_equal(np.asarray(w[s, i]), np.asarray(w1))
            np.testing.assert_array_equal(np.asarray(metrics["loss"][s, i]), np.asarray(metrics1["loss"]))
            np.testing.assert_array_equal(np.asarray(saved[s, i]), np.asarray(saved1))


@pytest.mark.parametrize("how", ["raised", "swallowed"])
def test_ctrl_c_during_a_chunk_stops_the_run_at_its_end_when_the_compilation_cache_is_on(cache_on_progress, how):
    """A Ctrl-C while the second chunk runs (recorded when the first one is reported, as the SIGINT handler
    records it; raised there, or swallowed as JAX's gc callback swallows it): the run stops with
    KeyboardInterrupt at the next chunk, not after all evaluations."""
    import signal

    from cleansepsis import interrupts

    def interrupt_at_first_report(self, n=1):
        _RecordingBar.updates.append(n)
        if len(_RecordingBar.updates) == 1:
            try:
                interrupts._handler(signal.SIGINT, None)  # what the handler does when the signal lands
            except KeyboardInterrupt:
                if how == "raised":
                    raise

    _, hparams = runs.make_hparam_grid({"decay": [0.0]})
    original = _RecordingBar.update
    _RecordingBar.update = interrupt_at_first_report
    try:
        with interrupts.handling(), pytest.raises(KeyboardInterrupt):
            runs.run_sweep(chunked_train(20), [0], hparams, n_ticks=20, inputs=toy_data())
    finally:
        _RecordingBar.update = original
    assert 1 <= len(cache_on_progress) <= 2
