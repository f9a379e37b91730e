"""A linear solve that never runs as a batched LU.

Under `vmap`, `jnp.linalg.solve` becomes one batched LU, which jaxlib spreads over its CPU thread pool
(`ParallelBatchMap`). With 2 threads, two such solves in one program wait on each other's tasks forever
(seen here with gdb: every thread parked in ParallelBatchMap). This solve's batching rule loops over the
batch with `lax.map` instead, so every LU is a plain unbatched call, however many vmaps wrap it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


@custom_vmap
def linear_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solve a x = b for square `a` (n, n) and `b` (n,) or (n, k)."""
    return jnp.linalg.solve(a, b)


@linear_solve.def_vmap
def _linear_solve_vmap(axis_size: int, in_batched: list[bool], a: jax.Array, b: jax.Array):
    a_batched, b_batched = in_batched
    if not a_batched:
        a = jnp.broadcast_to(a, (axis_size, *a.shape))
    if not b_batched:
        b = jnp.broadcast_to(b, (axis_size, *b.shape))
    return jax.lax.map(lambda ab: linear_solve(*ab), (a, b)), True
