"""Off-policy estimators against values computed by hand, the bootstrap over episodes, and the intervals for
small held-out sets: tabular FQE's partial-identification interval on a tiny MDP whose never-logged action is
far from the clinicians', and the delta-method, bootstrap-t and BCa intervals of WDR on a heavy-tailed sample,
each against a hand computation. (One module: the small datasets share compiled programs.)"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import ope, safety
from cleansepsis.replay import Transitions


def make_transitions(episodes: list[list[tuple[int, int, float, int, bool]]], n_actions: int = 2) -> Transitions:
    """episodes: per episode a list of (state, action, reward, next_state, terminated) steps."""
    rows = [(e, t, *step) for e, steps in enumerate(episodes) for t, step in enumerate(steps)]
    episode, t, state, action, reward, next_state, terminated = (np.array(c) for c in zip(*rows, strict=True))
    n = len(rows)
    obs = np.eye(8, dtype=np.float32)[state]
    next_obs = np.eye(8, dtype=np.float32)[next_state]
    return Transitions(
        obs=jnp.asarray(obs),
        action=jnp.asarray(action, jnp.int32),
        reward=jnp.asarray(reward, jnp.float32),
        next_obs=jnp.asarray(next_obs),
        terminated=jnp.asarray(terminated.astype(bool)),
        truncated=jnp.zeros(n, bool),
        episode_id=jnp.asarray(episode, jnp.int32),
        t=jnp.asarray(t, jnp.int32),
        split=jnp.zeros(n, jnp.int8),
        state_index=jnp.asarray(state, jnp.int32),
        next_state_index=jnp.asarray(next_state, jnp.int32),
        behavior_prob=jnp.full(n, 0.5, jnp.float32),
        action_mask=jnp.ones((n, n_actions), bool),
        next_action_mask=jnp.ones((n, n_actions), bool),
    )


# Two-step MDP: s0 -a0-> s1 (r 0), s0 -a1-> s2 (r 0.5); s1: a0 r 1, a1 r 0; s2: a0 r 0.2, a1 r 1; then the
# terminal state 3. The behaviour is uniform and each of the 4 trajectories is logged once, so every
# consistent estimator must return the exact value.
REWARD = {(0, 0): 0.0, (0, 1): 0.5, (1, 0): 1.0, (1, 1): 0.0, (2, 0): 0.2, (2, 1): 1.0}


def two_step_data() -> Transitions:
    episodes = []
    for a0 in (0, 1):
        s1 = 1 + a0
        for a1 in (0, 1):
            episodes.append([(0, a0, REWARD[0, a0], s1, False), (s1, a1, REWARD[s1, a1], 3, True)])
    return make_transitions(episodes)


def table_policy(p_a0: dict[int, float]) -> np.ndarray:
    table = np.full((8, 2), 0.5, np.float32)
    for state, p in p_a0.items():
        table[state] = (p, 1 - p)
    return table


def evaluate(data: Transitions, table: np.ndarray, gamma: float = 1.0, **kwargs) -> dict:
    return ope.off_policy_evaluation(
        data,
        table[np.asarray(data.state_index)],
        table[np.asarray(data.next_state_index)],
        np.asarray(data.behavior_prob),
        gamma=gamma,
        epsilon=0.0,
        n_boot=20,
        n_states=8,
        **kwargs,
    )


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_every_estimator_gets_the_hand_computed_value_of_a_stochastic_policy(gamma):
    table = table_policy({0: 0.8, 1: 0.9, 2: 0.3})
    # by hand: 0.8 * (0 + g * 0.9) + 0.2 * (0.5 + g * (0.3 * 0.2 + 0.7 * 1))
    exact = 0.8 * gamma * 0.9 + 0.2 * (0.5 + gamma * 0.76)
    result = evaluate(two_step_data(), table, gamma)
    for name in ope.ESTIMATORS:
        assert result["estimators"][name]["estimate"] == pytest.approx(exact, abs=1e-5), name


def test_deterministic_target_keeps_only_matching_trajectories():
    table = table_policy({0: 1.0, 1: 1.0, 2: 0.0})  # a0 then a0: return 1
    # a behaviour model off by a mile on top: four episodes, one carrying all the weight, so every
    # small-data warning fires, in the result of off_policy_evaluation
    result = evaluate(two_step_data(), table, behavior_ece=0.39)
    for name in ope.ESTIMATORS:
        assert result["estimators"][name]["estimate"] == pytest.approx(1.0, abs=1e-5), name
    weights = result["weights"]
    assert weights["share_zero_weight"] == pytest.approx(0.75)
    assert weights["max_weight"] == pytest.approx(4.0)
    assert weights["ess"] == pytest.approx(1.0)
    assert weights["max_weight_share"] == pytest.approx(1.0)
    codes = [w["code"] for w in result["warnings"]]
    assert codes == ["small-held-out-set", "low-ess", "dominant-weight", "behavior-miscalibrated"]
    assert result["n_episodes"] == 4 and "only 4 held-out episodes" in result["warnings"][0]["message"]


# The small datasets below have 4 episodes, as two_step_data: the tests share its compiled programs.


def test_one_step_episodes():
    steps = [(0, 0, 1.0, 3, True), (0, 1, 0.0, 3, True), (0, 0, 1.0, 3, True), (0, 0, 0.0, 3, True)]
    data = make_transitions([[step] for step in steps])
    table = table_policy({0: 0.25})
    # WIS: weights 0.5, 1.5, 0.5, 0.5 on returns 1, 0, 1, 0 -> 1 / 3
    result = evaluate(data, table)
    assert result["estimators"]["wis"]["estimate"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["estimators"]["pdwis"]["estimate"] == pytest.approx(1 / 3, abs=1e-6)
    # FQE sees Q(s0, a0) = 2/3, Q(s0, a1) = 0, so 0.25 * 2/3 exactly; WDR corrects to the same model value
    # (its weighted residuals 0.5 * (1/3 + 1/3 - 2/3) + 1.5 * 0 sum to zero)
    assert result["estimators"]["fqe"]["estimate"] == pytest.approx(1 / 6, abs=1e-6)
    assert result["estimators"]["wdr"]["estimate"] == pytest.approx(1 / 6, abs=1e-6)


def test_all_weights_zero_gives_nan_not_a_number_that_looks_real():
    data = make_transitions([[(0, 1, r, 3, True)] for r in (0.0, 1.0, 1.0, 0.0)])
    result = evaluate(data, table_policy({0: 1.0}))
    assert np.isnan(result["estimators"]["wis"]["estimate"])
    assert np.isnan(result["estimators"]["pdwis"]["estimate"])
    assert result["weights"]["ess"] == 0.0


def test_wis_and_per_decision_wis_differ_as_computed_by_hand():
    # two trajectories, each logged twice (4 episodes, as two_step_data); every ratio below is as with one each
    data = make_transitions(
        [
            [(0, 0, 1.0, 1, False), (1, 0, 0.0, 3, True)],
            [(0, 1, 0.0, 1, False), (1, 1, 0.0, 3, True)],
        ]
        * 2
    )
    table = table_policy({0: 0.75, 1: 0.9})
    # rho: ep0 (1.5, 1.8) -> W 2.7, G 1; ep1 (0.5, 0.2) -> W 0.1, G 0
    # WIS = 2.7 / 2.8; PDWIS: t0 (1.5 * 1) / 2.0 = 0.75, t1 0 / 2.8 = 0 -> 0.75
    result = evaluate(data, table)
    assert result["estimators"]["wis"]["estimate"] == pytest.approx(2.7 / 2.8, abs=1e-6)
    assert result["estimators"]["pdwis"]["estimate"] == pytest.approx(0.75, abs=1e-6)
    # clipping the cumulative weights at 1: ep0 (1, 1), ep1 (0.5, 0.1) -> WIS 1 / 1.1; PDWIS 1 / 1.5
    result = evaluate(data, table, clip=1.0)
    assert result["estimators"]["wis"]["estimate"] == pytest.approx(1 / 1.1, abs=1e-6)
    assert result["estimators"]["pdwis"]["estimate"] == pytest.approx(1 / 1.5, abs=1e-6)
    assert result["weights"]["share_clipped"] == pytest.approx(0.5)
    assert result["weights"]["max_weight"] == pytest.approx(2.7)


def test_softening_mixes_in_uniform_over_admissible_actions():
    probs = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = jnp.array([[True, True, False], [True, True, True]])
    soft = np.asarray(ope.soften(probs, 0.1, mask))
    np.testing.assert_allclose(soft, [[0.95, 0.05, 0.0], [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]], atol=1e-6)
    with pytest.raises(ope.OPEError, match="epsilon"):
        ope.soften(probs, 1.5)


def test_episode_with_a_gap_in_steps_is_refused():
    with pytest.raises(ope.OPEError, match="without gaps"):
        ope.episode_layout(np.array([0, 0, 1]), np.array([0, 2, 0]))


def test_warnings_name_each_small_data_problem_and_stay_quiet_otherwise():
    big = {"n_episodes": 10_000, "ess": 9_000.0, "max_weight": 3.0, "max_weight_share": 0.0003}
    assert ope.small_data_warnings(big, behavior_ece=0.01) == []
    assert ope.small_data_warnings(big) == []  # calibration unknown: no warning about it
    small = {"n_episodes": 6, "ess": 1.0, "max_weight": 6.5e24, "max_weight_share": 1.0}
    codes = [w["code"] for w in ope.small_data_warnings(small, behavior_ece=0.39)]
    assert codes == ["small-held-out-set", "low-ess", "dominant-weight", "behavior-miscalibrated"]
    # each threshold on its own
    assert [w["code"] for w in ope.small_data_warnings({**big, "ess": 900.0})] == ["low-ess"]
    assert [w["code"] for w in ope.small_data_warnings({**big, "max_weight_share": 0.3})] == ["dominant-weight"]
    assert [w["code"] for w in ope.small_data_warnings(big, behavior_ece=0.11)] == ["behavior-miscalibrated"]
    assert [w["code"] for w in ope.small_data_warnings({**big, "n_episodes": 99, "ess": 99.0})] == [
        "small-held-out-set"
    ]
    # a NaN share (all weights zero) warns rather than passing silently
    assert "dominant-weight" in [w["code"] for w in ope.small_data_warnings({**big, "max_weight_share": np.nan})]


def test_neural_fqe_interval_grows_when_every_resample_is_refitted():
    data = two_step_data()  # its 4 episodes: the importance-sampling programs of the tests above
    table = table_policy({0: 0.8, 1: 0.9, 2: 0.3})
    config = ope.NeuralFQEConfig(hidden=16, n_iterations=4, steps_per_iteration=30, batch_size=32)
    widths = {}
    for refits in (0, 8):
        result = evaluate(data, table, fqe="neural", neural_config=config, neural_refits=refits)
        fqe = result["estimators"]["fqe"]
        widths[refits] = fqe["ci_high"] - fqe["ci_low"]
        assert fqe["n_refits"] == refits and fqe["ci_low"] - 1e-6 <= fqe["estimate"] <= fqe["ci_high"] + 1e-6
    # every episode starts in s0, so V(s_0) resampled under one fit has no spread at all; refits on
    # resamples of the episodes (and fresh initialisations) carry the fit's own uncertainty
    assert widths[0] < 1e-6 < 0.01 < widths[8]
    with pytest.raises(ope.OPEError, match="n_refits"):
        evaluate(data, table, fqe="neural", neural_config=config, neural_refits=-1)


def test_zero_behaviour_probability_is_refused():
    data = two_step_data()
    with pytest.raises(ope.OPEError, match="behaviour probability"):
        ope.off_policy_evaluation(
            data, np.full((8, 2), 0.5), np.full((8, 2), 0.5), np.zeros(8), gamma=1.0, n_states=8
        )


# ----------------------------------------------------------------------------------------------
# Bootstrap over episodes


def long_and_short_episodes(n_each: int) -> Transitions:
    # long episodes: 10 steps of reward 0.1 (return 1); short ones: one step of reward 0 (return 0)
    long = [[(0, 0, 0.1, 0, False)] * 9 + [(0, 0, 0.1, 3, True)]]
    short = [[(0, 0, 0.0, 3, True)]]
    return make_transitions((long + short) * n_each)


def test_bootstrap_resamples_whole_episodes():
    n_each = 200
    data = long_and_short_episodes(n_each)
    layout = ope.episode_layout(data.episode_id, data.t)
    inputs = ope.make_is_inputs(
        layout, np.asarray(data.reward), np.full(data.size, 0.5), np.asarray(data.behavior_prob), 1.0
    )
    counts = ope.bootstrap_counts(jax.random.key(3), layout.n_episodes, 300)
    assert counts.shape == (300, 2 * n_each)
    np.testing.assert_array_equal(np.asarray(counts.sum(1)), 2 * n_each)
    boot = np.asarray(jax.jit(jax.vmap(ope.wis, in_axes=(None, 0)))(inputs, counts))  # one program, not eager ops
    # each resample is a mean of whole-episode returns (0 or 1) over 400 episodes: a multiple of 1/400.
    # Resampling transitions would mix 0.1-rewards from partial episodes and break this.
    np.testing.assert_allclose(boot * 2 * n_each, np.round(boot * 2 * n_each), atol=1e-3)
    # and its spread is the binomial one of 400 episodes, sqrt(0.25 / 400) = 0.025
    assert 0.02 < boot.std() < 0.03
    # and is_estimates reports that spread (off_policy_evaluation hands it bootstrap_counts' resamples:
    # test_wdr_interval_refits_fqe_on_every_resample_as_computed_by_hand rebuilds them one by one)
    assert ope.is_estimates(inputs, counts)["wis"]["boot_std"] == pytest.approx(float(boot.std()), rel=1e-5)


def test_a_resample_equals_the_estimate_on_the_duplicated_episodes():
    table = table_policy({0: 0.8, 1: 0.9, 2: 0.3})
    episodes = []
    rng = np.random.default_rng(0)
    for _ in range(12):
        a0, a1 = rng.integers(0, 2, 2)
        s1 = 1 + a0
        episodes.append([(0, a0, REWARD[0, a0], s1, False), (s1, a1, REWARD[s1, a1], 3, True)])
    data = make_transitions(episodes)
    layout = ope.episode_layout(data.episode_id, data.t)

    def inputs_for(d, lay):
        probs = table[np.asarray(d.state_index), np.asarray(d.action)]
        return ope.make_is_inputs(lay, np.asarray(d.reward), probs, np.asarray(d.behavior_prob), 1.0)

    counts = np.asarray(ope.bootstrap_counts(jax.random.key(1), 12, 5))
    estimators = [jax.jit(fn) for fn in (ope.wis, ope.pdwis)]  # a resample has 12 episodes: one program each
    for c in counts:
        duplicated = make_transitions([ep for ep, k in zip(episodes, c, strict=True) for _ in range(int(k))])
        dup_inputs = inputs_for(duplicated, ope.episode_layout(duplicated.episode_id, duplicated.t))
        ones = jnp.ones(int(c.sum()))
        for fn in estimators:
            assert float(fn(inputs_for(data, layout), jnp.asarray(c))) == pytest.approx(
                float(fn(dup_inputs, ones)), abs=1e-6
            )


# ----------------------------------------------------------------------------------------------
# ICU-Sepsis: FQE of the clinicians against their exact value


def test_fqe_and_wis_of_the_clinicians_on_icu_sepsis_are_close_to_the_exact_value():
    from cleansepsis import env
    from cleansepsis.icu_replay import default_replay_path
    from cleansepsis.replay import load_replay

    replay = load_replay(default_replay_path())  # 10,000 clinician episodes, cached and shared by the tests
    data = replay.data
    params = env.load_params()
    clinician = np.asarray(env.clinician_policy(params, renormalise=True))
    states, next_states = np.asarray(data.state_index), np.asarray(data.next_state_index)
    assert np.allclose(clinician[states, np.asarray(data.action)], np.asarray(data.behavior_prob), atol=1e-5)
    actions = np.asarray(data.action)
    ece = safety.calibration(clinician[states], actions)["ece"]  # the true behaviour model: well calibrated
    result = ope.off_policy_evaluation(
        data, clinician[states], clinician[next_states], np.asarray(data.behavior_prob),
        gamma=1.0, epsilon=0.0, n_boot=20, n_states=env.N_STATES, behavior_ece=ece,
    )  # fmt: skip
    exact = float(env.policy_evaluation(clinician, params)[0])
    # 10,000 episodes, all weights 1, a calibrated behaviour model: no small-data warning (the warnings of a
    # tiny held-out set: test_deterministic_target_keeps_only_matching_trajectories)
    assert result["n_episodes"] == 10_000 and ece < ope.MAX_BEHAVIOR_ECE
    assert result["warnings"] == []
    assert result["observed_return"] == pytest.approx(float(np.asarray(data.reward).sum()) / 10_000, abs=1e-6)
    est = result["estimators"]
    # 10,000 episodes: the standard error of a mean survival is about 0.004
    assert abs(est["fqe"]["estimate"] - exact) < 0.012
    assert abs(est["wis"]["estimate"] - exact) < 0.012
    assert est["wis"]["ci_low"] - 0.005 < exact < est["wis"]["ci_high"] + 0.005
    assert result["weights"]["ess"] == pytest.approx(result["n_episodes"])  # on-policy: all weights 1


# ----------------------------------------------------------------------------------------------
# Per-decision WIS with episodes of different lengths and a terminal reward

# s0 -a0-> terminal with reward 1 (prob 1/2) or s1 (reward 0); s1 -a0-> terminal, reward 1 or 0 (1/2 each);
# s1 -a1-> terminal reward 0; s0 -a1-> terminal reward 0. Behaviour uniform, target always a0: exact value
# 1/2 + 1/4 = 0.75. The five trajectories and their probabilities under the behaviour:
TOY_EPISODES = [
    [(0, 0, 1.0, 3, True)],  # A: survives at step 0, weight 2
    [(0, 0, 0.0, 1, False), (1, 0, 1.0, 3, True)],  # B1: survives at step 1, weights 2, 4
    [(0, 0, 0.0, 1, False), (1, 0, 0.0, 3, True)],  # B0: dies at step 1, weights 2, 4
    [(0, 0, 0.0, 1, False), (1, 1, 0.0, 3, True)],  # C: deviates at step 1, weights 2, 0
    [(0, 1, 0.0, 3, True)],  # D: deviates at step 0, weight 0
]
TOY_PROBS = np.array([1 / 4, 1 / 16, 1 / 16, 1 / 8, 1 / 2])


def toy_pdwis_by_hand(n_a, n_b1, n_b0, n_c, n_d, carried=True):
    """Step 0: sum w r / sum w over all episodes. Step 1: A ended at step 0 and carries its weight 2 into
    the normalisation (carried=True, Thomas 2015); carried=False drops ended episodes instead."""
    step0 = 2 * n_a / (2 * (n_a + n_b1 + n_b0 + n_c))
    den1 = (2 * n_a if carried else 0) + 4 * (n_b1 + n_b0)
    return step0 + (4 * n_b1 / den1 if den1 > 0 else 0.0)


def compositions(n, k):
    if k == 1:
        yield (n,)
        return
    for i in range(n + 1):
        for rest in compositions(n - i, k - 1):
            yield (i, *rest)


def test_per_decision_wis_carries_ended_episodes_and_its_small_sample_bias_is_its_own():
    from math import lgamma

    data = make_transitions(TOY_EPISODES)
    table = table_policy({0: 1.0, 1: 1.0})
    layout = ope.episode_layout(data.episode_id, data.t)
    target = table[np.asarray(data.state_index), np.asarray(data.action)]
    inputs = ope.make_is_inputs(layout, np.asarray(data.reward), target, np.asarray(data.behavior_prob), 1.0)
    pdwis = jax.jit(ope.pdwis)
    # the code's estimator is the hand formula, dataset by dataset: one of each -> 2/8 + 4/10
    assert float(pdwis(inputs, jnp.ones(5))) == pytest.approx(toy_pdwis_by_hand(1, 1, 1, 1, 1), abs=1e-6)
    assert toy_pdwis_by_hand(1, 1, 1, 1, 1) == pytest.approx(0.25 + 0.4)
    # consistency: at the behaviour's own frequencies (16 episodes in proportion) it is exact, and the
    # other convention (ended episodes leave the step-1 normalisation) converges to 1.0, not 0.75
    frequencies = jnp.asarray(16 * TOY_PROBS, jnp.float32)
    assert float(pdwis(inputs, frequencies)) == pytest.approx(0.75, abs=1e-6)
    assert toy_pdwis_by_hand(*(16 * TOY_PROBS), carried=False) == pytest.approx(1.0)

    sizes = (10, 30)
    all_counts = {n: np.array(list(compositions(n, 5)), np.float32) for n in sizes}
    # both sizes' datasets in one jitted call per estimator (eager vmaps compile every operation per shape)
    stacked = jnp.asarray(np.concatenate([all_counts[n] for n in sizes]))
    all_values = {
        fn: np.split(
            np.asarray(jax.jit(jax.vmap(fn, in_axes=(None, 0)))(inputs, stacked), np.float64),
            [len(all_counts[sizes[0]])],
        )
        for fn in (ope.pdwis, ope.wis)
    }

    def expected(n):
        """Exact expectation over every dataset of n behaviour episodes (multinomial counts), by the code."""
        counts = all_counts[n]
        log_p = (
            lgamma(n + 1)
            - np.array([sum(lgamma(c + 1) for c in row) for row in counts])
            + counts @ np.log(TOY_PROBS)
        )
        p = np.exp(log_p)
        out = {}
        for fn in (ope.pdwis, ope.wis):
            values = all_values[fn][sizes.index(n)]
            ok = np.isfinite(values)
            out[fn.__name__] = float((p[ok] * values[ok]).sum() / p[ok].sum()) - 0.75
            if fn is ope.pdwis:  # the code agrees with the hand formula on every dataset
                by_hand = [toy_pdwis_by_hand(*row) for row, good in zip(counts, ok, strict=True) if good]
                np.testing.assert_allclose(values[ok], by_hand, atol=1e-5)
        return out

    small, larger = expected(10), expected(30)
    # the same signs as on ICU-Sepsis (PDWIS low, WIS high), and both biases shrink like 1/n: the
    # estimator's own ratio bias, not a mishandling of the episodes that ended earlier
    assert -0.035 < small["pdwis"] < -0.02 and 0.02 < small["wis"] < 0.04
    assert -0.012 < larger["pdwis"] < -0.004 and abs(larger["pdwis"]) < 0.5 * abs(small["pdwis"])
    assert 0.004 < larger["wis"] < abs(small["wis"])


# ----------------------------------------------------------------------------------------------
# Intervals for small held-out sets (4 episodes and 20 resamples, as the tests above)

# Two steps: s0 -a0-> s1 (reward 0), then at s1 the clinicians always took a0 -> terminal, reward 1 in 3
# of the 4 logged episodes and 0 in 1 (mean 0.75). The target takes a1 at s1 with probability 0.7; a1
# leads to death (reward 0), which no logged transition shows. Exact value: 0.3 * 0.75 + 0.7 * 0 = 0.225.
EXACT = 0.3 * 0.75


def unlogged_action_data():
    rewards = [1.0] * 3 + [0.0]
    return make_transitions([[(0, 0, 0.0, 1, False), (1, 0, r, 3, True)] for r in rewards])


def target_table() -> np.ndarray:
    table = np.full((8, 2), 0.5, np.float32)
    table[0] = (1.0, 0.0)
    table[1] = (0.3, 0.7)
    return table


def test_identified_interval_covers_a_never_logged_action_the_fitting_interval_cannot_see():
    result = evaluate(unlogged_action_data(), target_table(), value_bounds=(0.0, 1.0))
    fqe = result["estimators"]["fqe"]
    # the fit gives a1 the clinicians' value at s1: 0.75, and every resample agrees that it is well above 0.225
    assert fqe["estimate"] == pytest.approx(0.75, abs=1e-5)
    assert not fqe["ci_low"] <= EXACT <= fqe["ci_high"]
    assert not fqe["ci_basic"][0] <= EXACT <= fqe["ci_basic"][1]
    # by hand: a1's Q is only known to lie in [0, 1], so the value lies in [0.3 * 0.75, 0.3 * 0.75 + 0.7]
    assert fqe["identified_set"] == pytest.approx([0.225, 0.925], abs=1e-5)
    low, high = fqe["ci_identified"]
    assert low <= EXACT <= high and low <= fqe["ci_low"] and high >= fqe["ci_high"]
    assert fqe["value_bounds"] == [0.0, 1.0] and "partial identification" in fqe["interval_identified"]
    # other bounds move the set by exactly the target's mass on the unidentified action
    wide = evaluate(unlogged_action_data(), target_table(), value_bounds=(-1.0, 2.0))["estimators"]["fqe"]
    assert wide["identified_set"] == pytest.approx([0.225 - 0.7, 0.225 + 1.4], abs=1e-5)
    assert wide["estimate"] == pytest.approx(fqe["estimate"])  # the point estimate is unchanged


def test_identified_set_collapses_to_the_estimate_when_every_target_action_is_logged():
    table = target_table()
    table[1] = (1.0, 0.0)  # the target only takes the logged action
    fqe = evaluate(unlogged_action_data(), table, value_bounds=(0.0, 1.0))["estimators"]["fqe"]
    assert fqe["identified_set"] == pytest.approx([0.75, 0.75], abs=1e-5)


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
N_HEAVY = 40
HEAVY_REWARD = np.array([1.0, 0.0, 1.0] + [1.0, 0.0] * 18 + [1.0])
HEAVY_Q_LOGGED = np.linspace(0.2, 0.8, N_HEAVY)
HEAVY_V_STATE = np.linspace(0.7, 0.3, N_HEAVY)
HEAVY_BEHAVIOUR = np.where(np.arange(N_HEAVY) < 3, 0.02, 0.5)


def heavy_tailed_inputs() -> ope.ISInputs:
    layout = ope.episode_layout(np.arange(N_HEAVY), np.zeros(N_HEAVY, int))
    return ope.make_is_inputs(
        layout, HEAVY_REWARD, np.full(N_HEAVY, 0.5), HEAVY_BEHAVIOUR, 1.0, q_logged=HEAVY_Q_LOGGED,
        v_state=HEAVY_V_STATE,
    )


def wdr_by_hand(c: np.ndarray) -> tuple[float, float, np.ndarray]:
    """WDR of one-step episodes with counts c, its influence values and delta-method variance, derived by
    hand: theta = sum c w (r - q) / sum c w + sum c v / n, so n d theta / d c_i =
    (n w_i / W) ((r_i - q_i) - A / W) + (v_i - mean v)."""
    w = 0.5 / HEAVY_BEHAVIOUR
    n, weight_sum = c.sum(), (c * w).sum()
    residual = (c * w * (HEAVY_REWARD - HEAVY_Q_LOGGED)).sum()
    mean_v = (c * HEAVY_V_STATE).sum() / n
    theta = residual / weight_sum + mean_v
    influence = n * w / weight_sum * ((HEAVY_REWARD - HEAVY_Q_LOGGED) - residual / weight_sum) + (
        HEAVY_V_STATE - mean_v
    )
    return theta, (c * influence**2).sum() / n**2, influence


def test_wdr_intervals_for_heavy_tailed_weights_match_the_hand_computation():
    counts = ope.bootstrap_counts(jax.random.key(3), N_HEAVY, 400)
    result = ope.is_estimates(heavy_tailed_inputs(), counts)["wdr"]
    theta, variance, influence = wdr_by_hand(np.ones(N_HEAVY))
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
    """One-step episodes from one state: the clinicians took a0 (probability 0.9) in 2 and a1 (0.1) in 2;
    the target takes each with 0.5, so a1's weight is 5 (4 episodes and 20 resamples, as test_one_step_episodes:
    the same compiled programs). On a resample with counts c, tabular FQE's Q(a)
    is the count-weighted mean reward of a (the state's mean when a is not drawn), and WDR =
    sum c w (r - Q(a)) / sum c w + sum_a pi(a) Q(a). The reported interval is the percentile interval
    of that over the resamples; the old one held the full-data Q fixed."""
    rewards = [1.0, 1.0, 1.0, 0.0]
    actions = [0, 0, 1, 1]
    data = make_transitions([[(0, a, r, 3, True)] for a, r in zip(actions, rewards, strict=True)])
    behaviour = np.where(np.asarray(actions) == 0, 0.9, 0.1)
    table = np.full((8, 2), 0.5, np.float32)
    states = np.asarray(data.state_index)
    result = ope.off_policy_evaluation(
        data, table[states], table[np.asarray(data.next_state_index)], behaviour, gamma=1.0, epsilon=0.0,
        n_boot=20, n_states=8, value_bounds=(0.0, 1.0),
    )  # fmt: skip
    wdr = result["estimators"]["wdr"]
    counts = np.asarray(ope.bootstrap_counts(jax.random.fold_in(jax.random.key(0), 0), 4, 20), np.float64)
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
    assert wdr["estimate"] == pytest.approx(wdr_refit(np.ones(4)), abs=1e-5)
    # the old interval (Q fixed at the full-data fit) differs: it omits the model's own resampling noise
    assert wdr["ci_fixed_model"] != pytest.approx(wdr["ci_refit"], abs=1e-3)
