"""benchmarks/study.py --quick: every part runs on tiny budgets and the report agrees with the learners."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("_study_under_test", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("study")
    result = module.main(["--quick", "--out", str(out)])
    return module, result, out


def test_quick_study_writes_every_part(study):
    module, result, out = study
    for name in ("study.md", "study.json", "data_efficiency.png", "actions_300.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "study.json").read_text())["data_efficiency"].keys() == {"300"}
    text = (out / "study.md").read_text()
    assert "## Wall time per part" in text and "## Safety of the FQE-selected policies at 300 episodes" in text
    assert {k for k in result["seconds"]} >= {"300 episodes: train", "total"}
    for n, by_learner in result["data_efficiency"].items():
        assert set(by_learner) == set(module.LEARNERS)
        for learner, cell in by_learner.items():
            assert len(cell["per_seed"]) == 2, (n, learner)
            for seed in cell["per_seed"].values():
                # the oracle is the best checkpoint: never below the final or the FQE-selected one
                assert seed["oracle"] >= seed["final"] - 1e-9 and seed["oracle"] >= seed["selected"] - 1e-9
    cql, iql = result["sweeps"]["300"]["cql.py alpha sweep"], result["sweeps"]["300"]["iql.py tau x beta grid"]
    assert [row["setting"]["alpha"] for row in cql] == [0.0, 0.005]
    assert sorted((row["setting"]["tau"], row["setting"]["beta"]) for row in iql) == [(0.9, 3.0), (0.9, 30.0)]
    assert [row["learner"] for row in result["safety"]["300"]] == list(module.LEARNERS)
    for row in result["safety"]["300"]:
        assert 0 <= row["agreement"] <= 1 and 0 <= row["support_mass"] <= 1
        assert row["inadmissible_rate"] == pytest.approx(0.0, abs=1e-6)  # every policy acts among admissible actions


def test_exact_returns_match_the_learners_own(study):
    """The study scores a checkpoint as its learner does: greedy for cql / iql, the softmax clone for bc."""
    _, result, out = study
    checked = 0
    for n, by_learner in result["data_efficiency"].items():
        for learner, folder in (("DDQN", "cql"), ("IQL", "iql"), ("BC", "bc")):
            summaries = sorted(out.glob(f"n{n}_{folder}*/summary.json"))
            finals = {}
            for path in summaries:
                summary = json.loads(path.read_text())
                for run in summary["runs"]:
                    if learner == "DDQN" and run["hparams"].get("alpha") != 0.0:
                        continue
                    if learner == "IQL" and (run["hparams"].get("tau"), run["hparams"].get("beta")) != (0.9, 30.0):
                        continue
                    finals.setdefault(run["seed"], []).append((summary.get("updates_per_policy", 0), run["exact_return"]))
            for seed, cell in by_learner[learner]["per_seed"].items():
                expected = max(finals[int(seed)])[1]  # the longest run's final policy
                assert cell["final"] == pytest.approx(expected, abs=2e-4), (n, learner, seed)
                checked += 1
    assert checked == 3 * 2  # three learners x two seeds
