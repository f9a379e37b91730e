"""Safety measures on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from cleansepsis import safety


def test_agreement_overall_and_per_level():
    logged = np.array([0, 6, 12, 24])  # (vaso, fluid) = (0,0), (1,1), (2,2), (4,4)
    policy = np.array([0, 7, 17, 4])  # (0,0), (2,1), (2,3), (4,0)
    result = safety.agreement(policy, logged)
    assert result["action"] == 0.25
    assert result["vaso_level"] == 0.75
    assert result["fluid_level"] == 0.5
    assert result["vaso_by_logged_level"] == [1.0, 0.0, 1.0, None, 1.0]
    assert result["fluid_by_logged_level"] == [1.0, 1.0, 0.0, None, 0.0]
    with pytest.raises(safety.SafetyError):
        safety.agreement(policy[:3], logged)


def test_dose_distribution_rows_are_fluid_columns_vaso():
    probs = np.zeros((2, 25))
    probs[0, 5 * 3 + 1] = 1.0  # fluid 3, vaso 1
    probs[1, 5 * 0 + 4] = 1.0  # fluid 0, vaso 4
    out = safety.dose_distributions(probs, np.array([0, 0]))
    joint = np.array(out["policy"]["joint_fluid_by_vaso"])
    assert joint[3, 1] == 0.5 and joint[0, 4] == 0.5
    assert out["policy"]["vaso"] == [0.0, 0.5, 0.0, 0.0, 0.5]
    assert out["clinicians"]["fluid"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_support_and_low_support_rate():
    behavior = np.array([[0.5, 0.495, 0.005], [0.2, 0.2, 0.6]])
    greedy = np.array([[0, 0, 1.0], [0, 0, 1.0]])
    result = safety.support(greedy, behavior, threshold=0.01)
    assert result["support_mass"] == pytest.approx((0.005 + 0.6) / 2)
    assert result["low_support_rate"] == pytest.approx(0.5)
    stochastic = np.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    assert safety.support(stochastic, behavior)["low_support_rate"] == pytest.approx(0.25)


def test_inadmissible_rate():
    mask = np.array([[True, False, False], [True, True, False]])
    probs = np.array([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])
    assert safety.inadmissible_rate(probs, mask) == pytest.approx((1.0 + 0.25) / 2)


def test_festor_hazards_for_policy_and_clinicians():
    step_hours = 4.0
    # state 0: MAP 50, CVP 3: scenarios A and C apply. Clinicians give nothing (hazard in A and C).
    # state 1: MAP 100: scenario B applies; clinicians give 0.8 ug/kg/min (hazard).
    # state 2: MAP 80, balance 12 L, CVP 16: D applies; clinicians give 1200 mL in 4 h = 300 mL/h (hazard).
    # state 3: MAP 50, CVP missing: A applies, C does not; clinicians give vaso 0.1 (no hazard).
    extras = {
        "map_mmhg": np.array([50.0, 100.0, 80.0, 50.0]),
        "cvp_mmhg": np.array([3.0, 8.0, 16.0, np.nan]),
        "cum_balance_ml": np.array([0.0, 0.0, 12_000.0, 0.0]),
        "vaso_ne_eq": np.array([0.0, 0.8, 0.0, 0.1]),
        "fluid_ml": np.array([0.0, 0.0, 1200.0, 0.0]),
    }
    logged = np.array([0, 4, 5 * 4, 1])  # levels consistent with the doses above
    policy = np.array([4, 0, 0, 0])  # max vaso at state 0, nothing elsewhere
    result = safety.hazards(extras, step_hours, policy, logged)
    clin, pol = result["clinicians"], result["policy"]
    assert clin["A"] == {"n_states": 2, "rate": 0.5}
    assert clin["B"]["rate"] == 1.0 and clin["C"] == {"n_states": 1, "rate": 1.0}
    assert clin["D"] == {"n_states": 1, "rate": 1.0}
    # the policy's level-4 vaso gets the median logged level-4 dose (0.8): not hazard A at state 0;
    # at state 3 it gives nothing with MAP 50: hazard A. It gives no fluid at state 0: hazard C.
    assert pol["A"]["rate"] == 0.5
    assert pol["B"]["rate"] == 0.0 and pol["C"]["rate"] == 1.0 and pol["D"]["rate"] == 0.0
    with pytest.raises(safety.SafetyError, match="cvp_mmhg"):
        safety.hazards({k: v for k, v in extras.items() if k != "cvp_mmhg"}, 4.0, policy, logged)


def test_calibration_of_a_perfect_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 20_000
    probs = np.tile([0.7, 0.2, 0.1], (n, 1))
    actions = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    assert safety.calibration(probs, actions)["ece"] < 0.02
    overconfident = np.tile([0.99, 0.005, 0.005], (n, 1))
    result = safety.calibration(overconfident, actions)
    assert result["ece"] == pytest.approx(0.29, abs=0.02)
    assert result["reliability"][-1]["n"] == n
