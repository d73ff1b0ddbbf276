"""DWA: dynamic weight average, tasks weighted by their loss descent rate.

Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention
<https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_losses,
                                       check_num_tasks, check_scalar,
                                       init_num_tasks, static_int)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)


def dwa_weighting(prev_losses: jax.Array, prev_prev_losses: jax.Array, *,
                  temperature: float = 2.0) -> jax.Array:
  r"""Dynamic weight average (DWA) from the last two loss values.

  .. math::
    r_t = \frac{L_t(n-1)}{L_t(n-2)}, \qquad
    \lambda_t(n) = T\,\frac{\exp(r_t / \tau)}{\sum_k \exp(r_k / \tau)},

  so the weights sum to ``T`` and a task whose loss went down more slowly
  gets more weight. The paper uses :math:`\tau = 2`, weights 1 for the first
  two epochs, and epoch-averaged losses (see :func:`pcgrad_optax.dwa`, which
  keeps the history). A non-positive previous-previous loss gives ratio 1
  (no information) rather than a division by zero; losses are assumed
  positive.

  Args:
    prev_losses: ``(T,)`` losses :math:`L(n-1)`.
    prev_prev_losses: ``(T,)`` losses :math:`L(n-2)`.
    temperature: :math:`\tau > 0`.

  Returns:
    ``(T,)`` positive weights summing to T.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.dwa(jnp.array([1.0, 0.5]),
    ...                                jnp.array([1.0, 1.0]))
    >>> print(jnp.round(w, 4))
    [1.1244 0.8756]

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  prev = as_vector(prev_losses, None, "prev_losses")
  t = prev.shape[0]
  prev_prev = as_vector(prev_prev_losses, t, "prev_prev_losses")
  _check_temperature(temperature)
  positive = prev_prev > 0
  ratio = jnp.where(positive, prev / jnp.where(positive, prev_prev, 1), 1)
  return t * jax.nn.softmax(ratio / temperature)


def _check_temperature(temperature) -> None:
  check_scalar(temperature, "`temperature`", lambda v: v > 0, "positive")


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    count: number of updates done so far (int32).
    loss_sum: ``(T,)`` float32 sum of the losses of the current period.
    history: ``(2, T)`` float32 mean losses of the last two complete periods
      (row 0 the most recent).
    periods: number of complete periods (int32, capped at 2).
    weights: ``(T,)`` float32 weights applied to the weighted leaves at the
      last step (zeros before the first update).
  """
  count: jax.Array
  loss_sum: jax.Array
  history: jax.Array
  periods: jax.Array
  weights: jax.Array | None = None


@documented
def dwa(*, num_tasks: int, temperature: float = 2.0, period: int = 1,
        reduction: str = "sum", shared: SharedMask = None) -> Aggregator:
  r"""Dynamic weight average (DWA): weight tasks by their loss descent rate.

  With :math:`\bar L(k)` the mean loss of period :math:`k` (a period is
  ``period`` steps; the paper uses an epoch),

  .. math::
    \lambda_t(k) = T\,\operatorname{softmax}_t\!\Big(
      \frac{\bar L_t(k-1)}{\tau\,\bar L_t(k-2)}\Big), \qquad
    \lambda(0) = \lambda(1) = 1,

  and the update during period :math:`k` is :math:`\sum_t \lambda_t g_t`
  (:func:`pcgrad_optax.weighting.dwa`; :math:`\tau = 2` as in the paper).
  The weights of a step never use that step's own losses; the losses (extra
  argument ``losses``) are accumulated into the current period's mean and
  rotated into the two-period history when the period ends. ``period=1``
  is the common per-step variant: step :math:`n \ge 2` uses
  :math:`L(n-1)/L(n-2)`, steps 0 and 1 have weights 1. The losses are
  assumed positive (a non-positive :math:`\bar L(k-2)` gives ratio 1).

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T.
    temperature: :math:`\tau > 0`.
    period: number of steps whose losses are averaged (steps per epoch for
      the paper's version).
    reduction: ``"sum"`` (the paper: weights sum to T) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`DWAState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)`` task
    losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.dwa(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> for losses in ([1.0, 1.0], [1.0, 0.5], [0.9, 0.4]):
    ...   u, state = tx.update(g, state, params, losses=jnp.array(losses))
    >>> print(jnp.round(u["w"], 4))  # third step: ratios 1 and 0.5
    [1.1244 0.8756]

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  _check_temperature(temperature)
  static_int(period, "`period`")   # a traced period is used as an array

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "dwa")
    return DWAState(count=jnp.zeros([], jnp.int32),
                    loss_sum=jnp.zeros((t,), jnp.float32),
                    history=jnp.ones((2, t), jnp.float32),
                    periods=jnp.zeros([], jnp.int32),
                    weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "dwa")
    check_record(state.loss_sum, t, "dwa")
    losses = check_losses(losses, t, "dwa")
    weights = jnp.where(
        state.periods >= 2,
        dwa_weighting(state.history[0], state.history[1],
                      temperature=temperature),
        jnp.ones((t,), jnp.float32))
    loss_sum = state.loss_sum + losses
    period_done = (state.count + 1) % period == 0
    history = jnp.where(
        period_done, jnp.stack([loss_sum / period, state.history[0]]),
        state.history)
    new_state = DWAState(
        count=optax.safe_increment(state.count),
        loss_sum=jnp.where(period_done, jnp.zeros_like(loss_sum), loss_sum),
        history=history,
        periods=jnp.minimum(state.periods + period_done.astype(jnp.int32), 2),
        weights=record(weights, None, state.weights, None, t, reduction)[0])
    return combine(leaves, treedef, mask, weights, reduction), \
        cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
