"""The Gram-matrix core shared by every aggregator.

Stacked per-task gradients are a pytree whose leaves all carry one extra
leading task axis of size ``T``. Most multi-task aggregators only need the
``T x T`` Gram matrix ``K = G G^T`` of the task gradients: one pass over the
leaves builds it, the method works on ``T x T`` numbers, and a second pass
forms ``sum_t w_t g_t``. Nothing here loops over tasks in Python, flattens the
model, or builds a ``T x T x P`` intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

PyTree = Any
SharedMask = PyTree | Callable[[PyTree], PyTree] | None

REDUCTIONS = ("sum", "mean")


def leaf_name(path) -> str:
  """'/'-joined name of a pytree key path (``"encoder/Dense_0/kernel"``)."""
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name or "<root>"


def accumulation_dtype(dtype) -> np.dtype:
  """f32 for half-precision and f32 inputs, f64 for f64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"Unknown reduction {reduction!r}; expected one of {REDUCTIONS}.")


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


def shared_leaves(shared: SharedMask, stacked: PyTree,
                  params: PyTree | None = None) -> list[bool]:
  """Resolves a ``shared`` mask into one static bool per stacked leaf.

  Args:
    shared: None (every leaf shared), a pytree of bools with the structure of
      the params (or a prefix of it, like ``optax.masked``), or a callable
      ``params -> pytree of bools``. A mask of other container types with
      the same keys (a nested dict for a Flax ``nnx.State``) is matched by
      key paths, every entry covering the leaves below it.
    stacked: the stacked gradients.
    params: the params, handed to a callable mask; when None the callable
      gets a shape-only view of the params.

  Returns:
    A list of Python bools in the leaf order of ``stacked``.
  """
  num_leaves = len(jax.tree.leaves(stacked))
  if shared is None:
    return [True] * num_leaves
  mask = shared(params if params is not None else unstacked_view(stacked)) \
      if callable(shared) else shared
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if isinstance(m, jax.core.Tracer) or not isinstance(
        m, (bool, np.bool_)) and not (
            isinstance(m, np.ndarray) and m.dtype == bool and m.ndim == 0):
      raise ValueError(
          f"`shared` mask leaf '{leaf_name(path)}' is {m!r}; mask leaves must "
          "be static Python bools (True for shared parameters).")
  try:
    broadcast = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, stacked)
  except (ValueError, TypeError) as e:
    by_path = _mask_by_key_path(mask, stacked)
    if by_path is None:
      raise ValueError(
          "The `shared` mask's structure does not match the gradients: mask "
          f"{jax.tree.structure(mask)} vs gradients "
          f"{jax.tree.structure(stacked)} ({e}).") from None
    return by_path
  return jax.tree.leaves(broadcast)


def _key_name(key) -> Any:
  for attr in ("key", "name", "idx"):   # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _mask_by_key_path(mask: PyTree, stacked: PyTree) -> list[bool] | None:
  """A mask matched to the gradients by key names, or None.

  For containers of other node types than the gradients' with the same keys,
  e.g. a plain nested dict against a Flax ``nnx.State``: each gradient leaf
  takes the mask entry whose key path is the longest prefix of its own. None
  unless every leaf finds an entry and every entry is used.
  """
  entries = {tuple(map(_key_name, path)): bool(m)
             for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  out, used = [], set()
  for path, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]:
    keys = tuple(map(_key_name, path))
    prefix = next((keys[:n] for n in range(len(keys), -1, -1)
                   if keys[:n] in entries), None)
    if prefix is None:
      return None
    used.add(prefix)
    out.append(entries[prefix])
  return out if used == set(entries) else None


def explicit_spec(x) -> tuple | None:
  """x's PartitionSpec if an explicit mesh axis shards it, else None."""
  spec = tuple(getattr(jax.typeof(x).sharding, "spec", ()))
  return spec if any(s is not None for s in spec) else None


def leaf_gram(x: jax.Array) -> jax.Array:
  """``(T, T)`` inner products of the task slices of one stacked leaf.

  Accumulates in f32 or wider at full precision. On GPU/TPU (and for sharded
  or small leaves) this is one ``dot_general`` contracting every non-task
  axis in place (no reshape, so sharded leaves stay sharded); on a
  single-device CPU, large leaves take :func:`_cpu_gram`, which computes the
  same sums several times faster.
  """
  if _cpu_fast_path(x):
    # CPU, single device, unsharded only: _cpu_gram reshapes the leaf.
    return _cpu_gram(jnp.reshape(x, (x.shape[0], -1)))
  return _dot_gram(x)


def _dot_gram(x: jax.Array) -> jax.Array:
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


# XLA:CPU computes a (T, P) x (P, T) contraction with small T and large P
# slowly (3M f32 params: ~10x the time of torch's x @ x.T at T=2, 2-4x at
# T=8..128): its matmul kernels repack the whole (T, P) operand and split no
# work over the cores for a tiny (T, T) output. _cpu_gram feeds them
# cache-sized slices instead, several independent ones per loop step.
_CPU_MIN_SIZE = 1 << 15        # smaller leaves: one dot_general is fine
_CPU_CHUNK_BYTES = 128 * 1024  # one (T, chunk) slice, well inside L2 ...
_CPU_MIN_CHUNK = 1024          # ... but never narrower than this (large T)
# Independent slice products per loop step. XLA:CPU runs the independent ops
# of a step concurrently on its thread pool only when a step has more than 8
# ops; 16 slices keep both cores (or more) busy.
_CPU_SLICES_PER_STEP = 16
# Up to this many tasks leaf_weighted_sum adds rows instead (see there).
_CPU_MAX_ROW_LOOP_TASKS = 8


def _cpu_fast_path(x) -> bool:
  """Whether leaf x takes the CPU-only code below (big, unsharded, 1 CPU)."""
  return (math.prod(x.shape[1:]) >= _CPU_MIN_SIZE
          and jax.default_backend() == "cpu" and jax.device_count() == 1
          and explicit_spec(x) is None)


@jax.jit   # one compiled loop when called outside jit too
def _cpu_gram(flat: jax.Array) -> jax.Array:
  """``flat @ flat.T`` of a ``(T, P)`` array, fast on XLA:CPU.

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
  t, p = flat.shape
  acc = accumulation_dtype(flat.dtype)
  slices = _CPU_SLICES_PER_STEP
  target = max(_CPU_MIN_CHUNK, _CPU_CHUNK_BYTES // (t * flat.dtype.itemsize))
  steps = max(1, p // (slices * target))
  chunk = p // (steps * slices)
  block = slices * chunk

  def step(i, gram):
    return gram + sum(
        _dot_gram(lax.dynamic_slice_in_dim(flat, i * block + j * chunk,
                                           chunk, 1))
        for j in range(slices))

  gram = lax.fori_loop(0, steps, step, jnp.zeros((t, t), acc))
  rest = flat[:, steps * block:]
  if rest.shape[1]:
    gram = gram + _dot_gram(rest)
  return gram


def leaf_weighted_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_t weights[t] * x[t]`` accumulated in f32+, returned in x's dtype."""
  acc = accumulation_dtype(x.dtype)
  if x.shape[0] <= _CPU_MAX_ROW_LOOP_TASKS and _cpu_fast_path(x):
    # XLA:CPU's dot_general is slower here than adding w_t x_t row by row
    # (10M f32 params: 23 vs 15 ms at T=2, even at T=8; cpu_paths.md).
    w = weights.astype(acc)
    return sum_over_tasks(x, lambda row, t: w[t] * row.astype(acc)).astype(
        x.dtype)
  spec = explicit_spec(x)   # the update keeps the param's sharding
  out = lax.dot_general(
      weights.astype(acc), x, (((0,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=acc,
      out_sharding=PartitionSpec(*spec[1:]) if spec else None)
  return out.astype(x.dtype)


def sum_over_tasks(x: jax.Array, row_fn: Callable[[jax.Array, jax.Array],
                                                  PyTree]) -> PyTree:
  """``sum_t row_fn(x[t], t)`` over the leading (task) axis of x.

  ``row_fn`` maps one task's slice and its index to a pytree of arrays, all
  summed over t. XLA:CPU reduces over a leading axis very slowly (a
  ``jnp.sum(x, axis=0)`` of a (8, 1M) f32 array: ~27x the time of adding
  its rows one by one, ``benchmarks/results/cpu_paths.md``), so on CPU this is a ``fori_loop`` adding one row's
  terms per step (compile time flat in T, no ``(T, ...)`` temporaries);
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


def masked_gram(leaves: list[jax.Array], mask: list[bool],
                t: int) -> jax.Array:
  """Sum of the per-leaf Gram matrices of the leaves whose mask is True."""
  acc = jnp.result_type(*[accumulation_dtype(x.dtype) for x in leaves])
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


def aggregate(stacked: PyTree,
              weighting: Callable[[jax.Array], jax.Array],
              *,
              params: PyTree | None = None,
              shared: SharedMask = None,
              reduction: str = "sum") -> tuple[PyTree, jax.Array, jax.Array]:
  """Shared machinery of the Gram-based transforms.

  Builds the Gram matrix of the shared leaves, asks ``weighting`` for task
  weights, combines shared leaves with them and gives every non-shared leaf
  (task heads) the plain sum (or mean) over its task axis.

  Returns:
    ``(combined update, gram, weights)``; ``weights`` are for the "sum"
    reduction (the "mean" reduction divides them by T).
  """
  check_reduction(reduction)
  t = num_tasks(stacked, params)
  mask = shared_leaves(shared, stacked, params)
  leaves, treedef = jax.tree.flatten(stacked)
  gram = masked_gram(leaves, mask, t)
  acc = gram.dtype
  weights = jnp.asarray(weighting(gram))
  if weights.shape != (t,):
    raise ValueError(
        f"The weighting returned shape {weights.shape}, expected ({t},).")
  scale = 1.0 / t if reduction == "mean" else 1.0
  shared_w = weights.astype(acc) * scale
  plain_w = jnp.full((t,), scale, acc)
  out = [leaf_weighted_sum(x, shared_w if m else plain_w)
         for x, m in zip(leaves, mask)]
  return jax.tree.unflatten(treedef, out), gram, weights
