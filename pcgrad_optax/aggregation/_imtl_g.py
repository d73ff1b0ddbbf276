"""IMTL-G: the update with equal projections on every unit task gradient.

Liu et al., `Towards Impartial Multi-task Learning
<https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import equal_cosine_direction


@jax.jit
def _imtl_g(gram):
  norms, nonzero, _, beta = equal_cosine_direction(gram)
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1), 0)
  total = jnp.sum(alpha)
  eps = jnp.finfo(alpha.dtype).eps
  # A sum lost in round-off means there is no such direction with weights
  # summing to one (e.g. opposite gradients): return zeros, as torchjd does.
  ok = jnp.abs(total) > 100 * alpha.shape[0] * eps * jnp.sum(jnp.abs(alpha))
  return jnp.where(ok, alpha / jnp.where(ok, total, 1), 0).astype(gram.dtype)


def imtl_g_weighting(gram: jax.Array) -> jax.Array:
  r"""IMTL-G: the update with equal projections on every unit gradient.

  Liu et al. (2021) pick :math:`u = \sum_t \alpha_t g_t` with
  :math:`\sum_t \alpha_t = 1` such that :math:`u \cdot g_t / \|g_t\|` is the
  same for all tasks. Their closed form
  :math:`\alpha_{2:T} = g_1 U^T (D U^T)^{-1}` (``D``, ``U``: differences of
  the raw and unit gradients to task 1) is, in Gram terms,

  .. math::
    \alpha = \frac{K^{-1} n}{1^T K^{-1} n}
           = \frac{N^{-1} C^{+} 1}{1^T N^{-1} C^{+} 1},
    \qquad n_t = \|g_t\|,\ N = \mathrm{diag}(n),\ C = N^{-1} K N^{-1},

  computed through the cosine matrix :math:`C` so that gradient norms
  spanning many orders of magnitude are harmless. With linearly dependent
  gradients :math:`K^{-1}` does not exist (the official code fails); the
  pseudo-inverse of :math:`C` then picks the direction whose cosines with
  the unit gradients are equal in the least-squares sense (torchjd's
  generalisation uses :math:`K^+ n`, which weights that least-squares fit by
  the gradient norms; both agree for independent gradients). Zero-gradient
  tasks get weight 0; if the weights cannot sum to one (e.g. two opposite
  gradients) they are all 0.

  Scaling: all gradients times :math:`s > 0` leaves :math:`\alpha` unchanged
  and scales the update by :math:`s`; scaling one task's gradient leaves the
  update's direction unchanged.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` weights summing to one (or all zero).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> w = pcgrad_optax.weighting.imtl_g(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.75, 0.25], dtype=float32), Array([0.75, 0.75], dtype=float32))

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021.
  """
  return _imtl_g(check_gram(gram))


@documented
def imtl_g(*, reduction: str = "sum", shared: SharedMask = None,
           num_tasks: int | None = None, keep_gram: bool = False
           ) -> Aggregator:
  r"""IMTL-G: equal projections of the update on every unit task gradient.

  Shared leaves get :math:`\sum_t \alpha_t g_t` with
  :math:`\sum_t \alpha_t = 1` and :math:`u \cdot g_t/\|g_t\|` equal for all
  tasks (Liu et al., 2021; closed form, see
  :func:`pcgrad_optax.weighting.imtl_g`).

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.imtl_g()
    >>> grads = {"w": jnp.array([[1., 0.], [0., 3.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([0.75, 0.75], dtype=float32)

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
  """
  return gram_transform(imtl_g_weighting, reduction=reduction, shared=shared,
                        num_tasks=num_tasks, keep_gram=keep_gram,
                        method="imtl_g")
