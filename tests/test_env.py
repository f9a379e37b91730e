"""The JAX ICU-Sepsis env: exact values against the published figures, sampler, determinism, Gymnasium."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import env as E

# Published reference figures (docs/icu-sepsis facts sheet, computed from the icu-sepsis 2.0.1 arrays).
FACTS_MEAN = {
    "random": (0.780071, 9.462),
    "clinician": (0.781845, 9.238),
    "clinician_renormalised": (0.782014, 9.223),
    "greedy_clinician": (0.786826, None),
    "optimal": (0.875142, 10.992),
}
FACTS_TERMINATE = {
    "random": 0.008360,
    "clinician": 0.415809,
    "clinician_renormalised": 0.782014,
    "optimal": 0.875142,
}


@pytest.fixture(scope="module")
def params():
    return E.load_params()


@pytest.fixture(scope="module")
def params_terminate():
    return E.load_params("terminate")


def test_reference_values_match_facts_sheet(params, params_terminate):
    table = E.reference_values(params)
    for name, (expected_return, mean_length) in FACTS_MEAN.items():
        assert table[name]["expected_return"] == pytest.approx(expected_return, abs=1e-5 + 5e-7), name
        if mean_length is not None:
            assert table[name]["mean_length"] == pytest.approx(mean_length, abs=5e-4), name
    table = E.reference_values(params_terminate)
    for name, expected_return in FACTS_TERMINATE.items():
        assert table[name]["expected_return"] == pytest.approx(expected_return, abs=1e-5 + 5e-7), name


def test_float32_jitted_evaluation_agrees(params, params_terminate):
    evaluate = jax.jit(E.policy_evaluation)
    for p, facts in ((params, {k: v[0] for k, v in FACTS_MEAN.items()}), (params_terminate, FACTS_TERMINATE)):
        policies = {
            "random": E.random_policy(p),
            "clinician": E.clinician_policy(p, renormalise=False),
            "clinician_renormalised": E.clinician_policy(p),
            "optimal": E.greedy_admissible(jax.jit(E.value_iteration)(p)[0], p.admissible_mask),
        }
        for name, policy in policies.items():
            expected_return, _ = evaluate(policy, p)
            assert float(expected_return) == pytest.approx(facts[name], abs=1e-4), (p.strategy, name)


def test_policy_evaluation_batches(params):
    batch = jnp.stack([E.random_policy(params), E.clinician_policy(params)])
    returns, lengths = E.policy_evaluation(batch, params)
    assert returns.shape == (2,) and lengths.shape == (2,)
    single = E.policy_evaluation(E.clinician_policy(params), params)
    np.testing.assert_allclose(returns[1], single[0], rtol=1e-6)


def test_greedy_admissible_never_picks_inadmissible(params):
    q = jax.random.normal(jax.random.key(0), (3, E.N_STATES, E.N_ACTIONS))
    policy = E.greedy_admissible(q, params.admissible_mask)
    assert policy.shape == (3, E.N_STATES, E.N_ACTIONS)
    np.testing.assert_array_equal(policy.sum(-1), 1.0)
    assert not bool(jnp.any((policy > 0) & ~params.admissible_mask))


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="'bogus'"):
        E.load_params(strategy="bogus")
    with pytest.raises(ValueError, match="'pixels'"):
        E.load_params(obs_mode="pixels")
