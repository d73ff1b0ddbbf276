"""UPGrad: the average of the task gradients projected onto their dual cone.

Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.checks import check_nonnegative
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (dual_cone_args,
                                               dual_cone_weights,
                                               torchjd_normalized)


@jax.jit
def _upgrad(gram, task_weights, reg_eps):
  gram_n = torchjd_normalized(gram, reg_eps)
  lowers = jnp.diag(task_weights.astype(gram_n.dtype))
  return jnp.sum(dual_cone_weights(gram_n, lowers), axis=0).astype(
      gram.dtype)


def upgrad_weighting(gram: jax.Array, *,
                     task_weights: jax.Array | None = None,
                     reg_eps: float = 0.0) -> jax.Array:
  r"""UPGrad: average of every gradient projected onto the dual cone.

  Quinton & Rey (2024) project each task gradient onto the dual cone of all
  of them, :math:`\mathcal C = \{x : g_t \cdot x \ge 0\ \forall t\}`, and
  average the projections:

  .. math::
    u = \frac1T \sum_i \pi_{\mathcal C}(g_i), \qquad
    \pi_{\mathcal C}(g_i) = G^T v^{(i)}, \quad
    v^{(i)} = \arg\min_{v \ge e_i} v^T K v ,

  (their Proposition 1) so :math:`w = \frac1T \sum_i v^{(i)}`. Each of the
  ``T`` small QPs is solved exactly by the shared active-set solver (batched
  with ``vmap``). The update never conflicts with any task, equals the
  mean gradient when no pair conflicts, and scales like the gradients
  (multiplying all of them by :math:`s > 0` multiplies the update by
  :math:`s`, leaving the weights unchanged).

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` preference vector :math:`p`; projects
      :math:`p_i g_i` and sums, i.e. :math:`v^{(i)} = \arg\min_{v \ge p_i e_i}
      v^T K v`. Default ``1/T`` (the paper's average, torchjd's default).
    reg_eps: adds ``reg_eps * I`` to ``K / trace(K)`` before solving.
      ``0`` (default) solves the paper's QP exactly; torchjd's default
      quadprog projector uses ``1e-4`` (and zeroes the weights when
      ``trace(K) < 1e-4``, which this never does).

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [-1., 1.]])
    >>> w = pcgrad_optax.weighting.upgrad(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([1. , 0.75], dtype=float32), Array([0.25, 0.75], dtype=float32))

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  return _upgrad(*dual_cone_args(gram, task_weights, reg_eps))


@documented
def upgrad(*, task_weights: jax.Array | None = None, reg_eps: float = 0.0,
           reduction: str = "sum", shared: SharedMask = None,
           num_tasks: int | None = None, keep_gram: bool = False
           ) -> Aggregator:
  r"""UPGrad: the average of the gradients projected onto their dual cone.

  Shared leaves get :math:`\frac1T \sum_i \pi_{\mathcal C}(g_i)` with
  :math:`\mathcal C = \{x : g_t \cdot x \ge 0\ \forall t\}` (Quinton & Rey,
  2024), each projection an exact small QP (see
  :func:`pcgrad_optax.weighting.upgrad`). Never conflicts with any task;
  the plain mean when no pair conflicts.

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` preference vector (default ``1/T``).
    reg_eps: ridge on ``K / trace(K)`` (torchjd's default projector uses
      ``1e-4``); ``0`` (default) is exact.
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.upgrad()
    >>> grads = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([0.25, 0.75], dtype=float32)

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  check_nonnegative(reg_eps, "reg_eps")
  return gram_transform(
      lambda gram: upgrad_weighting(gram, task_weights=task_weights,
                                    reg_eps=reg_eps),
      reduction=reduction, shared=shared,
      num_tasks=num_tasks, keep_gram=keep_gram,
      method="upgrad")
