"""Trimmed mean: the coordinate-wise mean after dropping the extremes.

Yin, Chen, Ramchandran & Bartlett, `Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates <https://arxiv.org/abs/1803.01498>`_,
ICML 2018.

Not Gram-based: an elementwise rule over the stacked leaves, so it has no
weighting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from pcgrad_optax._core.aggregate import resolve
from pcgrad_optax._core.checks import static_int
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import accumulation_dtype, check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum, sum_over_tasks


def _check_trim(trim) -> int | None:
  """A concrete ``trim`` as an int (validated); None when traced."""
  return static_int(trim, "trimmed_mean's trim", minimum=0)


# Up to this trim, select the extremes by rounds of passes over the task
# axis (a few P-sized buffers; on XLA:CPU ~300x faster than sorting a
# (8, 1M) leaf along its task axis); above it, sort.
_MAX_ROUNDS_TRIM = 4


def _trimmed_sum_by_rounds(x, trim, acc):
  """Sum over tasks without the trim largest and smallest, per coordinate.

  Round r picks, per coordinate, the largest (r < trim) or smallest value
  among the tasks not picked yet (ties: the lower task index) and records
  its task; a last pass sums the tasks never picked. Every pass is a
  ``fori_loop`` over the task axis, so nothing is ``(T,) + shape``.
  """
  t = x.shape[0]
  shape = x.shape[1:]
  def row(i):
    return lax.dynamic_index_in_dim(x, i, 0, False).astype(acc)

  def pick(r, chosen):
    sign = jnp.where(r < trim, 1, -1).astype(acc)

    def visit(i, carry):
      best, idx = carry
      value = sign * row(i)
      free = ~jnp.any(chosen == i, axis=0)
      better = free & ((idx < 0) | (value > best))
      return jnp.where(better, value, best), jnp.where(better, i, idx)

    _, idx = lax.fori_loop(0, t, visit, (zeros, none))
    return chosen.at[r].set(idx)

  # The carries are built from a row so that they share its sharding (and
  # shard_map's varying axes): loops under explicit mesh axes need that.
  zeros = jnp.zeros_like(row(0))
  none = jnp.full_like(zeros, -1, jnp.int32)
  chosen = lax.fori_loop(0, 2 * trim, pick,
                         jnp.broadcast_to(none, (2 * trim,) + shape))
  return lax.fori_loop(
      0, t, lambda i, total: total + jnp.where(
          jnp.any(chosen == i, axis=0), 0, row(i)), zeros)


@functools.partial(jax.jit, static_argnames=("mask", "trim", "reduction"))
def _trimmed_mean_step(leaves, *, mask, trim, reduction):
  t = leaves[0].shape[0]
  scale = 1.0 / t if reduction == "mean" else 1.0
  out = []
  for x, m in zip(leaves, mask):
    acc = accumulation_dtype(x.dtype)
    if not m:
      out.append(leaf_weighted_sum(x, jnp.full((t,), scale, acc)))
      continue
    if trim == 0:
      total = sum_over_tasks(x, lambda row, _, acc=acc: row.astype(acc))
    elif trim <= _MAX_ROUNDS_TRIM:
      total = _trimmed_sum_by_rounds(x, trim, acc)
    else:
      kept = jnp.sort(x, axis=0)[trim:t - trim]
      total = sum_over_tasks(kept, lambda row, _, acc=acc: row.astype(acc))
    out.append((total * (scale / (t - 2 * trim))).astype(x.dtype))
  return out


@functools.partial(jax.jit, static_argnames=("mask", "reduction"))
def _trimmed_mean_traced_step(leaves, trim, *, mask, reduction):
  # A traced trim (optax.inject_hyperparams under jit) cannot pick a shape:
  # sort along the task axis and mask the sorted rows instead.
  t = leaves[0].shape[0]
  scale = 1.0 / t if reduction == "mean" else 1.0
  rows = jnp.arange(t)
  keep = (rows >= trim) & (rows < t - trim)
  out = []
  for x, m in zip(leaves, mask):
    acc = accumulation_dtype(x.dtype)
    if not m:
      out.append(leaf_weighted_sum(x, jnp.full((t,), scale, acc)))
      continue
    kept = jnp.where(keep.reshape((t,) + (1,) * (x.ndim - 1)),
                     jnp.sort(x, axis=0).astype(acc), 0)
    total = jnp.sum(kept, axis=0)
    out.append((total * (scale / (t - 2 * trim).astype(acc))
                ).astype(x.dtype))
  return out


@documented
def trimmed_mean(trim: int, *, reduction: str = "sum",
                 shared: SharedMask = None) -> Aggregator:
  r"""Coordinate-wise trimmed mean of the task gradients (Yin et al., 2018).

  For every coordinate of the shared leaves, sort the :math:`T` task values
  :math:`g_{(1)} \le \dots \le g_{(T)}`, drop the ``trim`` largest and the
  ``trim`` smallest and average the rest:

  .. math::
    u = \frac{1}{T - 2b} \sum_{i = b + 1}^{T - b} g_{(i)}, \qquad b =
    \texttt{trim}.

  ``trim=0`` is the mean; ``2 * trim < T`` is checked when the update is
  traced. A robust aggregator from distributed learning, not Gram-based:
  for ``trim <= 4`` the extremes are picked by ``2 trim`` passes over the
  task axis (``2 trim`` int32 index buffers of the leaf's shape), beyond
  that by one sort along the task axis (a ``(T,) + shape`` temporary).
  Heads get their plain sum. ``trim`` may also be a JAX integer (so
  ``optax.inject_hyperparams`` wraps the factory without ``static_args``):
  a traced one always sorts and masks the sorted rows, and is not checked
  against T.

  @FIRST_IN_CHAIN@

  Args:
    trim: :math:`b \ge 0`, the number of values dropped at each end.
  @SHARED_ARGS@

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with ``optax.EmptyState``.
    ``update(updates, state, params=None)`` takes stacked gradients (every
    leaf of shape ``(T,) + param.shape``) and returns params-shaped updates.
    The trimmed mean keeps a different set of tasks per coordinate rather
    than task weights (as GradDrop), so its state records no ``weights``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.trimmed_mean(1)
    >>> g = {"w": jnp.array([[1., 10.], [2., -3.], [100., 0.], [3., 1.]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]    # means of (2, 3) and (0, 1)
    Array([2.5, 0.5], dtype=float32)

  References:
    Yin, Chen, Ramchandran & Bartlett, `Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates
    <https://arxiv.org/abs/1803.01498>`_, ICML 2018.
  """
  check_reduction(reduction)
  trim_value = _check_trim(trim)   # None when traced

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, None,
                                       "trimmed_mean")
    if trim_value is None:
      out = _trimmed_mean_traced_step(leaves, jnp.asarray(trim, jnp.int32),
                                      mask=tuple(mask), reduction=reduction)
      return jax.tree.unflatten(treedef, out), state
    if 2 * trim_value >= t:
      raise ValueError(f"trimmed_mean drops 2 * trim = {2 * trim_value} of "
                       f"the T={t} task values per coordinate; it needs "
                       f"2 * trim < T.")
    out = _trimmed_mean_step(leaves, mask=tuple(mask), trim=trim_value,
                             reduction=reduction)
    return jax.tree.unflatten(treedef, out), state

  return Aggregator(init_fn, update_fn)
