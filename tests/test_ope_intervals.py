"""The intervals for small held-out sets: tabular FQE's partial-identification interval on a tiny MDP whose
never-logged action is far from the clinicians', and the delta-method, bootstrap-t and BCa intervals of
WDR on a heavy-tailed sample, each against a hand computation."""

from __future__ import annotations

from statistics import NormalDist

import jax
import numpy as np
import pytest
from test_ope import evaluate, make_transitions

from cleansepsis import ope

# Two steps: s0 -a0-> s1 (reward 0), then at s1 the clinicians always took a0 -> terminal, reward 1 in 8
# of the 10 logged episodes and 0 in 2 (mean 0.8). The target takes a1 at s1 with probability 0.7; a1
# leads to death (reward 0), which no logged transition shows. Exact value: 0.3 * 0.8 + 0.7 * 0 = 0.24.
EXACT = 0.3 * 0.8


def unlogged_action_data():
    rewards = [1.0] * 8 + [0.0] * 2
    return make_transitions([[(0, 0, 0.0, 1, False), (1, 0, r, 3, True)] for r in rewards])


def target_table() -> np.ndarray:
    table = np.full((8, 2), 0.5, np.float32)
    table[0] = (1.0, 0.0)
    table[1] = (0.3, 0.7)
    return table


def test_identified_interval_covers_a_never_logged_action_the_fitting_interval_cannot_see():
    result = evaluate(unlogged_action_data(), target_table(), value_bounds=(0.0, 1.0))
    fqe = result["estimators"]["fqe"]
    # the fit gives a1 the clinicians' value at s1: 0.8, and every resample agrees that it is about 0.8
    assert fqe["estimate"] == pytest.approx(0.8, abs=1e-5)
    assert not fqe["ci_low"] <= EXACT <= fqe["ci_high"]
    assert not fqe["ci_basic"][0] <= EXACT <= fqe["ci_basic"][1]
    # by hand: a1's Q is only known to lie in [0, 1], so the value lies in [0.3 * 0.8, 0.3 * 0.8 + 0.7]
    assert fqe["identified_set"] == pytest.approx([0.24, 0.94], abs=1e-5)
    low, high = fqe["ci_identified"]
    assert low <= EXACT <= high and low <= fqe["ci_low"] and high >= fqe["ci_high"]
    assert fqe["value_bounds"] == [0.0, 1.0] and "partial identification" in fqe["interval_identified"]
    # other bounds move the set by exactly the target's mass on the unidentified action
    wide = evaluate(unlogged_action_data(), target_table(), value_bounds=(-1.0, 2.0))["estimators"]["fqe"]
    assert wide["identified_set"] == pytest.approx([0.24 - 0.7, 0.24 + 1.4], abs=1e-5)
    assert wide["estimate"] == pytest.approx(fqe["estimate"])  # the point estimate is unchanged


def test_identified_set_collapses_to_the_estimate_when_every_target_action_is_logged():
    table = target_table()
    table[1] = (1.0, 0.0)  # the target only takes the logged action
    fqe = evaluate(unlogged_action_data(), table, value_bounds=(0.0, 1.0))["estimators"]["fqe"]
    assert fqe["identified_set"] == pytest.approx([0.8, 0.8], abs=1e-5)


def test_default_value_bounds_are_the_range_of_the_logged_returns_to_go():
    data = unlogged_action_data()
    layout = ope.episode_layout(data.episode_id, data.t)
    assert ope.returns_to_go_range(data, layout, 1.0) == (0.0, 1.0)
    fqe = evaluate(data, target_table())["estimators"]["fqe"]
    assert fqe["value_bounds"] == [0.0, 1.0]
    with pytest.raises(ope.OPEError, match="value bounds"):
        evaluate(data, target_table(), value_bounds=(1.0, 0.0))


# One-step episodes with heavy-tailed weights: the behaviour took the logged action with probability 0.02
# in 3 of 40 episodes (weight 25 for a target with probability 0.5) and 0.5 in the others (weight 1).
N = 40
REWARD = np.array([1.0, 0.0, 1.0] + [1.0, 0.0] * 18 + [1.0])
Q_LOGGED = np.linspace(0.2, 0.8, N)
V_STATE = np.linspace(0.7, 0.3, N)
BEHAVIOUR = np.where(np.arange(N) < 3, 0.02, 0.5)


def heavy_tailed_inputs() -> ope.ISInputs:
    layout = ope.episode_layout(np.arange(N), np.zeros(N, int))
    return ope.make_is_inputs(
        layout, REWARD, np.full(N, 0.5), BEHAVIOUR, 1.0, q_logged=Q_LOGGED, v_state=V_STATE
    )


def wdr_by_hand(c: np.ndarray) -> tuple[float, float, np.ndarray]:
    """WDR of one-step episodes with counts c, its influence values and delta-method variance, derived by
    hand: theta = sum c w (r - q) / sum c w + sum c v / n, so n d theta / d c_i =
    (n w_i / W) ((r_i - q_i) - A / W) + (v_i - mean v)."""
    w = 0.5 / BEHAVIOUR
    n, weight_sum = c.sum(), (c * w).sum()
    residual = (c * w * (REWARD - Q_LOGGED)).sum()
    mean_v = (c * V_STATE).sum() / n
    theta = residual / weight_sum + mean_v
    influence = n * w / weight_sum * ((REWARD - Q_LOGGED) - residual / weight_sum) + (V_STATE - mean_v)
    return theta, (c * influence**2).sum() / n**2, influence


def test_wdr_intervals_for_heavy_tailed_weights_match_the_hand_computation():
    counts = ope.bootstrap_counts(jax.random.key(3), N, 400)
    result = ope.is_estimates(heavy_tailed_inputs(), counts)["wdr"]
    theta, variance, influence = wdr_by_hand(np.ones(N))
    se = np.sqrt(variance)
    assert result["estimate"] == pytest.approx(theta, abs=1e-5)
    assert result["se"] == pytest.approx(se, rel=1e-4)
    z = NormalDist().inv_cdf(0.975)
    assert result["ci_normal"] == pytest.approx([theta - z * se, theta + z * se], rel=1e-4)
    # bootstrap-t: every resample studentized by its own hand-computed standard error
    boot = [wdr_by_hand(np.asarray(c, np.float64)) for c in np.asarray(counts)]
    t = np.array([(b[0] - theta) / np.sqrt(b[1]) for b in boot])
    t_lo, t_hi = np.quantile(t, [0.025, 0.975], method="inverted_cdf")
    # (float32 against float64: the extreme t of resamples that drop the heavy episodes differ by ~0.2%)
    assert result["ci_bootstrap_t"] == pytest.approx([theta - t_hi * se, theta - t_lo * se], rel=1e-2)
    # BCa: z0 from the share of resamples below the estimate, the acceleration from the influence values
    values = np.array([b[0] for b in boot])
    z0 = NormalDist().inv_cdf(np.mean(values < theta))
    accel = (influence**3).sum() / (6 * (influence**2).sum() ** 1.5)
    shares = [NormalDist().cdf(z0 + (z0 + zq) / (1 - accel * (z0 + zq))) for zq in (-z, z)]
    assert result["ci_bca"] == pytest.approx(list(np.quantile(values, shares)), abs=2e-4)
    # the three heavy episodes skew the estimate: the studentized interval is not symmetric about it
    low, high = result["ci_bootstrap_t"]
    assert abs((high - theta) - (theta - low)) > 0.05 * (high - low)


def test_wdr_interval_refits_fqe_on_every_resample_as_computed_by_hand():
    """One-step episodes from one state: the clinicians took a0 (probability 0.9) in 27 and a1 (0.1) in 3;
    the target takes each with 0.5, so a1's weight is 5. On a resample with counts c, tabular FQE's Q(a)
    is the count-weighted mean reward of a (the state's mean when a is not drawn), and WDR =
    sum c w (r - Q(a)) / sum c w + sum_a pi(a) Q(a). The reported interval is the percentile interval
    of that over the resamples; the old one held the full-data Q fixed."""
    rewards = [1.0 if i % 3 else 0.0 for i in range(27)] + [1.0, 0.0, 0.0]
    actions = [0] * 27 + [1] * 3
    data = make_transitions([[(0, a, r, 3, True)] for a, r in zip(actions, rewards, strict=True)])
    behaviour = np.where(np.asarray(actions) == 0, 0.9, 0.1)
    table = np.full((8, 2), 0.5, np.float32)
    states = np.asarray(data.state_index)
    result = ope.off_policy_evaluation(
        data, table[states], table[np.asarray(data.next_state_index)], behaviour, gamma=1.0, epsilon=0.0,
        n_boot=50, n_states=8, value_bounds=(0.0, 1.0),
    )  # fmt: skip
    wdr = result["estimators"]["wdr"]
    counts = np.asarray(ope.bootstrap_counts(jax.random.fold_in(jax.random.key(0), 0), 30, 50), np.float64)
    r, a, w = np.asarray(rewards), np.asarray(actions), 0.5 / behaviour

    def wdr_refit(c):
        state_mean = (c * r).sum() / c.sum()
        q = [
            (c * r * (a == k)).sum() / (c * (a == k)).sum() if (c * (a == k)).sum() > 0 else state_mean
            for k in (0, 1)
        ]
        q_logged = np.asarray(q)[a]
        return (c * w * (r - q_logged)).sum() / (c * w).sum() + 0.5 * (q[0] + q[1])

    by_hand = np.array([wdr_refit(c) for c in counts])
    assert [wdr["ci_low"], wdr["ci_high"]] == pytest.approx(
        list(np.quantile(by_hand, [0.025, 0.975])), abs=1e-5
    )
    assert wdr["ci_refit"] == [wdr["ci_low"], wdr["ci_high"]]
    assert wdr["estimate"] == pytest.approx(wdr_refit(np.ones(30)), abs=1e-5)
    # the old interval (Q fixed at the full-data fit) differs: it omits the model's own resampling noise
    assert wdr["ci_fixed_model"] != pytest.approx(wdr["ci_refit"], abs=1e-3)
