"""`pytest --profile-suite PATH`: what each test costs, to find where the suite's time and memory go.

Wall time is useless on a shared machine, so each test (setup, call and teardown, which includes the module
fixtures' teardown after a module's last test) is charged the CPU seconds of this process
(`time.process_time`) plus those of the subprocesses it waited for (`RUSAGE_CHILDREN`), and the change of
this process's resident memory (VmRSS) and of its peak (VmHWM). Linux only (it reads /proc/self/status)."""

from __future__ import annotations

import csv
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
        self.path = path
        self.rows: list[dict] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        own0, children0 = _cpu_seconds()
        rss0, peak0 = _memory_mb()
        yield
        own1, children1 = _cpu_seconds()
        rss1, peak1 = _memory_mb()
        self.rows.append(
            {
                "test": item.nodeid,
                "module": item.nodeid.split("::")[0],
                "cpu_s": round(own1 - own0 + children1 - children0, 3),
                "children_cpu_s": round(children1 - children0, 3),
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
        modules: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for row in self.rows:
            module = modules[row["module"]]
            module["tests"] += 1
            for key in ("cpu_s", "children_cpu_s", "rss_growth_mb", "peak_growth_mb"):
                module[key] += row[key]
            module["rss_after_mb"] = row["rss_mb"]
        write = terminalreporter.write_line
        total = sum(row["cpu_s"] for row in self.rows)
        write(
            f"suite profile: {len(self.rows)} tests, {total:.0f} CPU-s, peak RSS {self.rows[-1]['peak_mb']:.0f} MB"
        )
        write(
            f"{'module':<42} {'tests':>5} {'CPU-s':>7} {'child':>6} {'dRSS MB':>8} {'dpeak MB':>8} {'RSS after':>9}"
        )
        for name, m in sorted(modules.items(), key=lambda kv: -kv[1]["cpu_s"]):
            write(
                f"{name:<42} {m['tests']:>5.0f} {m['cpu_s']:>7.1f} {m['children_cpu_s']:>6.1f} "
                f"{m['rss_growth_mb']:>8.0f} {m['peak_growth_mb']:>8.0f} {m['rss_after_mb']:>9.0f}"
            )
        write("costliest tests:")
        for row in sorted(self.rows, key=lambda r: -r["cpu_s"])[:25]:
            write(f"  {row['cpu_s']:>6.1f} CPU-s  dpeak {row['peak_growth_mb']:>5.0f} MB  {row['test']}")
        write(f"per-test table: {self.path}")
