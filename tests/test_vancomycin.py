"""The vancomycin simulator: exact PK against a numerical ODE solution, the behaviour density, the oracle,
the AKI link, what the observation hides, and the Gymnasium class."""

import functools

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from cleansepsis import vancomycin as V

PARAMS = V.VancoParams()


def _patient(seed: int = 0) -> V.PatientState:
    return V.reset(jax.random.PRNGKey(seed), PARAMS)[1]


def _ode_interval(amounts, dose, pk):
    """The same 12 h interval by a general-purpose ODE solver, with the AUC as a third state."""
    cl, vc, vp, q = (float(x) for x in pk)
    t_inf = max(dose / V.INFUSION_MG_PER_HOUR, V.MIN_INFUSION_HOURS)

    def rhs(t, y):
        rate = dose / t_inf if t < t_inf else 0.0
        ac, ap, _ = y
        return [rate - (cl + q) / vc * ac + q / vp * ap, q / vc * ac - q / vp * ap, ac / vc]

    sol = solve_ivp(rhs, (0.0, V.DECISION_HOURS), [*amounts, 0.0], rtol=1e-10, atol=1e-10,
                    method="LSODA", max_step=0.05)
    return sol.y[:2, -1], sol.y[2, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_two_compartment_solution_matches_a_numerical_ode_solver(seed):
    state = _patient(seed)
    pk = V.pk_parameters(state, PARAMS)
    start = np.array([300.0, 150.0])
    for dose in (0.0, 750.0, 2500.0):
        amounts, auc = jax.jit(V.dose_interval)(jnp.asarray(start, jnp.float32), jnp.float32(dose), pk)
        ref_amounts, ref_auc = _ode_interval(start, dose, pk)
        np.testing.assert_allclose(np.asarray(amounts), ref_amounts, rtol=2e-4, atol=1e-2)
        np.testing.assert_allclose(float(auc), ref_auc, rtol=2e-4)


def test_mass_balance_auc_of_one_dose_is_dose_over_clearance():
    state = _patient(3)
    pk = V.pk_parameters(state, PARAMS)
    dose = 1000.0
    amounts, auc = V.advance(jnp.zeros(2), jnp.float32(dose), jnp.float32(1.0), pk)
    _, auc_after = V.advance(amounts, jnp.float32(0.0), jnp.float32(2000.0), pk)  # until nothing is left
    np.testing.assert_allclose(float(auc + auc_after), dose / float(pk.cl), rtol=1e-4)


def test_covariate_model_follows_goti_2018():
    state = eqx.tree_at(
        lambda s: (s.age, s.weight, s.female, s.creatinine_base, s.eta_cl, s.eta_vc, s.eta_vp, s.dialysis),
        _patient(),
        tuple(jnp.float32(x) for x in (40.0, 70.0, 0.0, 100.0 * 70.0 / (72.0 * 120.0), 0.0, 0.0, 0.0, 0.0)),
    )
    pk = V.pk_parameters(state, PARAMS)  # a typical patient with CrCL exactly 120 mL/min
    np.testing.assert_allclose([float(x) for x in pk], [4.5, 58.4, 38.4, 6.5], rtol=1e-5)
    on_dialysis = V.pk_parameters(eqx.tree_at(lambda s: s.dialysis, state, jnp.float32(1.0)), PARAMS)
    np.testing.assert_allclose([float(on_dialysis.cl), float(on_dialysis.vc)], [4.5 * 0.7, 58.4 * 0.5], rtol=1e-5)
    # creatinine below 1 counts as 1 above 60 years; the clearance is capped at 150 mL/min
    assert float(V.cockcroft_gault(70.0, 70.0, 0.0, 0.5)) == pytest.approx(70.0 * 70.0 / 72.0, rel=1e-5)
    assert float(V.cockcroft_gault(30.0, 120.0, 0.0, 0.4)) == 150.0


def test_clinician_density_integrates_to_one_and_matches_its_samples():
    obs, state = V.reset(jax.random.PRNGKey(5), PARAMS)
    grid = jnp.linspace(1.0, V.DOSE_MAX_MG, 200_001)
    density = jnp.exp(V.clinician_log_density(obs, grid))
    assert float(jnp.trapezoid(density, grid)) == pytest.approx(1.0, abs=2e-3)
    keys = jax.random.split(jax.random.PRNGKey(6), 20_000)
    # jitted: one program instead of one dispatch (and small compile) per operation of the vmapped policy
    doses, log_dens = jax.jit(jax.vmap(lambda k: V.clinician_policy(k, obs, state, PARAMS)))(keys)
    np.testing.assert_allclose(np.asarray(log_dens), np.asarray(V.clinician_log_density(obs, doses)), rtol=1e-5)
    # the empirical CDF of the samples against the density's integral (Kolmogorov-Smirnov distance)
    cdf = np.cumsum(np.asarray(density)) * float(grid[1] - grid[0])
    empirical = np.searchsorted(np.sort(np.asarray(doses)), np.asarray(grid)) / doses.shape[0]
    assert np.abs(cdf - empirical).max() < 0.02
    assert float(V.clinician_log_density(obs, jnp.float32(0.0))) == -np.inf


def test_oracle_puts_every_daily_auc_at_the_middle_of_the_target():
    params = eqx.tree_at(lambda p: p.aki_rate_per_day, PARAMS, 0.0)
    # 2000 patients: the program test_rollouts_... compiles for the oracle (params are traced, not static)
    records = V.rollout_jit(jax.random.PRNGKey(1), params, V.oracle_policy, 2000)
    auc, dose = np.asarray(records["auc24"]), np.asarray(records["dose"])
    capped = dose >= V.DOSE_MAX_MG - 1.0  # a high-clearance patient may need more than the maximum dose
    free = ~capped
    free[:, 1:] &= ~capped[:, :-1]  # AUC24 spans this interval and the one before
    assert free.mean() > 0.8
    np.testing.assert_allclose(auc[free], 500.0, atol=0.5)
    assert (auc[capped] < 500.0).all()
    assert float(records["aki"].sum()) == 0.0


@functools.partial(jax.jit, static_argnames="n_patients")
def _fixed_dose_rollout(key, params, dose_mg, n_patients):
    """V.rollout under V.fixed_dose_policy with the dose traced: one compiled program for every dose (a
    new fixed_dose_policy closure is a new static argument of V.rollout_jit, and compiles again)."""
    return V.rollout(key, params, V.fixed_dose_policy(dose_mg), n_patients)


def test_aki_hazard_rises_with_exposure_and_feeds_back_into_clearance():
    key = jax.random.PRNGKey(2)
    low = _fixed_dose_rollout(key, PARAMS, 500.0, 2000)
    high = _fixed_dose_rollout(key, PARAMS, 2500.0, 2000)
    assert float(high["aki"].mean()) > 5 * float(low["aki"].mean())
    state = _patient(4)
    injured = eqx.tree_at(lambda s: s.kidney, state, jnp.float32(PARAMS.aki_gfr_factor))
    assert float(V.pk_parameters(injured, PARAMS).cl) < float(V.pk_parameters(state, PARAMS).cl)
    off = eqx.tree_at(lambda p: p.aki_rate_per_day, PARAMS, 0.0)
    assert float(_fixed_dose_rollout(key, off, 2500.0, 2000)["aki"].sum()) == 0.0


def test_observation_hides_the_pk_parameters():
    obs, state = V.reset(jax.random.PRNGKey(7), PARAMS)
    other = eqx.tree_at(
        lambda s: (s.eta_cl, s.eta_vc, s.eta_vp, s.kidney, s.creatinine_base, s.amount_central),
        state, tuple(jnp.float32(x) for x in (0.9, -0.7, 0.4, 0.5, 3.0, 123.0)),
    )
    np.testing.assert_array_equal(np.asarray(V.observe(other, PARAMS)), np.asarray(obs))
    assert obs.shape == (V.OBS_DIM,)


def test_rewards_follow_the_documented_target_bands():
    auc = jnp.array([0.0, 200.0, 399.0, 400.0, 600.0, 700.0, 800.0, 2000.0])
    np.testing.assert_allclose(np.asarray(V.target_reward(auc)), [-1.0, 0.0, 0.995, 1.0, 1.0, 0.0, -1.0, -2.0])


def test_rollouts_are_reproducible_and_values_order_the_reference_policies():
    key = jax.random.PRNGKey(0)
    # 2000 patients: the program policy_value below compiles for the clinician's chunks
    first = V.rollout_jit(key, PARAMS, V.clinician_policy, 2000)
    again = V.rollout_jit(key, PARAMS, V.clinician_policy, 2000)
    for name in first:
        np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(again[name]))
    assert bool(first["terminated"][:, -1].all()) and not bool(first["terminated"][:, :-1].any())
    values = {
        name: V.policy_value(key, PARAMS, policy, n_patients=2000, chunk=2000)
        for name, policy in [("clinician", V.clinician_policy), ("oracle", V.oracle_policy)]
    }
    # no dosing, through the traced-dose program above on policy_value's patients (one chunk: split(key, 1)):
    # a new fixed_dose_policy closure would compile another rollout
    none = np.asarray(_fixed_dose_rollout(jax.random.split(key, 1)[0], PARAMS, 0.0, 2000)["reward"].sum(-1))
    values["none"] = (float(none.mean()), float(none.std(ddof=1) / np.sqrt(none.size)))
    assert values["none"][0] == pytest.approx(-8.0)
    assert values["none"][0] < values["clinician"][0] - 10 * values["clinician"][1]
    assert values["clinician"][0] < values["oracle"][0] - 10 * values["oracle"][1]


def test_gymnasium_env_passes_check_env_and_make():
    from gymnasium.utils.env_checker import check_env

    check_env(V.VancomycinEnv(), skip_render_check=True)
    env = gymnasium.make(V.ENV_ID)
    obs, _ = env.reset(seed=3)
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([1000.0], np.float32))
        total, steps = total + reward, steps + 1
        assert not truncated and set(info) == {"auc24", "aki", "concentration", "level_drawn"}
    assert steps == V.N_DECISIONS and obs.shape == (V.OBS_DIM,)
    with pytest.raises(RuntimeError, match="ended"):
        env.step(np.array([1000.0], np.float32))
    with pytest.raises(ValueError, match="finite"):
        env.reset(seed=0)
        env.step(np.array([np.nan], np.float32))
