"""Stacked per-task gradients: their shape contract and its checks.

Stacked per-task gradients are a pytree with the structure of the params
whose leaves all carry one extra leading task axis of size ``T`` (what
``jax.vmap``/``jax.jacrev`` of the task losses, or
:func:`pcgrad_optax.task_value_and_grad`, return). Everything here looks at
shapes and dtypes only, so bad input raises a ``ValueError`` naming the leaf
at trace time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

REDUCTIONS = ("sum", "mean")


def leaf_name(path) -> str:
  """'/'-joined name of a pytree key path (``"encoder/Dense_0/kernel"``)."""
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name or "<root>"


def accumulation_dtype(dtype) -> np.dtype:
  """f32 for half-precision and f32 inputs, f64 for f64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def leaves_accumulation_dtype(leaves) -> np.dtype:
  """The f32-or-wider dtype that holds every leaf's accumulation."""
  return jnp.result_type(*[accumulation_dtype(x.dtype) for x in leaves])


def check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"Unknown reduction {reduction!r}; expected one of {REDUCTIONS}.")


class NotGramBased(ValueError):
  """A transformation that is not Gram-based was handed a ``GramProbe``.

  Raised by :func:`num_tasks`, which every transformation of the package
  calls on its stacked gradients, so that
  :func:`pcgrad_optax.value_and_aggregate` can tell "not Gram-based" from
  any other error (which it lets through).
  """


def num_tasks(stacked: PyTree, params: PyTree | None = None) -> int:
  """Validates stacked per-task gradients and returns the number of tasks T.

  Runs on shapes only, so it raises at trace time.

  Args:
    stacked: pytree whose leaves have a leading task axis of size T.
    params: optional params pytree; when given, every stacked leaf must have
      shape ``(T,) + param.shape``.

  Returns:
    T, the size of the shared leading task axis.

  Raises:
    ValueError: naming the offending leaf and its shapes, when a leaf is not a
      floating array, has no task axis, or the task axes disagree.
  """
  if getattr(type(stacked), "gram_probe", False) is True:
    raise NotGramBased(
        "This transformation is not Gram-based: it needs the stacked "
        "per-task gradients, not a GramProbe.")
  leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
  if not leaves:
    raise ValueError("The stacked gradients have no leaves.")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"Leaf '{leaf_name(path)}' of the stacked gradients must be a "
          f"floating-point array, got {type(leaf).__name__} with dtype {dtype}.")
    if jnp.ndim(leaf) == 0:
      raise ValueError(
          f"Leaf '{leaf_name(path)}' of the stacked gradients has shape (): it "
          "has no leading task axis. Stack per-task gradients with jax.vmap, "
          "jax.jacrev or pcgrad_optax.task_value_and_grad.")

  if params is not None:
    param_leaves, param_def = jax.tree_util.tree_flatten(params)
    stacked_def = jax.tree_util.tree_structure(stacked)
    if param_def != stacked_def:
      raise ValueError(
          "The stacked gradients and the params have different structures: "
          f"{stacked_def} vs {param_def}.")
    t = leaves[0][1].shape[0]
    for (path, leaf), param in zip(leaves, param_leaves):
      pshape = tuple(np.shape(param))
      if tuple(leaf.shape) == pshape:
        raise ValueError(
            f"Leaf '{leaf_name(path)}' has shape {tuple(leaf.shape)}, equal to "
            f"its param's shape {pshape}: it has no leading task axis. Pass "
            "stacked per-task gradients (shape (T,) + param shape).")
      if tuple(leaf.shape[1:]) != pshape or leaf.shape[0] != t:
        first = leaf_name(leaves[0][0])
        raise ValueError(
            f"Leaf '{leaf_name(path)}' has shape {tuple(leaf.shape)}, expected "
            f"(T,) + param shape = {(t,) + pshape} with T={t} taken from leaf "
            f"'{first}' of shape {tuple(leaves[0][1].shape)}.")
    return t

  first_path, first = leaves[0]
  t = first.shape[0]
  for path, leaf in leaves[1:]:
    if leaf.shape[0] != t:
      raise ValueError(
          "The leaves' leading task axes disagree: leaf "
          f"'{leaf_name(first_path)}' has shape {tuple(first.shape)} (T={t}) "
          f"but leaf '{leaf_name(path)}' has shape {tuple(leaf.shape)} "
          f"(T={leaf.shape[0]}). Every leaf needs the same leading task axis; "
          "a leaf that lost it is often a param that was not differentiated "
          "per task.")
  return t


def unstacked_view(stacked: PyTree) -> PyTree:
  """Shape-only params-like view of stacked gradients (task axis dropped)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
