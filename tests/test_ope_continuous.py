"""Continuous-dose OPE (cleansepsis.ope_continuous) on a two-step problem whose value is known in closed form."""

from __future__ import annotations

import dataclasses
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import ope_continuous as oc
from cleansepsis.ope import OPEError
from cleansepsis.replay import Transitions

# Two steps. A patient has x ~ U(X_LOW, X_HIGH); obs = (x, t). Step 0: dose a0 in [0, 10] mg, reward
# -(a0 / 10 - x)^2, and the next obs is (y, 1) with y = a0 / 10 (the action moves the state). Step 1: dose a1,
# reward y - (a1 / 10 - y)^2, then the episode ends. A policy dosing a = 10 u x0 (u drawn per step) has
# value E[u1] E[x] - E[(u1 - 1)^2] E[x^2] - E[(u2 - 1)^2] E[u1^2] E[x^2] (u1 at step 0, u2 at step 1).
X_LOW, X_HIGH = 0.1, 1.0
EX = (X_LOW + X_HIGH) / 2
EX2 = (X_LOW**2 + X_LOW * X_HIGH + X_HIGH**2) / 3
BEHAVIOUR_U = (0.5, 1.5)  # the logging policy: u ~ U(0.5, 1.5)
HIGH_DOSE = 10.0


def true_value(u_low: float, u_high: float) -> float:
    """Value of the policy a = 10 u obs[0] with u ~ U(u_low, u_high) at both steps (u_low = u_high: fixed)."""
    mean_u = (u_low + u_high) / 2
    mean_u2 = (u_low**2 + u_low * u_high + u_high**2) / 3
    mean_sq_dev = mean_u2 - 2 * mean_u + 1  # E[(u - 1)^2]
    return mean_u * EX - mean_sq_dev * EX2 - mean_sq_dev * mean_u2 * EX2


def uniform_scale_log_density(u_low: float, u_high: float):
    def log_density(obs, dose):
        base = HIGH_DOSE * obs[:, 0]
        inside = (dose >= u_low * base) & (dose <= u_high * base)
        return jnp.where(inside, -jnp.log(base * (u_high - u_low)), -jnp.inf)

    return log_density


def logged_data(n_episodes: int, seed: int = 0, integer_actions: bool = False) -> Transitions:
    rng = np.random.default_rng(seed)
    x = rng.uniform(X_LOW, X_HIGH, n_episodes)
    u0, u1 = rng.uniform(*BEHAVIOUR_U, (2, n_episodes))
    a0 = HIGH_DOSE * u0 * x
    y = a0 / HIGH_DOSE
    a1 = HIGH_DOSE * u1 * y
    obs = np.stack([np.stack([x, np.zeros_like(x)], 1), np.stack([y, np.ones_like(y)], 1)], 1)  # (E, 2, 2)
    next_obs = np.stack([obs[:, 1], np.stack([y, np.full_like(y, 2.0)], 1)], 1)
    reward = np.stack([-((a0 / HIGH_DOSE - x) ** 2), y - (a1 / HIGH_DOSE - y) ** 2], 1)
    dose = np.stack([a0, a1], 1)
    log_density = np.stack([-np.log(HIGH_DOSE * x), -np.log(HIGH_DOSE * y)], 1)  # U(0.5, 1.5) has width 1
    n = 2 * n_episodes
    action = np.round(dose).astype(np.int32) if integer_actions else dose.astype(np.float32)
    return Transitions(
        obs=jnp.asarray(obs.reshape(n, 2), jnp.float32),
        action=jnp.asarray(action.reshape(n)),
        reward=jnp.asarray(reward.reshape(n), jnp.float32),
        next_obs=jnp.asarray(next_obs.reshape(n, 2), jnp.float32),
        terminated=jnp.asarray(np.tile([False, True], n_episodes)),
        truncated=jnp.zeros(n, bool),
        episode_id=jnp.repeat(jnp.arange(n_episodes, dtype=jnp.int32), 2),
        t=jnp.tile(jnp.arange(2, dtype=jnp.int32), n_episodes),
        split=jnp.zeros(n, jnp.int8),
        state_index=jnp.full(n, -1, jnp.int32),
        next_state_index=jnp.full(n, -1, jnp.int32),
        behavior_prob=jnp.full(n, jnp.nan, jnp.float32),
        action_mask=jnp.ones((n, 0), bool),
        next_action_mask=jnp.ones((n, 0), bool),
        behavior_log_density=jnp.asarray(log_density.reshape(n), jnp.float32),
    )


def scaled_target(u_low: float, u_high: float) -> oc.ContinuousTarget:
    """a = 10 u obs[0]: deterministic when u_low == u_high, else u ~ U(u_low, u_high) with its density."""
    mean = oc.deterministic_target("", lambda obs: HIGH_DOSE * (u_low + u_high) / 2 * obs[:, 0]).mean_dose
    if u_low == u_high:
        return oc.deterministic_target(f"u = {u_low}", mean)
    return oc.ContinuousTarget(
        name=f"u ~ U({u_low}, {u_high})",
        mean_dose=mean,
        sample=lambda key, obs: HIGH_DOSE * jax.random.uniform(key, (obs.shape[0],), minval=u_low, maxval=u_high)
        * obs[:, 0],
        log_density=uniform_scale_log_density(u_low, u_high),
    )


# small explicit fits (the default is the validated history fit, minutes per policy); history_lags 0: Q on the
# observation, which is the Markov state of the two-step problem
CONFIG = oc.ContinuousFQEConfig(hidden=32, n_iterations=4, steps_per_iteration=300, batch_size=256,
                                learning_rate=3e-3, history_lags=0)  # fmt: skip


# a tiny fit with a history in Q (lag 1), the default kind of fit; tests that use it on 100 episodes share
# its compiled programs
TINY_HISTORY = oc.ContinuousFQEConfig(hidden=8, n_iterations=2, steps_per_iteration=20, batch_size=64,
                                      history_lags=1)  # fmt: skip


def evaluate(data, target, acting, seed=0, n_refits=2, config=CONFIG):
    return oc.continuous_off_policy_evaluation(
        data, target, low=0.0, high=HIGH_DOSE, gamma=1.0,
        behavior_log_density=np.asarray(data.behavior_log_density), acting=acting, n_action_samples=4,
        n_boot=50, key=jax.random.key(seed), config=config, n_refits=n_refits,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return logged_data(1500)


def test_closed_form_matches_a_monte_carlo_of_the_problem():
    # the formula the other tests rest on, against a plain simulation of the two steps
    rng = np.random.default_rng(1)
    x = rng.uniform(X_LOW, X_HIGH, 400_000)
    u1, u2 = rng.uniform(0.7, 1.1, (2, x.size))
    y = u1 * x
    returns = -((y - x) ** 2) + y - (u2 * y - y) ** 2
    assert returns.mean() == pytest.approx(true_value(0.7, 1.1), abs=2e-3)


def test_fqe_recovers_the_value_of_a_deterministic_dose_rule_and_says_is_is_undefined(data):
    truth = true_value(0.8, 0.8)
    result = evaluate(data, scaled_target(0.8, 0.8), "mean")
    fqe = result["estimators"]["fqe"]
    assert fqe["estimate"] == pytest.approx(truth, abs=0.02)
    # the behaviour's own return is far from it, so this is not FQE echoing the data
    assert abs(result["observed_return"] - truth) > 0.04
    assert fqe["ci_low"] < fqe["estimate"] < fqe["ci_high"] and fqe["n_refits"] == 2
    assert "deterministic" in result["undefined"] and result["weights"] is None
    for name in ("wis", "pdwis", "wdr"):
        assert np.isnan(result["estimators"][name]["estimate"])
        assert "importance sampling is undefined" in result["estimators"][name]["undefined"]


def test_fqe_wis_and_wdr_recover_the_value_of_a_stochastic_policy(data):
    truth = true_value(0.7, 1.1)
    result = evaluate(data, scaled_target(0.7, 1.1), "sample")
    assert result["undefined"] is None and result["n_action_samples"] == 4
    est = result["estimators"]
    assert est["fqe"]["estimate"] == pytest.approx(truth, abs=0.02)
    assert est["wdr"]["estimate"] == pytest.approx(truth, abs=0.02)
    assert est["wis"]["estimate"] == pytest.approx(truth, abs=0.05)
    # the ratio of two uniform densities: zero outside the target's band, so some episodes weigh nothing
    assert 0 < result["weights"]["share_zero_weight"] < 1
    for name in ("wis", "wdr"):
        assert est[name]["ci_low"] - 0.02 <= truth <= est[name]["ci_high"] + 0.02


def test_without_the_behaviour_density_only_fqe_runs(data):
    # the fit of the stochastic test above (same shapes and settings): its compiled programs serve again
    result = oc.continuous_off_policy_evaluation(
        data, scaled_target(0.7, 1.1), low=0.0, high=HIGH_DOSE, gamma=1.0, acting="sample",
        config=CONFIG, n_refits=2, n_boot=50,
    )  # fmt: skip
    assert "behavior_log_density" in result["undefined"]
    assert np.isfinite(result["estimators"]["fqe"]["estimate"]) and np.isnan(result["estimators"]["wis"]["estimate"])


def test_discrete_actions_are_one_clear_error():
    with pytest.raises(OPEError, match="discrete action indices"):
        evaluate(logged_data(20, integer_actions=True), scaled_target(0.8, 0.8), "mean")
    with pytest.raises(OPEError, match="acting"):
        evaluate(logged_data(20), scaled_target(0.8, 0.8), "greedy")


def test_same_seed_same_numbers_other_seed_other_numbers():
    small = logged_data(100, seed=3)
    first = evaluate(small, scaled_target(0.7, 1.1), "sample", seed=5, config=TINY_HISTORY)
    again = evaluate(small, scaled_target(0.7, 1.1), "sample", seed=5, config=TINY_HISTORY)
    other = evaluate(small, scaled_target(0.7, 1.1), "sample", seed=6, config=TINY_HISTORY)
    for name in ("fqe", "wis", "wdr"):
        assert first["estimators"][name] == again["estimators"][name]
    assert first["estimators"]["fqe"]["estimate"] != other["estimators"]["fqe"]["estimate"]


def test_history_features_append_the_previous_steps_and_shift_them_for_the_next_state():
    # two episodes of lengths 3 and 2, rows shuffled so the layout (not the row order) must place them
    episode = np.array([1, 0, 0, 1, 0])
    t = np.array([1, 2, 0, 0, 1])
    obs = np.stack([10.0 * episode + t, -t], 1).astype(np.float32)
    next_obs = obs + 0.5
    dose = (100.0 * episode + t + 1).astype(np.float32)
    layout = oc.ope.episode_layout(episode, t)
    q_obs, q_next = oc.history_features(obs, dose, next_obs, layout, lags=2)
    assert q_obs.shape == q_next.shape == (5, 2 + 2 * 4)
    np.testing.assert_array_equal(q_obs[:, :2], obs)
    np.testing.assert_array_equal(q_next[:, :2], next_obs)

    def record(e, step):  # (obs, dose, present) of episode e's step
        row = int(np.flatnonzero((episode == e) & (t == step))[0])
        return [*obs[row], dose[row], 1.0]

    empty = [0.0] * 4
    row = 1  # episode 0, t 2: lag 1 is t 1, lag 2 is t 0; its next state's lags are t 2 and t 1
    np.testing.assert_array_equal(q_obs[row, 2:], record(0, 1) + record(0, 0))
    np.testing.assert_array_equal(q_next[row, 2:], record(0, 2) + record(0, 1))
    row = 3  # episode 1, t 0: no history; its next state's lag 1 is this step itself
    np.testing.assert_array_equal(q_obs[row, 2:], empty + empty)
    np.testing.assert_array_equal(q_next[row, 2:], record(1, 0) + empty)
    assert oc.history_features(obs, dose, next_obs, layout, lags=0)[0] is not None
    with pytest.raises(OPEError, match="lags"):
        oc.history_features(obs, dose, next_obs, layout, lags=-1)


def hidden_dose_data(n_episodes: int, seed: int = 0) -> Transitions:
    """A problem whose observation is not Markov: x ~ U(X_LOW, X_HIGH); step 0 sees (x, 0), doses a0 = 10 u x
    (u ~ U(0.5, 1.5)), reward -(a0 / 10 - x)^2; step 1 sees only (0, 1), doses a1 = 10 v EX (v ~ U(0.5, 1.5)),
    reward -(a1 - a0)^2 / 100, which depends on the first dose that step 1's observation does not show."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(X_LOW, X_HIGH, n_episodes)
    u, v = rng.uniform(*BEHAVIOUR_U, (2, n_episodes))
    a0, a1 = HIGH_DOSE * u * x, HIGH_DOSE * v * EX
    obs = np.stack([np.stack([x, np.zeros_like(x)], 1), np.tile([0.0, 1.0], (n_episodes, 1))], 1)
    next_obs = np.stack([obs[:, 1], np.tile([0.0, 2.0], (n_episodes, 1))], 1)
    reward = np.stack([-((a0 / HIGH_DOSE - x) ** 2), -(((a1 - a0) / HIGH_DOSE) ** 2)], 1)
    n = 2 * n_episodes
    base = logged_data(n_episodes)
    return dataclasses.replace(
        base,
        obs=jnp.asarray(obs.reshape(n, 2), jnp.float32), next_obs=jnp.asarray(next_obs.reshape(n, 2), jnp.float32),
        action=jnp.asarray(np.stack([a0, a1], 1).reshape(n), jnp.float32),
        reward=jnp.asarray(reward.reshape(n), jnp.float32),
    )  # fmt: skip


def test_history_features_remove_the_bias_of_a_non_markov_observation():
    # target: a0 = 8 x, a1 = 8 EX. Value: -0.04 E[x^2] - 0.64 Var(x). On the observation alone, Q at step 1
    # averages a0 over the BEHAVIOUR's first doses (u ~ U(0.5, 1.5)), which spread more than the target's:
    # -E[(0.8 EX - u x)^2] = -0.110 instead of -0.043, a bias of -0.067 whatever the data size.
    truth = -0.04 * EX2 - 0.64 * (EX2 - EX**2)
    data = hidden_dose_data(1500)
    target = oc.deterministic_target("8 x, then 8 EX",
                                     lambda obs: jnp.where(obs[:, 1] < 0.5, 8.0 * obs[:, 0], 8.0 * EX))  # fmt: skip
    on_obs = evaluate(data, target, "mean", n_refits=0)["estimators"]["fqe"]
    with_history = evaluate(data, target, "mean", n_refits=0,
                            config=dataclasses.replace(CONFIG, history_lags=1))["estimators"]["fqe"]  # fmt: skip
    assert on_obs["estimate"] < truth - 0.04
    assert with_history["estimate"] == pytest.approx(truth, abs=0.02)
    assert with_history["history_lags"] == 1 and "previous (obs, dose)" in with_history["features"]
    assert with_history["q_inputs"].startswith("observation + history") and "1 previous" in with_history["q_inputs"]
    assert on_obs["q_inputs"] == "observation only (history_lags 0)" and "only, no history" in on_obs["features"]


def test_the_default_fit_is_the_validated_history_fit_and_a_bad_setting_is_one_clear_error():
    # docs/evaluation.md: Q on obs + 7 previous steps, 2 x 256, 12 x 2,000 Adam steps of 512, 5 refits
    default = oc.ContinuousFQEConfig()
    assert (default.history_lags, default.hidden, default.n_iterations, default.steps_per_iteration,
            default.batch_size, default.learning_rate, default.dose_encoding) == (7, 256, 12, 2_000, 512, 1e-3, "bounds")
    assert (default.target_focus, default.dose_every_layer) == (0.0, False)  # the diagnostics are off
    for fn in (oc.continuous_off_policy_evaluation, oc.continuous_fqe_estimate):
        parameters = inspect.signature(fn).parameters
        assert parameters["config"].default == default and parameters["n_refits"].default == 5
    for bad in ({"history_lags": -1}, {"history_lags": 1.5}, {"hidden": 0}, {"n_iterations": 0},
                {"steps_per_iteration": 0}, {"batch_size": -2}, {"learning_rate": 0.0}, {"dose_encoding": "log"},
                {"target_focus": -1.0}, {"focus_bandwidth": 0.0}):
        name, value = next(iter(bad.items()))
        with pytest.raises(OPEError, match=f"{name} must .*{value!r}"):
            oc.ContinuousFQEConfig(**bad)


def test_the_history_takes_rows_in_any_order_and_an_episode_not_starting_at_t0_is_one_clear_error(monkeypatch):
    data = logged_data(100, seed=4)  # the shapes and fit of the seed test: no compile of its own
    seen = []

    def recording(q_obs, *rest):
        seen.append(np.asarray(q_obs))
        return make_data(q_obs, *rest)

    make_data = oc.make_continuous_fqe_data
    monkeypatch.setattr(oc, "make_continuous_fqe_data", recording)
    order = np.random.default_rng(0).permutation(data.size)  # episodes interleaved, steps out of order
    for rows in (np.arange(data.size), order):
        result = evaluate(jax.tree.map(lambda x, rows=rows: x[rows], data), scaled_target(0.7, 1.1), "sample",
                          config=TINY_HISTORY)  # fmt: skip
        assert np.isfinite(result["estimators"]["fqe"]["estimate"])
    # each row's history is its own episode's previous step, wherever the rows sit
    np.testing.assert_array_equal(seen[1], seen[0][order])
    assert np.ptp(seen[0][1::2, 2:]) > 0  # the t = 1 rows carry a history (the t = 0 step), not zeros

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before the episodes were checked")

    monkeypatch.setattr(oc, "_continuous_fqe_fits", no_fit)
    late_start = dataclasses.replace(data, t=data.t + 1)  # every episode starts at t = 1
    gap = dataclasses.replace(data, t=data.t.at[1].set(2))  # episode 0 has steps 0 and 2
    for bad, episode in ((late_start, 0), (gap, 0)):
        with pytest.raises(OPEError, match=f"episode {episode} has steps .* needs every episode's steps 0, 1, 2"):
            evaluate(bad, scaled_target(0.7, 1.1), "sample", config=TINY_HISTORY)


def _tiny_fqe_data(n_episodes: int = 40, n_samples: int = 3):
    data = logged_data(n_episodes, seed=7)
    obs, next_obs, action = (np.asarray(x) for x in (data.obs, data.next_obs, data.action))
    layout = oc.ope.episode_layout(data.episode_id, data.t)
    rng = np.random.default_rng(0)
    next_doses = rng.uniform(0, HIGH_DOSE, (len(action), n_samples))
    first_doses = rng.uniform(0, HIGH_DOSE, (layout.n_episodes, n_samples))
    scaling = oc.make_scaling(obs, next_obs, action, 0.0, HIGH_DOSE, "bounds")
    return oc.make_continuous_fqe_data(obs, action, np.asarray(data.reward), next_obs, np.asarray(data.terminated),
                                       layout, next_doses, first_doses, scaling), layout  # fmt: skip


def test_bellman_targets_are_the_frozen_q_at_every_next_state_in_any_chunking(monkeypatch):
    fqe_data, _ = _tiny_fqe_data()
    network = oc.DoseQNetwork(2, 1, 8, jax.random.key(3))
    rows = zip(np.asarray(fqe_data.next_obs), np.asarray(fqe_data.next_doses), strict=True)
    next_value = np.array([[float(network(o, d)) for d in ds] for o, ds in rows]).mean(1)
    expected = np.asarray(fqe_data.reward) + 0.9 * np.asarray(fqe_data.not_done) * next_value
    assert np.ptp(np.asarray(fqe_data.not_done)) == 1  # terminal steps are among the rows: they must not bootstrap
    for chunk in (oc.TARGET_CHUNK, 7):  # 80 rows: one chunk, or 11 chunks and a remainder of 3
        monkeypatch.setattr(oc, "TARGET_CHUNK", chunk)
        np.testing.assert_allclose(np.asarray(oc.bellman_targets(network, fqe_data, 0.9)), expected, atol=1e-5)


def test_the_estimate_and_its_refits_are_the_single_fits_with_the_same_keys():
    # one vmapped program fits the estimate (every episode once) and the refits: each of its numbers must be
    # the fit that key and those episode weights give alone
    fqe_data, layout = _tiny_fqe_data()
    tiny = oc.ContinuousFQEConfig(hidden=8, n_iterations=2, steps_per_iteration=15, batch_size=32, history_lags=0)
    key = jax.random.key(11)
    counts = oc.ope.bootstrap_counts(jax.random.key(2), layout.n_episodes, 5)
    result, networks = oc.continuous_fqe_estimate(fqe_data, 1.0, key, counts, tiny, n_refits=3)
    # the single fit as one program (one lax.scan over the iterations): compiled once without counts (every
    # episode once), once for the three refits
    fit = eqx.filter_jit(oc.continuous_fqe)
    alone, alone_network, _ = fit(fqe_data, 1.0, key, tiny)
    assert result["estimate"] == pytest.approx(float(alone), abs=1e-5)
    refit_keys = jax.random.split(jax.random.fold_in(key, 1), 3)
    refits = [fit(fqe_data, 1.0, k, tiny, jnp.asarray(c, jnp.float32))
              for k, c in zip(refit_keys, counts[:3], strict=True)]  # fmt: skip
    np.testing.assert_allclose(result["refit_estimates"], [float(r[0]) for r in refits], atol=1e-5)
    assert result["boot_std"] == pytest.approx(np.std(result["refit_estimates"], ddof=1), rel=1e-6)
    # every fit's network is returned, the estimate's first
    obs, doses = np.asarray(fqe_data.obs[:5]), np.asarray(fqe_data.dose[:5])
    assert len(networks) == 4
    for network, expected in zip(networks, [alone_network] + [r[1] for r in refits], strict=True):
        np.testing.assert_allclose(jax.vmap(network)(obs, doses), jax.vmap(expected)(obs, doses), atol=1e-5)
    single, _ = oc.continuous_fqe_estimate(fqe_data, 1.0, key, counts, tiny, n_refits=1)
    assert single["estimate"] == pytest.approx(float(alone), abs=1e-5) and np.isnan(single["boot_std"])
    assert single["refit_estimates"] == pytest.approx([float(refits[0][0])], abs=1e-5)  # one refit: no interval


def test_target_focus_weighs_rows_by_the_targets_dose_at_their_own_state_and_the_fit_follows_the_weights():
    data = logged_data(100, seed=4)  # the seed test's shapes and fit: no compile of its own
    focused = dataclasses.replace(TINY_HISTORY, target_focus=3.0, focus_bandwidth=0.05)
    target = scaled_target(1.0, 1.0)  # a = 10 obs[0]: at step 1 that is 10 y, the row's own state, not the next
    fqe = oc.prepare_continuous_fqe(data, target, low=0.0, high=HIGH_DOSE, key=jax.random.key(0), config=focused)
    own_dose = HIGH_DOSE * np.asarray(data.obs)[:, 0]
    expected = 1.0 + 3.0 * np.exp(-0.5 * ((np.asarray(data.action) - own_dose) / (0.05 * HIGH_DOSE)) ** 2)
    np.testing.assert_allclose(np.asarray(fqe.fqe_data.focus), expected, rtol=1e-5)
    assert expected.min() < 1.01 and expected.max() > 3.9  # both near and far rows are among them
    plain = oc.prepare_continuous_fqe(data, target, low=0.0, high=HIGH_DOSE, key=jax.random.key(0), config=TINY_HISTORY)
    np.testing.assert_array_equal(np.asarray(plain.fqe_data.focus), 1.0)

    # a row of weight 0 does not move the fit: rewriting those rows' rewards leaves every network weight as it was
    muted = np.arange(data.size) % 3 == 0
    weights = jnp.asarray(np.where(muted, 0.0, expected), jnp.float32)
    base = eqx.tree_at(lambda d: d.focus, fqe.fqe_data, weights)
    noisy = eqx.tree_at(lambda d: d.reward, base, jnp.where(jnp.asarray(muted), 1e3, base.reward))
    noisier = eqx.tree_at(lambda d: d.reward, base, jnp.where(jnp.asarray(~muted), 1e3, base.reward))

    def fitted_weights(fqe_data):
        network = oc.continuous_fqe_estimate(fqe_data, 1.0, fqe.fqe_key, jnp.asarray(fqe.counts), focused, 0)[1][0]
        return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(network, eqx.is_array))]

    base_fit, noisy_fit, noisier_fit = (fitted_weights(d) for d in (base, noisy, noisier))
    for a, b in zip(base_fit, noisy_fit, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(base_fit[0], noisier_fit[0])  # and the weighted rows do move it


def test_dose_every_layer_feeds_the_dose_past_the_first_layer():
    obs, doses = jnp.ones(2), jnp.linspace(-1.0, 1.0, 5)[:, None]
    for every_layer in (False, True):
        network = oc.DoseQNetwork(2, 1, 8, jax.random.key(3), dose_every_layer=every_layer)
        # the first layer no longer reads the dose: only later layers can
        network = eqx.tree_at(lambda n: n.layers[0].weight, network, network.layers[0].weight.at[:, 2:].set(0.0))
        q = np.asarray(jax.vmap(lambda d, n=network: n(obs, d))(doses))
        assert (np.ptp(q) > 1e-3) == every_layer
