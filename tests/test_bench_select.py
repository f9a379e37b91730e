"""benchmarks/bench_select.py's cross-fitting: folds that partition the episodes, and the choice over folds."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cleansepsis.replay import load_replay

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_select.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_select_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_folds_partition_the_episodes_and_the_full_replay_trains_on_all(bench, tmp_path):
    args = bench.Args(episodes=60, folds=3, seed=4)
    folds, full = bench.fold_replays(args, tmp_path)
    every = set(np.unique(np.asarray(load_replay(full).episode_ids)))
    assert len(every) == 60 and set(np.unique(np.asarray(load_replay(full).data.split))) == {0}  # all train
    held_out = []
    for path in folds:
        replay = load_replay(path)
        split = np.asarray(replay.data.split)
        ids = np.asarray(replay.episode_ids)[np.asarray(replay.data.episode_id)]
        val, train = set(ids[split == 1]), set(ids[split == 0])
        assert val and train and not val & train and val | train == every
        assert set(np.unique(split)) == {0, 1}
        held_out.append(val)
    # every episode is held out exactly once, and the folds are about equal
    assert sorted(e for val in held_out for e in val) == sorted(every)
    assert max(map(len, held_out)) - min(map(len, held_out)) <= 1


def test_cross_fit_choice_by_hand(bench):
    # three configurations, two folds each; "b" has the highest mean FQE (0.7) though "c" wins fold 0
    per_config = {
        "a": {"fqe": [0.50, 0.60], "wdr": [0.9, 0.9], "wis": [np.nan, np.nan]},
        "b": {"fqe": [0.60, 0.80], "wdr": [0.1, np.nan], "wis": [0.2, 0.2]},
        "c": {"fqe": [0.90, 0.30], "wdr": [0.2, 0.2], "wis": [0.1, 0.1]},
        "unscored_on_all": {"fqe": [5.0], "wdr": [5.0], "wis": [5.0]},
    }
    truth = {"a": [0.70, 0.72], "b": [0.80, 0.82], "c": [0.75, 0.75], "only_deployed": [0.99]}
    result = bench.cross_fit_choice(per_config, truth)
    assert result["n_configs"] == 3
    assert result["oracle_best"] == "b" and result["oracle_best_exact"] == pytest.approx(0.81)
    fqe, wdr, wis = (result["methods"][m] for m in ("fqe", "wdr", "wis"))
    assert fqe["config"] == "b" and fqe["estimate"] == pytest.approx(0.7) and fqe["regret"] == pytest.approx(0.0)
    assert fqe["spearman"] == pytest.approx(1.0)  # means 0.55, 0.70, 0.60 rank as the truth 0.71, 0.81, 0.75
    # WDR: b's NaN fold is ignored (mean 0.1); a wins with 0.9, a regret of 0.81 - 0.71
    assert wdr["config"] == "a" and wdr["regret"] == pytest.approx(0.10) and wdr["n_estimates"] == 2
    assert wdr["spearman"] == pytest.approx(-1.0)  # 0.9, 0.1, 0.2 against 0.71, 0.81, 0.75
    # WIS: a has no finite estimate and ranks lowest; b (0.2) beats c (0.1)
    assert wis["config"] == "b" and math.isclose(wis["spearman"], 1.0)


def test_cross_fit_choice_refuses_disjoint_configurations(bench):
    with pytest.raises(ValueError, match="no configuration"):
        bench.cross_fit_choice({"a": {"fqe": [1.0], "wdr": [1.0], "wis": [1.0]}}, {"b": [0.5]})
