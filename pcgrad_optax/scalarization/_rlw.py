"""RLW: random loss weighting, a fresh random convex combination per step.

Lin, Ye, Xu, Shi, Zhang, Kwok, `Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning
<https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.checks import check_num_tasks
from pcgrad_optax._core.transform import (Aggregator, canonicalize_key,
                                          check_record, check_record_args,
                                          documented, init_record, record)

RLW_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


def rlw_weighting(key: jax.Array, num_tasks: int, *,
                  distribution: str = "normal") -> jax.Array:
  r"""Random loss weighting (RLW): fresh random task weights.

  .. math::
    \tilde\lambda \sim \mathcal N(0, I_T), \qquad
    \lambda = \operatorname{softmax}(\tilde\lambda),

  the paper's main variant (also LibMTL's and torchjd's). The weights lie on
  the simplex, so with the ``"sum"`` reduction the update is
  :math:`\sum_t \lambda_t g_t` (a random convex combination), exactly the
  paper's loss :math:`\sum_t \lambda_t L_t`.

  Other samplers: ``"uniform"`` is the softmax of
  :math:`\tilde\lambda \sim U(0, 1)^T`; ``"dirichlet"`` draws
  :math:`\lambda \sim \mathrm{Dir}(1, \dots, 1)`, uniform on the simplex,
  used as drawn (no softmax).

  Args:
    key: PRNG key.
    num_tasks: T.
    distribution: ``"normal"`` (default), ``"uniform"`` or ``"dirichlet"``.

  Returns:
    ``(T,)`` float32 weights, positive and summing to 1.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.rlw(jax.random.key(0), 3)
    >>> w.shape, bool(jnp.isclose(w.sum(), 1.0)), bool(jnp.all(w > 0))
    ((3,), True, True)

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, `Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  num_tasks = check_num_tasks(num_tasks)
  if num_tasks is None:
    raise ValueError("num_tasks must be a concrete positive int (it is the "
                     "shape of the weights), got a traced value.")
  if distribution == "normal":
    return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))
  if distribution == "uniform":
    return jax.nn.softmax(jax.random.uniform(key, (num_tasks,), jnp.float32))
  if distribution == "dirichlet":
    return jax.random.dirichlet(key, jnp.ones((num_tasks,), jnp.float32))
  raise ValueError(f"Unknown distribution {distribution!r}; expected one of "
                   f"{RLW_DISTRIBUTIONS}.")


class RLWState(NamedTuple):
  """State of :func:`rlw`.

  Attributes:
    key: typed PRNG key; step ``n`` draws its weights with
      ``pcgrad_optax.weighting.rlw(jax.random.fold_in(key, n), T)``.
    count: number of updates done so far (int32).
    weights: with ``num_tasks``, the ``(T,)`` weights applied to the
      weighted leaves at the last step (zeros before the first update);
      else None.
  """
  key: jax.Array
  count: jax.Array
  weights: jax.Array | None = None


@documented
def rlw(key: jax.Array | int = 0, *, distribution: str = "normal",
        reduction: str = "sum", shared: SharedMask = None,
        num_tasks: int | None = None) -> Aggregator:
  r"""Random loss weighting (RLW): a fresh random convex combination per step.

  .. math::
    \lambda = \operatorname{softmax}(\tilde\lambda), \quad
    \tilde\lambda \sim \mathcal N(0, I_T), \qquad
    u = \sum_t \lambda_t g_t ,

  drawn afresh every step (see :func:`pcgrad_optax.weighting.rlw` for the
  other samplers). Weighting the gradients is the same as weighting the
  losses, so no losses are needed. The weights sum to 1, as in the paper, so
  the ``"sum"`` reduction is a random *average* of the task gradients (the
  ``"mean"`` reduction divides it by T once more).

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    key: int seed or PRNG key.
    distribution: ``"normal"`` (the paper's), ``"uniform"`` or
      ``"dirichlet"``.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.
    num_tasks: optional T. Given, the state's ``weights`` keep the last
      step's ``(T,)`` weights for logging; None (default) leaves them None
      (``init`` only sees the params).

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`RLWState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.rlw(0)
    >>> params = {"w": jnp.zeros(2)}
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, tx.init(params), params)
    >>> print(jnp.round(u["w"].sum(), 4))  # a convex combination
    1.0

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, `Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  check_reduction(reduction)
  if distribution not in RLW_DISTRIBUTIONS:
    raise ValueError(f"Unknown distribution {distribution!r}; expected one "
                     f"of {RLW_DISTRIBUTIONS}.")

  records = check_record_args(num_tasks, False, "rlw")
  expected = check_num_tasks(num_tasks) if records else None

  def init_fn(params):
    weights = (init_record(params, num_tasks, False, "rlw")[0] if records
               else None)
    return RLWState(key=canonicalize_key(key), count=jnp.zeros([], jnp.int32),
                    weights=weights)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "rlw")
    weights = rlw_weighting(jax.random.fold_in(state.key, state.count), t,
                            distribution=distribution)
    recorded = None
    if records:
      check_record(state.weights, t, "rlw")
      recorded, _ = record(weights, None, state.weights, None, t, reduction)
    return combine(leaves, treedef, mask, weights, reduction), RLWState(
        state.key, optax.safe_increment(state.count), recorded)

  return Aggregator(init_fn, update_fn)
