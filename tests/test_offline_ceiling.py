"""benchmarks/offline_ceiling.py: its planner and noise-free learner recover known answers from an exact model."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from benchmarks import offline_ceiling
from cleansepsis import env

OPTIMAL, GREEDY_CLINICIAN = 0.875142, 0.786826


@pytest.fixture(scope="module")
def exact_counts() -> np.ndarray:
    """Counts proportional to the true transition matrix, as if every admissible pair had 10,000 visits."""
    mask = np.asarray(env.load_params("mean").admissible_mask)
    counts = env.transition_matrix("mean") * 10_000.0 * mask[..., None]
    counts[list(env.TERMINAL_STATES)] = 0.0
    return counts


@pytest.fixture(scope="module")
def scorer() -> offline_ceiling.Scorer:
    return offline_ceiling.Scorer()


def test_planning_on_the_true_model_is_optimal(exact_counts, scorer):
    clinician = np.asarray(env.clinician_policy(scorer.params))
    scores = offline_ceiling.plan(exact_counts, scorer.mask, clinician, prior_weight=0.0, penalty=0.0)
    assert scores.shape == (env.N_STATES, env.N_ACTIONS)
    assert scorer(scores) == pytest.approx(OPTIMAL, abs=2e-4)
    # the clinician fallback is scored as a greedy policy: its value is the greedy clinician's
    assert scorer(clinician) == pytest.approx(GREEDY_CLINICIAN, abs=2e-4)


def test_a_large_count_penalty_falls_back_towards_the_most_visited_actions(exact_counts, scorer):
    clinician = np.asarray(env.clinician_policy(scorer.params))
    tilted = exact_counts * (1.0 + 50.0 * clinician[..., None])  # the clinician's actions are seen far more
    penalised = offline_ceiling.plan(tilted, scorer.mask, clinician, prior_weight=0.0, penalty=1e3)
    unpenalised = offline_ceiling.plan(tilted, scorer.mask, clinician, prior_weight=0.0, penalty=0.0)
    assert scorer(unpenalised) == pytest.approx(OPTIMAL, abs=2e-4)
    assert abs(scorer(penalised) - GREEDY_CLINICIAN) < abs(scorer(penalised) - OPTIMAL)


def test_noise_free_q_learning_improves_on_the_clinician(exact_counts, scorer):
    args = dataclasses.replace(offline_ceiling.Args(), steps=900, report_every=300, hidden=(64, 64))
    returns = offline_ceiling.noise_free_q_learning(exact_counts, scorer, args, alpha=0.0)
    assert len(returns) == 3
    assert returns[-1] > GREEDY_CLINICIAN + 0.02
    assert returns[-1] <= OPTIMAL + 1e-4


def test_a_replay_without_state_indices_is_named(tmp_path):
    path = tmp_path / "mimic.parquet"
    pl.DataFrame({"action": [0, 1]}).write_parquet(path)
    with pytest.raises(SystemExit, match=r"mimic\.parquet: needs columns"):
        offline_ceiling.replay_counts(str(path))
