"""COSMOS: preference-weighted losses with a cosine penalty to the ray.

Ruchte, Grabocka, `Scalable Pareto Front Approximation for Deep
Multi-Objective Learning <https://arxiv.org/abs/2103.13392>`_, ICDM 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.checks import (as_vector, check_nonnegative,
                                       check_num_tasks, losses_in_domain)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    loss_transformation,
                                                    preference_vector,
                                                    scalarized,
                                                    stateless)


def _cosmos_weights_and_value(losses, preference, lambda_):
  t = losses.shape[0]
  check_nonnegative(lambda_, "`lambda_`")
  losses_in_domain(losses, method="cosmos")
  r = preference_vector(preference, t, 1.0 / t)
  rl = jnp.dot(r, losses)
  r_norm = jnp.linalg.norm(r)
  l_norm = jnp.linalg.norm(losses)
  ok = l_norm > 0
  safe_l = jnp.where(ok, l_norm, 1.0)
  cosine = jnp.where(ok, rl / (r_norm * safe_l), 0.0)
  # d cos(r, L) / d L = r / (|r||L|) - (r.L) L / (|r||L|^3); 0 at L = 0.
  d_cos = jnp.where(ok, r / (r_norm * safe_l)
                    - rl * losses / (r_norm * safe_l ** 3), 0.0)
  return r - lambda_ * d_cos, rl - lambda_ * cosine


def cosmos_weighting(losses: jax.Array, *, lambda_: float,
                     preference: jax.Array | None = None) -> jax.Array:
  r"""COSMOS's gradient weights on the task losses.

  COSMOS minimises the preference-weighted sum of the losses minus a cosine
  penalty that pulls the loss vector towards the preference ray :math:`r`,

  .. math::
    C(L) = r^\top L - \lambda \cos(r, L), \qquad
    \cos(r, L) = \frac{r^\top L}{\lVert r\rVert\,\lVert L\rVert},

  whose gradient weights are

  .. math::
    w = \frac{\partial C}{\partial L} = r - \frac{\lambda}{\lVert r\rVert}
      \Big(\frac{r}{\lVert L\rVert}
        - \frac{(r^\top L)\,L}{\lVert L\rVert^3}\Big)

  (the penalty's part is 0 at :math:`L = 0`, where the cosine is
  undefined). The weights can be negative: a task whose loss is already
  larger than the ray asks is pushed harder, one below it is relaxed.
  Definitions as torchjd's ``COSMOS(lambda_, weights)``; the paper draws
  :math:`r` from a Dirichlet distribution for every batch and also feeds it
  to the network (a modelling choice left to the user).

  Args:
    losses: ``(T,)`` task losses (finite).
    lambda_: penalty :math:`\lambda \ge 0` (0: the linear scalarisation;
      the paper uses 0.01 to 8 depending on the data set).
    preference: ``(T,)`` ray :math:`r \ge 0` (default: uniform, 1/T).

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.cosmos(jnp.array([1.0, 1.0]), lambda_=1.0)
    >>> print(w)  # on the ray: the cosine is at its maximum
    [0.5 0.5]
    >>> w = pcgrad_optax.weighting.cosmos(jnp.array([3.0, 4.0]), lambda_=5.0)
    >>> print([round(float(x), 4) for x in w])  # task 1 is pushed harder
    [0.3869, 0.5849]

  References:
    Ruchte, Grabocka, `Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning <https://arxiv.org/abs/2103.13392>`_,
    ICDM 2021.
  """
  losses = as_vector(losses, None, "losses")
  return _cosmos_weights_and_value(losses, preference, lambda_)[0]


def _cosmos_method(preference, lambda_, num_tasks):
  """``(init, step)`` of COSMOS (see ``_scalarized.py``); stateless."""
  check_nonnegative(lambda_, "`lambda_`")
  t = None if num_tasks is None else check_num_tasks(num_tasks)
  if preference is not None and t is not None:
    preference_vector(preference, t, 1.0)

  return stateless(lambda losses, extra: _cosmos_weights_and_value(
      losses, extra.get("preference", preference), lambda_))


@documented
def cosmos(preference: jax.Array | None = None, *, lambda_: float,
           reduction: str = "sum", shared: SharedMask = None,
           num_tasks: int | None = None) -> Aggregator:
  r"""COSMOS: the gradient of :math:`r^\top L - \lambda\cos(r, L)`.

  The update is :math:`\sum_t w_t g_t` with the weights of
  :func:`pcgrad_optax.weighting.cosmos`: the preference-weighted sum of the
  task gradients, corrected towards the preference ray :math:`r`. The ray
  is ``preference`` (default uniform, :math:`1/T`), or the extra argument
  ``preference=`` of ``update``, which takes precedence: the paper draws a
  new ray :math:`r \sim \mathrm{Dir}(\alpha)` for every batch and conditions
  the network on it, so the user draws it (outside the model) and passes
  the same ray to the model and to ``update``. The losses (extra argument
  ``losses``) are needed; there is no state.
  The one-backward-pass form is
  :func:`pcgrad_optax.scalarization.cosmos_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    preference: ``(T,)`` ray :math:`r \ge 0`, or None (uniform).
    lambda_: penalty :math:`\lambda \ge 0` (torchjd's ``lambda_``; no
      default, as there: the paper uses 0.01 to 8).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.
  @STATELESS_RECORD_ARGS@

  @STATELESS_RETURNS@
    ``update(grads, state, params=None, *, losses, preference=None)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.cosmos(lambda_=5.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, _ = tx.update(g, tx.init(params), params,
    ...                  losses=jnp.array([3.0, 4.0]))
    >>> print([round(float(x), 4) for x in u["w"]])
    [0.3869, 0.5849]

  References:
    Ruchte, Grabocka, `Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning <https://arxiv.org/abs/2103.13392>`_,
    ICDM 2021.
  """
  check_reduction(reduction)
  init, step = _cosmos_method(preference, lambda_, num_tasks)
  return loss_transformation(init, step, method="cosmos",
                             num_tasks=num_tasks, reduction=reduction,
                             shared=shared)


def cosmos_loss(preference: jax.Array | None = None, *, lambda_: float,
                reduction: str = "sum", num_tasks: int | None = None
                ) -> LossScalarization:
  r"""COSMOS as one scalar loss (one backward pass).

  ``loss(losses, state, preference=None)`` returns
  :math:`r^\top L - \lambda\cos(r, L)`, whose gradient is :func:`cosmos`'s
  update (``shared=None``); the state is ``optax.EmptyState()``. A
  ``preference=`` given to ``loss`` replaces the one given here.

  Args:
    preference: ``(T,)`` ray :math:`r \ge 0`, or None (uniform).
    lambda_: penalty :math:`\lambda \ge 0`.
    reduction: ``"sum"`` or ``"mean"`` (divides by T).
    num_tasks: optional T: the state then keeps the last step's weights.

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.cosmos_loss(lambda_=5.0)
    >>> g, _ = jax.grad(scal.loss, has_aux=True)(jnp.array([3.0, 4.0]),
    ...                                          scal.init())
    >>> print([round(float(x), 4) for x in g])
    [0.3869, 0.5849]

  References:
    Ruchte, Grabocka, `Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning <https://arxiv.org/abs/2103.13392>`_,
    ICDM 2021.
  """
  init, step = _cosmos_method(preference, lambda_, num_tasks)
  return scalarized(init, step, method="cosmos_loss", num_tasks=num_tasks,
                    reduction=reduction)
