"""The Gram matrix ``K = G G^T`` of stacked per-task gradients.

One pass over the leaves: each shared leaf adds the ``(T, T)`` inner products
of its task slices, accumulated in f32 (f64 for f64 gradients) at full
precision whatever the gradients' dtype. Large unsharded leaves on a single
CPU take :func:`_tiled_gram` (slice products in a loop; see
:mod:`pcgrad_optax._core.cpu` for when); everything else is one
``dot_general`` per leaf, contracting the non-task axes in place (no reshape,
so sharded leaves stay sharded). :func:`check_gram` is the input check of
every weighting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core import cpu
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.mesh import explicit_spec, on_mesh_of
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
  single-device CPU, large leaves take :func:`_tiled_gram`, which
  computes the same sums several times faster.
  """
  if cpu.fast_path(x):
    # CPU, single device, unsharded only: _tiled_gram reshapes the leaf.
    return _tiled_gram(jnp.reshape(x, (x.shape[0], -1)))
  return dot_gram(x)


def leaf_cross(x: jax.Array, y: jax.Array) -> jax.Array:
  """``(T, T)`` inner products ``<x_s, y_t>`` of two stacked leaves.

  :func:`leaf_gram` of two leaves of one shape: one ``dot_general``, or on
  a single-device CPU (large, unsharded leaves) :func:`_tiled_gram` of the
  pair, which also spares XLA:CPU the transposed copy of one operand that
  it makes for a ``(T, P) x (P, T)`` contraction.
  """
  if cpu.fast_path(x) and cpu.fast_path(y):
    return _tiled_gram(jnp.reshape(x, (x.shape[0], -1)),
                       jnp.reshape(y, (y.shape[0], -1)))
  return dot_cross(x, y)


def dot_gram(x: jax.Array) -> jax.Array:
  """One ``dot_general`` contracting every non-task axis of x with x."""
  axes = tuple(range(1, x.ndim))
  # Under explicit mesh axes a contraction over sharded axes must name its
  # output sharding: the (T, T) Gram is replicated (an all-reduce of T*T
  # numbers, never a gather of the leaf), named on the leaf's own mesh so
  # that no jax.set_mesh context is needed.
  return lax.dot_general(
      x, x, ((axes, axes), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=accumulation_dtype(x.dtype),
      out_sharding=on_mesh_of(x) if explicit_spec(x) else None)


# XLA:CPU computes a (T, P) x (P, T) contraction with small T and large P
# slowly (3M f32 params: ~10x the time of torch's x @ x.T at T=2, 2-4x at
# T=8..128): its matmul kernels repack the whole (T, P) operand and split no
# work over the cores for a tiny (T, T) output. _tiled_gram feeds them
# cache-sized slices instead, several independent ones per loop step.
_CHUNK_BYTES = 128 * 1024  # one (T, chunk) slice, well inside L2 ...
_MIN_CHUNK = 1024          # ... but never narrower than this (large T)
# Independent slice products per loop step. XLA:CPU runs the independent ops
# of a step concurrently on its thread pool only when a step has more than 8
# ops; 16 slices keep both cores (or more) busy.
_SLICES_PER_STEP = 16


@jax.jit   # one compiled loop when called outside jit too
def _tiled_gram(flat: jax.Array, other: jax.Array | None = None) -> jax.Array:
  """``flat @ other.T`` of ``(T, P)`` arrays (``other=flat`` by default),
  fast on XLA:CPU.

  A loop walks the P axis; each step contracts 16 independent
  ``(T, chunk)`` slices with themselves, which XLA:CPU runs concurrently.
  ``chunk`` is about 128 KiB of a slice (so it stays in cache) but at least
  1024 columns (wider slices win for T >= 64), adjusted so that the steps
  tile P up to fewer than ``16 * steps`` columns, which one plain contraction
  adds. Same f32+ accumulation at full precision as the plain contraction,
  summed in a different order; the loop keeps compile time flat in T.
  Measured against one ``dot_general`` (``benchmarks/results/cpu_paths.md``,
  2-core EPYC): 3-4x faster for T <= 32 on 3M f32 params, 1.5x at T=128;
  within 0.75-1.25x of torch's BLAS ``x @ x.T`` from T=8 up, slower at T=2.
  """
  if other is None:
    pair = lambda a: dot_gram(a(flat))
  else:
    pair = lambda a: dot_cross(a(flat), a(other))
  t, p = flat.shape
  acc = accumulation_dtype(flat.dtype)
  if other is not None:
    acc = jnp.promote_types(acc, accumulation_dtype(other.dtype))
  slices = _SLICES_PER_STEP
  target = max(_MIN_CHUNK, _CHUNK_BYTES // (t * flat.dtype.itemsize))
  steps = max(1, p // (slices * target))
  chunk = p // (steps * slices)
  block = slices * chunk

  def step(i, gram):
    return gram + sum(
        pair(lambda a, j=j: lax.dynamic_slice_in_dim(
            a, i * block + j * chunk, chunk, 1)).astype(acc)
        for j in range(slices))

  gram = lax.fori_loop(0, steps, step, jnp.zeros((t, t), acc))
  if steps * block < p:
    gram = gram + pair(lambda a: a[:, steps * block:]).astype(acc)
  return gram


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


def dot_cross(x: jax.Array, y: jax.Array) -> jax.Array:
  """``(T, T)`` inner products ``<x_i, y_j>`` of two stacked leaves."""
  axes = tuple(range(1, x.ndim))
  acc = jnp.promote_types(accumulation_dtype(x.dtype),
                          accumulation_dtype(y.dtype))
  return lax.dot_general(
      x, y, ((axes, axes), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=acc,
      out_sharding=on_mesh_of(x) if explicit_spec(x) else None)


def masked_cross(leaves: list[jax.Array], others: list[jax.Array],
                 mask: list[bool], t: int) -> jax.Array:
  r"""Cross matrix :math:`J_1 J_2^T` of two batches' shared leaves.

  ``C_ij = sum_l <g_i^(l), h_j^(l)>`` over the leaves whose mask is True:
  one contraction per leaf, in f32 or wider, like :func:`masked_gram` (the
  Gram matrix is the cross matrix of a batch with itself). Not symmetric in
  general.
  """
  acc = jnp.result_type(leaves_accumulation_dtype(leaves),
                        leaves_accumulation_dtype(others))
  cross = jnp.zeros((t, t), acc)
  for x, y, m in zip(leaves, others, mask):
    if m:
      cross = cross + leaf_cross(x, y).astype(acc)
  return cross
