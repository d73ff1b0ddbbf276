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

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_losses,
                                       check_num_tasks, init_num_tasks,
                                       per_task)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)

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
    weights: ``(T,)`` float32 weights applied to the weighted leaves at the
      last step (zeros before the first update).
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

  The losses are the extra argument ``losses`` of ``update``.

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
    ``GradientTransformationExtraArgs``) with a :class:`UncertaintyState`; ``update(grads, state, params=None, *,
    losses)`` needs the ``(T,)`` task losses (ValueError otherwise).

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
  expected = check_num_tasks(num_tasks)   # None when traced
  if expected is not None:
    _uncertainty_factors(task_types, expected)
    per_task(init_log_vars, expected, "init_log_vars")
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "uncertainty")
    init_s = per_task(init_log_vars, t, "init_log_vars")
    return UncertaintyState(log_vars=init_s, opt_state=opt.init(init_s),
                            weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "uncertainty")
    check_record(state.log_vars, t, "uncertainty")
    weight_factor, reg_factor = _uncertainty_factors(task_types, t)
    losses = check_losses(losses, t, "uncertainty")
    log_vars = state.log_vars
    weights = uncertainty_weighting(log_vars, task_types=task_types)
    grad_s = (reg_factor - weight_factor * jnp.exp(-log_vars) * losses)
    grad_s = grad_s.astype(log_vars.dtype)
    step, opt_state = opt.update(grad_s, state.opt_state, log_vars)
    new_log_vars = optax.apply_updates(log_vars, step)
    return combine(leaves, treedef, mask, weights, reduction), \
        UncertaintyState(
            cast_like(new_log_vars, log_vars),
            cast_like(opt_state, state.opt_state),
            record(weights, None, state.weights, None, t, reduction)[0])

  return Aggregator(init_fn, update_fn)
