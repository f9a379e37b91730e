"""The compiled sweep over (setting x seed) runs, and the devices it runs on.

`use_host_devices` is called first thing by every learner (before JAX's first operation): it splits the
CPU into one XLA device per core and, when `CLEANSEPSIS_DISTRIBUTED=1`, joins the processes of a
multi-process or multi-host run (`jax.distributed.initialize`). `run_sweep` then compiles `train` once,
lays the flat axis of runs over every device of every process (a `jax.sharding.Mesh`), runs it with a
progress bar (`tick`, called inside train) and gives every process the whole result.

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
# Progress bar, advanced from inside the compiled program

# "ticks": False while the persistent compilation cache is on (runs.enable_compilation_cache): JAX does not
# cache a program with host callbacks, so tick() then adds none
_progress: dict[str, Any] = {"bar": None, "ticks": True}


def _advance(value: Any = None) -> None:
    interrupts.check()  # a Ctrl-C swallowed earlier stops the compiled program here (see interrupts.py)
    bar = _progress["bar"]
    if bar is not None:
        if value is not None:
            bar.set_postfix_str(f"last return {float(value):.4f}", refresh=False)
        bar.update(1)


def tick(value: jnp.ndarray | None = None) -> None:
    """Advance the progress bar by one evaluation; call once per outer-scan step inside train. With a
    scalar `value` (e.g. the exact return), the bar also shows the latest one."""
    if not _progress["ticks"]:
        return
    if value is None:
        jax.debug.callback(_advance)
    else:
        jax.debug.callback(_advance, value)


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

    Why one run at a time on CPU: under vmap, how many runs share a device changes XLA's fused program
    (a wider batch of the same ops), and with it the float rounding; a chaotic training loop turns that into
    other final returns (0.7994 / 0.8028 on 1 device against 0.8016 / 0.8029 on 2 for the same two seeds).
    Without vmap every device runs the same program for each run."""
    from tqdm.auto import tqdm

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
    args = (_global_array(keys, split), {name: _global_array(x, split) for name, x in flat_hparams.items()})
    if inputs is not None:
        args = (*args, jax.tree.map(lambda x: _global_array(x, replicated), inputs))

    def on_device(device_keys, device_hparams, *inp):
        """The runs of one device, (per_device, ...): one at a time, or `width` at a time under vmap."""
        if width == 1:  # no vmap: each run is the same program whatever the layout
            return jax.lax.map(lambda one: train(*one, *inp), (device_keys, device_hparams))
        run = jax.vmap(train, in_axes=(0, 0, *(None,) * len(inp)))
        groups = jax.tree.map(lambda x: x.reshape(-1, width, *x.shape[1:]), (device_keys, device_hparams))
        out = jax.lax.map(lambda group: run(*group, *inp), groups)
        return jax.tree.map(lambda x: x.reshape(per_device, *x.shape[2:]), out)

    spec_runs = jax.sharding.PartitionSpec(RUNS_AXIS)
    in_specs = (spec_runs, spec_runs, jax.sharding.PartitionSpec())[: len(args)]
    sweep = jax.shard_map(on_device, mesh=mesh, in_specs=in_specs, out_specs=spec_runs, check_vma=False)

    def train_all(*a):  # named after what it runs: the persistent cache files read jit_train_all-...
        return sweep(*a)

    t0 = time.perf_counter()
    compiled = jax.jit(train_all).lower(*args).compile()
    compile_seconds = time.perf_counter() - t0
    _last_layout.clear()
    _last_layout.update(
        n_runs=n_runs, n_padded_runs=n_padded, n_devices=n_devices, n_processes=jax.process_count(),
        runs_per_device=per_device, vmap_width=width,
    )
    with tqdm(
        total=n_ticks * n_local * per_device, desc=desc, unit="eval", file=sys.stderr, mininterval=1.0,
        leave=False, disable=True if not is_main_process() else None,
    ) as bar:
        _progress["bar"] = bar
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            with interrupts.stop_point():  # Ctrl-C inside the program comes back as another error
                out = jax.block_until_ready(compiled(*args))
                jax.effects_barrier()
            train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            _progress["bar"] = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)  # numpy, the whole result on every process
    out = jax.tree.map(lambda x: jnp.asarray(x[:n_runs].reshape(n_settings, n_seeds, *x.shape[1:])), out)
    timing = {"compile_seconds": compile_seconds, "train_seconds": train_seconds}
    return out, {**timing, "train_cpu_seconds": train_cpu_seconds}
