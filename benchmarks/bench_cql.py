"""Speed of cql.py's update against d3rlpy 2.8.1's DiscreteCQL, measured in the same run.

Same network (47 -> 256 -> 256 -> 25), same batch (`--batch-size`, default 256), Adam, 200,000 random
transitions on the device. Prints
  - seed-updates per second of cql.py's compiled update loop for 1, 8 and 32 seeds under one vmap,
    and the ratio to d3rlpy's updates per second (goal >= 5x);
  - the update's matmul FLOPs per second as a share of this machine's float32 matmul throughput, measured
    here with a jitted 1024^3 matmul loop (goal >= 85%);
  - compile time (goal < 10 s).
d3rlpy is never a runtime dependency: it runs in a subprocess of a separate venv (torch CPU + d3rlpy):
    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0 d3rlpy==2.8.1
    uv run python benchmarks/bench_cql.py [--bench-python .bench-venv/bin/python]
Timings on a shared machine swing widely: each figure is the median of --repeats runs; the load average
is printed with them. The layout is run_sweep's (one host device per core, at most one per seed, each
training its runs one after another); `CLEANSEPSIS_HOST_DEVICES=N` and `CLEANSEPSIS_VMAP_WIDTH=K` (K runs of
a device side by side under one vmap) measure others, and each row prints the layout it ran on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cql  # noqa: E402
from cleansepsis import runs  # noqa: E402
from cleansepsis.replay import Transitions  # noqa: E402

OBS_DIM, N_ACTIONS, HIDDEN = 47, 25, (256, 256)
CORES = len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Args:
    bench_python: str = str(REPO / ".bench-venv" / "bin" / "python")
    """Interpreter of the venv with torch and d3rlpy; the d3rlpy part is skipped if it does not exist."""
    seeds: tuple[int, ...] = (1, 8, 32)
    """Seed counts to time under one vmap."""
    updates: int = 500
    """Updates per timed call (per seed)."""
    repeats: int = 3
    """Timed calls per measurement; the median is reported."""
    transitions: int = 200_000
    """Random transitions on the device."""
    d3rlpy_updates: int = 100
    """d3rlpy updates per timed repeat."""
    batch_size: int = 256
    """Transitions per update, for both libraries (2048 is the batch the 100k-episode runs use)."""
    vmap_widths: tuple[int, ...] = (0,)
    """Runs a device trains side by side under one vmap; 0 = run_sweep's default (1 on CPU). Several
    values are timed one after another for every seed count."""


def random_transitions(n: int, seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    terminated = np.zeros(n, bool)
    terminated[9::10] = True
    return Transitions(
        obs=jnp.asarray(rng.normal(size=(n, OBS_DIM)), jnp.float32),
        action=jnp.asarray(rng.integers(0, N_ACTIONS, n), jnp.int32),
        reward=jnp.asarray(rng.random(n), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(n, OBS_DIM)), jnp.float32),
        terminated=jnp.asarray(terminated),
        truncated=jnp.zeros(n, bool),
        episode_id=jnp.arange(n, dtype=jnp.int32) // 10,
        t=jnp.arange(n, dtype=jnp.int32) % 10,
        split=jnp.zeros(n, jnp.int8),
        state_index=jnp.full(n, -1, jnp.int32),
        next_state_index=jnp.full(n, -1, jnp.int32),
        behavior_prob=jnp.full(n, jnp.nan, jnp.float32),
        action_mask=jnp.ones((n, N_ACTIONS), bool),
        next_action_mask=jnp.ones((n, N_ACTIONS), bool),
    )


def update_flops(batch: int, widths: tuple[int, ...] = (OBS_DIM, *HIDDEN, N_ACTIONS)) -> float:
    """Matmul FLOPs of one CQL update: forward on obs (online), on next_obs (online and target), and the
    backward pass of the obs forward (weight gradients everywhere, input gradients except the first layer)."""
    forward = sum(2 * batch * i * o for i, o in itertools.pairwise(widths))
    backward = 2 * forward - 2 * batch * widths[0] * widths[1]
    return 3 * forward + backward


def matmul_gflops(repeats: int, n: int = 1024) -> tuple[float, float]:
    """float32 throughput of a jitted loop of n x n @ n x n matmuls (the same FLOPs for every n): GFLOP per
    wall second, and per CPU second of this process times the usable cores (what the loop would reach with
    every core to itself; other jobs on the machine disturb it less than wall time)."""
    loops = 20 * (1024 // n) ** 3
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)

    @jax.jit
    def chain(x):
        return jax.lax.fori_loop(0, loops, lambda _, y: (y @ a) * (1.0 / n**0.5), x)

    jax.block_until_ready(chain(a))
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(chain(a))
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    flop = 2 * n**3 * loops / 1e9
    return flop / statistics.median(walls), flop * CORES / statistics.median(cpus)


def time_cql(
    data: Transitions, num_seeds: int, updates: int, repeats: int, batch: int, vmap_width: int | None
) -> tuple[float, float, float]:
    """(median compile seconds, median seed-updates per second, the same per CPU second times the cores) of
    cql.py's train for `num_seeds` seeds, run the way cql.py runs it: runs.run_sweep (the runs spread over
    the host devices; `vmap_width` of them side by side, None for run_sweep's default). The first call is a
    warm-up."""
    args = dataclasses.replace(
        cql.Args(), num_updates=updates, eval_every=updates, batch_size=batch, hidden=HIDDEN, lr_schedule="cosine"
    )
    train = cql.make_train(args, OBS_DIM, N_ACTIONS)
    _, hparams = runs.make_hparam_grid({"alpha": 1.0, "learning_rate": 1e-3, "gamma": 0.99})
    timings = [
        runs.run_sweep(
            train, range(num_seeds), hparams, n_ticks=1, desc="cql", inputs=(data, None), vmap_width=vmap_width
        )[1]
        for _ in range(repeats + 1)
    ][1:]
    compile_seconds = statistics.median(t["compile_seconds"] for t in timings)
    wall = statistics.median(t["train_seconds"] for t in timings)
    cpu = statistics.median(t["train_cpu_seconds"] for t in timings)
    return compile_seconds, num_seeds * updates / wall, num_seeds * updates * CORES / cpu


D3RLPY_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch, d3rlpy
    torch.set_num_threads(int(sys.argv[1]))
    n, updates, repeats, batch_size = (int(x) for x in sys.argv[2:6])
    rng = np.random.default_rng(0)
    terminals = np.zeros(n); terminals[9::10] = 1
    dataset = d3rlpy.dataset.MDPDataset(
        rng.normal(size=(n, 47)).astype(np.float32), rng.integers(0, 25, n), rng.random(n).astype(np.float32),
        terminals, action_space=d3rlpy.ActionSpace.DISCRETE, action_size=25)
    algo = d3rlpy.algos.DiscreteCQLConfig(
        batch_size=batch_size, learning_rate=1e-3, alpha=1.0, gamma=0.99,
        encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[256, 256])).create(device="cpu:0")
    algo.build_with_dataset(dataset)
    batches = [dataset.sample_transition_batch(batch_size) for _ in range(updates)]
    for batch in batches[:10]:
        algo.update(batch)
    update_only, with_sampling = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            algo.update(batch)
        update_only.append(updates / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(updates):
            algo.update(dataset.sample_transition_batch(batch_size))
        with_sampling.append(updates / (time.perf_counter() - start))
    print(json.dumps({"update_only": statistics.median(update_only),
                      "with_sampling": statistics.median(with_sampling),
                      "torch": torch.__version__, "d3rlpy": d3rlpy.__version__}))
    """
)


def time_d3rlpy(args: Args) -> dict | None:
    if not Path(args.bench_python).exists():
        print(
            f"d3rlpy: skipped, {args.bench_python} does not exist (see this file's docstring)",
            file=sys.stderr,
        )
        return None
    result = subprocess.run(
        [args.bench_python, "-c", D3RLPY_SCRIPT, str(os.cpu_count() or 1), str(args.transitions),
         str(args.d3rlpy_updates), str(args.repeats), str(args.batch_size)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        print(f"d3rlpy: failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    import tyro

    args = tyro.cli(Args, description=__doc__)
    n_devices = runs.use_host_devices()  # as cql.py does; CLEANSEPSIS_HOST_DEVICES=1 measures one device
    print(
        f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}, "
        f"XLA CPU devices: {n_devices}, jax {jax.__version__}"
    )
    data = random_transitions(args.transitions)
    peak, peak_cpu = matmul_gflops(args.repeats)
    # the update's matmuls are 256 wide: a loop of 256^3 matmuls is the ceiling at that shape
    peak_256, peak_256_cpu = matmul_gflops(args.repeats, n=256)
    flops = update_flops(args.batch_size)
    print(
        f"float32 matmul throughput (JAX, jitted loop): {peak:.1f} GFLOP/s at 1024^3, {peak_256:.1f} at 256^3; "
        f"per {CORES} busy cores (CPU time): {peak_cpu:.1f} / {peak_256_cpu:.1f}; "
        f"CQL update at batch {args.batch_size}: {flops / 1e6:.1f} MFLOP"
    )
    reference = time_d3rlpy(args)
    if reference:
        print(
            f"d3rlpy {reference['d3rlpy']} DiscreteCQL (torch {reference['torch']}): "
            f"{reference['update_only']:.1f} updates/s (update only), {reference['with_sampling']:.1f} with sampling"
        )
    rows = []
    for num_seeds in args.seeds:
        for width in args.vmap_widths:
            compile_seconds, rate, rate_cpu = time_cql(
                data, num_seeds, args.updates, args.repeats, args.batch_size, width or None
            )
            gflops = rate * flops / 1e9
            ratio = rate / reference["with_sampling"] if reference else float("nan")
            layout = runs.device_info()["sweep"]
            shares = (gflops / peak, gflops / peak_256, rate_cpu * flops / 1e9 / peak_cpu)
            rows.append((num_seeds, rate, ratio, *shares, compile_seconds, layout))
    print(
        f"{'seeds':>5}  {'seed-updates/s':>14}  {'vs d3rlpy':>9}  {'of 1024^3':>9}  {'of 256^3':>8}  "
        f"{'CPU-time of 1024^3':>18}  {'compile s':>9}  layout"
    )
    for num_seeds, rate, ratio, share, share_256, share_cpu, compile_seconds, layout in rows:
        print(
            f"{num_seeds:>5}  {rate:>14.1f}  {ratio:>8.2f}x  {share:>9.1%}  {share_256:>8.1%}  {share_cpu:>18.1%}  "
            f"{compile_seconds:>9.1f}  {layout['n_devices']} device(s) x {layout['runs_per_device']} runs, "
            f"vmap width {layout['vmap_width']}"
        )
    print("goals: >= 5x d3rlpy (with its sampler), >= 85% of matmul throughput, compile < 10 s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
