"""Nash-MTL: the Nash bargaining update, solved in JAX.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, `Multi-Task
Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.checks import (as_float, check_choice,
                                       check_nonnegative)
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (cosines, mm, normalized,
                                               solver_dtype)

NASH_MTL_NORMALIZATIONS = ("none", "frobenius")


def _nash_unit_weights(cos, active, ridge):
  r"""``beta > 0`` with ``(C + ridge I) beta = 1 / beta`` (active tasks).

  Damped Newton on the strictly convex, self-concordant
  :math:`F(\beta) = \frac12 \beta^T C \beta - \sum_i \log \beta_i`, whose
  stationarity condition is the equation: step :math:`1/(1+\lambda)` of the
  Newton step while the Newton decrement :math:`\lambda \ge 1/4`, full steps
  after (quadratic convergence). Self-concordance keeps every iterate
  positive and needs no line search (whose function values float32 could not
  resolve). Stops at round-off (the decrement stops shrinking
  quadratically), on a non-finite step, or after 100 steps. Inactive
  (zero-gradient) tasks are decoupled; they converge to 1 and are zeroed by
  the caller.
  """
  t = cos.shape[0]
  dtype = cos.dtype
  eps = jnp.finfo(dtype).eps
  both = active[:, None] & active[None, :]
  # Active diagonal 1 + ridge; inactive rows/columns decoupled (diagonal 1).
  c_mat = jnp.where(both, cos, 0) + jnp.diag(
      jnp.where(active, ridge, 1).astype(dtype))

  def cond(state):
    it, _, dec, prev_dec = state
    converging = (dec > 4 * t * eps) & ~((dec < 1 / 16) & (dec > prev_dec / 4))
    return (it < 100) & converging

  def body(state):
    it, b, dec_prev, _ = state
    grad = mm(c_mat, b) - 1 / b
    hess = c_mat + jnp.diag(1 / (b * b))
    chol = jax.scipy.linalg.cho_factor(hess, lower=True)
    step = -jax.scipy.linalg.cho_solve(chol, grad)
    dec = -jnp.dot(grad, step)                # Newton decrement squared
    size = jnp.where(dec >= 1 / 16, 1 / (1 + jnp.sqrt(dec)), 1.0)
    new_b = b + size * step
    finite = jnp.all(jnp.isfinite(new_b)) & jnp.all(new_b > 0)
    return (it + 1, jnp.where(finite, new_b, b),
            jnp.where(finite, dec, 0), dec_prev)

  total = jnp.sum(c_mat)
  start = jnp.sqrt(t / jnp.where(total > 0, total, 1))
  init = (jnp.zeros((), jnp.int32), jnp.full((t,), start, dtype),
          jnp.full((), jnp.inf, dtype), jnp.full((), jnp.inf, dtype))
  _, beta, _, _ = lax.while_loop(cond, body, init)
  return beta


@functools.partial(jax.jit, static_argnames=("normalization",))
def _nash_mtl(gram, ridge, max_norm, normalization):
  k = gram.astype(solver_dtype(gram))
  _, nonzero, cos = cosines(normalized(k))
  # A Gram matrix rounded from low-precision gradients can be slightly
  # indefinite; Newton needs C + diag(1/beta^2) positive definite.
  lam, vec = jnp.linalg.eigh(cos)
  cos = mm(vec * jnp.maximum(lam, 0)[None, :], vec.T)
  beta = _nash_unit_weights(cos, nonzero, ridge.astype(k.dtype))
  # alpha_i = beta_i / |g_i| solves K alpha = 1 / alpha in the raw scale.
  raw_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(k), 0))
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, raw_norms, 1), 0)
  if normalization == "frobenius":
    alpha = alpha * jnp.sqrt(jnp.sqrt(jnp.sum(k * k)))
  update_norm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, mm(k, alpha)), 0))
  max_norm = max_norm.astype(k.dtype)
  clip = (max_norm > 0) & (update_norm > max_norm)
  alpha = jnp.where(clip, alpha * max_norm / jnp.where(clip, update_norm, 1),
                    alpha)
  return alpha.astype(gram.dtype)


def nash_mtl_weighting(gram: jax.Array, *, normalization: str = "none",
                       max_norm: float = 0.0, ridge: float = 1e-6) -> jax.Array:
  r"""Nash-MTL: the Nash bargaining solution of Navon et al. (2022).

  The update :math:`u = \sum_t \alpha_t g_t` maximises
  :math:`\sum_t \log(g_t \cdot u)` in a ball; its weights solve

  .. math:: K \alpha = 1 / \alpha, \qquad \alpha > 0

  (elementwise), i.e. every task's directional improvement is
  :math:`g_t \cdot u = 1/\alpha_t`. Writing :math:`\alpha_t = \beta_t /
  \|g_t\|` turns this into :math:`C \beta = 1/\beta` on the cosine matrix,
  so :math:`u = \sum_t \beta_t g_t/\|g_t\|` only depends on the directions:
  it is invariant to rescaling any task's gradient (the paper's scale
  invariance). Note :math:`\|u\|^2 = \alpha^T K \alpha = T`: the paper's
  update always has norm :math:`\sqrt T`.

  The system is solved to convergence in JAX by damped Newton on the convex,
  self-concordant :math:`\frac12\beta^T C\beta - \sum\log\beta` (a
  capped ``lax.while_loop``, typically 3–7 steps). The official code instead
  runs up to 20 steps of a convex-concave procedure with cvxpy (stopping at
  a residual of 1e-3), warm-started from the previous training step, on
  :math:`K / \|K\|_F` (see ``normalization``), optionally recomputing the
  weights only every few steps, and clips the shared gradient's norm
  (``max_norm``). Solving to convergence from scratch needs no state.

  A solution exists iff some direction improves every task. At
  Pareto-stationary points (0 in the cone of the gradients) there is none,
  and the small ``ridge`` on :math:`C` keeps the problem well posed (the
  update then goes to 0); with ``ridge=0`` the iteration is stopped when it
  diverges and the (finite) update is meaningless. Zero-gradient tasks get
  weight 0.

  Scaling: with ``normalization="none"`` the update is unchanged when the
  gradients are multiplied by :math:`s > 0` (and for one task it is the unit
  gradient); with ``"frobenius"`` it scales by :math:`s` (and is the
  identity for one task).

  Args:
    gram: ``(T, T)`` Gram matrix.
    normalization: ``"none"`` (the paper's :math:`K\alpha = 1/\alpha`) or
      ``"frobenius"``: the official code's weights, solved on
      :math:`K / \|K\|_F` and applied to the raw gradients, i.e.
      :math:`\alpha \sqrt{\|K\|_F}`.
    max_norm: if ``> 0``, shrink the weights so that the update's norm is at
      most ``max_norm`` (the official code clips the shared parameters'
      gradient norm to 1.0 after the step; torchjd clips the update like
      this). ``0`` (default) disables it.
    ridge: added to the diagonal of :math:`C` (default ``1e-6``). Where a
      solution exists it changes :math:`\beta` by a relative
      :math:`O(\text{ridge}\,\beta^2)`: invisible unless some task's
      cosine with the update, :math:`1/(\beta_t\sqrt T)`, is below about
      ``1e-2`` (nearly Pareto-stationary; then up to a few percent of the
      gradient norm). ``0`` solves the paper's equation exactly.

  Returns:
    ``(T,)`` positive weights (zero for zero-gradient tasks).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 2.]])
    >>> w = pcgrad_optax.weighting.nash_mtl(g @ g.T, ridge=0.0)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([1. , 0.5], dtype=float32), Array([1., 1.], dtype=float32))

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  gram = check_gram(gram)
  if normalization not in NASH_MTL_NORMALIZATIONS:
    raise ValueError(f"Unknown Nash-MTL normalization {normalization!r}; "
                     f"expected one of {NASH_MTL_NORMALIZATIONS}.")
  for name, value in (("max_norm", max_norm), ("ridge", ridge)):
    value = as_float(value)
    if isinstance(value, float) and not (value >= 0 and math.isfinite(value)):
      raise ValueError(f"Nash-MTL's {name} must be finite and >= 0, got "
                       f"{value}.")
  return _nash_mtl(gram, jnp.asarray(ridge, gram.dtype),
                   jnp.asarray(max_norm, gram.dtype), normalization)


@documented
def nash_mtl(*, normalization: str = "none", max_norm: float = 0.0,
             ridge: float = 1e-6, reduction: str = "sum",
             shared: SharedMask = None,
             num_tasks: int | None = None, keep_gram: bool = False
             ) -> Aggregator:
  r"""Nash-MTL: the Nash bargaining update (Navon et al., 2022).

  Shared leaves get :math:`\sum_t \alpha_t g_t` with
  :math:`K\alpha = 1/\alpha`, :math:`\alpha > 0`, solved to convergence by
  damped Newton every step (see :func:`pcgrad_optax.weighting.nash_mtl`).
  With the default ``normalization="none"`` the update is invariant to the
  scale of every task's gradient (one task: its unit gradient);
  ``"frobenius"`` gives the official code's scaling.

  @FIRST_IN_CHAIN@

  Args:
    normalization: ``"none"`` (paper) or ``"frobenius"`` (official code).
    max_norm: if ``> 0``, the update's norm is clipped to it.
    ridge: diagonal added to the cosine matrix (default ``1e-6``; 0 exact).
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.nash_mtl()
    >>> grads = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([1., 1.], dtype=float32)

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  check_choice(normalization, NASH_MTL_NORMALIZATIONS,
               "Nash-MTL normalization")
  check_nonnegative(max_norm, "Nash-MTL's max_norm")
  check_nonnegative(ridge, "Nash-MTL's ridge")
  return gram_transform(
      lambda gram: nash_mtl_weighting(gram, normalization=normalization,
                                      max_norm=max_norm, ridge=ridge),
      reduction=reduction, shared=shared,
      num_tasks=num_tasks, keep_gram=keep_gram,
      method="nash_mtl")
