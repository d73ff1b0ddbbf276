"""Geometric mean of the task losses (GLS, the geometric loss strategy).

Chennupati, Sistu, Yogamani, Rawashdeh, `MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning
<https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.checks import as_vector, losses_in_domain
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    bounded_below,
                                                    loss_transformation,
                                                    scalarized,
                                                    stateless)


def geometric_mean_weighting(losses: jax.Array) -> jax.Array:
  r"""The gradient weights of the geometric mean of the losses.

  GLS minimises :math:`G = (\prod_t L_t)^{1/T}`, whose gradient is
  :math:`\sum_t w_t \nabla L_t` with

  .. math::
    w_t = \frac{\partial G}{\partial L_t} = \frac{G}{T\,L_t}
        = \frac{1}{T}\exp\Big(\frac{1}{T}\sum_k \log L_k - \log L_t\Big),

  computed in the log domain (no overflow of the product). A task with a
  small loss gets a large weight; the direction is that of the gradient of
  :math:`\sum_t \log L_t`, scaled by :math:`G/T`, and rescaling all losses
  by one factor leaves the weights unchanged.
  The losses must be positive (a ValueError for concrete ones; traced
  non-positive losses give non-finite weights). (LibMTL's ``GLS`` returns
  :math:`L_t/(T\prod_k L_k)` as its logged weights, which are not these;
  its gradient, from autodiff of :math:`G`, is.)

  Args:
    losses: ``(T,)`` positive task losses.

  Returns:
    ``(T,)`` positive weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> print(pcgrad_optax.weighting.geometric_mean(jnp.array([1.0, 4.0])))
    [1.   0.25]

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, `MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning
    <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
  """
  losses = as_vector(losses, None, "losses")
  losses_in_domain(losses, 0.0, strict=True, method="geometric_mean")
  log_l = jnp.log(losses)
  t = losses.shape[0]
  return jnp.exp(jnp.mean(log_l) - log_l) / t


def _geometric_mean_method():
  """``(init, step)`` of GLS (see ``_scalarized.py``); stateless."""
  return stateless(lambda losses, extra: (
      geometric_mean_weighting(losses), jnp.exp(jnp.mean(jnp.log(losses)))))


@documented
def geometric_mean(*, reduction: str = "sum", shared: SharedMask = None,
                   num_tasks: int | None = None) -> Aggregator:
  r"""GLS: the gradient of the geometric mean of the task losses.

  .. math::
    u = \nabla (\textstyle\prod_t L_t)^{1/T} = \sum_t \frac{G}{T L_t}\, g_t,
    \qquad G = (\textstyle\prod_t L_t)^{1/T},

  the weights of :func:`pcgrad_optax.weighting.geometric_mean` on the
  stacked gradients. Minimising :math:`G` is minimising
  :math:`\frac1T\sum_t\log L_t` with a step scaled by :math:`G`: each task's
  relative progress counts the same, whatever its loss scale. The losses
  (extra argument ``losses``, positive) are needed; there is no state. The
  one-backward-pass form is
  :func:`pcgrad_optax.scalarization.geometric_mean_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    reduction: ``"sum"`` (the gradient of :math:`G`) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.
  @STATELESS_RECORD_ARGS@

  @STATELESS_RETURNS@
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.geometric_mean()
    >>> params = {"w": jnp.zeros(2)}
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, _ = tx.update(g, tx.init(params), params,
    ...                  losses=jnp.array([1.0, 4.0]))
    >>> print(u["w"])  # G = 2: weights 2 / (2 L)
    [1.   0.25]

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, `MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning
    <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
  """
  check_reduction(reduction)
  init, step = _geometric_mean_method()
  return loss_transformation(init, step, method="geometric_mean",
                             num_tasks=num_tasks, reduction=reduction,
                             shared=shared,
                             domain=bounded_below(0.0, strict=True))


def geometric_mean_loss(*, reduction: str = "sum",
                        num_tasks: int | None = None) -> LossScalarization:
  r"""GLS as one scalar loss: :math:`(\prod_t L_t)^{1/T}`, one backward pass.

  ``loss(losses, state)`` returns the geometric mean :math:`G` (computed as
  :math:`\exp(\frac1T\sum_t \log L_t)`) with the gradient
  :math:`\sum_t \frac{G}{T L_t}\nabla L_t` of :func:`geometric_mean` (with
  ``shared=None``); the state is ``optax.EmptyState()`` (with
  ``num_tasks``, a :class:`pcgrad_optax.GramState` of the weights).
  Positive losses only (ValueError for concrete ones).

  Args:
    reduction: ``"sum"`` or ``"mean"`` (divides by T).

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.geometric_mean_loss()
    >>> losses = jnp.array([1.0, 4.0])
    >>> g, _ = jax.grad(scal.loss, has_aux=True)(losses, scal.init())
    >>> print(scal.loss(losses, scal.init())[0], g)
    2.0 [1.   0.25]

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, `MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning
    <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
  """
  init, step = _geometric_mean_method()
  return scalarized(init, step, method="geometric_mean_loss",
                    num_tasks=num_tasks, reduction=reduction,
                    domain=bounded_below(0.0, strict=True))
