"""`pytest --profile-suite PATH`: what each test costs, to find where the suite's time and memory go.
Also the wall seconds JAX spent tracing, lowering and compiling during the test (jax.monitoring).

Wall time is useless on a shared machine, so each test (setup, call and teardown, which includes the module
fixtures' teardown after a module's last test) is charged the CPU seconds of this process
(`time.process_time`) plus those of the subprocesses it waited for (`RUSAGE_CHILDREN`), and the change of
this process's resident memory (VmRSS) and of its peak (VmHWM). Linux only (it reads /proc/self/status)."""

from __future__ import annotations

import csv
import os
import resource
import time
from collections import defaultdict

import pytest


def _memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _cpu_seconds() -> tuple[float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


class SuiteProfile:
    def __init__(self, path: str):
        # Under pytest-xdist every worker profiles its own tests: one table per worker.
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.path = f"{path}.{worker}" if worker else path
        self.rows: list[dict] = []
        # Seconds JAX spent tracing, lowering and compiling in this process (wall, from jax.monitoring).
        self.compile_seconds: dict[str, float] = defaultdict(float)
        import jax

        # Backend compiles per program name: [count, seconds], to find programs compiled many times.
        self.programs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

        def record(event: str, seconds: float, **kwargs) -> None:
            if event.startswith("/jax/core/compile/"):
                self.compile_seconds[event.rsplit("/", 1)[1]] += seconds
            if event.endswith("backend_compile_duration") and "fun_name" in kwargs:
                entry = self.programs[str(kwargs["fun_name"])]
                entry[0] += 1
                entry[1] += seconds

        jax.monitoring.register_event_duration_secs_listener(record)

    def _compile_total(self) -> float:
        return sum(self.compile_seconds.values())

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        own0, children0 = _cpu_seconds()
        rss0, peak0 = _memory_mb()
        compile0 = self._compile_total()
        yield
        compile1 = self._compile_total()
        own1, children1 = _cpu_seconds()
        rss1, peak1 = _memory_mb()
        self.rows.append(
            {
                "test": item.nodeid,
                "module": item.nodeid.split("::")[0],
                "cpu_s": round(own1 - own0 + children1 - children0, 3),
                "children_cpu_s": round(children1 - children0, 3),
                "jax_compile_s": round(compile1 - compile0, 3),
                "rss_mb": round(rss1, 1),
                "rss_growth_mb": round(rss1 - rss0, 1),
                "peak_mb": round(peak1, 1),
                "peak_growth_mb": round(peak1 - peak0, 1),
            }
        )

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        with open(self.path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        with open(f"{self.path}.compiles.csv", "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["program", "compiles", "backend_compile_s"])
            for name, (count, seconds) in sorted(self.programs.items(), key=lambda kv: -kv[1][1]):
                writer.writerow([name, count, round(seconds, 3)])
        modules: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for row in self.rows:
            module = modules[row["module"]]
            module["tests"] += 1
            for key in ("cpu_s", "children_cpu_s", "jax_compile_s", "rss_growth_mb", "peak_growth_mb"):
                module[key] += row[key]
            module["rss_after_mb"] = row["rss_mb"]
        write = terminalreporter.write_line
        total = sum(row["cpu_s"] for row in self.rows)
        write(
            f"suite profile: {len(self.rows)} tests, {total:.0f} CPU-s, peak RSS {self.rows[-1]['peak_mb']:.0f} MB, "
            "JAX trace/lower/compile wall s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.compile_seconds.items()))
        )
        write(
            f"{'module':<42} {'tests':>5} {'CPU-s':>7} {'child':>6} {'compile':>7} {'dRSS MB':>8} {'dpeak MB':>8} "
            f"{'RSS after':>9}"
        )
        for name, m in sorted(modules.items(), key=lambda kv: -kv[1]["cpu_s"]):
            write(
                f"{name:<42} {m['tests']:>5.0f} {m['cpu_s']:>7.1f} {m['children_cpu_s']:>6.1f} {m['jax_compile_s']:>7.1f} "
                f"{m['rss_growth_mb']:>8.0f} {m['peak_growth_mb']:>8.0f} {m['rss_after_mb']:>9.0f}"
            )
        write("costliest tests:")
        for row in sorted(self.rows, key=lambda r: -r["cpu_s"])[:25]:
            write(f"  {row['cpu_s']:>6.1f} CPU-s  dpeak {row['peak_growth_mb']:>5.0f} MB  {row['test']}")
        write(f"per-test table: {self.path}; compiles per program: {self.path}.compiles.csv")
