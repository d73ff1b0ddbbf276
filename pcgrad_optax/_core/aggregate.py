"""Stacked gradients in, params-shaped update out: the path every method takes.

:func:`resolve` validates the stacked gradients and the ``shared`` mask;
:func:`combine_leaves` gives shared leaves the method's weights and every
other leaf (a task head) the plain sum (or mean); :func:`aggregate` puts the
Gram-based case together: Gram matrix of the shared leaves, a weighting, the
weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pcgrad_optax._core.gram import masked_gram
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import (PyTree, check_reduction, leaf_name,
                                        leaves_accumulation_dtype, num_tasks)
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum


def resolve(updates: PyTree, params: PyTree | None, shared: SharedMask,
            expected_tasks: int | None, method: str):
  """Validates stacked gradients; returns ``(leaves, treedef, mask, T)``.

  ``expected_tasks``: the T a method was built for (None: any), checked
  against the gradients' task axis with an error naming ``method``.
  """
  t = num_tasks(updates, params)
  if expected_tasks is not None and t != expected_tasks:
    path, first = jax.tree_util.tree_flatten_with_path(updates)[0][0]
    raise ValueError(
        f"{method} was built with num_tasks={expected_tasks} but the stacked "
        f"gradients have T={t} tasks (leaf '{leaf_name(path)}' has "
        f"shape {tuple(first.shape)}).")
  mask = shared_leaves(shared, updates, params)
  leaves, treedef = jax.tree.flatten(updates)
  return leaves, treedef, mask, t


def combine_leaves(leaves, mask, weights, reduction: str) -> list:
  """Shared leaves get ``sum_t w_t g_t``, the others ``sum_t g_t``.

  ``weights`` is ``(T,)`` or a per-leaf list of ``(T,)`` weights; "mean"
  divides by T.
  """
  t = leaves[0].shape[0]
  acc = leaves_accumulation_dtype(leaves)
  scale = 1.0 / t if reduction == "mean" else 1.0
  if not isinstance(weights, list):
    weights = [weights] * len(leaves)
  plain = jnp.full((t,), scale, acc)
  return [leaf_weighted_sum(x, w.astype(acc) * scale if m else plain)
          for x, m, w in zip(leaves, mask, weights)]


# Jitted with the mask static: an eager caller (a stateful transformation
# outside jit) compiles each shape once instead of dispatching per leaf.
combine_leaves_jit = jax.jit(combine_leaves,
                             static_argnames=("mask", "reduction"))


def combine(leaves, treedef, mask, weights, reduction: str):
  """:func:`combine_leaves` (jitted) unflattened into the params' structure."""
  return jax.tree.unflatten(
      treedef, combine_leaves_jit(leaves, tuple(mask), weights, reduction))


def aggregate(stacked: PyTree,
              weighting: Callable[[jax.Array], jax.Array],
              *,
              params: PyTree | None = None,
              shared: SharedMask = None,
              reduction: str = "sum",
              expected_tasks: int | None = None,
              method: str = "aggregate"
              ) -> tuple[PyTree, jax.Array, jax.Array]:
  """Shared machinery of the Gram-based transforms.

  Builds the Gram matrix of the shared leaves, asks ``weighting`` for task
  weights, combines shared leaves with them and gives every non-shared leaf
  (task heads) the plain sum (or mean) over its task axis.

  ``expected_tasks``/``method``: the T a transformation was built for and
  its name, for the error when the gradients have another T.

  Returns:
    ``(combined update, gram, weights)``; ``weights`` are for the "sum"
    reduction (the "mean" reduction divides them by T).
  """
  check_reduction(reduction)
  leaves, treedef, mask, t = resolve(stacked, params, shared, expected_tasks,
                                     method)
  gram = masked_gram(leaves, mask, t)
  weights = jnp.asarray(weighting(gram))
  if weights.shape != (t,):
    raise ValueError(
        f"The weighting returned shape {weights.shape}, expected ({t},).")
  out = combine_leaves(leaves, mask, weights, reduction)
  return jax.tree.unflatten(treedef, out), gram, weights
