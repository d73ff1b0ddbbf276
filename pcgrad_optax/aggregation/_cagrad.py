"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.checks import (as_float, check_choice,
                                       check_nonnegative, concrete)
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (dual_cone_weights,
                                               min_norm_simplex, mm,
                                               normalized)

CAGRAD_RESCALES = (0, 1, 2)

# Below this many sqrt(T eps) (of the largest gradient norm) |x*| may be
# the Gram matrix's round-off: compare with the degenerate case's answer.
_DEGENERATE_NORM = 8.0


@jax.jit
def _cagrad(gram, c):
  k = normalized(gram)
  dtype = k.dtype
  t = k.shape[0]
  c = c.astype(dtype)
  mean_w = jnp.full((t,), 1.0 / t, dtype)
  k_g0 = mm(k, mean_w)                       # g_i . g0
  g0_sq = jnp.maximum(jnp.dot(mean_w, k_g0), 0)
  rho = c * jnp.sqrt(g0_sq)                   # radius c |g0|
  eps = jnp.finfo(dtype).eps

  def project(tt, passive):
    # The point of the hull closest to -tt*g0 is the min-norm point of the
    # hull of the translated gradients g_i + tt*g0.
    k_t = k + tt * (k_g0[:, None] + k_g0[None, :]) + tt * tt * g0_sq
    return min_norm_simplex(k_t, passive)

  def hull_norm(w):
    return jnp.sqrt(jnp.maximum(jnp.dot(w, mm(k, w)), 0))

  # x* = argmin_{x in hull} g0.x + rho|x| satisfies x* = proj(-t* g0) with
  # t* = |x*| / rho: bisect phi(t) = |proj(-t g0)| - rho t, >= 0 below t*.
  # t_hi = max|g_i| / rho = 1 / rho makes phi <= 0.
  has_radius = rho > 0
  t_hi = jnp.where(has_radius, 1 / jnp.where(has_radius, rho, 1), 0)

  def cond(state):
    it, lo, hi, _, _ = state
    return (it < 80) & (hi - lo > 4 * eps * hi)

  def body(state):
    it, lo, hi, passive, _ = state
    mid = 0.5 * (lo + hi)
    w, passive = project(mid, passive)
    above = hull_norm(w) >= rho * mid
    return (it + 1, jnp.where(above, mid, lo), jnp.where(above, hi, mid),
            passive, w)

  # The last projection (at the last midpoint, within round-off of t*) is
  # the answer; projecting once more after the loop would only double the
  # compiled solver.
  init = (jnp.zeros((), jnp.int32), jnp.zeros((), dtype), t_hi,
          jnp.zeros((t,), bool), mean_w)
  _, _, _, _, w = lax.while_loop(cond, body, init)
  w_norm = hull_norm(w)
  dual = mean_w + rho / jnp.where(w_norm > 0, w_norm, 1) * w

  # 0 (nearly) in the hull: |x*| is small and its direction, round-off at
  # worst. Then the primal's optimal set is B n C (the ball and the dual
  # cone C = {d : G d >= 0}) when dist(g0, C) <= rho, and in general the
  # point of B nearest p = proj_C(g0) = g0 + G^T z (the limit of the dual's
  # solution as x* -> 0): d = g0 + min(1, rho / |G^T z|) G^T z. Near there,
  # keep whichever of the two improves the worst task more (the dual's
  # only if |x*| is above the round-off of the Gram matrix).
  def nearest_in_cone(_):
    z = dual_cone_weights(k, mean_w) - mean_w
    delta = jnp.sqrt(jnp.maximum(jnp.dot(z, mm(k, z)), 0))
    shrink = jnp.where(delta > rho, rho / jnp.where(delta > rho, delta, 1),
                       1)
    projected = mean_w + shrink * z
    worst = lambda v: jnp.min(mm(k, v))      # noqa: E731
    keep_dual = (w_norm > jnp.sqrt(eps)) & (worst(dual) > worst(projected))
    return jnp.where(keep_dual, dual, projected)

  near_zero = w_norm <= _DEGENERATE_NORM * jnp.sqrt(t * eps)
  weights = lax.cond(has_radius & near_zero, nearest_in_cone,
                     lambda _: dual, None)
  weights = jnp.where(has_radius, weights, mean_w)
  return weights.astype(gram.dtype)


def cagrad_weighting(gram: jax.Array, c: float = 0.5, *, rescale: int = 0
                     ) -> jax.Array:
  r"""CAGrad: conflict-averse gradient descent (Liu et al., 2021).

  Maximise the worst task improvement in a ball around the mean gradient
  :math:`g_0 = \frac1T \sum_t g_t`:

  .. math::
    \max_d \min_t\ g_t \cdot d \quad \text{s.t.}\quad
    \|d - g_0\| \le c \|g_0\| .

  Its dual over the simplex is

  .. math::
    w = \arg\min_{w \in \Delta_T}\ g_w \cdot g_0 + \sqrt{\phi}\, \|g_w\|,
    \qquad g_w = \sum_t w_t g_t,\ \phi = c^2 \|g_0\|^2,

  and the update is :math:`d = g_0 + \frac{\sqrt\phi}{\|g_w\|} g_w`
  (Algorithm 1). The dual is solved to round-off without a generic solver:
  the optimal :math:`x^* = g_w` is the projection of :math:`-\tau g_0` onto
  the convex hull of the gradients with :math:`\tau = \|x^*\| / \sqrt\phi`,
  so a bisection on :math:`\tau` with an exact (warm-started) min-norm solve
  per step finds it.

  Zero in the convex hull: then :math:`\|g_w\|` is 0 (or round-off) and
  the formula above is undefined. Back in the primal problem: with
  :math:`C = \{d : g_t\cdot d \ge 0\ \forall t\}` and
  :math:`p = \Pi_C(g_0) = g_0 + \sum_t z_t g_t` (:math:`z \ge 0`, the
  projection onto the dual cone, as in DualProj), the best worst-task
  improvement is 0 if :math:`\|p - g_0\| \le c\|g_0\|`, attained by every
  :math:`d` in the ball and in :math:`C`; we return the one nearest the
  centre, :math:`p`. Otherwise it is negative and the optimum is the point
  of the ball nearest :math:`p`,
  :math:`d = g_0 + c\|g_0\| (p - g_0) / \|p - g_0\|` (the limit of the
  formula above, :math:`g_w / \|g_w\| \to (p - g_0)/\|p - g_0\|`). When
  :math:`\|g_w\|` is within a few :math:`\sqrt{T\epsilon}` of the largest
  gradient norm, both candidates are formed and the one that improves the
  worst task more is kept, so the weights stay bounded and the update stays
  in the ball. (The official code adds 1e-4 to :math:`\|g_w\|`; torchjd
  ``norm_eps``.) For :math:`c \ge 1` the ball contains 0, so the update
  never conflicts with any task; for :math:`c < 1` it may. If
  :math:`c\|g_0\| = 0` the update is :math:`g_0`.

  Scaling: multiplying every gradient by :math:`s > 0` leaves the weights
  unchanged and scales the update by :math:`s`. For one task the update is
  :math:`(1 + c) g` (with ``rescale=0``).

  Args:
    gram: ``(T, T)`` Gram matrix.
    c: the radius factor :math:`c \ge 0` (``0`` gives the mean gradient; the
      paper uses 0.4–0.5 and shows convergence to the average-loss optimum
      for :math:`c < 1`).
    rescale: ``0`` (default) the paper's update; ``1`` divides it by
      :math:`1 + c^2` (the official code's and LibMTL's default);
      ``2`` divides by :math:`1 + c` (their third option). torchjd uses 0.

  Returns:
    ``(T,)`` weights :math:`\frac1T + \frac{\sqrt\phi}{\|g_w\|} w_t`
    (divided as ``rescale`` says).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [-0.5, 1.]])
    >>> w = pcgrad_optax.weighting.cagrad(g @ g.T, c=0.5)
    >>> np.round(np.asarray(w @ g, np.float64), 3)
    array([0.458, 0.687])

  References:
    Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  gram = check_gram(gram)
  c_value = as_float(c)
  if isinstance(c_value, float) and not c_value >= 0:
    raise ValueError(f"CAGrad's c must be >= 0, got {c}.")
  rescale_value = concrete(rescale)   # None when traced
  if rescale_value is not None and (
      rescale_value.ndim != 0 or rescale_value.dtype == bool
      or rescale_value.item() not in CAGRAD_RESCALES):
    raise ValueError(f"Unknown CAGrad rescale {rescale!r}; expected one of "
                     f"{CAGRAD_RESCALES} (none, 1 + c^2, 1 + c).")
  c = jnp.asarray(c, gram.dtype)
  # A select, not a Python branch: rescale may be traced.
  divisor = jnp.where(jnp.asarray(rescale) == 1, 1 + c * c,
                      jnp.where(jnp.asarray(rescale) == 2, 1 + c, 1.0))
  return _cagrad(gram, c) / divisor


@documented
def cagrad(c: float = 0.5, *, rescale: int = 0, reduction: str = "sum",
           shared: SharedMask = None,
           num_tasks: int | None = None, keep_gram: bool = False
           ) -> Aggregator:
  r"""CAGrad: conflict-averse gradient descent (Liu et al., 2021).

  Shared leaves get the update maximising the worst task's improvement in
  the ball of radius :math:`c\|g_0\|` around the mean gradient :math:`g_0`:
  :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w` with :math:`w` the
  solution of the dual over the simplex (solved to round-off; see
  :func:`pcgrad_optax.weighting.cagrad`). For one task the update is
  :math:`(1 + c)\,g`.

  @FIRST_IN_CHAIN@

  Args:
    c: radius factor, ``>= 0`` (0 gives the mean gradient).
    rescale: ``0`` the paper's update (default), ``1`` divides by
      :math:`1 + c^2` (the official code's default), ``2`` by :math:`1 + c`.
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.cagrad(c=0.5)
    >>> grads = {"w": jnp.array([[1., 0.], [-0.5, 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> np.round(np.asarray(updates["w"], np.float64), 3)
    array([0.458, 0.687])

  References:
    Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  check_nonnegative(c, "CAGrad's c")
  check_choice(rescale, CAGRAD_RESCALES, "CAGrad rescale")
  return gram_transform(lambda gram: cagrad_weighting(gram, c, rescale=rescale),
                        reduction=reduction, shared=shared,
                        num_tasks=num_tasks, keep_gram=keep_gram,
                        method="cagrad")
