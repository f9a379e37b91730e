"""Time and peak memory of `data_prep.py mimic` on synthetic MIMIC-IV-shaped data of growing size, with a
projection to full MIMIC-IV v3.1 (94,458 ICU stays; 433 million chartevents rows, 158 million labevents rows).

Each size is generated once into --cache-dir (not timed), then the pipeline runs in a fresh process whose wall
time and peak resident memory (wait4 rusage) are measured. As a reference measured in the same run, a bare
streaming pass that only decompresses, parses and counts chartevents + labevents gives the read floor; the
ratio pipeline / floor is less sensitive to how busy the shared machine is than the seconds are.

Projection: least-squares line through (stays, seconds) and (stays, peak MB), evaluated at 94,458 stays. The
synthetic tables have MIMIC-IV's rows per stay, so cost per stay carries over; the cohort share with suspected
infection (about half) is also close to MIMIC-IV's.

    uv run python benchmarks/bench_data_prep.py --sizes 200 1000 3000
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

FULL_STAYS = 94_458
GOAL_MINUTES, GOAL_GB = 20.0, 8.0
REAL_CHART_GB = 6.6 * 433e6 / 1e9


@dataclass(frozen=True)
class Args:
    sizes: list[int] = field(default_factory=lambda: [200, 1000, 3000])
    """Numbers of synthetic ICU stays to measure."""
    cache_dir: Path = Path(".cache/bench_data_prep")
    """Where the synthetic inputs are kept between runs (generated once per size and seed)."""
    format: str = "csv.gz"
    """Input format of the synthetic tables (PhysioNet ships csv.gz)."""
    seed: int = 0
    """Seed of the synthetic data."""
    repeats: int = 1
    """Pipeline runs per size; the median is reported."""


def measure(code: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of `python -c code` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: benchmark step failed: {code}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def main() -> None:
    args = tyro.cli(Args)
    rows = []
    size_per_stay: list[float] = []
    for stays in args.sizes:
        data = args.cache_dir / f"synth_{stays}_{args.seed}_{args.format}"
        if not data.exists():
            print(f"generating {stays} stays into {data} ...", file=sys.stderr, flush=True)
            measure(
                "from pathlib import Path; from cleansepsis.mimic.synth import SynthArgs, generate; "
                f"generate(SynthArgs(out=Path({str(data)!r}), stays={stays}, seed={args.seed}, "
                f"format={args.format!r}, quiet=True))"
            )
        suffix = args.format
        floor_s, _, _ = measure(
            "import polars as pl; "
            + "; ".join(
                f"pl.scan_{'parquet' if suffix == 'parquet' else 'csv'}({str(data / t)!r})"
                ".select(pl.len()).collect(engine='streaming')"
                for t in (f"icu/chartevents.{suffix}", f"hosp/labevents.{suffix}")
            )
        )
        runs = []
        for _ in range(args.repeats):
            out = args.cache_dir / f"out_{stays}"
            runs.append(
                measure(
                    "from pathlib import Path; from cleansepsis.mimic.pipeline import MimicArgs, run; "
                    f"run(MimicArgs(mimic_dir=Path({str(data)!r}), out=Path({str(out)!r}), overwrite=True, quiet=True))"
                )
            )
        seconds = float(np.median([r[0] for r in runs]))
        cpu = float(np.median([r[1] for r in runs]))
        peak = float(max(r[2] for r in runs))
        rows.append((stays, seconds, floor_s, peak, cpu))
        chart_gz = data / f"icu/chartevents.{suffix}"
        size_per_stay.append(chart_gz.stat().st_size / stays)
        print(
            f"{stays:>7} stays: pipeline {seconds:7.1f} s wall, {cpu:7.1f} s CPU, read floor {floor_s:6.1f} s "
            f"(x{seconds / floor_s:4.2f}), peak {peak:7.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    load = os.getloadavg()
    print(
        f"\nload average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores\n"
    )
    print("| stays | pipeline wall s | pipeline CPU s | read floor wall s | wall / floor | peak MB |")
    print("|---|---|---|---|---|---|")
    for stays, seconds, floor_s, peak, cpu in rows:
        print(
            f"| {stays:,} | {seconds:.1f} | {cpu:.1f} | {floor_s:.1f} | {seconds / floor_s:.2f} | {peak:.0f} |"
        )
    if len(rows) >= 2:
        x = np.array([r[0] for r in rows], float)
        t_fit = np.polyfit(x, [r[1] for r in rows], 1)
        m_fit = np.polyfit(x, [r[3] for r in rows], 1)
        f_fit = np.polyfit(x, [r[2] for r in rows], 1)
        c_fit = np.polyfit(x, [r[4] for r in rows], 1)
        t_full, m_full, f_full, c_full = (np.polyval(f, FULL_STAYS) for f in (t_fit, m_fit, f_fit, c_fit))
        print(
            f"\nlinear fit: {t_fit[0] * 1000:.1f} s per 1,000 stays + {t_fit[1]:.1f} s fixed; "
            f"{m_fit[0] * 1000:.0f} MB per 1,000 stays + {m_fit[1]:.0f} MB fixed"
        )
        gz_full = float(np.mean(size_per_stay)) * FULL_STAYS / 1e9
        print(
            f"synthetic chartevents file: {gz_full:.1f} GB at full scale; the real v3.1 chartevents.csv.gz is "
            f"about {REAL_CHART_GB:.1f} GB (6.6 B/row in the demo x 433e6 rows). polars holds a .csv.gz's "
            "compressed bytes while it streams it, so peak memory tracks the largest compressed table."
        )
        print(
            f"projected full MIMIC-IV v3.1 ({FULL_STAYS:,} stays): {t_full / 60:.1f} min "
            f"(goal <= {GOAL_MINUTES:.0f}), peak {m_full / 1024:.2f} GB (goal <= {GOAL_GB:.0f}); "
            f"read floor alone {f_full / 60:.1f} min"
        )
        print(
            f"CPU time fit: {c_fit[0] * 1000:.1f} s per 1,000 stays + {c_fit[1]:.1f} s fixed -> "
            f"{c_full / 60:.1f} CPU-min at full scale, i.e. at most that many minutes of wall time on an idle "
            "machine with one free core (polars spreads the scans over both cores)"
        )


if __name__ == "__main__":
    main()
