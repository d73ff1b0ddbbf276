"""IMTL-L: impartial multi-task learning, loss part (learned loss scales).

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, `Towards Impartial Multi-task
Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.checks import as_vector
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    bounded_below,
                                                    learned_log_scales,
                                                    loss_transformation,
                                                    scalarized)


def imtl_l_weighting(log_scales: jax.Array) -> jax.Array:
  r"""IMTL-L's task weights from its learned loss scales.

  IMTL-L scales each task loss by :math:`e^{s_t}` and minimises, jointly
  over the network and :math:`s`,

  .. math::
    \sum_t e^{s_t} L_t - s_t ,

  so the task weights on the loss gradients are :math:`e^{s_t}`; the
  :math:`-s_t` term keeps :math:`s_t` from going to :math:`-\infty`, and
  the optimum over :math:`s` is :math:`s_t = -\log L_t`: every scaled loss
  :math:`e^{s_t}L_t` equals 1. (This is uncertainty weighting's objective
  with :math:`s \to -s` and factors 1: :func:`pcgrad_optax.weighting.
  uncertainty` at ``-log_scales`` gives the same weights.)

  Args:
    log_scales: ``(T,)`` learned scales :math:`s`.

  Returns:
    ``(T,)`` positive weights :math:`e^{s_t}`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.imtl_l(jnp.log(jnp.array([1.0, 0.25])))
    >>> print(w)
    [1.   0.25]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021.
  """
  log_scales = as_vector(log_scales, None, "log_scales")
  return jnp.exp(log_scales)


class IMTLLState(NamedTuple):
  """State of :func:`imtl_l`.

  Attributes:
    log_scales: ``(T,)`` float32 learned loss scales :math:`s_t`.
    opt_state: state of the optimiser of the scales.
    weights: ``(T,)`` weights applied to the weighted leaves at the last
      step (zeros before the first update; float32, or float64 for float64
      params).
  """
  log_scales: jax.Array
  opt_state: optax.OptState
  weights: jax.Array | None = None


def _imtl_l_method(num_tasks, learning_rate, init_log_scales, optimizer,
                   method):
  """``(init, step)`` of IMTL-L (see ``_scalarized.py``)."""
  del method

  def objective(losses, s, t):
    del t
    weights = imtl_l_weighting(s)
    # d/ds_t of sum_t e^{s_t} L_t - s_t: losses only, no gradient needed.
    return weights, jnp.sum(weights * losses - s), weights * losses - 1.0

  return learned_log_scales(IMTLLState, num_tasks=num_tasks,
                            learning_rate=learning_rate,
                            init_value=init_log_scales,
                            init_name="init_log_scales", optimizer=optimizer,
                            objective=objective)


@documented
def imtl_l(*, num_tasks: int, learning_rate: float = 1e-2,
           init_log_scales: float | jax.Array = 0.0,
           optimizer: optax.GradientTransformation | None = None,
           reduction: str = "sum", shared: SharedMask = None
           ) -> Aggregator:
  r"""IMTL-L: task weights :math:`e^{s_t}` from learned loss scales.

  The update is :math:`\sum_t e^{s_t} g_t` (see
  :func:`pcgrad_optax.weighting.imtl_l`), and the scales :math:`s` in the
  state (zeros at first, as in the paper, torchjd and LibMTL: the plain sum)
  are trained on the paper's objective :math:`\sum_t e^{s_t} L_t - s_t`,
  whose gradient

  .. math::
    \frac{\partial}{\partial s_t} = e^{s_t} L_t - 1

  needs the losses only. Each step uses the weights of the current
  :math:`s` (as joint training does: the network's and :math:`s`'s
  gradients come from the same forward pass), then takes
  :math:`s \leftarrow s - \eta\,\partial/\partial s` (``learning_rate``
  :math:`\eta`, or the given ``optimizer``; the paper trains :math:`s` with
  the network's optimiser). The fixed point is :math:`s_t = -\log L_t`,
  weight :math:`1/L_t`. The losses must be non-negative (the paper's
  setting; a ValueError for concrete ones): while a loss is 0 its scale
  grows by :math:`\eta` per step.

  The losses are the extra argument ``losses`` of ``update``. The
  one-backward-pass form is :func:`pcgrad_optax.scalarization.imtl_l_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T.
    learning_rate: :math:`\eta` of the gradient descent on :math:`s`
      (ignored when ``optimizer`` is given).
    init_log_scales: scalar or ``(T,)`` initial :math:`s` (0: weights 1).
    optimizer: optional optax transformation for :math:`s` (default
      ``optax.sgd(learning_rate)``).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with an :class:`IMTLLState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.imtl_l(num_tasks=2, learning_rate=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params, losses=jnp.array([1.0, 3.0]))
    >>> print(u["w"])  # s = 0: weights 1
    [1. 1.]
    >>> print(state.log_scales)  # s - 0.5 * (L - 1)
    [ 0. -1.]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021.
  """
  check_reduction(reduction)
  init, step = _imtl_l_method(num_tasks, learning_rate, init_log_scales,
                              optimizer, "imtl_l")
  return loss_transformation(init, step, method="imtl_l",
                             num_tasks=num_tasks, reduction=reduction,
                             shared=shared, domain=bounded_below(0.0))


def imtl_l_loss(*, num_tasks: int, learning_rate: float = 1e-2,
                init_log_scales: float | jax.Array = 0.0,
                optimizer: optax.GradientTransformation | None = None,
                reduction: str = "sum") -> LossScalarization:
  r"""IMTL-L as one scalar loss (one backward pass).

  ``loss(losses, state)`` returns the paper's objective at the current
  scales, :math:`\sum_t e^{s_t} L_t - s_t`, whose gradient is
  :func:`imtl_l`'s update :math:`\sum_t e^{s_t} \nabla L_t` (with
  ``shared=None``), and the next state, with the same step on :math:`s` as
  :func:`imtl_l` (its derivative :math:`e^{s_t}L_t - 1` needs only the
  losses, so :math:`s` lives in the state; the gradient of the returned
  scalar with respect to ``state.log_scales`` is zero by construction).
  There is no ``shared`` mask: the loss weights the whole model.

  Args:
    num_tasks: T.
    learning_rate: :math:`\eta` (ignored when ``optimizer`` is given).
    init_log_scales: scalar or ``(T,)`` initial :math:`s`.
    optimizer: optional optax transformation for :math:`s`.
    reduction: ``"sum"`` (the paper) or ``"mean"`` (divides by T).

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization` with an
    :class:`IMTLLState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.imtl_l_loss(num_tasks=2,
    ...                                               learning_rate=0.5)
    >>> def objective(w, state):
    ...   return scal.loss(jnp.stack([w[0] ** 2, 3 * w[1] ** 2]), state)
    >>> (loss, state), g = jax.value_and_grad(objective, has_aux=True)(
    ...     jnp.ones(2), scal.init())
    >>> print(g, state.log_scales)
    [2. 6.] [ 0. -1.]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021.
  """
  init, step = _imtl_l_method(num_tasks, learning_rate, init_log_scales,
                              optimizer, "imtl_l_loss")
  return scalarized(init, step, method="imtl_l_loss", num_tasks=num_tasks,
                    reduction=reduction, domain=bounded_below(0.0))
