"""The whole replay as one batch: the cell form of the TD loss against a plain per-transition sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cql import random_replay_with_repeats

from cleansepsis.full_batch import full_batch
from cleansepsis.replay import distinct_transitions


@pytest.mark.parametrize("dense", [True, False])
def test_td_squared_error_equals_the_sum_over_every_transition(dense):
    data, _ = random_replay_with_repeats(seed=5)
    batch = full_batch(distinct_transitions(data), max_dense_entries=10**9 if dense else 0)
    assert (batch.continue_next is not None) == dense
    rng = np.random.default_rng(0)
    n_rows, n_actions = batch.pair_weight.shape
    q = jnp.asarray(rng.normal(size=(2, n_rows, n_actions)), jnp.float32)  # twin Q over the table rows
    next_value = jnp.asarray(rng.normal(size=n_rows), jnp.float32)
    # the same loss per transition of the original replay, in numpy
    obs = np.concatenate([np.asarray(data.obs), np.asarray(data.next_obs)])
    table = np.asarray(batch.obs_table)
    row_of = [int(np.flatnonzero((table == o).all(1))[0]) for o in obs]  # each observation has one mask here
    n = data.size
    row, next_row = np.array(row_of[:n]), np.array(row_of[n:])
    reward, terminated = np.asarray(data.reward), np.asarray(data.terminated)
    for scale, discount in ((1.0, 0.9), (10.0, 1.0)):
        target = scale * reward + discount * np.where(terminated, 0.0, np.asarray(next_value)[next_row])
        expected = ((np.asarray(q)[:, row, np.asarray(data.action)] - target) ** 2).mean(axis=1)
        got = batch.td_squared_error(q, scale, discount, next_value)
        np.testing.assert_allclose(got, expected, rtol=2e-5)
    # and its gradient with respect to q is the per-transition one
    grad = jax.grad(lambda q: batch.td_squared_error(q, 1.0, 0.9, next_value).sum())(q)
    target = reward + 0.9 * np.where(terminated, 0.0, np.asarray(next_value)[next_row])
    expected_grad = np.zeros_like(np.asarray(q))
    for twin in range(2):
        np.add.at(expected_grad[twin], (row, np.asarray(data.action)),
                  2 * (np.asarray(q)[twin, row, np.asarray(data.action)] - target) / n)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
