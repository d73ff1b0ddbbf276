"""Per-task state of parameter size, and a second batch of stacked gradients.

Some methods keep a ``(T,) + param.shape`` array per shared leaf in their
state (MoCo's tracked gradients, DB-MTL's gradient buffers, ExcessMTL's
AdaGrad accumulators). :func:`init_task_tree` allocates it at ``init`` with
the params' structure: a shared leaf gets zeros of shape
``(T,) + param.shape`` in f32 (f64 for f64 params), every other leaf an
``optax.MaskedNode`` (no array), as ``optax.masked`` does; the shared leaves
of the tree are then its ``jax.tree.leaves`` in the gradients' leaf order.
:func:`task_tree_leaves` checks the tree against the gradients an update
receives. :func:`check_second_batch` validates the extra stacked gradients of
the two-batch methods (SDMGrad, MoDo) against the first batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core.aggregate import combine_leaves
from pcgrad_optax._core.checks import check_scalar, static_int
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import (PyTree, accumulation_dtype, leaf_name,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum


def init_task_tree(params: PyTree, shared: SharedMask,
                   num_tasks: int) -> PyTree:
  """Zeros of shape ``(T,) + param.shape`` for the shared leaves of params."""
  mask = iter(shared_leaves(shared, params, params))
  return jax.tree.map(
      lambda p: jnp.zeros((num_tasks,) + tuple(np.shape(p)),
                          accumulation_dtype(jnp.asarray(p).dtype))
      if next(mask) else optax.MaskedNode(), params)


def task_tree_leaves(tree: PyTree, leaves: list, mask: list[bool],
                     method: str, field: str) -> list:
  """The arrays of ``tree`` (one per shared gradient leaf), checked."""
  state = jax.tree.leaves(tree)
  shared = [x for x, m in zip(leaves, mask) if m]
  if len(state) != len(shared) or any(
      s.shape != x.shape for s, x in zip(state, shared)):
    raise ValueError(
        f"{method} state `{field}` holds arrays of shapes "
        f"{[tuple(s.shape) for s in state]} but the shared stacked gradients "
        f"have shapes {[tuple(x.shape) for x in shared]}: init was called "
        "with other params, another `shared` mask or another num_tasks.")
  return state


def replace_task_tree(tree: PyTree, new_leaves: list) -> PyTree:
  """``tree`` with its arrays replaced (dtypes kept)."""
  old = jax.tree.leaves(tree)
  return jax.tree.unflatten(
      jax.tree.structure(tree),
      [n.astype(o.dtype) for n, o in zip(new_leaves, old)])


def check_second_batch(second: PyTree, leaves: list, treedef, method: str,
                       arg: str) -> list:
  """The leaves of another batch's stacked gradients, checked against leaves.

  ``ValueError`` (naming ``arg``, the leaf and both shapes) unless ``second``
  has the structure of the first batch and every leaf the same shape.
  """
  if second is None:
    raise ValueError(
        f"{method} needs the stacked gradients of a second, independent "
        f"batch: call tx.update(grads, state, params, {arg}=...) with a "
        "pytree like grads.")
  other, other_def = jax.tree.flatten(second)
  if other_def != treedef:
    raise ValueError(
        f"{method}: `{arg}` must have the structure of the stacked "
        f"gradients, got {other_def} vs {treedef}.")
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree.unflatten(treedef, leaves))[0]]
  for path, x, y in zip(paths, leaves, other):
    dtype = getattr(y, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"{method}: leaf '{leaf_name(path)}' of `{arg}` must be a "
          f"floating-point array, got dtype {dtype}.")
    if tuple(np.shape(y)) != tuple(x.shape):
      raise ValueError(
          f"{method}: leaf '{leaf_name(path)}' of `{arg}` has shape "
          f"{tuple(np.shape(y))}, expected {tuple(x.shape)} as in the "
          "stacked gradients.")
  return [jnp.asarray(y) for y in other]


def check_range(value, name: str, *, low: float = 0.0,
                low_open: bool = False, high: float | None = None,
                high_open: bool = False) -> None:
  """ValueError unless a concrete hyperparameter is a scalar in the range.

  Traced values (``optax.inject_hyperparams`` under ``jit``) are not
  checked (see :func:`pcgrad_optax._core.checks.check_scalar`).
  """
  lo = f"{'(' if low_open else '['}{low}"
  hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"

  def ok(v):
    return (v > low if low_open else v >= low) and (
        high is None or (v < high if high_open else v <= high))

  check_scalar(value, f"`{name}`", ok, f"in {lo}, {hi}")


def two_batch_update(leaves: list, second: list, third: list | None,
                     mask: list[bool], weights: jax.Array, reduction: str
                     ) -> list:
  """The update of a two-batch method, per leaf.

  With a third batch: its shared leaves weighted, its heads summed. Without:
  the same for the mean of the two batches, ``(u(J_1) + u(J_2)) / 2``,
  formed as two weighted sums per leaf (no ``(T, P)`` temporary).
  """
  if third is not None:
    return [o.astype(x.dtype) for o, x in zip(
        combine_leaves(third, mask, weights, reduction), leaves)]
  t = leaves[0].shape[0]
  acc = leaves_accumulation_dtype(leaves)
  scale = (1.0 / t if reduction == "mean" else 1.0) / 2
  shared_w = weights.astype(acc) * scale
  plain = jnp.full((t,), scale, acc)
  out = []
  for x, y, m in zip(leaves, second, mask):
    w = shared_w if m else plain
    a = leaf_weighted_sum(x, w)
    b = leaf_weighted_sum(y.astype(x.dtype), w)
    out.append((a.astype(acc) + b.astype(acc)).astype(x.dtype))
  return out


def check_count(value, name: str) -> None:
  """ValueError unless ``value`` is a positive int (or integer array).

  A traced integer (``optax.inject_hyperparams`` under ``jit``) is only
  checked for its dtype and shape.
  """
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return
  static_int(value, f"`{name}`")
