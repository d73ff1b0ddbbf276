"""Uncertainty weighting: task weights from learnable log-variances.

Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_,
CVPR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.checks import as_vector, check_num_tasks
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    bounded_below,
                                                    learned_log_scales,
                                                    loss_transformation,
                                                    scalarized)

UNCERTAINTY_TASK_TYPES = ("regression", "classification")


def _uncertainty_factors(task_types: Sequence[str] | None, num_tasks: int
                         ) -> tuple[jax.Array, jax.Array]:
  """(weight factor a_t, regulariser factor b_t) of a_t e^{-s} L + b_t s."""
  if task_types is None:
    return jnp.ones((num_tasks,)), jnp.ones((num_tasks,))
  if isinstance(task_types, str):
    task_types = [task_types] * num_tasks
  task_types = list(task_types)
  if len(task_types) != num_tasks:
    raise ValueError(
        f"`task_types` has {len(task_types)} entries, expected one per task "
        f"(T={num_tasks}).")
  for kind in task_types:
    if kind not in UNCERTAINTY_TASK_TYPES:
      raise ValueError(f"Unknown task type {kind!r}; expected one of "
                       f"{UNCERTAINTY_TASK_TYPES}.")
  weight = jnp.array([0.5 if k == "regression" else 1.0 for k in task_types])
  return weight, jnp.full((num_tasks,), 0.5)


def uncertainty_weighting(log_vars: jax.Array, *,
                          task_types: Sequence[str] | str | None = None
                          ) -> jax.Array:
  r"""Homoscedastic-uncertainty weights from learnable log-variances.

  With :math:`s_t = \log\sigma_t^2`, Kendall et al. (2018) minimise, jointly
  over the network and :math:`s`,

  .. math::
    \sum_t a_t\, e^{-s_t} L_t + b_t\, s_t,

  so the task weights are :math:`a_t e^{-s_t}`. The paper's factors are
  :math:`a = b = \tfrac12` for a regression (Gaussian) task and
  :math:`a = 1, b = \tfrac12` for a classification (softmax) task
  (``task_types``). By default (``task_types=None``) every task uses
  :math:`a = b = 1`: the objective :math:`e^{-s}L + s`, weights
  :math:`e^{-s}` (1 at :math:`s=0`). That is exactly twice the paper's
  regression objective — the same optimum :math:`s^* = \log L` and the same
  relative weights, with the factor 2 a global step size. (LibMTL and the
  Nash-MTL/FAMO code use :math:`\tfrac12(e^{-s}L + s)`, the regression form,
  for every task.)

  Args:
    log_vars: ``(T,)`` log-variances :math:`s`.
    task_types: None, ``"regression"``, ``"classification"``, or one of these
      per task.

  Returns:
    ``(T,)`` weights :math:`a_t e^{-s_t}`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> log_vars = jnp.log(jnp.array([1.0, 4.0]))
    >>> print(jnp.round(pcgrad_optax.weighting.uncertainty(log_vars), 3))
    [1.   0.25]
    >>> pcgrad_optax.weighting.uncertainty(
    ...     jnp.zeros(2), task_types=("regression", "classification"))
    Array([0.5, 1. ], dtype=float32)

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  log_vars = as_vector(log_vars, None, "log_vars")
  weight_factor, _ = _uncertainty_factors(task_types, log_vars.shape[0])
  return weight_factor.astype(log_vars.dtype) * jnp.exp(-log_vars)


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`.

  Attributes:
    log_vars: ``(T,)`` float32 learnable log-variances :math:`s_t`.
    opt_state: state of the optimiser of the log-variances.
    weights: ``(T,)`` weights applied to the weighted leaves at the last
      step (zeros before the first update; float32, or float64 for float64
      params).
  """
  log_vars: jax.Array
  opt_state: optax.OptState
  weights: jax.Array | None = None


@documented
def uncertainty(*, num_tasks: int, learning_rate: float = 1e-2,
                task_types: Sequence[str] | str | None = None,
                init_log_vars: float | jax.Array = 0.0,
                optimizer: optax.GradientTransformation | None = None,
                reduction: str = "sum", shared: SharedMask = None
                ) -> Aggregator:
  r"""Uncertainty weighting (Kendall et al., 2018) with learnable log-variances.

  The task weights are :math:`a_t e^{-s_t}` (see
  :func:`pcgrad_optax.weighting.uncertainty` for the factors :math:`a_t,
  b_t`; by default :math:`a = b = 1`), and the log-variances :math:`s` in
  the state are trained by gradient descent on the paper's objective
  :math:`\sum_t a_t e^{-s_t} L_t + b_t s_t`, whose gradient is

  .. math::
    \frac{\partial}{\partial s_t} = b_t - a_t e^{-s_t} L_t .

  Each step uses the weights of the current :math:`s` (as joint training
  does: the network's and :math:`s`'s gradients come from the same forward
  pass), then updates :math:`s \leftarrow s - \eta\,\partial/\partial s`
  with ``learning_rate`` :math:`\eta` (or the given ``optimizer``). The
  stationary point is :math:`s_t = \log(a_t L_t / b_t)`, i.e. weight
  :math:`b_t / L_t`. With plain gradient descent :math:`s` moves by
  :math:`\eta(a e^{-s} L - b)` per step, which is slow to recover from
  losses that vary by orders of magnitude; ``optimizer=optax.adam(1e-2)``
  is scale free.

  The losses are the extra argument ``losses`` of ``update``. They must be
  finite and :math:`\ge 0` (below 0 the objective is unbounded below in
  :math:`s`): concrete ones outside that raise a ``ValueError``; under
  ``jit`` such a step leaves the whole state (:math:`s`, its optimiser,
  the weights record) as it was, and the update is the usual one,
  :math:`\sum_t a_t e^{-s_t} g_t` with the current :math:`s` (the weights
  do not use the step's losses). The same holds for
  :func:`pcgrad_optax.scalarization.uncertainty_loss`.

  The one-backward-pass form (no per-task gradients) is
  :func:`pcgrad_optax.scalarization.uncertainty_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T.
    learning_rate: :math:`\eta` of the gradient descent on :math:`s`
      (ignored when ``optimizer`` is given).
    task_types: None (the objective :math:`e^{-s}L + s`, twice the paper's
      regression form), ``"regression"``/``"classification"`` or one per
      task (the paper's exact factors).
    init_log_vars: scalar or ``(T,)`` initial :math:`s` (0: weights
      :math:`a_t`).
    optimizer: optional optax transformation for :math:`s` (default
      ``optax.sgd(learning_rate)``).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`UncertaintyState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.uncertainty(num_tasks=2, learning_rate=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params, losses=jnp.array([1.0, 3.0]))
    >>> print(u["w"])  # s = 0: weights 1
    [1. 1.]
    >>> print(state.log_vars)  # s - 0.5 * (1 - L)
    [0. 1.]

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  check_reduction(reduction)
  init, step = _uncertainty_method(num_tasks, learning_rate, task_types,
                                   init_log_vars, optimizer)
  return loss_transformation(init, step, method="uncertainty",
                             num_tasks=num_tasks, reduction=reduction,
                             shared=shared, domain=bounded_below(0.0))


def _uncertainty_method(num_tasks, learning_rate, task_types, init_log_vars,
                        optimizer):
  """``(init, step)`` of uncertainty weighting (see ``_scalarized.py``)."""
  expected = check_num_tasks(num_tasks)   # None when traced
  if expected is not None:
    _uncertainty_factors(task_types, expected)

  def objective(losses, log_vars, t):
    weight_factor, reg_factor = _uncertainty_factors(task_types, t)
    weights = uncertainty_weighting(log_vars, task_types=task_types)
    value = jnp.sum(weights * losses + reg_factor * log_vars)
    grad_s = (reg_factor - weight_factor * jnp.exp(-log_vars) * losses)
    return weights, value, grad_s

  return learned_log_scales(UncertaintyState, num_tasks=num_tasks,
                            learning_rate=learning_rate,
                            init_value=init_log_vars,
                            init_name="init_log_vars", optimizer=optimizer,
                            objective=objective)


def uncertainty_loss(*, num_tasks: int, learning_rate: float = 1e-2,
                     task_types: Sequence[str] | str | None = None,
                     init_log_vars: float | jax.Array = 0.0,
                     optimizer: optax.GradientTransformation | None = None,
                     reduction: str = "sum") -> LossScalarization:
  r"""Uncertainty weighting as one scalar loss (one backward pass).

  ``loss(losses, state)`` returns Kendall et al.'s objective at the current
  log-variances, :math:`\sum_t a_t e^{-s_t} L_t + b_t s_t`, whose gradient
  is :math:`\sum_t a_t e^{-s_t} \nabla L_t`, :func:`uncertainty`'s update
  (with ``shared=None``), and the next state: the log-variances take the
  same optimiser step on :math:`\partial/\partial s_t = b_t - a_t e^{-s_t}
  L_t` as in :func:`uncertainty`. That derivative needs only the losses, so
  the log-variances live in the state, not in the model's parameters, and
  the state sequence is the transformation's step for step. (Making
  :math:`s` model parameters instead, trained by the model's optimiser
  through this loss, is the torchjd/LibMTL way; the value returned here is
  that objective, but its gradient with respect to ``state.log_vars`` is
  zero by construction, so use ``pcgrad_optax.weighting.uncertainty`` for
  that.) There is no ``shared`` mask: the loss weights the whole model.

  Args:
    num_tasks: T.
    learning_rate: :math:`\eta` of the gradient descent on :math:`s`
      (ignored when ``optimizer`` is given).
    task_types: as for :func:`uncertainty`.
    init_log_vars: scalar or ``(T,)`` initial :math:`s`.
    optimizer: optional optax transformation for :math:`s`.
    reduction: ``"sum"`` (the paper) or ``"mean"`` (divides by T).

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization` with an
    :class:`UncertaintyState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.uncertainty_loss(
    ...     num_tasks=2, learning_rate=0.5)
    >>> def objective(w, state):
    ...   return scal.loss(jnp.stack([w[0] ** 2, 3 * w[1] ** 2]), state)
    >>> (loss, state), g = jax.value_and_grad(objective, has_aux=True)(
    ...     jnp.ones(2), scal.init())
    >>> print(g, state.log_vars)  # weights 1 at s = 0; s - 0.5 * (1 - L)
    [2. 6.] [0. 1.]

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  init, step = _uncertainty_method(num_tasks, learning_rate, task_types,
                                   init_log_vars, optimizer)
  return scalarized(init, step, method="uncertainty_loss",
                    num_tasks=num_tasks, reduction=reduction,
                    domain=bounded_below(0.0))
