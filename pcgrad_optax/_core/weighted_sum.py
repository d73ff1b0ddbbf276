"""The second pass: ``sum_t w_t g_t`` over the task axis of stacked leaves.

Accumulated in f32 (or wider), returned in each leaf's dtype; the update
keeps the param's sharding. :func:`sum_over_tasks` is the general reduction
over the task axis, for methods that are not a weighted sum (GradDrop).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core import cpu
from pcgrad_optax._core.mesh import explicit_spec, on_mesh_of
from pcgrad_optax._core.stacked import PyTree, accumulation_dtype, num_tasks


def leaf_weighted_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_t weights[t] * x[t]`` accumulated in f32+, returned in x's dtype."""
  acc = accumulation_dtype(x.dtype)
  if x.shape[0] <= cpu.MAX_ROW_LOOP_TASKS and cpu.fast_path(x):
    # XLA:CPU's dot_general is slower here than adding w_t x_t row by row
    # (10M f32 params: 23 vs 15 ms at T=2, even at T=8; cpu_paths.md).
    w = weights.astype(acc)
    return sum_over_tasks(x, lambda row, t: w[t] * row.astype(acc)).astype(
        x.dtype)
  spec = explicit_spec(x)   # the update keeps the param's sharding
  out = lax.dot_general(
      weights.astype(acc), x, (((0,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=acc,
      out_sharding=on_mesh_of(x, *spec[1:]) if spec else None)
  return out.astype(x.dtype)


def sum_over_tasks(x: jax.Array, row_fn: Callable[[jax.Array, jax.Array],
                                                  PyTree]) -> PyTree:
  """``sum_t row_fn(x[t], t)`` over the leading (task) axis of x.

  ``row_fn`` maps one task's slice and its index to a pytree of arrays, all
  summed over t. XLA:CPU reduces over a leading axis very slowly (a
  ``jnp.sum(x, axis=0)`` of a (8, 1M) f32 array: ~27x the time of adding
  its rows one by one, ``benchmarks/results/cpu_paths.md``), so on CPU this
  is a ``fori_loop`` adding one row's terms per step (compile time flat in
  T, no ``(T, ...)`` temporaries);
  elsewhere the vectorised ``vmap`` + ``sum``, which GPU/TPU fuse.
  """
  t = x.shape[0]
  if jax.default_backend() != "cpu":
    terms = jax.vmap(row_fn)(x, jnp.arange(t))
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), terms)
  first = row_fn(x[0], jnp.zeros([], jnp.int32))
  return lax.fori_loop(
      1, t, lambda i, total: jax.tree.map(
          jnp.add, total, row_fn(lax.dynamic_index_in_dim(x, i, 0, False), i)),
      first)


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  r"""Combines stacked per-task gradients: :math:`\sum_t w_t g_t`.

  Args:
    stacked: pytree of arrays with a common leading task axis of size T.
    weights: ``(T,)`` task weights.

  Returns:
    A params-shaped pytree; each leaf is accumulated in f32 (or wider) and
    returned in its input dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = {"w": jnp.array([[1., 0.], [1., 1.]])}
    >>> pcgrad_optax.weighted_sum(g, jnp.array([0.5, 2.0]))
    {'w': Array([2.5, 2. ], dtype=float32)}
  """
  t = num_tasks(stacked)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(
        f"weights must have shape (T,) = ({t},) to match the stacked "
        f"gradients' task axis, got {weights.shape}.")
  return jax.tree.map(lambda x: leaf_weighted_sum(x, weights), stacked)
