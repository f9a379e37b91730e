"""Wall time and peak memory of `data_prep.py mimic` on synthetic MIMIC-IV-shaped data of growing size, each
size run (not extrapolated), with a projection to full MIMIC-IV v3.1 (94,458 ICU stays).

Each size is generated once into --cache-dir (`data_prep.py synth`, not timed), then the pipeline runs in a
fresh process. Measured per run: wall time, CPU time (wait4 rusage), peak resident memory of the child's
process tree (sampled from /proc every 0.1 s, and the kernel's own maximum for the largest process), and the
load average of the machine before and after. The pipeline's progress lines mark its stages; the peak memory
within each stage is printed for the largest size, so memory that grows faster than the data points at its
stage.

A bare streaming pass that only decompresses, parses and counts chartevents + labevents (the read floor) is
measured beside each size with --floor: the ratio pipeline / floor is less sensitive to how busy the shared
machine is than the seconds are.

    uv run python benchmarks/bench_data_prep.py --sizes 1000 5000 20000 40000
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

FULL_STAYS = 94_458
GOAL_MINUTES, GOAL_GB = 20.0, 8.0
REAL_CHART_GB = 6.6 * 433e6 / 1e9  # 6.6 bytes per row in the demo's chartevents.csv.gz x 433 million rows
DATA_PREP = str(Path(__file__).resolve().parents[1] / "data_prep.py")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Args:
    sizes: list[int] = field(default_factory=lambda: [1000, 5000, 20000, 40000])
    """Numbers of synthetic ICU stays to measure."""
    cache_dir: Path = Path(".cache/bench_data_prep")
    """Where the synthetic inputs are kept between runs (generated once per size and seed)."""
    format: str = "csv.gz"
    """Input format of the synthetic tables (PhysioNet ships csv.gz)."""
    seed: int = 0
    """Seed of the synthetic data."""
    repeats: int = 1
    """Pipeline runs per size; the median time and the largest peak are reported."""
    floor: bool = False
    """Also time the bare read of chartevents + labevents (the read floor) at each size."""
    first_stay_only: bool = True
    """Pass --first-stay-only to the pipeline (its default); False counts every ICU stay as an episode."""


def _children(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat parent ids)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                parent_of[int(entry)] = int(fields[1])
            except OSError:
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        tree += frontier
    return tree


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of the process tree, MB: (all, anonymous). The difference is file-backed pages (a
    memory-mapped input file), which the kernel can drop under pressure; anonymous memory it cannot."""
    total = anon = 0
    for member in _children(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0, anon / 1024.0


@dataclass
class Run:
    seconds: float
    cpu: float
    peak_mb: float  # of the whole process tree, sampled
    peak_anon_mb: float  # its anonymous part (not file-backed)
    maxrss_mb: float  # the kernel's maximum resident set of the largest process
    load_before: float
    load_after: float
    stages: list[tuple[str, float, float, float]]  # (stage, seconds, peak MB, peak anonymous MB)


def measure(argv: list[str]) -> Run:
    """Run `python argv...` in a fresh process, sampling the memory of its process tree and reading its
    progress lines ("[mimic   12.3s] message") as stage markers."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, float]] = []
    marks: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - start, *tree_rss_mb(proc.pid)))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[mimic"):
            message = line.split("]", 1)[1].strip()
            marks.append((time.perf_counter() - start, re.sub(r"[\d,]+", "N", message)[:60]))
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: benchmark step failed: {' '.join(argv)}\n{''.join(lines[-5:])}")
    # a stage is the time up to the progress line that ends it
    stages, begin = [], 0.0
    for end, name in [*marks, (seconds, "(end: report and exit)")]:
        inside = [(rss, anon) for at, rss, anon in samples if begin <= at <= end]
        stages.append(
            (
                name,
                end - begin,
                max((r for r, _ in inside), default=0.0),
                max((a for _, a in inside), default=0.0),
            )
        )
        begin = end
    return Run(
        seconds,
        usage.ru_utime + usage.ru_stime,
        max((rss for _, rss, _ in samples), default=0.0),
        max((anon for _, _, anon in samples), default=0.0),
        usage.ru_maxrss / 1024.0,
        load_before,
        os.getloadavg()[0],
        stages,
    )


def main() -> None:
    args = tyro.cli(Args)
    rows: list[tuple[int, Run, float]] = []
    chart_gb_per_stay = []
    for stays in args.sizes:
        data = args.cache_dir / f"synth_{stays}_{args.seed}_{args.format}"
        if not data.exists():
            print(f"generating {stays} stays into {data} ...", file=sys.stderr, flush=True)
            measure(
                [
                    DATA_PREP,
                    "synth",
                    "--stays",
                    str(stays),
                    "--seed",
                    str(args.seed),
                    "--format",
                    args.format,
                    "--out",
                    str(data),
                    "--quiet",
                ]
            )
        suffix = args.format
        floor_s = float("nan")
        if args.floor:
            scan = "parquet" if suffix == "parquet" else "csv"
            code = "import polars as pl; " + "; ".join(
                f"pl.scan_{scan}({str(data / t)!r}).select(pl.len()).collect(engine='streaming')"
                for t in (f"icu/chartevents.{suffix}", f"hosp/labevents.{suffix}")
            )
            floor_s = measure(["-c", code]).seconds
        runs = []
        for _ in range(args.repeats):
            argv = [
                DATA_PREP,
                "mimic",
                "--mimic-dir",
                str(data),
                "--out",
                str(args.cache_dir / f"out_{stays}"),
            ]
            argv += ["--overwrite"] + ([] if args.first_stay_only else ["--no-first-stay-only"])
            runs.append(measure(argv))
        run = (
            min(runs, key=lambda r: r.seconds)
            if len(runs) == 1
            else sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
        )
        run.peak_mb = max(r.peak_mb for r in runs)
        run.peak_anon_mb = max(r.peak_anon_mb for r in runs)
        rows.append((stays, run, floor_s))
        chart_gb_per_stay.append((data / f"icu/chartevents.{suffix}").stat().st_size / 1e9 / stays)
        print(
            f"{stays:>7} stays: {run.seconds:7.1f} s wall, {run.cpu:7.1f} s CPU, peak {run.peak_mb:7.0f} MB "
            f"({run.peak_anon_mb:.0f} MB anonymous) "
            f"(largest process {run.maxrss_mb:.0f} MB), load {run.load_before:.1f} -> {run.load_after:.1f}",
            file=sys.stderr,
            flush=True,
        )
    print(f"\n{os.cpu_count()} cores; load average (1 min) before -> after each run in the table\n")
    print(
        "| stays | wall s | CPU s | peak RSS MB | of it anonymous MB | MB per 1,000 stays | load | read floor s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for stays, run, floor_s in rows:
        print(
            f"| {stays:,} | {run.seconds:.0f} | {run.cpu:.0f} | {run.peak_mb:.0f} | {run.peak_anon_mb:.0f} | "
            f"{run.peak_mb / stays * 1000:.0f} | "
            f"{run.load_before:.1f} -> {run.load_after:.1f} | {floor_s:.0f} |"
        )
    stays, run, _ = rows[-1]
    print(f"\nstages of the {stays:,}-stay run (each ends with the progress line named):\n")
    print("| stage | seconds | peak RSS MB | peak anonymous MB |")
    print("|---|---|---|---|")
    for name, seconds, peak, anon in run.stages:
        print(f"| {name} | {seconds:.1f} | {peak:.0f} | {anon:.0f} |")
    if len(rows) >= 2:
        x = np.array([r[0] for r in rows], float)
        wall = np.array([r[1].seconds for r in rows])
        cpu = np.array([r[1].cpu for r in rows])
        peak = np.array([r[1].peak_mb for r in rows])
        anon = np.array([r[1].peak_anon_mb for r in rows])
        t_fit, c_fit, m_fit, a_fit = (np.polyfit(x, y, 1) for y in (wall, cpu, peak, anon))
        marginal = np.diff(peak) / np.diff(x) * 1000
        print(
            f"\nlinear fit: {t_fit[0] * 1000:.1f} s wall ({c_fit[0] * 1000:.1f} s CPU) per 1,000 stays; "
            f"{m_fit[0] * 1000:.0f} MB per 1,000 stays + {m_fit[1]:.0f} MB"
        )
        print(
            "marginal memory between consecutive sizes, MB per 1,000 stays: "
            + ", ".join(f"{m:.0f}" for m in marginal)
            + (
                " (growing: faster than linear)"
                if len(marginal) > 1 and marginal[-1] > 1.3 * marginal[0]
                else ""
            )
        )
        t_full, c_full, m_full, a_full = (np.polyval(f, FULL_STAYS) for f in (t_fit, c_fit, m_fit, a_fit))
        # memory from the largest run, scaled by the largest marginal rate (not the fit): the pessimistic one
        m_pess = peak[-1] + max(marginal.max(), 0) * (FULL_STAYS - x[-1]) / 1000
        print(
            f"projected full MIMIC-IV v3.1 ({FULL_STAYS:,} stays, {FULL_STAYS / x[-1]:.1f}x the largest run): "
            f"{t_full / 60:.1f} min wall as loaded (goal <= {GOAL_MINUTES:.0f}), {c_full / 60:.1f} CPU-min; "
            f"peak {m_full / 1024:.2f} GB by the fit ({a_full / 1024:.2f} GB anonymous), {m_pess / 1024:.2f} GB "
            f"at the steepest measured rate (goal <= {GOAL_GB:.0f} GB)"
        )
        print(
            f"synthetic chartevents file: {np.mean(chart_gb_per_stay) * FULL_STAYS:.1f} GB at full scale; the "
            f"real v3.1 chartevents.csv.gz is about {REAL_CHART_GB:.1f} GB"
        )


if __name__ == "__main__":
    main()
