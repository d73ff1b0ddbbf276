"""The Gram matrix ``K = G G^T`` of stacked per-task gradients.

One pass over the leaves: each shared leaf adds the ``(T, T)`` inner products
of its task slices, accumulated in f32 (f64 for f64 gradients) at full
precision whatever the gradients' dtype. Large unsharded leaves on a single
CPU take :func:`pcgrad_optax._core.cpu.tiled_gram`; everything else is one
``dot_general`` per leaf, contracting the non-task axes in place (no reshape,
so sharded leaves stay sharded). :func:`check_gram` is the input check of
every weighting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from pcgrad_optax._core import cpu
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.mesh import explicit_spec
from pcgrad_optax._core.stacked import (PyTree, accumulation_dtype,
                                        leaves_accumulation_dtype, num_tasks)


def check_gram(gram: jax.Array) -> jax.Array:
  """Validates a Gram matrix and returns it in f32 (or wider).

  Every weighting starts with this: ``ValueError`` unless ``gram`` is square
  ``(T, T)``; integer and half-precision inputs become float32.

  Example:
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.check_gram([[4, 2], [2, 1]]).dtype
    dtype('float32')
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
        f"The Gram matrix must be square (T, T), got shape {gram.shape}.")
  if not jnp.issubdtype(gram.dtype, jnp.floating):
    gram = gram.astype(jnp.float32)
  return gram.astype(jnp.promote_types(gram.dtype, jnp.float32))


def leaf_gram(x: jax.Array) -> jax.Array:
  """``(T, T)`` inner products of the task slices of one stacked leaf.

  Accumulates in f32 or wider at full precision. On GPU/TPU (and for sharded
  or small leaves) this is one ``dot_general`` contracting every non-task
  axis in place (no reshape, so sharded leaves stay sharded); on a
  single-device CPU, large leaves take :func:`cpu.tiled_gram`, which
  computes the same sums several times faster.
  """
  if cpu.fast_path(x):
    # CPU, single device, unsharded only: tiled_gram reshapes the leaf.
    return cpu.tiled_gram(jnp.reshape(x, (x.shape[0], -1)))
  return dot_gram(x)


def dot_gram(x: jax.Array) -> jax.Array:
  """One ``dot_general`` contracting every non-task axis of x with x."""
  axes = tuple(range(1, x.ndim))
  # Under explicit mesh axes a contraction over sharded axes must name its
  # output sharding: the (T, T) Gram is replicated (an all-reduce of T*T
  # numbers, never a gather of the leaf).
  return lax.dot_general(
      x, x, ((axes, axes), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=accumulation_dtype(x.dtype),
      out_sharding=PartitionSpec() if explicit_spec(x) else None)


def masked_gram(leaves: list[jax.Array], mask: list[bool],
                t: int) -> jax.Array:
  """Sum of the per-leaf Gram matrices of the leaves whose mask is True."""
  acc = leaves_accumulation_dtype(leaves)
  gram = jnp.zeros((t, t), acc)
  for x, m in zip(leaves, mask):
    if m:
      gram = gram + leaf_gram(x).astype(acc)
  return gram


def gram_matrix(stacked: PyTree, shared: SharedMask = None) -> jax.Array:
  r"""Gram matrix of stacked per-task gradients.

  .. math::
    K_{ij} = \sum_{\ell \in \text{shared}} \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle

  where :math:`g_i^{(\ell)}` is task :math:`i`'s gradient w.r.t. leaf
  :math:`\ell`. One pass over the leaves; each leaf's contribution is one
  contraction over its non-task axes in f32 (f64 for f64 gradients) at full
  precision, whatever the gradients' dtype.

  Args:
    stacked: pytree of arrays with a common leading task axis of size T.
    shared: None (all leaves), or a pytree of bools / callable
      ``params -> pytree of bools`` selecting the leaves that enter ``K``
      (see :func:`pcgrad_optax.pcgrad`).

  Returns:
    The symmetric positive semi-definite ``(T, T)`` Gram matrix, float32 (or
    float64 for float64 gradients).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = {"w": jnp.array([[1., 0.], [1., 1.]])}
    >>> pcgrad_optax.gram_matrix(g)
    Array([[1., 1.],
           [1., 2.]], dtype=float32)
  """
  t = num_tasks(stacked)
  return masked_gram(jax.tree.leaves(stacked), shared_leaves(shared, stacked),
                     t)
