"""Gram-matrix weightings of the aggregator family.

Every function here maps the ``(T, T)`` Gram matrix ``K = G G^T`` of the task
gradients (rows ``g_t`` of ``G``) to ``(T,)`` weights ``w``; the update is
``w^T G = sum_t w_t g_t``. They are re-exported as
``pcgrad_optax.weighting.<name>`` and drive the transformations of the same
name in :mod:`pcgrad_optax`.

Conventions shared by all of them:

* The weights are the method's update as its paper defines it (MGDA: the
  min-norm point of the convex hull, so weights on the simplex; UPGrad: the
  *average* of the projected gradients; CAGrad: around the *mean* gradient;
  Aligned-MTL and ConFIG: around the *sum*). The transformations apply them
  as they are with ``reduction="sum"`` and divide them by ``T`` with
  ``reduction="mean"``.
* Everything works on ``T x T`` numbers only, so the cost does not depend
  on the model size: ``O(T^3)`` for the closed forms, ``O(T^3)`` per
  active-set step (at most ``3T + 10`` steps) for the QPs, ``T`` such QPs
  for UPGrad. All of it is jit-able; iterations run in ``lax.while_loop``
  with caps (never unrolled), so compile time does not grow with ``T``.
* The small problems are solved in the Gram matrix's dtype (float32 for
  float32/bf16/f16 gradients, float64 for float64 ones), or in float64
  whenever ``jax_enable_x64`` is on. In float32 the Gram matrix itself
  carries a relative error of about ``1e-7``, which bounds how well *any*
  Gram-based method can resolve nearly degenerate configurations: updates
  are then accurate to a few ``1e-4`` of the largest gradient norm (about
  ``sqrt(1e-7)``), against ``1e-7`` on well-conditioned problems. Enable
  x64 if you need more.
* Methods that only depend on directions work on the cosine matrix
  ``C_ij = K_ij / (|g_i| |g_j|)``, so gradient norms spanning many orders of
  magnitude do not cost precision. A task with a zero gradient is handled
  explicitly by every method (never ``0/0``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "aligned_mtl",
    "cagrad",
    "config",
    "dualproj",
    "imtl_g",
    "mean",
    "mgda",
    "nash_mtl",
    "sum",
    "upgrad",
]

_HIGHEST = lax.Precision.HIGHEST

MGDA_NORMALIZATIONS = ("none", "l2")
CAGRAD_RESCALES = (0, 1, 2)
ALIGNED_MTL_SCALE_MODES = ("min", "median", "rmse")
NASH_MTL_NORMALIZATIONS = ("none", "frobenius")


# ---------------------------------------------------------------------------
# Small helpers.


def _mm(a, b):
  # Full f32 precision for the T x T products, also on accelerators whose
  # default f32 matmul precision is lower (TF32, bf16 passes).
  return jnp.matmul(a, b, precision=_HIGHEST)


def _check_gram(gram) -> jax.Array:
  # weighting.py imports this module at its end, so look it up lazily.
  from pcgrad_optax import weighting
  return weighting.check_gram(gram)


def _solver_dtype(gram: jax.Array):
  """float64 if x64 is enabled, else the Gram matrix's (f32 or wider) dtype."""
  return jnp.promote_types(gram.dtype,
                           jax.dtypes.canonicalize_dtype(jnp.float64))


def _normalized(gram: jax.Array) -> jax.Array:
  """``gram / max_t K_tt`` in the solver dtype (unchanged if all zero)."""
  gram = gram.astype(_solver_dtype(gram))
  scale = jnp.max(jnp.diagonal(gram))
  return gram / jnp.where(scale > 0, scale, 1)


def _cosines(gram: jax.Array, zero_diagonal_for_zero_tasks: bool = False):
  """Norms, nonzero mask and cosine matrix ``C_ij = K_ij / (n_i n_j)``.

  A zero-gradient task gets a zero row and column, and a diagonal entry of 1
  (decoupled from the others) unless ``zero_diagonal_for_zero_tasks``.
  """
  t = gram.shape[0]
  sq = jnp.diagonal(gram)
  nonzero = sq > 0
  norms = jnp.sqrt(jnp.where(nonzero, sq, 0))
  inv = jnp.where(nonzero, 1 / jnp.where(nonzero, norms, 1), 0)
  cos = gram * inv[:, None] * inv[None, :]
  eye = jnp.eye(t, dtype=bool)
  diag = nonzero if zero_diagonal_for_zero_tasks else jnp.ones_like(nonzero)
  cos = jnp.where(eye, diag.astype(gram.dtype), cos)
  return norms, nonzero, cos


def _safe_div(num, den):
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


def _psd_pinv(mat: jax.Array, rtol) -> jax.Array:
  """Pseudo-inverse of a symmetric PSD matrix (eigenvalues <= rtol*max cut)."""
  lam, vec = jnp.linalg.eigh(mat)
  keep = lam > rtol * jnp.maximum(lam[-1], jnp.finfo(mat.dtype).tiny)
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  return _mm(vec * inv[None, :], vec.T)


def _as_float(x) -> float | jax.Array:
  """A Python float if ``x`` is concrete (validated by callers), else x."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return x


def _check_task_vector(x, t: int, name: str, dtype) -> jax.Array:
  x = jnp.asarray(x)
  if x.shape != (t,):
    raise ValueError(f"`{name}` must have shape (T,) = ({t},), got {x.shape}.")
  return x.astype(dtype)


# ---------------------------------------------------------------------------
# The shared QP solver.


def _nnls(q: jax.Array, h: jax.Array,
          passive: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Exact active-set solution of the non-negative QP below.

  .. math:: \min_{z \ge 0}\ \tfrac12 z^T Q z - h^T z

  Lawson–Hanson's NNLS method written on the normal equations (``Q = A^T A``
  PSD, ``h = A^T b`` in the range of ``Q``): keep a passive set ``P``; solve
  the unconstrained problem on ``P`` (a Cholesky solve of the masked
  ``T x T`` system); if that solution is positive take it and add the index
  with the most negative gradient, else step towards it until a passive
  entry hits zero and drop that one. Finite in exact arithmetic; here one
  ``lax.while_loop`` with a cap of ``3T + 10`` steps.

  Callers pass ``Q`` scaled to a unit diagonal (cosine form), so the
  ridge and the stopping tolerance are relative to the
  directions of the gradients, not their norms.

  Args:
    q: ``(T, T)`` PSD matrix.
    h: ``(T,)`` linear term.
    passive: optional ``(T,)`` bool warm start (indices expected positive).

  Returns:
    ``(z, passive)``: the solution and its final passive set.
  """
  t = q.shape[0]
  dtype = q.dtype
  eps = jnp.finfo(dtype).eps
  rtol = t * eps
  max_iter = 3 * t + 10
  idx = jnp.arange(t, dtype=jnp.int32)
  # The nearest PSD matrix (a rounded, e.g. bf16, Gram can be slightly
  # indefinite): then every Q_PP + rtol I below is positive definite.
  lam, vec = jnp.linalg.eigh(q)
  q = _mm(vec * jnp.maximum(lam, 0)[None, :], vec.T)
  q = (q + q.T) / 2
  abs_q, abs_h = jnp.abs(q), jnp.abs(h)
  if passive is None:
    passive = jnp.zeros((t,), bool)

  def solve_on(p):
    # Lawson-Hanson keeps the passive columns linearly independent, so Q_PP
    # is positive definite: a Cholesky solve (a few times cheaper than the
    # eigendecomposition a pseudo-inverse needs), with a ridge of rtol on
    # the passive diagonal against round-off, the identity elsewhere.
    both = p[:, None] & p[None, :]
    mat = jnp.where(both, q, 0) + jnp.diag(jnp.where(p, rtol, 1).astype(dtype))
    factor = jax.scipy.linalg.cho_factor(mat, lower=True)
    return jnp.where(p, jax.scipy.linalg.cho_solve(factor, jnp.where(p, h, 0)),
                     0)

  def cond(state):
    it, _, _, _, _, done = state
    return (it < max_iter) & ~done

  def body(state):
    it, z, p, blocked, last, _ = state
    s = solve_on(p)
    feasible = jnp.all(jnp.where(p, s > 0, True))
    # Feasible: s is the new iterate. Free the bound with the most negative
    # gradient, unless every gradient is within its round-off.
    neg_grad = h - _mm(q, s)
    tol = eps * jnp.max(abs_h + _mm(abs_q, jnp.abs(s)))
    candidates = ~p & ~blocked & (neg_grad > tol)
    any_candidate = jnp.any(candidates)
    j = jnp.argmax(jnp.where(candidates, neg_grad, -jnp.inf)).astype(
        jnp.int32)
    # The previously freed index survived: progress, so unblock everything.
    progressed = (last >= 0) & p[jnp.maximum(last, 0)]
    blocked_f = blocked & ~progressed
    p_f = p | (any_candidate & (idx == j))
    last_f = jnp.where(any_candidate, j, last)
    # Infeasible: move from z towards s until the first passive entry that
    # s makes non-positive reaches zero; drop it.
    negative = p & (s <= 0)
    gap = z - s
    ratio = jnp.where(negative & (gap > 0), z / jnp.where(gap > 0, gap, 1),
                      jnp.where(negative, 0, jnp.inf))
    step = jnp.clip(jnp.min(ratio), 0, 1)
    z_i = z + step * (s - z)
    drop = negative & ((ratio <= step) | (z_i <= 0))
    z_i = jnp.where(p & ~drop, jnp.maximum(z_i, 0), 0)
    # An index freed in round-off that is immediately dropped again (a zero
    # step) would be freed forever: block it until something else moves.
    blocked_i = blocked | (drop & (step <= 0) & (idx == last))
    new = (
        (it + 1).astype(jnp.int32),
        jnp.where(feasible, s, z_i),
        jnp.where(feasible, p_f, p & ~drop),
        jnp.where(feasible, blocked_f, blocked_i),
        jnp.where(feasible, last_f, last),
        feasible & ~any_candidate,
    )
    return new

  init = (jnp.zeros((), jnp.int32), jnp.zeros((t,), dtype), passive,
          jnp.zeros((t,), bool), jnp.full((), -1, jnp.int32),
          jnp.zeros((), bool))
  _, z, p, _, _, _ = lax.while_loop(cond, body, init)
  return z, p


def _min_norm_simplex(gram: jax.Array, passive: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  r"""Exact :math:`\arg\min_{w \in \Delta} w^T K w` (weights, support).

  ``T = 1, 2`` in closed form. Otherwise the simplex problem is rewritten as
  a non-negative least-squares problem: for :math:`\lambda = s w` with
  :math:`w \in \Delta`,
  :math:`\lambda^T K \lambda + \gamma^2 (1 - 1^T\lambda)^2` is minimised over
  :math:`s` at :math:`\gamma^2 f(w) / (f(w) + \gamma^2)`, increasing in
  :math:`f(w) = w^T K w`; so the minimiser over :math:`\lambda \ge 0`
  normalised to sum one is the simplex minimiser, also when the minimum is 0.
  In the variables :math:`y_i = |g_i| \lambda_i` with
  :math:`\gamma = \min_i |g_i|` this is :math:`Q = C + r r^T`,
  :math:`h = \gamma r` with :math:`r_i = \gamma / |g_i| \le 1` (``h`` is
  passed divided by :math:`\gamma`, which only rescales the solution), so
  every entry is at most 1 in magnitude whatever the spread of gradient
  norms. A zero gradient is itself the min-norm point.
  """
  t = gram.shape[0]
  dtype = gram.dtype
  if t == 1:
    return jnp.ones((1,), dtype), jnp.ones((1,), bool)
  if t == 2:
    # min_w |w g1 + (1-w) g2|^2: w = (K22 - K12) / |g1 - g2|^2, clipped.
    den = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
    w1 = jnp.clip(_safe_div(gram[1, 1] - gram[0, 1], den), 0, 1)
    w1 = jnp.where(den > 0, w1, jnp.where(gram[0, 0] <= gram[1, 1], 1., 0.))
    w = jnp.stack([w1, 1 - w1]).astype(dtype)
    return w, w > 0
  norms, nonzero, cos = _cosines(gram)
  smallest = jnp.min(jnp.where(nonzero, norms, jnp.inf))
  ratio = jnp.where(nonzero, smallest / jnp.where(nonzero, norms, 1), 0)
  y, support = _nnls(cos + ratio[:, None] * ratio[None, :], ratio, passive)
  lam = jnp.where(nonzero, y / jnp.where(nonzero, norms, 1), 0)
  total = jnp.sum(lam)
  w = jnp.where(total > 0, lam / jnp.where(total > 0, total, 1), 1.0 / t)
  zero_task = ~nonzero
  first_zero = jax.nn.one_hot(jnp.argmax(zero_task), t, dtype=dtype)
  w = jnp.where(jnp.any(zero_task), first_zero, w)
  return w, jnp.where(jnp.any(zero_task), zero_task, support)


def _dual_cone_weights(gram: jax.Array, lower: jax.Array) -> jax.Array:
  r"""Weights of the projection of :math:`G^T u` onto the dual cone of G.

  By Proposition 1 of Quinton & Rey (2024) the projection of
  :math:`G^T u` onto :math:`\{x : G x \ge 0\}` is :math:`G^T v` with
  :math:`v = \arg\min_{v \ge u} v^T K v`. With :math:`v = u + z` that is an
  NNLS problem in :math:`z`, solved here in the cosine variables
  :math:`y_i = |g_i| z_i`. ``lower`` may carry leading batch axes.
  """
  if gram.shape[0] == 1:
    # One gradient is its own projection (and u < 0 projects to 0).
    return jnp.where(gram[0, 0] > 0, jnp.maximum(lower, 0), lower)
  norms, nonzero, cos = _cosines(gram)
  inv = jnp.where(nonzero, 1 / jnp.where(nonzero, norms, 1), 0)
  h = -_mm(lower, gram) * inv            # -(K u)_i / |g_i|, batched over u
  solve = lambda hh: _nnls(cos, hh)[0]    # noqa: E731
  for _ in range(lower.ndim - 1):
    solve = jax.vmap(solve)
  return lower + solve(h) * inv


# ---------------------------------------------------------------------------
# Linear scalarisation.


def mean(gram: jax.Array) -> jax.Array:
  r"""Equal weights :math:`1/T`: the mean of the task gradients.

  .. math:: w_t = \tfrac1T, \qquad u = \tfrac1T \sum_t g_t .

  Linear scalarisation of the mean loss, the baseline of every table. Note
  that the transformation :func:`pcgrad_optax.mean` with
  ``reduction="mean"`` divides by ``T`` once more; use
  :func:`pcgrad_optax.sum` with ``reduction="mean"`` for the plain mean of
  shared parameters *and* heads.

  Args:
    gram: ``(T, T)`` Gram matrix (only its shape is used).

  Returns:
    ``(T,)`` weights, all ``1/T``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.mean(jnp.eye(4))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  """
  gram = _check_gram(gram)
  t = gram.shape[0]
  return jnp.full((t,), 1.0 / t, gram.dtype)


def sum(gram: jax.Array) -> jax.Array:  # noqa: A001 (the method's name)
  r"""Unit weights: the sum of the task gradients.

  .. math:: w_t = 1, \qquad u = \sum_t g_t .

  Linear scalarisation of the summed loss (the gradient of
  :math:`\sum_t L_t`).

  Args:
    gram: ``(T, T)`` Gram matrix (only its shape is used).

  Returns:
    ``(T,)`` weights, all 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.sum(jnp.eye(3))
    Array([1., 1., 1.], dtype=float32)
  """
  gram = _check_gram(gram)
  return jnp.ones((gram.shape[0],), gram.dtype)


# ---------------------------------------------------------------------------
# MGDA.


@functools.partial(jax.jit, static_argnames=("normalization",))
def _mgda(gram, normalization):
  gram_n = _normalized(gram)
  if normalization == "l2":
    gram_n = _cosines(gram_n, zero_diagonal_for_zero_tasks=True)[2]
  return _min_norm_simplex(gram_n)[0].astype(gram.dtype)


def mgda(gram: jax.Array, *, normalization: str = "none") -> jax.Array:
  r"""MGDA: the exact min-norm point of the convex hull of the gradients.

  Sener & Koltun (2018) take the Multiple-Gradient Descent Algorithm's
  common descent direction, the minimum-norm element of the convex hull of
  the task gradients:

  .. math::
    w = \arg\min_{w \in \Delta_T} \Big\| \sum_t w_t g_t \Big\|^2
      = \arg\min_{w \ge 0,\ 1^T w = 1} w^T K w,
    \qquad u = \sum_t w_t g_t .

  The update :math:`u` never conflicts with any task
  (:math:`g_t \cdot u \ge \|u\|^2 \ge 0`) and is zero exactly at
  Pareto-stationary points. The paper (and torchjd, LibMTL) solve the QP with
  Frank–Wolfe, which stops short of the optimum; here it is solved exactly:
  closed form for ``T = 2``, otherwise an active-set NNLS reformulation
  (see ``_min_norm_simplex``) in cosine variables, so the result is the true
  min-norm point to round-off (about ``1e-7`` of the largest gradient norm on
  well-conditioned float32 problems, a few ``1e-4`` on nearly degenerate
  ones).

  With ``reduction="sum"`` the transformation returns the min-norm vector
  itself (weights on the simplex), as the paper and torchjd do; LibMTL does
  the same. The scaling: multiplying every gradient by :math:`s > 0` leaves
  the weights unchanged and scales the update by :math:`s`.

  Args:
    gram: ``(T, T)`` Gram matrix.
    normalization: ``"none"`` (the paper's MGDA), or ``"l2"``: the weights
      are solved on the unit gradients :math:`g_t / \|g_t\|` and applied to
      the raw gradients, as the official code's ``normalization_type="l2"``
      does (then the weights only depend on the directions). LibMTL's
      ``mgda_gn="l2"`` instead returns the min-norm point of the *unit*
      gradients, whose weights are ``mgda(K, normalization="l2") /
      sqrt(diag(K))``. The loss-based normalisations need the losses and are
      not Gram-only.

  Returns:
    ``(T,)`` weights on the simplex.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 2.]])
    >>> w = pcgrad_optax.weighting.mgda(g @ g.T)
    >>> np.round(np.asarray(w, np.float64), 4)
    array([0.8, 0.2])
    >>> np.round(np.asarray(w @ g, np.float64), 4)  # the min-norm point
    array([0.8, 0.4])

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018; Désidéri, `Multiple-
    gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_, 2012.
  """
  gram = _check_gram(gram)
  if normalization not in MGDA_NORMALIZATIONS:
    raise ValueError(f"Unknown MGDA normalization {normalization!r}; expected "
                     f"one of {MGDA_NORMALIZATIONS}.")
  return _mgda(gram, normalization)


# ---------------------------------------------------------------------------
# UPGrad and DualProj.


def _torchjd_normalized(gram, reg_eps):
  """``K / trace(K) + reg_eps * I`` (torchjd's QP preprocessing)."""
  gram = gram.astype(_solver_dtype(gram))
  trace = jnp.trace(gram)
  gram = gram / jnp.where(trace > 0, trace, 1)
  return gram + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def _dual_cone_args(gram, task_weights, reg_eps) -> tuple:
  """UPGrad's and DualProj's checked ``(gram, task_weights, reg_eps)``."""
  gram = _check_gram(gram)
  t = gram.shape[0]
  if task_weights is None:
    task_weights = jnp.full((t,), 1.0 / t, gram.dtype)
  task_weights = _check_task_vector(task_weights, t, "task_weights",
                                    gram.dtype)
  if isinstance(_as_float(reg_eps), float) and reg_eps < 0:
    raise ValueError(f"reg_eps must be >= 0, got {reg_eps}.")
  return gram, task_weights, jnp.asarray(reg_eps, gram.dtype)


@jax.jit
def _upgrad(gram, task_weights, reg_eps):
  gram_n = _torchjd_normalized(gram, reg_eps)
  lowers = jnp.diag(task_weights.astype(gram_n.dtype))
  return jnp.sum(_dual_cone_weights(gram_n, lowers), axis=0).astype(
      gram.dtype)


def upgrad(gram: jax.Array, *, task_weights: jax.Array | None = None,
           reg_eps: float = 0.0) -> jax.Array:
  r"""UPGrad: average of every gradient projected onto the dual cone.

  Quinton & Rey (2024) project each task gradient onto the dual cone of all
  of them, :math:`\mathcal C = \{x : g_t \cdot x \ge 0\ \forall t\}`, and
  average the projections:

  .. math::
    u = \frac1T \sum_i \pi_{\mathcal C}(g_i), \qquad
    \pi_{\mathcal C}(g_i) = G^T v^{(i)}, \quad
    v^{(i)} = \arg\min_{v \ge e_i} v^T K v ,

  (their Proposition 1) so :math:`w = \frac1T \sum_i v^{(i)}`. Each of the
  ``T`` small QPs is solved exactly by the shared active-set solver (batched
  with ``vmap``). The update never conflicts with any task, equals the
  mean gradient when no pair conflicts, and scales like the gradients
  (multiplying all of them by :math:`s > 0` multiplies the update by
  :math:`s`, leaving the weights unchanged).

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` preference vector :math:`p`; projects
      :math:`p_i g_i` and sums, i.e. :math:`v^{(i)} = \arg\min_{v \ge p_i e_i}
      v^T K v`. Default ``1/T`` (the paper's average, torchjd's default).
    reg_eps: adds ``reg_eps * I`` to ``K / trace(K)`` before solving.
      ``0`` (default) solves the paper's QP exactly; torchjd's default
      quadprog projector uses ``1e-4`` (and zeroes the weights when
      ``trace(K) < 1e-4``, which this never does).

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [-1., 1.]])
    >>> w = pcgrad_optax.weighting.upgrad(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([1. , 0.75], dtype=float32), Array([0.25, 0.75], dtype=float32))

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  return _upgrad(*_dual_cone_args(gram, task_weights, reg_eps))


@jax.jit
def _dualproj(gram, task_weights, reg_eps):
  gram_n = _torchjd_normalized(gram, reg_eps)
  return _dual_cone_weights(gram_n, task_weights.astype(gram_n.dtype)).astype(
      gram.dtype)


def dualproj(gram: jax.Array, *, task_weights: jax.Array | None = None,
             reg_eps: float = 0.0) -> jax.Array:
  r"""DualProj: the mean gradient projected onto the dual cone (GEM-style).

  Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017, Eq. 11) projects a
  proposed update onto :math:`\{x : g_t \cdot x \ge 0\ \forall t\}` by
  solving the dual QP; DualProj (as defined by Quinton & Rey, 2024) applies
  that to the mean gradient:

  .. math::
    u = \pi_{\mathcal C}\Big(\frac1T \sum_t g_t\Big) = G^T v, \qquad
    v = \arg\min_{v \ge \frac1T 1} v^T K v .

  Exact active-set solution. The update never conflicts with any task,
  equals the mean when the mean conflicts with none, and scales like the
  gradients.

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` preference vector :math:`p` replacing the
      mean (projects :math:`G^T p`; ``v >= p``). Default ``1/T``.
    reg_eps: adds ``reg_eps * I`` to ``K / trace(K)`` (torchjd's quadprog
      projector uses ``1e-4``); ``0`` (default) is the exact projection.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 1.], [-3., 0.]])
    >>> w = pcgrad_optax.weighting.dualproj(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.75, 0.5 ], dtype=float32), Array([-0.75,  0.75], dtype=float32))

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017; Quinton & Rey,
    `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  return _dualproj(*_dual_cone_args(gram, task_weights, reg_eps))


# ---------------------------------------------------------------------------
# CAGrad.


@jax.jit
def _cagrad(gram, c):
  k = _normalized(gram)
  dtype = k.dtype
  t = k.shape[0]
  c = c.astype(dtype)
  mean_w = jnp.full((t,), 1.0 / t, dtype)
  k_g0 = _mm(k, mean_w)                       # g_i . g0
  g0_sq = jnp.maximum(jnp.dot(mean_w, k_g0), 0)
  rho = c * jnp.sqrt(g0_sq)                   # radius c |g0|
  eps = jnp.finfo(dtype).eps

  def project(tt, passive):
    # The point of the hull closest to -tt*g0 is the min-norm point of the
    # hull of the translated gradients g_i + tt*g0.
    k_t = k + tt * (k_g0[:, None] + k_g0[None, :]) + tt * tt * g0_sq
    return _min_norm_simplex(k_t, passive)

  def hull_norm(w):
    return jnp.sqrt(jnp.maximum(jnp.dot(w, _mm(k, w)), 0))

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
  ok = has_radius & (w_norm > 0)
  weights = mean_w + jnp.where(ok, rho / jnp.where(ok, w_norm, 1), 0) * w
  return weights.astype(gram.dtype)


def cagrad(gram: jax.Array, c: float = 0.5, *, rescale: int = 0
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
  per step finds it. If :math:`g_w = 0` (or :math:`c\|g_0\| = 0`) the update
  is :math:`g_0`, as in the official code.

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
  gram = _check_gram(gram)
  c_value = _as_float(c)
  if isinstance(c_value, float) and not c_value >= 0:
    raise ValueError(f"CAGrad's c must be >= 0, got {c}.")
  if rescale not in CAGRAD_RESCALES:
    raise ValueError(f"Unknown CAGrad rescale {rescale!r}; expected one of "
                     f"{CAGRAD_RESCALES} (none, 1 + c^2, 1 + c).")
  c = jnp.asarray(c, gram.dtype)
  divisor = {0: 1.0, 1: 1 + c * c, 2: 1 + c}[int(rescale)]
  return _cagrad(gram, c) / divisor


# ---------------------------------------------------------------------------
# IMTL-G and ConFIG: the direction with equal cosines to every gradient.


def _equal_cosine_direction(gram):
  """``beta = C^+ 1``: ``sum_i beta_i u_i`` has unit projection on every u_t.

  Returns (norms, nonzero, cos, beta), cos with zero rows for zero tasks.
  """
  norms, nonzero, cos = _cosines(_normalized(gram),
                                 zero_diagonal_for_zero_tasks=True)
  t = gram.shape[0]
  pinv = _psd_pinv(cos, t * jnp.finfo(cos.dtype).eps)
  beta = _mm(pinv, nonzero.astype(cos.dtype))
  return norms, nonzero, cos, beta


@jax.jit
def _imtl_g(gram):
  norms, nonzero, _, beta = _equal_cosine_direction(gram)
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1), 0)
  total = jnp.sum(alpha)
  eps = jnp.finfo(alpha.dtype).eps
  # A sum lost in round-off means there is no such direction with weights
  # summing to one (e.g. opposite gradients): return zeros, as torchjd does.
  ok = jnp.abs(total) > 100 * alpha.shape[0] * eps * jnp.sum(jnp.abs(alpha))
  return jnp.where(ok, alpha / jnp.where(ok, total, 1), 0).astype(gram.dtype)


def imtl_g(gram: jax.Array) -> jax.Array:
  r"""IMTL-G: the update with equal projections on every unit gradient.

  Liu et al. (2021) pick :math:`u = \sum_t \alpha_t g_t` with
  :math:`\sum_t \alpha_t = 1` such that :math:`u \cdot g_t / \|g_t\|` is the
  same for all tasks. Their closed form
  :math:`\alpha_{2:T} = g_1 U^T (D U^T)^{-1}` (``D``, ``U``: differences of
  the raw and unit gradients to task 1) is, in Gram terms,

  .. math::
    \alpha = \frac{K^{-1} n}{1^T K^{-1} n}
           = \frac{N^{-1} C^{+} 1}{1^T N^{-1} C^{+} 1},
    \qquad n_t = \|g_t\|,\ N = \mathrm{diag}(n),\ C = N^{-1} K N^{-1},

  computed through the cosine matrix :math:`C` so that gradient norms
  spanning many orders of magnitude are harmless. With linearly dependent
  gradients :math:`K^{-1}` does not exist (the official code fails); the
  pseudo-inverse of :math:`C` then picks the direction whose cosines with
  the unit gradients are equal in the least-squares sense (torchjd's
  generalisation uses :math:`K^+ n`, which weights that least-squares fit by
  the gradient norms; both agree for independent gradients). Zero-gradient
  tasks get weight 0; if the weights cannot sum to one (e.g. two opposite
  gradients) they are all 0.

  Scaling: all gradients times :math:`s > 0` leaves :math:`\alpha` unchanged
  and scales the update by :math:`s`; scaling one task's gradient leaves the
  update's direction unchanged.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` weights summing to one (or all zero).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> w = pcgrad_optax.weighting.imtl_g(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.75, 0.25], dtype=float32), Array([0.75, 0.75], dtype=float32))

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021.
  """
  return _imtl_g(_check_gram(gram))


@jax.jit
def _config(gram):
  norms, nonzero, cos, beta = _equal_cosine_direction(gram)
  # g_c = sum_j beta_j u_j; |g_c|^2 = beta^T C beta; sum_i g_i.g_c = n^T C b.
  c_beta = _mm(cos, beta)
  sq_norm = jnp.dot(beta, c_beta)
  length = jnp.dot(norms, c_beta)
  scale = _safe_div(length, sq_norm)
  eps = jnp.finfo(cos.dtype).eps
  scale = jnp.where(sq_norm > eps * jnp.sum(beta * beta), scale, 0)
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1), 0)
  return (scale * alpha).astype(gram.dtype)


def config(gram: jax.Array) -> jax.Array:
  r"""ConFIG: the conflict-free update of Liu et al. (2024).

  The direction solves :math:`u_t \cdot g_c = 1` for every unit gradient
  :math:`u_t = g_t / \|g_t\|` with the pseudo-inverse (equal angles with all
  tasks), and its length is the sum of the gradients' projections on it:

  .. math::
    g_c = U^{+} 1, \qquad
    d = \Big(\sum_t g_t \cdot \hat g_c\Big)\, \hat g_c,
    \quad \hat g_c = g_c / \|g_c\| .

  In Gram terms :math:`g_c = \sum_j \beta_j u_j` with
  :math:`\beta = C^{+} 1` (``C`` the cosine matrix), so the weights are
  :math:`\frac{n^T C \beta}{\beta^T C \beta}\, \beta_t / \|g_t\|`. This is
  the official ``ConFIG_update`` with its defaults (equal weights,
  ``ProjectionLength``; its ``lstsq``/``pinv`` paths agree with the
  pseudo-inverse here). When the gradients are linearly independent the
  update conflicts with no task. A zero gradient's unit vector is taken as
  zero (its equation is dropped), as the official code's ``nan_to_num``
  does.

  Scaling: all gradients times :math:`s > 0` scales the update by :math:`s`;
  scaling one task's gradient keeps the direction and changes the length.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> w = pcgrad_optax.weighting.config(g @ g.T)
    >>> jnp.round(w @ g, 4)
    Array([2., 2.], dtype=float32)

  References:
    Liu, Chu, Thuerey, `ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
  """
  return _config(_check_gram(gram))


# ---------------------------------------------------------------------------
# Aligned-MTL.


@functools.partial(jax.jit, static_argnames=("scale_mode",))
def _aligned_mtl(gram, task_weights, scale_mode):
  k = _normalized(gram)
  t = k.shape[0]
  lam, vec = jnp.linalg.eigh(k)               # ascending
  eps = jnp.finfo(k.dtype).eps
  keep = lam > lam[-1] * t * eps              # the official rank rule
  rank = jnp.sum(keep)
  kept_lam = jnp.where(keep, lam, 0)
  if scale_mode == "min":
    scale = lam[t - jnp.maximum(rank, 1)]
  elif scale_mode == "median":
    # torch.median: the lower median of the kept eigenvalues.
    scale = lam[t - rank + (jnp.maximum(rank, 1) - 1) // 2]
  else:  # "rmse"
    scale = jnp.sum(kept_lam) / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam, 1)), 0)
  balance = jnp.sqrt(jnp.maximum(scale, 0)) * _mm(vec * inv_sqrt[None, :],
                                                   vec.T)
  balance = jnp.where(rank > 0, balance, jnp.eye(t, dtype=k.dtype))
  return _mm(balance, task_weights.astype(k.dtype)).astype(gram.dtype)


def aligned_mtl(gram: jax.Array, *, task_weights: jax.Array | None = None,
                scale_mode: str = "min") -> jax.Array:
  r"""Aligned-MTL: align the gradients' principal components.

  Senushkin et al. (2023) make the task gradients orthogonal with equal
  norms (condition number 1) and rescale them to the smallest singular
  value. With the eigendecomposition :math:`K = V \Sigma^2 V^T` (the
  rank-:math:`r` part),

  .. math::
    \hat G = B G, \quad B = \sigma_{\min} V \Sigma^{-1} V^T, \qquad
    u = \hat G^T p = G^T (B p) ,

  so the weights are :math:`B p` for pre-defined task weights :math:`p`
  (ones: the sum of the aligned gradients, as in the paper's Algorithm 1
  and the official code). Eigenvalues at or below
  :math:`T \varepsilon \lambda_{\max}` are dropped (the official code's rank
  rule); with no positive eigenvalue :math:`B = I`. torchjd's default uses
  :math:`p = 1/T` (the mean): pass ``task_weights`` or use
  ``reduction="mean"`` in the transformation.

  Scaling: multiplying every gradient by :math:`s > 0` leaves :math:`B`
  unchanged and scales the update by :math:`s`. One task: the identity.

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` :math:`p`; default ones.
    scale_mode: the scale replacing :math:`\sigma_{\min}^2`: ``"min"`` (the
      paper: smallest kept eigenvalue), ``"median"`` (lower median of the
      kept eigenvalues) or ``"rmse"`` (their mean), as in the official code.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[2., 0.], [0., 1.]])
    >>> w = pcgrad_optax.weighting.aligned_mtl(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.5, 1. ], dtype=float32), Array([1., 1.], dtype=float32))

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, `Independent Component
    Alignment for Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_,
    CVPR 2023.
  """
  gram = _check_gram(gram)
  t = gram.shape[0]
  if scale_mode not in ALIGNED_MTL_SCALE_MODES:
    raise ValueError(f"Unknown Aligned-MTL scale_mode {scale_mode!r}; "
                     f"expected one of {ALIGNED_MTL_SCALE_MODES}.")
  if task_weights is None:
    task_weights = jnp.ones((t,), gram.dtype)
  task_weights = _check_task_vector(task_weights, t, "task_weights",
                                    gram.dtype)
  return _aligned_mtl(gram, task_weights, scale_mode)


# ---------------------------------------------------------------------------
# Nash-MTL.


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
    grad = _mm(c_mat, b) - 1 / b
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
  k = gram.astype(_solver_dtype(gram))
  _, nonzero, cos = _cosines(_normalized(k))
  # A Gram matrix rounded from low-precision gradients can be slightly
  # indefinite; Newton needs C + diag(1/beta^2) positive definite.
  lam, vec = jnp.linalg.eigh(cos)
  cos = _mm(vec * jnp.maximum(lam, 0)[None, :], vec.T)
  beta = _nash_unit_weights(cos, nonzero, ridge.astype(k.dtype))
  # alpha_i = beta_i / |g_i| solves K alpha = 1 / alpha in the raw scale.
  raw_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(k), 0))
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, raw_norms, 1), 0)
  if normalization == "frobenius":
    alpha = alpha * jnp.sqrt(jnp.sqrt(jnp.sum(k * k)))
  update_norm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, _mm(k, alpha)), 0))
  max_norm = max_norm.astype(k.dtype)
  clip = (max_norm > 0) & (update_norm > max_norm)
  alpha = jnp.where(clip, alpha * max_norm / jnp.where(clip, update_norm, 1),
                    alpha)
  return alpha.astype(gram.dtype)


def nash_mtl(gram: jax.Array, *, normalization: str = "none",
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
  gram = _check_gram(gram)
  if normalization not in NASH_MTL_NORMALIZATIONS:
    raise ValueError(f"Unknown Nash-MTL normalization {normalization!r}; "
                     f"expected one of {NASH_MTL_NORMALIZATIONS}.")
  for name, value in (("max_norm", max_norm), ("ridge", ridge)):
    value = _as_float(value)
    if isinstance(value, float) and not (value >= 0 and math.isfinite(value)):
      raise ValueError(f"Nash-MTL's {name} must be finite and >= 0, got "
                       f"{value}.")
  return _nash_mtl(gram, jnp.asarray(ridge, gram.dtype),
                   jnp.asarray(max_norm, gram.dtype), normalization)
