"""DualProj: the mean gradient projected onto the dual cone (GEM-style).

Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
<https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017; as defined by Quinton &
Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024.
"""

from __future__ import annotations

import jax

from pcgrad_optax._core.checks import check_nonnegative
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (dual_cone_args,
                                               dual_cone_weights,
                                               torchjd_normalized)


@jax.jit
def _dualproj(gram, task_weights, reg_eps):
  gram_n = torchjd_normalized(gram, reg_eps)
  return dual_cone_weights(gram_n, task_weights.astype(gram_n.dtype)).astype(
      gram.dtype)


def dualproj_weighting(gram: jax.Array, *,
                       task_weights: jax.Array | None = None,
                       reg_eps: float = 0.0) -> jax.Array:
  r"""DualProj: the mean gradient projected onto the dual cone (GEM-style).

  Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017, Eq. 11) projects a
  proposed update onto :math:`\{x : g_t \cdot x \ge 0\ \forall t\}` by
  solving the dual QP; DualProj (as defined by Quinton & Rey, 2024) applies
  that to the mean gradient:

  .. math::
    u = \pi_{\mathcal C}\Big(\frac1T \sum_t g_t\Big) = G^T v, \qquad
    v = \arg\min_{v \ge \frac1T 1} v^T K v .

  Exact active-set solution. The update never conflicts with any task,
  equals the mean when the mean conflicts with none, and scales like the
  gradients.

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` preference vector :math:`p` replacing the
      mean (projects :math:`G^T p`; ``v >= p``). Default ``1/T``.
    reg_eps: adds ``reg_eps * I`` to ``K / trace(K)`` (torchjd's quadprog
      projector uses ``1e-4``); ``0`` (default) is the exact projection.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 1.], [-3., 0.]])
    >>> w = pcgrad_optax.weighting.dualproj(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.75, 0.5 ], dtype=float32), Array([-0.75,  0.75], dtype=float32))

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017; Quinton & Rey,
    `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  return _dualproj(*dual_cone_args(gram, task_weights, reg_eps))


@documented
def dualproj(*, task_weights: jax.Array | None = None, reg_eps: float = 0.0,
             reduction: str = "sum", shared: SharedMask = None,
             num_tasks: int | None = None, keep_gram: bool = False
             ) -> Aggregator:
  r"""DualProj: the mean gradient projected onto the dual cone (GEM-style).

  Shared leaves get :math:`\pi_{\mathcal C}(\frac1T \sum_t g_t)`, the
  closest vector to the mean gradient that conflicts with no task
  (Lopez-Paz & Ranzato, 2017; see :func:`pcgrad_optax.weighting.dualproj`).

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` preference vector replacing the mean.
    reg_eps: ridge on ``K / trace(K)`` (torchjd uses ``1e-4``); ``0``
      (default) is exact.
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.dualproj()
    >>> grads = {"w": jnp.array([[1., 1.], [-3., 0.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([-0.75,  0.75], dtype=float32)

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  """
  check_nonnegative(reg_eps, "reg_eps")
  return gram_transform(
      lambda gram: dualproj_weighting(gram, task_weights=task_weights,
                                      reg_eps=reg_eps),
      reduction=reduction, shared=shared,
      num_tasks=num_tasks, keep_gram=keep_gram,
      method="dualproj")
