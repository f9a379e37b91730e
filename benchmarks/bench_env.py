"""Steps per second of the JAX ICU-Sepsis env vs the reference icu-sepsis Gymnasium env, measured in the
same run (interleaved rounds, medians). Same as `python env_sepsis.py bench`.

    uv run python benchmarks/bench_env.py [--json] [--n-envs 8192] [--n-steps 500] [--repeats 5]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tyro

from env_sepsis import bench

if __name__ == "__main__":
    tyro.cli(bench)
