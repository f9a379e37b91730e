"""linear_solve: correct under nested vmap, and never lowered to a batched LU (which deadlocks jaxlib's
2-thread CPU pool when two run at once)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import env as E
from cleansepsis.linalg import linear_solve


def test_nested_vmap_solves_each_system():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 4, 6, 6)) + 6 * np.eye(6), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 4, 6, 2)), jnp.float32)
    x = jax.jit(jax.vmap(jax.vmap(linear_solve)))(a, b)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(np.asarray(a, np.float64), np.asarray(b)), atol=1e-4)
    shared = jax.vmap(linear_solve, in_axes=(None, 0))(a[0, 0], b[0])  # one matrix, many right-hand sides
    np.testing.assert_allclose(np.asarray(shared), np.linalg.solve(np.asarray(a[0, 0]), np.asarray(b[0])), atol=1e-4)


def _lu_batch_dims(lowered_text: str) -> list[str]:
    return re.findall(r'lapack_\w*getrf\w*\(.*?num_batch_dims = "(\d+)"', lowered_text)


def test_batched_policy_evaluation_lowers_to_unbatched_lu():
    params = E.load_params()
    policies = jnp.stack([E.random_policy(params), E.clinician_policy(params)])

    def two_solves(a, b):  # the shape that deadlocked: two independent batched evaluations in one program
        return E.policy_evaluation(a, params), E.policy_evaluation(b, params)

    lowered = jax.jit(two_solves).lower(policies, policies)
    dims = _lu_batch_dims(lowered.as_text())
    assert dims and set(dims) == {"0"}, dims
    returns, _ = lowered.compile()(policies, policies)[0]  # the very program checked above, traced once
    np.testing.assert_allclose(np.asarray(returns), [0.780071, 0.782014], atol=1e-5)


def test_plain_solve_would_be_batched():
    """Guards the test above: jnp.linalg.solve under vmap does lower to a batched LU."""
    a = jnp.ones((2, 3, 3)) + jnp.eye(3)
    text = jax.jit(jax.vmap(jnp.linalg.solve)).lower(a, jnp.ones((2, 3))).as_text()
    assert set(_lu_batch_dims(text)) == {"1"}
