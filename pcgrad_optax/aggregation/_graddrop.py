"""GradDrop: keep one sign per coordinate, chosen by its sign purity.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, `Just Pick a Sign:
Optimizing Deep Multitask Models with Gradient Sign Dropout
<https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.

Not Gram-based: an elementwise rule over the stacked leaves, so it has no
weighting.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core.aggregate import resolve
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import accumulation_dtype, check_reduction
from pcgrad_optax._core.checks import concrete
from pcgrad_optax._core.transform import (Aggregator, canonicalize_key,
                                          documented)
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum, sum_over_tasks


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    key: typed PRNG key. At step ``n`` the uniform draws of the leaf at
      position ``l`` in ``jax.tree.leaves`` order are
      ``jax.random.uniform(fold_in(fold_in(key, n), l), leaf.shape[1:])``
      (float32), one per coordinate, shared by all tasks.
    count: number of updates done so far (int32).
  """
  key: jax.Array
  count: jax.Array


@functools.partial(jax.jit, static_argnames=("mask", "reduction"))
def _graddrop_step(leaves, key, count, leak, *, mask, reduction):
  t = leaves[0].shape[0]
  step_key = jax.random.fold_in(key, count)
  scale = 1.0 / t if reduction == "mean" else 1.0
  out = []
  for index, (x, m) in enumerate(zip(leaves, mask)):
    acc = accumulation_dtype(x.dtype)
    if not m:
      out.append(leaf_weighted_sum(x, jnp.full((t,), scale, acc)))
      continue
    uniform = jax.random.uniform(jax.random.fold_in(step_key, index),
                                 x.shape[1:], jnp.float32)
    # Two passes over the task axis, never a (T, ...) temporary.
    total, total_abs = sum_over_tasks(
        x, lambda g, _: (g.astype(acc), jnp.abs(g.astype(acc))))
    nonzero = total_abs > 0
    purity = jnp.where(
        nonzero, 0.5 * (1 + total / jnp.where(nonzero, total_abs, 1)), 0.5)
    leaks = jnp.broadcast_to(leak.astype(acc), (t,))

    def kept(g, task, purity=purity, uniform=uniform):
      g = g.astype(acc)
      keep = ((purity > uniform) & (g > 0)) | ((purity < uniform) & (g < 0))
      return jnp.where(keep, g, leaks[task] * g)

    out.append((sum_over_tasks(x, kept) * scale).astype(x.dtype))
  return out


@documented
def graddrop(key: jax.Array | int = 0, *, leak: float | jax.Array = 0.0,
             reduction: str = "sum", shared: SharedMask = None
             ) -> Aggregator:
  r"""GradDrop: keep one sign per coordinate, chosen by its sign purity.

  For every coordinate of the shared leaves, with task gradients
  :math:`g_i`, the positive sign purity and a uniform draw

  .. math::
    P = \tfrac12\Big(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Big), \qquad
    U \sim \mathcal U(0, 1),

  keep the positive components where :math:`P > U` and the negative ones
  where :math:`P < U`: with :math:`M_i = [P > U][g_i > 0] + [P < U][g_i < 0]`
  the update is

  .. math::
    \sum_i \big(\ell_i + (1 - \ell_i) M_i\big)\, g_i

  (or the mean), with leak :math:`\ell_i` (0 in the paper's multi-task
  experiments). A coordinate where every task's gradient is zero has
  :math:`P = \tfrac12` (0/0 otherwise) and gets 0. Elementwise over the
  stacked leaves: no Gram matrix, no loop over tasks; heads get plain sums.

  This is the parameter-gradient version (as in torchjd and the
  Nash-MTL/FAMO code). The paper applies the mask to the gradients at a
  layer's *activations* (summed over the batch to compute :math:`P`), just
  after the shared trunk; the masked activation gradient is then
  back-propagated through the shared layers, so all parameters upstream
  see one consistent sign choice per activation unit. Here every shared
  parameter coordinate picks its own sign, which needs only the stacked
  parameter gradients. Like torchjd we use the identity for the paper's
  monotone purity transform :math:`f(P)`.

  @FIRST_IN_CHAIN@

  Args:
    key: int seed or PRNG key for the uniform draws (see
      :class:`GradDropState` for how they are derived, so a test can
      regenerate them).
    leak: scalar or ``(T,)`` leak values :math:`\ell_i` in ``[0, 1]``; 1
      passes task ``i``'s gradient through untouched.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`GradDropState`.
    GradDrop picks a sign per coordinate rather than task weights, so its
    state has no ``weights``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.graddrop(0)
    >>> params = {"w": jnp.zeros(3)}
    >>> g = {"w": jnp.array([[1., 2., -1.], [3., -2., -1.]])}
    >>> u, state = tx.update(g, tx.init(params), params)
    >>> print(u["w"][0], u["w"][2])  # pure signs are always kept
    4.0 -2.0
    >>> bool(u["w"][1] in (2.0, -2.0))  # P = 1/2: one sign, at random
    True

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, `Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  check_reduction(reduction)
  leak_array = jnp.asarray(leak, jnp.float32)
  if leak_array.ndim > 1:
    raise ValueError(f"`leak` must be a scalar or shape (T,), got "
                     f"{leak_array.shape}.")
  leak_value = concrete(leak)   # None when traced
  if leak_value is not None and not np.all((leak_value >= 0)
                                           & (leak_value <= 1)):
    raise ValueError(f"`leak` must be in [0, 1], got {leak!r}.")

  def init_fn(params):
    del params
    return GradDropState(key=canonicalize_key(key),
                         count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, None,
                                       "graddrop")
    if leak_array.ndim == 1 and leak_array.shape != (t,):
      raise ValueError(f"`leak` must be a scalar or shape (T,) = ({t},), "
                       f"got {leak_array.shape}.")
    out = _graddrop_step(leaves, state.key, state.count, leak_array,
                         mask=tuple(mask), reduction=reduction)
    return jax.tree.unflatten(treedef, out), GradDropState(
        state.key, optax.safe_increment(state.count))

  return Aggregator(init_fn, update_fn)
