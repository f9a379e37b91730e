"""The compiled sweep over (setting x seed) runs, and the devices it runs on.

`use_host_devices` is called first thing by every learner (before JAX's first operation): it splits the
CPU into one XLA device per core and, when `CLEANSEPSIS_DISTRIBUTED=1`, joins the processes of a
multi-process or multi-host run (`jax.distributed.initialize`). `run_sweep` then compiles `train` once,
lays the flat axis of runs over every device of every process (a `jax.sharding.Mesh`), runs it in chunks
of evaluations with a progress bar advanced between them, and gives every process the whole result.

Results that travel: on CPU each device runs its runs one after another (a `lax.map` of single runs),
so every run is the same compiled computation whatever the number of devices, processes or seeds, and a
seed gives the same bytes on 1 or 2 devices, in one process or two. On GPUs (and with
`CLEANSEPSIS_VMAP_WIDTH`) the runs of a device go side by side under `vmap`, faster there, but then the
float rounding can depend on how many runs share a device; summary.json records the layout either way
(`device.sweep`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import interrupts

HOST_DEVICES_VARIABLE = "CLEANSEPSIS_HOST_DEVICES"
DISTRIBUTED_VARIABLE = "CLEANSEPSIS_DISTRIBUTED"
VMAP_WIDTH_VARIABLE = "CLEANSEPSIS_VMAP_WIDTH"
RUNS_AXIS = "runs"


def _run_error(message: str) -> Exception:
    from cleansepsis.runs import RunError  # runs re-exports this module: import it only when raising

    return RunError(message)


def _whole_number(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _run_error(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise _run_error(f"{name} must be at least {minimum}, got {value}")
    return value


def use_host_devices(num_seeds: int | None = None) -> int:
    """Set up the devices before JAX's first operation; returns the number of CPU devices asked for.

    Splits the CPU into one XLA device per core (at most one per seed) so that run_sweep runs the seeds
    side by side: on 2 cores about 1.4x the seed-updates per second of one device running all of them
    (benchmarks/bench_cql.py). One seed keeps one device. `CLEANSEPSIS_HOST_DEVICES=N` overrides the count.
    With `CLEANSEPSIS_DISTRIBUTED=1`, also joins a multi-process run (see `init_distributed`). Once JAX has
    run something its devices are fixed, and this leaves them as they are."""
    wanted = _whole_number(HOST_DEVICES_VARIABLE, 1)
    if wanted is None:
        cores = len(os.sched_getaffinity(0))
        wanted = cores if num_seeds is None else max(1, min(cores, num_seeds))
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # JAX already ran something: its devices are fixed
        wanted = len(jax.local_devices(backend="cpu"))
    init_distributed()
    return wanted


def init_distributed() -> bool:
    """Join a multi-process run when `CLEANSEPSIS_DISTRIBUTED=1` (returns whether it did).

    The coordinator, the process count and this process's index come from SLURM (srun) or Open MPI
    (mpirun), which jax.distributed detects, or from JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID when processes are started by hand. Must run before JAX's first operation."""
    raw = os.environ.get(DISTRIBUTED_VARIABLE, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw not in ("1", "true", "yes"):
        raise _run_error(f"{DISTRIBUTED_VARIABLE} must be 1 or 0, got {raw!r}")
    if jax.distributed.is_initialized():
        return True
    num_processes = _whole_number("JAX_NUM_PROCESSES", 1)
    process_id = _whole_number("JAX_PROCESS_ID", 0)
    try:
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    except (ValueError, RuntimeError) as err:
        raise _run_error(
            f"{DISTRIBUTED_VARIABLE}=1 but the processes could not join ({err}); run under srun or mpirun, "
            "or set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
        ) from None
    return True


def is_main_process() -> bool:
    """Whether this process writes files and prints results (process 0 of a multi-process run)."""
    return jax.process_index() == 0


# Layout of the last sweep, recorded in summary.json by device_info.
_last_layout: dict[str, Any] = {}


def device_info() -> dict[str, Any]:
    """The devices of this run (as summary.json records them), with the last sweep's layout."""
    import platform

    devices = jax.devices()
    info = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "n_devices": len(devices),
        "n_processes": jax.process_count(),
        "machine": platform.machine(),
    }
    if _last_layout:
        info["sweep"] = dict(_last_layout)
    return info


# --------------------------------------------------------------------------------------------------
# Progress bar

# A train that goes through `runs.scan_evaluations` (every learner) runs in chunks of evaluations, one
# compiled call each, and the bar advances between calls from Python. A train that does not (a toy in a
# test) runs as one program and advances the bar by `tick`, a host callback inside it. "ticks": False while
# the persistent compilation cache is on (runs.enable_compilation_cache): JAX does not cache a program with
# host callbacks, so tick() then adds none.
_progress: dict[str, Any] = {"bar": None, "ticks": True}


def _advance(value: Any = None) -> None:
    interrupts.check()  # a Ctrl-C swallowed earlier stops the compiled program here (see interrupts.py)
    bar = _progress["bar"]
    if bar is not None:
        if value is not None:
            bar.set_postfix_str(f"last return {float(value):.4f}", refresh=False)
        bar.update(1)


def tick(value: jnp.ndarray | None = None) -> None:
    """Advance the progress bar by one evaluation from inside a train that runs as one program (one that
    does not use `runs.scan_evaluations`; those run in chunks and need no tick). With a scalar `value` (e.g.
    the exact return), the bar also shows the latest one."""
    chunk = _chunking["active"]
    if not _progress["ticks"] or (chunk is not None and (chunk.evals or chunk.num_evals)):
        return  # off, or inside scan_evaluations under run_sweep (chunks advance the bar)
    if value is None:
        jax.debug.callback(_advance)
    else:
        jax.debug.callback(_advance, value)


# --------------------------------------------------------------------------------------------------
# Chunks of evaluations

# At most this many compiled calls per run (each costs a dispatch and a return to Python, about a
# millisecond); fewer when the evaluations do not divide finely.
MAX_CHUNKS = 100


class _Chunk:
    """What `scan_evaluations` does while run_sweep traces `train` (see `chunked_scan_evaluations`).

    Probing (evals None): record the carry's shapes, num_evals and evals_per_save, and stop tracing.
    Chunking: start from `carry_in` unless `first`, scan `evals` evaluations, and record the carry and
    snapshot(carry) after them, which run_sweep returns from the compiled call."""

    def __init__(self, evals: int | None = None, carry_in: Any = None, first: Any = None):
        self.evals, self.carry_in, self.first = evals, carry_in, first
        self.carry_shapes: Any = None
        self.num_evals: int | None = None
        self.evals_per_save = 0
        self.carry_out: Any = None
        self.snapshot: Any = None


_chunking: dict[str, _Chunk | None] = {"active": None}


class _Probed(Exception):  # not an error: ends the probe's trace at scan_evaluations
    pass


def chunked_scan_evaluations(
    evaluate: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    num_evals: int,
    evals_per_save: int,
    snapshot: Callable[[Any], Any],
) -> tuple[Any, Any, Any] | None:
    """`runs.scan_evaluations` while run_sweep traces train, or None outside run_sweep."""
    chunk = _chunking["active"]
    if chunk is None:
        return None
    saving = bool(evals_per_save) and evals_per_save < num_evals
    if chunk.evals is None:  # probing: what run_sweep needs is known; the rest of train need not be traced
        chunk.num_evals, chunk.evals_per_save = num_evals, evals_per_save if saving else 0
        chunk.carry_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), carry)
        raise _Probed
    if chunk.carry_in is not None:
        carry = jax.tree.map(lambda start, resume: jnp.where(chunk.first, start, resume), carry, chunk.carry_in)
    carry, metrics = jax.lax.scan(evaluate, carry, None, length=chunk.evals)
    chunk.carry_out = carry
    chunk.snapshot = snapshot(carry) if saving else None
    return carry, metrics, None


def evals_per_chunk(num_evals: int, evals_per_save: int, max_chunks: int = MAX_CHUNKS) -> int:
    """The fewest evaluations per compiled call that divide num_evals (and evals_per_save, so that every
    saved policy ends a chunk) in at most max_chunks calls; every call is then the same program."""
    period = evals_per_save or num_evals
    for evals in range(1, period + 1):
        if period % evals == 0 and num_evals // evals <= max_chunks:
            return evals
    return period


# --------------------------------------------------------------------------------------------------
# The sweep


def default_vmap_width(platform: str) -> int | None:
    """Runs a device trains side by side under vmap (None: all of its runs at once). CPU: 1, so that a
    run's result does not depend on the layout; GPU/TPU: all, since they need wide batches to be busy."""
    override = _whole_number(VMAP_WIDTH_VARIABLE, 1)
    if override is not None:
        return override
    return 1 if platform == "cpu" else None


def _global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` (the same on every process) as an array of `sharding`, which may span processes."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def run_sweep(
    train: Callable[..., Any],
    seeds: Sequence[int],
    hparams: dict[str, jnp.ndarray],
    n_ticks: int,
    desc: str = "training",
    inputs: Any = None,
    vmap_width: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """Compile `train` once for all settings x seeds, run it with a progress bar, and time both.

    `train(key, hparams[, inputs])` trains one run. `inputs` (optional): a pytree of arrays (the replay,
    env params) passed to every run as an argument rather than closed over; closed-over arrays become
    constants in the program, and tens of megabytes of constants make XLA compile slowly.

    The runs form one flat axis (setting slowest, then seed), padded with extra seeds of the last setting
    to equal blocks, and placed on a `jax.sharding.Mesh` over every device of every process: one block per
    device (`jax.shard_map`). A device trains `vmap_width` runs side by side (default `default_vmap_width`:
    1 on CPU) and its groups of them one after another (`lax.map`). Every process gets the whole result.
    Returns (train's outputs with leading axes (n_settings, n_seeds), timing) where timing has
    compile_seconds, train_seconds and train_cpu_seconds (CPU time of this process while training, which
    other jobs on the machine disturb less than wall time).

    Chunks: when train returns `(final, metrics, saved)` as the learners do, its metrics and saved
    policies straight from `runs.scan_evaluations`, the compiled program runs a chunk of evaluations of every
    run per call (`evals_per_chunk`) and hands back the scan's carry for the next call. The progress bar
    advances between calls, so it moves whether or not the persistent compilation cache is on (the program
    has no host callback), and a Ctrl-C stops the run at the end of the chunk it lands in. The chunks
    together are the same computation as one scan over every evaluation. Any other train runs as one
    program, its progress given by `tick`; `n_ticks` is its number of ticks per run.

    Why one run at a time on CPU: under vmap, how many runs share a device changes XLA's fused program
    (a wider batch of the same ops), and with it the float rounding; a chaotic training loop turns that into
    other final returns (0.7994 / 0.8028 on 1 device against 0.8016 / 0.8029 on 2 for the same two seeds).
    Without vmap every device runs the same program for each run."""
    n_seeds = len(seeds)
    if n_seeds < 1:
        raise _run_error("run_sweep needs at least one seed")
    n_settings = int(next(iter(hparams.values())).shape[0]) if hparams else 1
    n_runs = n_settings * n_seeds
    devices, local_devices = jax.devices(), jax.local_devices()
    n_devices, n_local = len(devices), len(local_devices)
    if n_devices != n_local * jax.process_count():
        raise _run_error(
            f"every process needs the same number of devices; this one has {n_local} of {n_devices} "
            f"in {jax.process_count()} processes"
        )
    width = vmap_width if vmap_width is not None else default_vmap_width(devices[0].platform)
    per_device = -(-n_runs // n_devices)
    width = per_device if width is None else min(width, per_device)
    per_device = -(-per_device // width) * width  # whole groups of `width` runs on each device
    n_padded = per_device * n_devices

    # flat (setting, seed) axis; padding runs take seeds past the last and the last setting's values
    run_seeds = [int(s) for s in seeds] * n_settings
    run_seeds += range(max(seeds) + 1, max(seeds) + 1 + n_padded - n_runs)
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in run_seeds])
    setting_of_run = np.minimum(np.arange(n_padded) // n_seeds, n_settings - 1)
    flat_hparams = {name: np.asarray(value)[setting_of_run] for name, value in hparams.items()}
    mesh = jax.sharding.Mesh(np.asarray(devices), (RUNS_AXIS,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(RUNS_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    run_args = (_global_array(keys, split), {name: _global_array(x, split) for name, x in flat_hparams.items()})
    shared = () if inputs is None else (jax.tree.map(lambda x: _global_array(x, replicated), inputs),)
    spec_runs, spec_all = jax.sharding.PartitionSpec(RUNS_AXIS), jax.sharding.PartitionSpec()

    def over_runs(run: Callable[..., Any], n_split: int, n_shared: int) -> Callable[..., Any]:
        """`run` over the flat axis: its first n_split arguments split by run, the other n_shared the same
        for all. On one device, one run at a time, or `width` at a time under vmap."""

        def on_device(*a):
            split_args, shared_args = a[:n_split], a[n_split:]
            if width == 1:  # no vmap: each run is the same program whatever the layout
                return jax.lax.map(lambda one: run(*one, *shared_args), split_args)
            vmapped = jax.vmap(run, in_axes=(0,) * n_split + (None,) * n_shared)
            groups = jax.tree.map(lambda x: x.reshape(-1, width, *x.shape[1:]), split_args)
            out = jax.lax.map(lambda group: vmapped(*group, *shared_args), groups)
            return jax.tree.map(lambda x: x.reshape(per_device, *x.shape[2:]), out)

        in_specs = (spec_runs,) * n_split + (spec_all,) * n_shared
        return jax.shard_map(on_device, mesh=mesh, in_specs=in_specs, out_specs=spec_runs, check_vma=False)

    def named(program: Callable[..., Any]) -> Callable[..., Any]:
        def train_all(*a):  # named after what it runs: the persistent cache files read jit_train_all-...
            return program(*a)

        return train_all

    # The whole program, traced first: if train goes through scan_evaluations, the trace stops there with
    # the shapes of its carry; if not, it is what runs.
    t0 = time.perf_counter()
    probe, traced = _Chunk(), None
    _chunking["active"] = probe
    try:
        traced = jax.jit(named(over_runs(train, 2, len(shared)))).trace(*run_args, *shared)
    except _Probed:
        pass
    finally:
        _chunking["active"] = None
    if probe.num_evals is None:
        compiled = traced.lower().compile()
    else:
        evals = evals_per_chunk(probe.num_evals, probe.evals_per_save)
        n_chunks = probe.num_evals // evals

        def run_chunk(key, run_hparams, carry_in, first, *inp):
            chunk = _Chunk(evals, carry_in, first)
            _chunking["active"] = chunk
            try:
                final, metrics, _ = train(key, run_hparams, *inp)
            finally:
                _chunking["active"] = None
            return chunk.carry_out, final, metrics, chunk.snapshot

        carry = jax.tree.map(
            lambda x: _global_array(np.zeros((n_padded, *x.shape), x.dtype), split), probe.carry_shapes
        )
        first = _global_array(np.bool_(True), replicated)
        program = jax.jit(named(over_runs(run_chunk, 3, 1 + len(shared))), donate_argnums=2)
        compiled = program.lower(*run_args, carry, first, *shared).compile()
    compile_seconds = time.perf_counter() - t0
    _last_layout.clear()
    _last_layout.update(
        n_runs=n_runs, n_padded_runs=n_padded, n_devices=n_devices, n_processes=jax.process_count(),
        runs_per_device=per_device, vmap_width=width,
    )
    if probe.num_evals is None:
        out, timing = _run_whole(compiled, (*run_args, *shared), n_ticks * n_local * per_device, desc)
    else:
        out, timing = _run_chunks(compiled, run_args, carry, shared, n_chunks, evals, probe, n_runs, desc)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)  # numpy, the whole result on every process
    out = jax.tree.map(lambda x: jnp.asarray(on_host(x, lambda a: a[:n_runs].reshape(n_settings, n_seeds, *a.shape[1:]))),
                       out)  # fmt: skip
    return out, {"compile_seconds": compile_seconds, **timing}


def _plain(x: Any) -> bool:
    """An array on one device whose values numpy holds exactly: not a PRNG key, not weakly typed (an array
    spread over several devices keeps the eager op, whose result stays spread over them)."""
    return (isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and not x.weak_type
            and len(x.devices()) == 1)  # fmt: skip


def on_host(x: Any, take: Callable[[Any], Any]) -> Any:
    """`take` (a slice, reshape or index: a copy of some values) of a device array done by numpy, back on the
    device: the same values as the eager device op, which compiled a small program per shape. Other
    leaves (numpy, PRNG keys, weakly typed or multi-device arrays) as `take` gives them."""
    if _plain(x):
        return jax.device_put(take(np.asarray(x)))
    return take(x)


def _join_on_host(join: Callable[..., Any], parts: tuple[Any, ...]) -> Any:
    """jnp.concatenate / jnp.stack of chunks along axis 1, by numpy when every part is a plain device array."""
    if all(_plain(p) for p in parts) and len({p.dtype for p in parts}) == 1:
        return jax.device_put(join([np.asarray(p) for p in parts], axis=1))
    return {np.concatenate: jnp.concatenate, np.stack: jnp.stack}[join](parts, axis=1)


def progress_bar(total: int, desc: str | None, unit: str = "eval", enabled: bool = True):
    """The project's progress bar: on stderr, only on a terminal and on the main process, gone when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0, leave=False,
                disable=True if not (enabled and is_main_process()) else None)


def _run_whole(compiled: Any, args: tuple, total_ticks: int, desc: str) -> tuple[Any, dict[str, float]]:
    """One call of a program that ticks the progress bar from inside (`tick`)."""
    with progress_bar(total_ticks, desc) as bar:
        _progress["bar"] = bar
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            with interrupts.stop_point():  # Ctrl-C inside the program comes back as another error
                out = jax.block_until_ready(compiled(*args))
                jax.effects_barrier()
            return out, {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}
        finally:
            _progress["bar"] = None


def _run_chunks(
    compiled: Any, run_args: tuple, carry: Any, shared: tuple, n_chunks: int, evals: int, probe: _Chunk,
    n_runs: int, desc: str,
) -> tuple[Any, dict[str, float]]:
    """Call the chunk program n_chunks times, each from the carry the last one returned; the next call is
    queued before waiting for the last one's metrics, so the cores never wait for Python. Returns
    (final, metrics over all evaluations, saved policies or None) as one scan over them would."""
    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), (RUNS_AXIS,)),
                                            jax.sharding.PartitionSpec())
    flags = [_global_array(np.bool_(i == 0), replicated) for i in range(min(n_chunks, 2))]
    metrics_of_chunks, snapshots, final = [], [], None
    with progress_bar(probe.num_evals * n_runs, desc) as bar:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(n_chunks):
            with interrupts.stop_point():
                carry, final, metrics, snapshot = compiled(*run_args, carry, flags[min(i, 1)], *shared)
            done = (i + 1) * evals
            if probe.evals_per_save and done % probe.evals_per_save == 0 and done < probe.num_evals:
                snapshots.append(snapshot)
            if metrics_of_chunks:
                _show_progress(bar, metrics_of_chunks[-1], evals * n_runs, n_runs)
            metrics_of_chunks.append(metrics)
        with interrupts.stop_point():
            jax.block_until_ready((carry, final, metrics_of_chunks))
        _show_progress(bar, metrics_of_chunks[-1], evals * n_runs, n_runs)
        timing = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - cpu0}
    metrics = jax.tree.map(lambda *parts: _join_on_host(np.concatenate, parts), *metrics_of_chunks)
    saved = jax.tree.map(lambda *parts: _join_on_host(np.stack, parts), *snapshots) if snapshots else None
    return (final, metrics, saved), timing


def _show_progress(bar: Any, metrics: Any, evals_done: int, n_runs: int) -> None:
    """Wait for a chunk's metrics, then advance the bar (with the mean latest exact return, if any)."""
    with interrupts.stop_point():
        jax.block_until_ready(metrics)
    if isinstance(metrics, dict) and "exact_return" in metrics and jax.process_count() == 1:
        bar.set_postfix_str(f"last return {float(np.asarray(metrics['exact_return'])[:n_runs, -1].mean()):.4f}",
                            refresh=False)
    bar.update(evals_done)
