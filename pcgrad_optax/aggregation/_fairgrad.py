"""FairGrad: alpha-fair resource allocation between the tasks, solved in JAX.

Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
<https://arxiv.org/abs/2402.15638>`_, ICML 2024.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.checks import check_scalar
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import mm, normalized, solver_dtype

_MAX_NEWTON_STEPS = 100
_MAX_HALVINGS = 40


def _fair_weights(k, alpha, ridge):
  r"""``w > 0`` with ``(K + ridge I) w = w^(-1/alpha)``, K normalised.

  Newton with a backtracking (Armijo) line search on the strictly convex
  :math:`F(w) = \frac12 w^T (K + rI) w - \sum_i h(w_i)`,
  :math:`h'(w) = w^{-1/\alpha}` (:math:`h = \log` for
  :math:`\alpha = 1`), whose stationarity condition is the equation; every
  step moves each :math:`w_i` by at most half of its value, so the iterates
  stay positive. Zero-gradient tasks are decoupled (their weight is zeroed
  by the caller).
  """
  t = k.shape[0]
  dtype = k.dtype
  eps = jnp.finfo(dtype).eps
  active = jnp.diagonal(k) > 0
  both = active[:, None] & active[None, :]
  mat = jnp.where(both, k, 0) + jnp.diag(
      jnp.where(active, ridge, 1).astype(dtype))
  inv_alpha = (1 / alpha).astype(dtype)
  p = 1 - inv_alpha

  def power(w, e):                        # w ** e for w > 0
    return jnp.exp(e * jnp.log(w))

  def h(w):                               # (w^p - 1) / p, log w at p = 0
    lw = jnp.log(w)
    small = jnp.abs(p) < 1e-6
    return jnp.where(small, lw, jnp.expm1(p * lw) / jnp.where(small, 1, p))

  def objective(w):
    quad = 0.5 * jnp.dot(w, mm(mat, w))
    barrier = jnp.sum(h(w))
    return quad - barrier, jnp.abs(quad) + jnp.sum(jnp.abs(h(w)))

  def cond(state):
    it, _, dec, prev_dec, stalled, full = state
    # Converged: the decrement is at round-off, or full Newton steps stopped
    # shrinking it (round-off of the float32 equation).
    converging = (dec > 4 * t * eps) & ~(full & (dec < 1e-3)
                                         & (dec >= prev_dec))
    return (it < _MAX_NEWTON_STEPS) & converging & ~stalled

  def body(state):
    it, w, dec_prev, _, _, _ = state
    grad = mm(mat, w) - power(w, -inv_alpha)
    hess = mat + jnp.diag(inv_alpha * power(w, -inv_alpha - 1))
    chol = jax.scipy.linalg.cho_factor(hess, lower=True)
    step = -jax.scipy.linalg.cho_solve(chol, grad)
    dec = -jnp.dot(grad, step)            # Newton decrement squared
    # Fraction to the boundary: no w_i loses more than half its value.
    shrink = jnp.where(step < 0, -0.5 * w / jnp.where(step < 0, step, -1),
                       jnp.inf)
    size0 = jnp.minimum(1.0, jnp.min(shrink)).astype(dtype)
    f0, mag = objective(w)
    slack = 16 * eps * mag

    def ls_cond(ls):
      j, size = ls
      f1, _ = objective(w + size * step)
      ok = f1 <= f0 - 1e-4 * size * dec + slack
      return (j < _MAX_HALVINGS) & ~ok

    def ls_body(ls):
      j, size = ls
      return j + 1, size / 2

    j, size = lax.while_loop(ls_cond, ls_body, (jnp.zeros((), jnp.int32),
                                                size0))
    new_w = w + size * step
    finite = jnp.all(jnp.isfinite(new_w)) & jnp.all(new_w > 0) & jnp.isfinite(
        dec)
    stalled = ~finite | (j >= _MAX_HALVINGS)
    return (it + 1, jnp.where(finite, new_w, w), jnp.where(finite, dec, 0),
            dec_prev, stalled, size >= 1)

  # Start from the decoupled solution K_ii w_i = w_i^(-1/alpha).
  start = power(jnp.diagonal(mat), -1 / (1 + inv_alpha))
  init = (jnp.zeros((), jnp.int32), start,
          jnp.full((), jnp.inf, dtype), jnp.full((), jnp.inf, dtype),
          jnp.zeros((), bool), jnp.zeros((), bool))
  _, w, _, _, _, _ = lax.while_loop(cond, body, init)
  return w, active


@jax.jit
def _fairgrad(gram, alpha, ridge):
  k = gram.astype(solver_dtype(gram))
  dtype = k.dtype
  alpha = alpha.astype(dtype)
  scale = jnp.max(jnp.diagonal(k))
  kn = normalized(k)
  # A rounded (e.g. bf16) Gram matrix can be slightly indefinite.
  lam, vec = jnp.linalg.eigh(kn)
  kn = mm(vec * jnp.maximum(lam, 0)[None, :], vec.T)
  kn = (kn + kn.T) / 2
  active = jnp.diagonal(k) > 0
  kn = jnp.where(active[:, None] & active[None, :], kn, 0)
  w, active = _fair_weights(kn, alpha, ridge.astype(dtype))
  # K = s Kn: w = s^(-alpha / (alpha + 1)) wn solves K w = w^(-1/alpha).
  factor = jnp.exp(-alpha / (alpha + 1) * jnp.log(jnp.where(scale > 0,
                                                            scale, 1)))
  w = jnp.where(active, w * factor, 0)
  return w.astype(gram.dtype)


def _check_alpha_ridge(alpha, ridge) -> None:
  # Concrete values (numbers or arrays) are validated; traced ones pass.
  check_scalar(alpha, "FairGrad's alpha",
               lambda a: a > 0 and math.isfinite(a), "finite and > 0")
  check_scalar(ridge, "FairGrad's ridge",
               lambda r: r >= 0 and math.isfinite(r), "finite and >= 0")


def fairgrad_weighting(gram: jax.Array, *, alpha: float = 1.0,
                       ridge: float = 1e-6) -> jax.Array:
  r"""FairGrad: the :math:`\alpha`-fair update of Ban & Ji (2024).

  The update :math:`d = \sum_t w_t g_t` maximises the
  :math:`\alpha`-fair utility :math:`\sum_t \frac{(g_t\cdot
  d)^{1-\alpha}}{1-\alpha}` (:math:`\sum_t\log(g_t\cdot d)` for
  :math:`\alpha = 1`) of the tasks' improvements in a ball; its weights solve
  (Eq. 4 of the paper)

  .. math:: K w = w^{-1/\alpha}, \qquad w > 0

  (elementwise), i.e. task :math:`t` improves by
  :math:`g_t\cdot d = w_t^{-1/\alpha}`. :math:`\alpha = 1` is proportional
  fairness (Nash-MTL's equation :math:`K w = 1/w`); :math:`\alpha \to 0`
  tends to linear scalarisation (all weights 1), :math:`\alpha \to \infty`
  to max-min fairness (:math:`K w = 1`, equal improvements).

  Solved in JAX under ``jit`` (no SciPy): Newton with an Armijo line search
  on the strictly convex :math:`\frac12 w^T K w - \sum_t h(w_t)` with
  :math:`h' (w) = w^{-1/\alpha}`, whose stationarity condition is the
  equation, on :math:`K / \max_t K_{tt}` (the weights are then rescaled:
  :math:`K \to sK` maps :math:`w \to s^{-\alpha/(\alpha+1)} w`). torchjd and
  the official code call SciPy's ``least_squares`` on the residual (with a
  cap on the evaluations) instead.

  A solution exists iff some direction improves every task. At weakly
  Pareto-stationary points (some :math:`v \ge 0, v \ne 0` with
  :math:`v^T G = 0`, e.g. opposite gradients) there is none; the small
  ``ridge`` on the normalised Gram matrix keeps the problem well posed, and
  the update then goes to 0 like ``ridge ** (1 / (1 + alpha))`` (relative
  to the largest gradient norm: 1e-6 for small alpha, 1e-3 at alpha = 1,
  much less small for large alpha). Where a solution exists the ridge
  changes it by a relative :math:`O(\text{ridge}\; w^{1 + 1/\alpha})`.
  Zero-gradient tasks get weight 0.

  Scaling: multiplying every gradient by :math:`s > 0` scales the update by
  :math:`s^{(1-\alpha)/(1+\alpha)}` (unchanged for :math:`\alpha = 1`).

  Args:
    gram: ``(T, T)`` Gram matrix.
    alpha: :math:`\alpha > 0` (finite), default 1.
    ridge: added to the diagonal of the normalised Gram matrix (default
      ``1e-6``; ``0`` solves the paper's equation exactly).

  Returns:
    ``(T,)`` positive weights (zero for zero-gradient tasks).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = pcgrad_optax.weighting.fairgrad(g @ g.T, alpha=1.0)
    >>> print(jnp.round(w, 4), jnp.round(w @ g, 4))
    [0.5915 0.4071] [0.0766 0.9985 0.9985]

  References:
    Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
  """
  gram = check_gram(gram)
  _check_alpha_ridge(alpha, ridge)
  return _fairgrad(gram, jnp.asarray(alpha, gram.dtype),
                   jnp.asarray(ridge, gram.dtype))


@documented
def fairgrad(alpha: float = 1.0, *, ridge: float = 1e-6,
             reduction: str = "sum", shared: SharedMask = None,
             num_tasks: int | None = None, keep_gram: bool = False
             ) -> Aggregator:
  r"""FairGrad: :math:`\alpha`-fair task weights (Ban & Ji, 2024).

  Shared leaves get :math:`\sum_t w_t g_t` with :math:`K w =
  w^{-1/\alpha}`, :math:`w > 0`, solved by Newton in JAX every step (see
  :func:`pcgrad_optax.weighting.fairgrad`); heads get their plain sum.

  @FIRST_IN_CHAIN@

  Args:
    alpha: the fairness parameter :math:`\alpha > 0` (1: proportional
      fairness; large: max-min). A Python number or a JAX array.
    ridge: diagonal added to the normalised Gram matrix (default ``1e-6``;
      0 exact).
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.fairgrad(alpha=1.0)
    >>> grads = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(3)}))
    >>> print(jnp.round(updates["w"], 4))
    [0.0766 0.9985 0.9985]

  References:
    Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
  """
  _check_alpha_ridge(alpha, ridge)
  return gram_transform(
      lambda gram: fairgrad_weighting(gram, alpha=alpha, ridge=ridge),
      reduction=reduction, shared=shared, num_tasks=num_tasks,
      keep_gram=keep_gram, method="fairgrad")
