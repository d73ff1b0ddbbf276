"""MoDo: multi-objective gradient with double sampling.

Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance
<https://arxiv.org/abs/2305.20057>`_, NeurIPS 2023 (JMLR 2024).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pcgrad_optax._core.aggregate import resolve
from pcgrad_optax._core.checks import (as_vector, check_num_tasks,
                                       init_num_tasks)
from pcgrad_optax._core.gram import masked_cross
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.task_state import (check_range, check_second_batch,
                                           two_batch_update)
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)
from pcgrad_optax.aggregation._simplex import project_to_simplex


def check_cross(cross) -> jax.Array:
  """A square ``(T, T)`` cross matrix in f32 (or wider)."""
  cross = jnp.asarray(cross)
  if cross.ndim != 2 or cross.shape[0] != cross.shape[1]:
    raise ValueError(
        f"The cross matrix must be square (T, T), got shape {cross.shape}.")
  if not jnp.issubdtype(cross.dtype, jnp.floating):
    cross = cross.astype(jnp.float32)
  return cross.astype(jnp.promote_types(cross.dtype, jnp.float32))


def modo_weighting(cross: jax.Array, weights: jax.Array, *,
                   step_size: float = 1e-3, rho: float = 0.1) -> jax.Array:
  r"""One MoDo step of the task weights on the cross matrix of two batches.

  .. math::
    \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,
      (J_1 J_2^\top + \rho I)\,\lambda\big),

  a projected stochastic gradient step on
  :math:`\tfrac12\|J^\top\lambda\|^2 + \tfrac\rho2\|\lambda\|^2` over the
  simplex :math:`\Delta`, where the product of two independent batches'
  Jacobians :math:`J_1 J_2^\top` is an unbiased estimate of
  :math:`J J^\top` ("double sampling"); the Gram matrix of one batch would be
  biased. :math:`\gamma` is the step size, :math:`\rho \ge 0` the
  :math:`\ell_2` regulariser; :math:`\Pi_\Delta` the Euclidean projection.

  Args:
    cross: ``(T, T)`` cross matrix :math:`C_{ij} = g_i^{(1)} \cdot
      g_j^{(2)}` of the first and second batches' task gradients (not
      symmetric in general).
    weights: ``(T,)`` current weights :math:`\lambda` (on the simplex; MoDo
      starts from :math:`1/T`).
    step_size: :math:`\gamma > 0`; ``1e-3`` as in LibMTL, from the authors'
      code (torchjd defaults to 0.1).
    rho: :math:`\rho \ge 0`.

  Returns:
    The new ``(T,)`` weights, on the simplex; the update is
    :math:`\sum_t \lambda_t g_t`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> j1 = jnp.array([[1., 0.], [0., 2.]])
    >>> j2 = jnp.array([[1., 0.2], [0., 2.]])
    >>> w = pcgrad_optax.weighting.modo(j1 @ j2.T, jnp.array([0.5, 0.5]),
    ...                                 step_size=0.1, rho=0.0)
    >>> print([round(float(v), 4) for v in w])  # the larger gradient loses
    [0.585, 0.415]

  References:
    Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance
    <https://arxiv.org/abs/2305.20057>`_, NeurIPS 2023.
  """
  cross = check_cross(cross)
  t = cross.shape[0]
  weights = as_vector(weights, t, "weights", cross.dtype).astype(cross.dtype)
  check_range(step_size, "step_size", low_open=True)
  check_range(rho, "rho")
  step = jnp.asarray(step_size, cross.dtype)
  grad = cross @ weights + jnp.asarray(rho, cross.dtype) * weights
  return project_to_simplex(weights - step * grad)


class MoDoState(NamedTuple):
  """State of :func:`modo`.

  Attributes:
    lambdas: ``(T,)`` float32 task weights :math:`\\lambda` (on the
      simplex, ``1/T`` at first), moved every step.
    weights: ``(T,)`` float32 weights applied to the shared leaves at the
      last step (zeros before the first update), as in every state of the
      package: :math:`\\lambda` after the step, divided by T with
      ``reduction="mean"`` (applied to the mean of the two batches, or to
      ``third_grads``).
  """
  lambdas: jax.Array
  weights: jax.Array


@documented
def modo(*, num_tasks: int, step_size: float = 1e-3, rho: float = 0.1,
         reduction: str = "sum", shared: SharedMask = None) -> Aggregator:
  r"""MoDo: task weights from two independent batches (double sampling).

  Each step takes the stacked gradients of two independent mini-batches,
  :math:`J_1` (``grads``) and :math:`J_2` (``second_grads``), updates the
  weights with :func:`pcgrad_optax.weighting.modo` on their cross matrix,

  .. math::
    \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,
      (J_1 J_2^\top + \rho I)\,\lambda\big),

  and returns :math:`\sum_t \lambda_t \bar g_t` with the *new* weights.
  Which gradients form the update: both readings in use are offered. By
  default :math:`\bar g` is the mean of the two batches,
  :math:`(J_1 + J_2)/2`, so no third backward pass is needed (torchjd's
  two-batch example, its reading of the paper's eq. 2.9b). Pass
  ``third_grads``, a third independent batch, to form the update from it
  alone, as the authors' code (its ``three_grads`` option) and LibMTL do
  (their decoders get the mean of the three batches; here the heads get
  the third batch's plain sums).

  The cross matrix is one contraction per shared leaf in f32 or wider (like
  the Gram matrix); the update one weighted sum per batch.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  @EXTRA_BATCHES@

  Args:
    num_tasks: T (the weights are allocated at ``init``).
    step_size: :math:`\gamma > 0` (``1e-3`` as in LibMTL; torchjd 0.1).
    rho: :math:`\rho \ge 0` (0.1 as in LibMTL and torchjd).
    reduction: ``"sum"`` (the weights on the simplex) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`MoDoState`;
    ``update(grads, state, params=None, *, second_grads, third_grads=None)``
    needs ``second_grads``, the stacked gradients of a second batch with the
    structure and shapes of ``grads`` (ValueError otherwise).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.modo(num_tasks=2, step_size=0.1, rho=0.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g1 = {"w": jnp.array([[1., 0.], [0., 2.]])}   # batch 1
    >>> g2 = {"w": jnp.array([[1., 0.2], [0., 2.]])}  # batch 2
    >>> u, state = jax.jit(tx.update)(g1, state, params, second_grads=g2)
    >>> print([round(float(v), 4) for v in state.lambdas])
    [0.585, 0.415]
    >>> print([round(float(v), 4) for v in u["w"]])  # on the batches' mean
    [0.585, 0.8885]

  References:
    Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance
    <https://arxiv.org/abs/2305.20057>`_, NeurIPS 2023.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(step_size, "step_size", low_open=True)
  check_range(rho, "rho")

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "modo")
    return MoDoState(lambdas=jnp.full((t,), 1.0 / t, jnp.float32),
                     weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, second_grads=None,
                third_grads=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "modo")
    check_record(state.weights, t, "modo")
    second = check_second_batch(second_grads, leaves, treedef, "modo",
                                "second_grads")
    third = None if third_grads is None else check_second_batch(
        third_grads, leaves, treedef, "modo", "third_grads")
    cross = masked_cross(leaves, second, mask, t)
    weights = modo_weighting(cross, state.lambdas, step_size=step_size,
                             rho=rho)
    out = two_batch_update(leaves, second, third, mask, weights, reduction)
    new_state = MoDoState(
        lambdas=weights,
        weights=record(weights, None, state.weights, None, t, reduction)[0])
    return jax.tree.unflatten(treedef, out), cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
