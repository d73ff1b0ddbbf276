"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban, Ji, `Direction-oriented Multi-objective Learning: Simple and
Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_,
NeurIPS 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.aggregate import resolve
from pcgrad_optax._core.checks import (as_vector, check_num_tasks,
                                       init_num_tasks)
from pcgrad_optax._core.gram import masked_cross
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.task_state import (check_count, check_range,
                                           check_second_batch,
                                           two_batch_update)
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)
from pcgrad_optax.aggregation._modo import check_cross
from pcgrad_optax.aggregation._simplex import project_to_simplex


def sdmgrad_weighting(cross: jax.Array, weights: jax.Array, *,
                      lambda_: float = 0.3, learning_rate: float = 10.0,
                      momentum: float = 0.5, num_steps: int = 20,
                      preference: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  r"""SDMGrad's weights from the cross matrix of two independent batches.

  SDMGrad looks for the direction :math:`d = G^\top w` that solves

  .. math::
    \min_{w \in \Delta}\ \tfrac12 \|G^\top w\|^2
      + \lambda\, (G^\top w)^\top (G^\top \tilde w),

  a min-norm (MGDA) problem pulled towards the preferred direction
  :math:`g_0 = G^\top \tilde w` (:math:`\tilde w = 1/T`: the mean gradient).
  Its gradient in :math:`w` is :math:`A (w + \lambda\tilde w)` with
  :math:`A = G G^\top`, estimated without bias by the cross matrix
  :math:`A = J_1 J_2^\top` of two independent batches. Each call runs
  ``num_steps`` steps of projected SGD with heavy-ball momentum from the
  previous :math:`w` (the velocity starts at 0 every call),

  .. math::
    v \leftarrow \mu v + \hat A (w + \lambda \tilde w), \qquad
    w \leftarrow \Pi_\Delta(w - \eta v),

  on the normalised :math:`\hat A = A / s^2`,
  :math:`s = \operatorname{mean}_t \sqrt{\max(A_{tt}, 0)}` (so that
  :math:`\eta` does not depend on the gradients' scale; :math:`\hat A = A`
  if :math:`s = 0`), and returns the weights of the update

  .. math::
    d = \frac{G^\top w + \lambda\, G^\top \tilde w}{1 + \lambda}
      = G^\top\, \frac{w + \lambda \tilde w}{1 + \lambda}.

  Conventions: :math:`\eta = 10`, :math:`\mu = 0.5`, 20 steps and
  :math:`\lambda = 0.3` are the authors' code's (``weight_methods.py``; its
  class default :math:`\lambda = 0.6` is overridden to 0.3 in all their
  experiments) and torchjd's; LibMTL uses :math:`\eta = 5`. The authors
  normalise by :math:`\operatorname{mean}\sqrt{A_{tt} + 10^{-4}}`, LibMTL
  and torchjd by :math:`s^2 + 10^{-8}`; here exactly :math:`s^2`.

  Args:
    cross: ``(T, T)`` cross matrix :math:`C_{ij} = g_i^{(1)}\cdot
      g_j^{(2)}` of two independent batches (the Gram matrix of one batch
      gives the deterministic method).
    weights: ``(T,)`` previous :math:`w` (on the simplex; ``1/T`` at first).
    lambda_: :math:`\lambda \ge 0`.
    learning_rate: :math:`\eta > 0`.
    momentum: :math:`\mu \in [0, 1)`.
    num_steps: number of inner steps (a Python int).
    preference: ``(T,)`` :math:`\tilde w` (default ``1/T``).

  Returns:
    ``(update_weights, new_weights)``: the ``(T,)`` weights
    :math:`(w + \lambda\tilde w)/(1 + \lambda)` of the update and the new
    :math:`w` to keep for the next step.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [-1., 1.]])
    >>> u, w = pcgrad_optax.weighting.sdmgrad(
    ...     g @ g.T, jnp.array([.5, .5]), lambda_=0.0, learning_rate=1.0,
    ...     num_steps=100)
    >>> print([round(float(v), 4) for v in w])  # the min-norm point (MGDA)
    [0.6, 0.4]

  References:
    Xiao, Ban, Ji, `Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_,
    NeurIPS 2023.
  """
  cross = check_cross(cross)
  t = cross.shape[0]
  dtype = cross.dtype
  weights = as_vector(weights, t, "weights", dtype).astype(dtype)
  check_range(lambda_, "lambda_")
  check_range(learning_rate, "learning_rate", low_open=True)
  check_range(momentum, "momentum", high=1.0, high_open=True)
  check_count(num_steps, "num_steps")
  pref = (jnp.full((t,), 1.0 / t, dtype) if preference is None else
          as_vector(preference, t, "preference", dtype).astype(dtype))
  return _sdmgrad_solve(cross, weights, pref, jnp.asarray(lambda_, dtype),
                        jnp.asarray(learning_rate, dtype),
                        jnp.asarray(momentum, dtype),
                        jnp.asarray(num_steps, jnp.int32))


# Jitted once at module level: called eagerly (a transformation outside jit),
# a fresh fori_loop body would compile again at every step.
@jax.jit
def _sdmgrad_solve(cross, weights, pref, lam, lr, mu, num_steps):
  scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(cross), 0)))
  a = cross / jnp.where(scale > 0, scale**2, 1)

  def step(_, carry):
    w, v = carry
    v = mu * v + a @ (w + lam * pref)
    return project_to_simplex(w - lr * v), v

  w, _ = lax.fori_loop(0, num_steps, step, (weights, jnp.zeros_like(weights)))
  return (w + lam * pref) / (1 + lam), w


class SDMGradState(NamedTuple):
  """State of :func:`sdmgrad`.

  Attributes:
    inner_weights: ``(T,)`` float32 inner weights :math:`w` (``1/T`` at
      first), the warm start of the next step's inner solve.
    weights: ``(T,)`` float32 weights applied to the shared leaves at the
      last step (zeros before the first update), as in every state of the
      package: :math:`(w + \\lambda\\tilde w) / (1 + \\lambda)`, divided by
      T with ``reduction="mean"`` (applied to the mean of the two batches,
      or to ``third_grads``).
  """
  inner_weights: jax.Array
  weights: jax.Array


@documented
def sdmgrad(*, num_tasks: int, lambda_: float = 0.3,
            learning_rate: float = 10.0, momentum: float = 0.5,
            num_steps: int = 20, preference: jax.Array | None = None,
            reduction: str = "sum", shared: SharedMask = None
            ) -> Aggregator:
  r"""SDMGrad: direction-oriented MGDA from two independent batches.

  Each step takes the stacked gradients of two independent mini-batches,
  :math:`J_1` (``grads``) and :math:`J_2` (``second_grads``), runs the inner
  solve of :func:`pcgrad_optax.weighting.sdmgrad` on their cross matrix
  :math:`J_1 J_2^\top` from the previous step's weights, and returns

  .. math::
    d = \sum_t \frac{w_t + \lambda \tilde w_t}{1 + \lambda}\, \bar g_t .

  Which gradients form the update: the paper's Algorithm 1 (and the
  authors' code, LibMTL, torchjd) evaluates :math:`d` on a third
  independent batch :math:`\zeta`; pass it as ``third_grads``. Without it,
  :math:`\bar g` is the mean of the two batches (no third backward pass;
  the estimate of :math:`d` is then correlated with the weights).

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  @EXTRA_BATCHES@

  Args:
    num_tasks: T (the weights are allocated at ``init``).
    lambda_: :math:`\lambda \ge 0`, the pull towards the preferred direction
      (0.3 as in the paper's experiments, LibMTL and torchjd).
    learning_rate: :math:`\eta > 0` of the inner solve (10 as in the
      authors' code and torchjd; LibMTL 5).
    momentum: :math:`\mu \in [0, 1)` of the inner solve.
    num_steps: inner steps per update (20).
    preference: ``(T,)`` preference :math:`\tilde w` (default ``1/T``).
    reduction: ``"sum"`` (the weights sum to one) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`SDMGradState`;
    ``update(grads, state, params=None, *, second_grads, third_grads=None)``
    needs ``second_grads``, the stacked gradients of a second batch with the
    structure and shapes of ``grads`` (ValueError otherwise).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.sdmgrad(num_tasks=2, lambda_=0.0,
    ...                           learning_rate=1.0, num_steps=100)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> u, state = jax.jit(tx.update)(g, state, params, second_grads=g)
    >>> print([round(float(v), 4) for v in u["w"]])  # one batch twice: MGDA
    [0.2, 0.4]

  References:
    Xiao, Ban, Ji, `Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_,
    NeurIPS 2023.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(lambda_, "lambda_")
  check_range(learning_rate, "learning_rate", low_open=True)
  check_range(momentum, "momentum", high=1.0, high_open=True)
  check_count(num_steps, "num_steps")
  if preference is not None:
    as_vector(preference, expected, "preference")

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "sdmgrad")
    return SDMGradState(inner_weights=jnp.full((t,), 1.0 / t, jnp.float32),
                        weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, second_grads=None,
                third_grads=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "sdmgrad")
    check_record(state.weights, t, "sdmgrad")
    second = check_second_batch(second_grads, leaves, treedef, "sdmgrad",
                                "second_grads")
    third = None if third_grads is None else check_second_batch(
        third_grads, leaves, treedef, "sdmgrad", "third_grads")
    cross = masked_cross(leaves, second, mask, t)
    update_weights, weights = sdmgrad_weighting(
        cross, state.inner_weights, lambda_=lambda_,
        learning_rate=learning_rate, momentum=momentum, num_steps=num_steps,
        preference=preference)
    out = two_batch_update(leaves, second, third, mask, update_weights,
                           reduction)
    new_state = SDMGradState(
        inner_weights=weights,
        weights=record(update_weights, None, state.weights, None, t,
                       reduction)[0])
    return jax.tree.unflatten(treedef, out), cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
