"""The whole replay as one batch, with the TD loss written over (observation, action) cells.

`DistinctTransitions` (cleansepsis.replay) already runs the networks once per distinct observation; what
is left per update is the TD target, a sum over the distinct transitions (93,503 on the 926,212-transition
ICU-Sepsis replay). Every learner's target is linear in a value of the next observation,

    y_i = reward_scale * r_i + discount * (1 - terminated_i) * next_value[next_row_i],

so the per-cell mean and mean square of y are fixed matrices (cells x table rows) times next_value and
next_value^2, built once from the data. On ICU-Sepsis that is 2,238 x 714: a small dense product per
update instead of two scatters over every distinct transition. Where the matrices would be large (a
forced full batch on MIMIC-IV, where observations never repeat) the loss falls back to the scatter form.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cleansepsis.replay import DistinctTransitions

# Dense cell matrices up to this many entries (two float32 matrices of 8M entries are 64 MB).
MAX_DENSE_ENTRIES = 8_000_000


class FullBatch(DistinctTransitions):
    """DistinctTransitions plus, per observed (row, action) cell k (cells with weight > 0):
    cell_row/cell_action (K,), cell_weight (K,) = pair_weight at the cell, reward_mean and
    reward_square_mean (K,), and the matrices (K, U) continue_next[k, j] = mean over the cell's
    transitions of (1 - terminated) * [next row = j], and reward_continue_next, the same times the reward."""

    cell_row: jnp.ndarray
    cell_action: jnp.ndarray
    cell_weight: jnp.ndarray
    reward_mean: jnp.ndarray
    reward_square_mean: jnp.ndarray
    continue_next: jnp.ndarray | None
    reward_continue_next: jnp.ndarray | None

    def td_squared_error(self, q: jnp.ndarray, reward_scale, discount, next_value: jnp.ndarray) -> jnp.ndarray:
        """sum_i weight_i (q[row_i, action_i] - y_i)^2 with y_i as in the module docstring, for
        q (..., U, n_actions) and next_value (U,) (held fixed by the caller); returns (...)."""
        if self.continue_next is None:  # too many cells for the dense form
            target = reward_scale * self.reward + discount * jnp.where(
                self.terminated, 0.0, next_value[self.next_obs_index]
            )
            return self.squared_error(q, target)
        q_cell = q[..., self.cell_row, self.cell_action]  # (..., K)
        next_mean = self.continue_next @ next_value  # (K,)
        mean = reward_scale * self.reward_mean + discount * next_mean
        square_mean = (
            reward_scale**2 * self.reward_square_mean
            + 2 * reward_scale * discount * (self.reward_continue_next @ next_value)
            + discount**2 * (self.continue_next @ next_value**2)
        )
        variance = jnp.maximum(square_mean - mean**2, 0.0)
        return jnp.sum(self.cell_weight * ((q_cell - mean) ** 2 + variance), axis=-1)


def full_batch(distinct: DistinctTransitions, max_dense_entries: int = MAX_DENSE_ENTRIES) -> FullBatch:
    """The FullBatch of a replay's distinct transitions (numpy work, once, before compiling)."""
    n_rows, n_actions = distinct.pair_weight.shape
    row = np.asarray(distinct.obs_index, np.int64)
    action = np.asarray(distinct.action, np.int64)
    weight = np.asarray(distinct.weight, np.float64)
    reward = np.asarray(distinct.reward, np.float64)
    continues = ~np.asarray(distinct.terminated, bool)
    flat = row * n_actions + action
    cells, cell_of = np.unique(flat, return_inverse=True)
    k = cells.size
    cell_weight = np.bincount(cell_of, weight, k)
    reward_mean = np.bincount(cell_of, weight * reward, k) / cell_weight
    reward_square_mean = np.bincount(cell_of, weight * reward**2, k) / cell_weight
    continue_next = reward_continue_next = None
    if k * n_rows <= max_dense_entries:
        next_row = np.asarray(distinct.next_obs_index, np.int64)
        share = weight * continues / cell_weight[cell_of]
        continue_next = np.zeros((k, n_rows))
        np.add.at(continue_next, (cell_of, next_row), share)
        reward_continue_next = np.zeros((k, n_rows))
        np.add.at(reward_continue_next, (cell_of, next_row), share * reward)
    fields = {name: getattr(distinct, name) for name in DistinctTransitions.__dataclass_fields__}
    as32 = (lambda x: None if x is None else jnp.asarray(x, jnp.float32))  # noqa: E731
    return FullBatch(
        **fields,
        cell_row=jnp.asarray(cells // n_actions, jnp.int32),
        cell_action=jnp.asarray(cells % n_actions, jnp.int32),
        cell_weight=as32(cell_weight),
        reward_mean=as32(reward_mean),
        reward_square_mean=as32(reward_square_mean),
        continue_next=as32(continue_next),
        reward_continue_next=as32(reward_continue_next),
    )


__all__ = ["FullBatch", "full_batch"]
