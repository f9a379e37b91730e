"""benchmarks/vanco_obs_ceiling.py: the observation-only policy search improves on its start, acts on the
observation alone, and its AKI surrogate keeps the expected return."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import vancomycin as V

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vanco_obs_ceiling.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("_vanco_obs_ceiling_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


B = load_bench()
SIM = V.VancoParams()


N_STATS = 200


@functools.cache
def small_model(start_dose_mg: float = 1000.0):
    mean, std = B.observation_stats(SIM, n_patients=N_STATS)
    return B.init_policy(jax.random.PRNGKey(0), (8,), mean, std, start_dose_mg)


N_TRUE = 3_000  # patients of the true-return rollouts


@functools.cache
def policy_rollout():
    """jit(key, policy params, simulator) -> records of N_TRUE patients under a small_model-shaped policy: one
    compiled program for every test below that rolls out such a policy (the parameters are traced)."""
    static = eqx.partition(small_model(), eqx.is_array)[1]
    return jax.jit(lambda key, p, sim: V.rollout(key, sim, B.as_policy(eqx.combine(p, static)), N_TRUE))


def test_initial_policy_gives_the_start_dose_within_bounds():
    model = small_model()
    obs = V.rollout_jit(jax.random.PRNGKey(1), SIM, V.clinician_policy, N_STATS)["obs"].reshape(-1, V.OBS_DIM)
    doses = np.asarray(jax.jit(jax.vmap(model))(obs))  # one program, not the network's eager operations
    assert np.all((doses >= 10.0) & (doses <= V.DOSE_MAX_MG))
    np.testing.assert_allclose(doses, 1000.0, rtol=0.05)


def test_search_on_a_tiny_budget_improves_the_true_value_over_its_start():
    model = small_model()
    params, static = eqx.partition(model, eqx.is_array)
    search = jax.jit(B.make_search(SIM, static, batch_patients=128, steps=40, learning_rate=1e-2))
    found, curve = search(jax.random.PRNGKey(2), params)
    assert curve.shape == (40,) and np.all(np.isfinite(np.asarray(curve)))
    def true_returns(p):  # patients the search never saw; true (sampled-AKI) returns
        return policy_rollout()(jax.random.PRNGKey(3), p, SIM)["reward"].sum(-1)

    gain = np.asarray(true_returns(found) - true_returns(params), np.float64)  # paired: the same patients
    assert gain.mean() > 4 * gain.std() / np.sqrt(gain.size), gain.mean()


def test_policy_never_reads_the_hidden_state():
    """The ceiling must be observation-only: the same observation with another patient's hidden PK gives
    the same dose."""
    policy = B.as_policy(small_model())
    obs, state = V.reset(jax.random.PRNGKey(4), SIM)
    other = eqx.tree_at(lambda s: (s.eta_cl, s.eta_vc), state, (state.eta_cl + 1.0, state.eta_vc - 1.0))
    assert float(policy(None, obs, state, SIM)[0]) == float(policy(None, obs, other, SIM)[0])


def test_surrogate_return_has_the_true_expected_return():
    high_dose = eqx.partition(small_model(start_dose_mg=2500.0), eqx.is_array)[0]  # about 2500 mg throughout
    records = policy_rollout()(jax.random.PRNGKey(5), high_dose, SIM)
    assert np.allclose(np.asarray(records["dose"]), 2500.0, rtol=0.05)
    true, surrogate = records["reward"].sum(-1), B.surrogate_returns(records, SIM)
    assert float(records["aki"].sum()) > 100  # the case is one where AKI matters
    diff = np.asarray(true - surrogate, np.float64)
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(diff.size)
    no_aki = eqx.tree_at(lambda p: p.aki_penalty, SIM, 0.0)
    records = policy_rollout()(jax.random.PRNGKey(5), high_dose, no_aki)
    np.testing.assert_array_equal(np.asarray(B.surrogate_returns(records, no_aki)),
                                  np.asarray(records["reward"].sum(-1)))


def test_surrogate_has_a_gradient_through_the_aki_hazard():
    """Pathwise, the sampled AKI indicator has no gradient; the surrogate must penalise exposure anyway."""
    key = jax.random.PRNGKey(6)

    def aki_part(dose):
        policy = lambda k, obs, state, params: (dose, jnp.zeros((), jnp.float32))  # noqa: E731
        records = V.rollout(key, SIM, policy, 200)
        return (B.surrogate_returns(records, SIM) - records["reward"].sum(-1)).mean()

    assert float(jax.jit(jax.grad(aki_part))(jnp.float32(2500.0))) < 0.0  # one program, not eager operations


def test_final_patients_are_the_learners_final_patients():
    """The ceiling is reported on the same patients as iql_continuous.py's final values (same key, same
    chunking), so the README's rows compare patient for patient."""
    import iql_continuous as learner

    assert B.LEARNER_PATIENTS_KEY_SEED == learner.EVAL_KEY_SEED + 1
    assert learner.FINAL_EVAL_CHUNK == inspect.signature(V.policy_value).parameters["chunk"].default


N_HISTORY_PATIENTS = 50


def history_twin(history_lags: int, flag_lag: int | None = None, flag_weight: float = 0.0):
    """small_model() as a HistoryPolicy: the same weights on the observation, zero weight on the history
    except (when `flag_lag` is given) `flag_weight` on the 'present' flag of that lag, in every hidden unit."""
    obs_model = small_model()
    model = B.init_policy(jax.random.PRNGKey(0), (8,), obs_model.obs_mean, obs_model.obs_std,
                          history_lags=history_lags)
    first = obs_model.net.layers[0]
    history_weight = np.zeros((first.weight.shape[0], history_lags, B.HISTORY_ROW), np.float32)
    if flag_lag is not None:
        history_weight[:, flag_lag, -1] = flag_weight
    weight = jnp.concatenate([first.weight, jnp.asarray(history_weight.reshape(first.weight.shape[0], -1))], 1)
    layers = [eqx.tree_at(lambda layer: (layer.weight, layer.bias), model.net.layers[0], (weight, first.bias)),
              *obs_model.net.layers[1:]]
    return eqx.tree_at(lambda m: m.net.layers, model, layers)


@functools.cache
def history_rollout_program():
    return jax.jit(lambda key, model: B.history_rollout(key, SIM, model, N_HISTORY_PATIENTS))


def test_history_rollout_gives_the_simulators_patients_and_doses():
    """With zero weight on the history, the history policy is small_model(): its rollout must be V.rollout's,
    patient for patient (the same keys), so ceilings with and without history compare on the same patients."""
    key = jax.random.PRNGKey(5)
    expected = V.rollout_jit(key, SIM, B.as_policy(small_model()), N_HISTORY_PATIENTS)
    got = history_rollout_program()(key, history_twin(3))
    # the longer matmul rounds the doses differently in float32 (1e-5 relative); exposure and the reward's
    # steep parts magnify that up to 1e-3, where another patient would differ by tens of percent
    for name, rtol, atol in (("obs", 1e-4, 1e-4), ("dose", 1e-4, 1e-4), ("auc24", 1e-2, 0.0),
                             ("reward", 0.0, 2e-2), ("aki", 0.0, 0.0)):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]), rtol=rtol, atol=atol,
                                   err_msg=name)


def test_history_holds_the_previous_steps_newest_first():
    """A policy reading only the 'present' flag of its third-newest step (lag index 2) must act as
    small_model() at steps 0-2, when that step does not exist yet, and differently from step 3 on."""
    key = jax.random.PRNGKey(6)
    plain = np.asarray(history_rollout_program()(key, history_twin(3))["dose"])
    flagged = np.asarray(history_rollout_program()(key, history_twin(3, flag_lag=2, flag_weight=5.0))["dose"])
    np.testing.assert_array_equal(flagged[:, :3], plain[:, :3])
    assert np.all(np.abs(flagged[:, 3] - plain[:, 3]) > 1e-3 * plain[:, 3])


def clinician_observations() -> jax.Array:
    return V.rollout_jit(jax.random.PRNGKey(1), SIM, V.clinician_policy, N_STATS)["obs"].reshape(-1, V.OBS_DIM)


def test_policy_within_the_clinicians_support_stays_in_its_band_around_the_rule():
    """--within-clinician-sd K: whatever the weights, the dose is the clinician's rule dose scaled within
    exp(+-K x 0.2); at the start it is the rule itself, and large weights reach both edges of the band."""
    model = small_model()
    supported = B.init_policy(jax.random.PRNGKey(0), (8,), model.obs_mean, model.obs_std, within_clinician_sd=2.0)
    obs = clinician_observations()
    rule = np.clip(np.asarray(jax.vmap(V.clinician_rule_dose)(obs)), 1.0, V.DOSE_MAX_MG)
    doses = jax.jit(jax.vmap(lambda m, o: m(o), in_axes=(None, 0)))
    z_start = np.log(np.asarray(doses(supported, obs)) / rule) / V.CLINICIAN_LOG_SD
    assert np.all(np.abs(z_start) < 0.05)
    loud = eqx.tree_at(lambda m: m.net.layers[-1].weight, supported, supported.net.layers[-1].weight * 1e4)
    z_loud = np.log(np.asarray(doses(loud, obs)) / rule) / V.CLINICIAN_LOG_SD
    capped = rule * np.exp(2.0 * V.CLINICIAN_LOG_SD) > V.DOSE_MAX_MG  # the band's top is above the largest dose
    assert np.all(z_loud[~capped] <= 2.0 + 1e-4) and np.all(z_loud >= -2.0 - 1e-4)
    assert z_loud.max() > 1.9 and z_loud.min() < -1.9


def test_dose_vs_rule_puts_the_clinicians_own_doses_where_its_noise_does():
    """The clinician's doses are log-normal around its rule with log-sd 0.2, so about 95.4% of them are within
    2 of its sds (99.7% within 3): dose_vs_rule must measure in those units."""
    records = V.rollout_jit(jax.random.PRNGKey(1), SIM, V.clinician_policy, N_STATS)
    spread = B.dose_vs_rule(records)
    assert abs(spread["share_within_2_sd"] - 0.9545) < 0.02, spread
    assert spread["share_within_3_sd"] > 0.99
    assert abs(spread["z_quantiles_5_25_50_75_95"][2]) < 0.15
