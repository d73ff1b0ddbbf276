"""PBI: penalty-based boundary intersection along a preference ray.

Zhang, Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on
Decomposition <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC 2007.
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


def _pbi_weights_and_value(losses, preference, theta, reference):
  t = losses.shape[0]
  check_nonnegative(theta, "`theta`")
  losses_in_domain(losses, method="pbi")
  w = preference_vector(preference, t, 1.0)
  direction = w / jnp.linalg.norm(w)
  z = 0.0 if reference is None else reference
  f = losses - jnp.broadcast_to(jnp.asarray(z, losses.dtype), (t,))
  d1 = jnp.dot(f, direction)
  perp = f - d1 * direction
  d2 = jnp.linalg.norm(perp)
  # d d2 / d L = perp / d2 (perp is orthogonal to the direction already);
  # on the ray (d2 = 0, or round-off of |f|: perp is then noise) the
  # subgradient 0.
  ok = d2 > 16 * jnp.finfo(f.dtype).eps * jnp.linalg.norm(f)
  unit_perp = jnp.where(ok, perp / jnp.where(ok, d2, 1.0), 0.0)
  return direction + theta * unit_perp, d1 + theta * d2


def pbi_weighting(losses: jax.Array, *, theta: float = 5.0,
                  preference: jax.Array | None = None,
                  reference: jax.Array | float | None = None) -> jax.Array:
  r"""PBI's gradient weights on the task losses.

  With the unit preference direction :math:`\hat w = w/\lVert w\rVert` and
  the reference (ideal) point :math:`z^*`, the losses
  :math:`f = L - z^*` split into the distance along the ray and the
  distance to it,

  .. math::
    d_1 = f^\top \hat w, \qquad d_2 = \lVert f - d_1 \hat w\rVert, \qquad
    P = d_1 + \theta\, d_2,

  and the gradient weights of :math:`P` are

  .. math::
    w = \hat w + \theta\,\frac{f - d_1\hat w}{d_2}

  (:math:`\hat w` on the ray, the subgradient where :math:`d_2 = 0`; a
  :math:`d_2` at round-off level, below :math:`16\,\varepsilon\lVert f
  \rVert`, counts as 0).
  Weights can be negative: the penalty pulls the loss vector back onto the
  ray. Definitions as torchjd's ``PBI(theta, weights, reference)`` (which
  adds :math:`10^{-12}` under the norm's square root instead of the
  subgradient at :math:`d_2 = 0`).

  Args:
    losses: ``(T,)`` task losses (finite).
    theta: penalty :math:`\theta \ge 0` (MOEA/D's 5).
    preference: ``(T,)`` :math:`w \ge 0` (default: uniform).
    reference: scalar or ``(T,)`` :math:`z^*` (default 0).

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.pbi(jnp.array([1.0, 1.0]))
    >>> print(jnp.round(w, 4))  # on the ray: the unit direction
    [0.7071 0.7071]
    >>> w = pcgrad_optax.weighting.pbi(jnp.array([1.0, 3.0]), theta=1.0)
    >>> print(jnp.round(w, 4))  # off the ray: pulled back towards it
    [0.   1.4142]

  References:
    Zhang, Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC
    2007.
  """
  losses = as_vector(losses, None, "losses")
  return _pbi_weights_and_value(losses, preference, theta, reference)[0]


def _pbi_method(preference, theta, reference, num_tasks):
  """``(init, step)`` of PBI (see ``_scalarized.py``); stateless."""
  check_nonnegative(theta, "`theta`")
  t = None if num_tasks is None else check_num_tasks(num_tasks)
  if preference is not None and t is not None:
    preference_vector(preference, t, 1.0)

  return stateless(lambda losses, extra: _pbi_weights_and_value(
      losses, extra.get("preference", preference), theta, reference))


@documented
def pbi(preference: jax.Array | None = None, *, theta: float = 5.0,
        reference: jax.Array | float | None = None, reduction: str = "sum",
        shared: SharedMask = None, num_tasks: int | None = None
        ) -> Aggregator:
  r"""PBI: the gradient of :math:`d_1 + \theta d_2` along a preference ray.

  The update is :math:`\sum_t w_t g_t` with the weights of
  :func:`pcgrad_optax.weighting.pbi`: descend along the preference
  direction and back towards the ray. The ray is ``preference`` (default
  uniform) or the extra argument ``preference=`` of ``update``, which takes
  precedence (e.g. a ray drawn for every batch). The losses (extra argument
  ``losses``) are needed; there is no state.
  The one-backward-pass form is
  :func:`pcgrad_optax.scalarization.pbi_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    preference: ``(T,)`` direction :math:`w \ge 0`, or None (uniform).
    theta: penalty :math:`\theta \ge 0` (MOEA/D's 5; torchjd's ``theta``).
    reference: scalar or ``(T,)`` ideal point :math:`z^*` (default 0).
    reduction: ``"sum"`` or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.
  @STATELESS_RECORD_ARGS@

  @STATELESS_RETURNS@
    ``update(grads, state, params=None, *, losses, preference=None)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.pbi(theta=1.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, _ = tx.update(g, tx.init(params), params,
    ...                  losses=jnp.array([1.0, 3.0]))
    >>> print(jnp.round(u["w"], 4))
    [0.   1.4142]

  References:
    Zhang, Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC
    2007.
  """
  check_reduction(reduction)
  init, step = _pbi_method(preference, theta, reference, num_tasks)
  return loss_transformation(init, step, method="pbi",
                             num_tasks=num_tasks, reduction=reduction,
                             shared=shared)


def pbi_loss(preference: jax.Array | None = None, *, theta: float = 5.0,
             reference: jax.Array | float | None = None,
             reduction: str = "sum", num_tasks: int | None = None
             ) -> LossScalarization:
  r"""PBI as one scalar loss (one backward pass).

  ``loss(losses, state, preference=None)`` returns :math:`d_1 + \theta d_2`,
  whose gradient is :func:`pbi`'s update (``shared=None``); the state is
  ``optax.EmptyState()``. A ``preference=`` given to ``loss`` replaces the
  one given here.

  Args:
    preference: ``(T,)`` direction :math:`w \ge 0`, or None (uniform).
    theta: penalty :math:`\theta \ge 0`.
    reference: scalar or ``(T,)`` ideal point :math:`z^*` (default 0).
    reduction: ``"sum"`` or ``"mean"`` (divides by T).
    num_tasks: optional T: the state then keeps the last step's weights.

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.pbi_loss(theta=1.0)
    >>> g, _ = jax.grad(scal.loss, has_aux=True)(jnp.array([1.0, 3.0]),
    ...                                          scal.init())
    >>> print(jnp.round(g, 4))
    [0.   1.4142]

  References:
    Zhang, Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC
    2007.
  """
  init, step = _pbi_method(preference, theta, reference, num_tasks)
  return scalarized(init, step, method="pbi_loss", num_tasks=num_tasks,
                    reduction=reduction)
