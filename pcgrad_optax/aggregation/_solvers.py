"""The small solvers behind the Gram-based methods, on ``T x T`` numbers.

Everything here works on the Gram matrix (or the cosine matrix) only, so its
cost does not depend on the model size: ``O(T^3)`` per active-set step (at
most ``3T + 10`` steps) for the QPs. All of it is jit-able; iterations run in
``lax.while_loop`` with caps (never unrolled), so compile time does not grow
with ``T``.

* :func:`nnls`: the exact active-set solver of ``min_{z >= 0} z^T Q z / 2 -
  h^T z`` (Lawson–Hanson), behind MGDA, CAGrad, UPGrad and DualProj;
* :func:`min_norm_simplex`: the min-norm point of the convex hull of the
  gradients (MGDA's problem, CAGrad's inner step);
* :func:`dual_cone_weights`: the projection onto the dual cone of the
  gradients (UPGrad, DualProj);
* :func:`equal_cosine_direction`: the pseudo-inverse direction with equal
  cosines to every gradient (IMTL-G, ConFIG);
* the cosine matrix, scalings and safe divisions they share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.checks import as_float, check_task_vector
from pcgrad_optax._core.gram import check_gram

_HIGHEST = lax.Precision.HIGHEST


def mm(a, b):
  # Full f32 precision for the T x T products, also on accelerators whose
  # default f32 matmul precision is lower (TF32, bf16 passes).
  return jnp.matmul(a, b, precision=_HIGHEST)


def solver_dtype(gram: jax.Array):
  """float64 if x64 is enabled, else the Gram matrix's (f32 or wider) dtype."""
  return jnp.promote_types(gram.dtype,
                           jax.dtypes.canonicalize_dtype(jnp.float64))


def normalized(gram: jax.Array) -> jax.Array:
  """``gram / max_t K_tt`` in the solver dtype (unchanged if all zero)."""
  gram = gram.astype(solver_dtype(gram))
  scale = jnp.max(jnp.diagonal(gram))
  return gram / jnp.where(scale > 0, scale, 1)


def cosines(gram: jax.Array, zero_diagonal_for_zero_tasks: bool = False):
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


def safe_div(num, den):
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


def psd_pinv(mat: jax.Array, rtol) -> jax.Array:
  """Pseudo-inverse of a symmetric PSD matrix (eigenvalues <= rtol*max cut)."""
  lam, vec = jnp.linalg.eigh(mat)
  keep = lam > rtol * jnp.maximum(lam[-1], jnp.finfo(mat.dtype).tiny)
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  return mm(vec * inv[None, :], vec.T)


def nnls(q: jax.Array, h: jax.Array,
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
  q = mm(vec * jnp.maximum(lam, 0)[None, :], vec.T)
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
    neg_grad = h - mm(q, s)
    tol = eps * jnp.max(abs_h + mm(abs_q, jnp.abs(s)))
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


def min_norm_simplex(gram: jax.Array, passive: jax.Array | None = None
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
    w1 = jnp.clip(safe_div(gram[1, 1] - gram[0, 1], den), 0, 1)
    w1 = jnp.where(den > 0, w1, jnp.where(gram[0, 0] <= gram[1, 1], 1., 0.))
    w = jnp.stack([w1, 1 - w1]).astype(dtype)
    return w, w > 0
  norms, nonzero, cos = cosines(gram)
  smallest = jnp.min(jnp.where(nonzero, norms, jnp.inf))
  ratio = jnp.where(nonzero, smallest / jnp.where(nonzero, norms, 1), 0)
  y, support = nnls(cos + ratio[:, None] * ratio[None, :], ratio, passive)
  lam = jnp.where(nonzero, y / jnp.where(nonzero, norms, 1), 0)
  total = jnp.sum(lam)
  w = jnp.where(total > 0, lam / jnp.where(total > 0, total, 1), 1.0 / t)
  zero_task = ~nonzero
  first_zero = jax.nn.one_hot(jnp.argmax(zero_task), t, dtype=dtype)
  w = jnp.where(jnp.any(zero_task), first_zero, w)
  return w, jnp.where(jnp.any(zero_task), zero_task, support)


def dual_cone_weights(gram: jax.Array, lower: jax.Array) -> jax.Array:
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
  norms, nonzero, cos = cosines(gram)
  inv = jnp.where(nonzero, 1 / jnp.where(nonzero, norms, 1), 0)
  h = -mm(lower, gram) * inv            # -(K u)_i / |g_i|, batched over u
  solve = lambda hh: nnls(cos, hh)[0]    # noqa: E731
  for _ in range(lower.ndim - 1):
    solve = jax.vmap(solve)
  return lower + solve(h) * inv


def torchjd_normalized(gram, reg_eps):
  """``K / trace(K) + reg_eps * I`` (torchjd's QP preprocessing)."""
  gram = gram.astype(solver_dtype(gram))
  trace = jnp.trace(gram)
  gram = gram / jnp.where(trace > 0, trace, 1)
  return gram + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def dual_cone_args(gram, task_weights, reg_eps) -> tuple:
  """UPGrad's and DualProj's checked ``(gram, task_weights, reg_eps)``."""
  gram = check_gram(gram)
  t = gram.shape[0]
  if task_weights is None:
    task_weights = jnp.full((t,), 1.0 / t, gram.dtype)
  task_weights = check_task_vector(task_weights, t, "task_weights",
                                   gram.dtype)
  if isinstance(as_float(reg_eps), float) and reg_eps < 0:
    raise ValueError(f"reg_eps must be >= 0, got {reg_eps}.")
  return gram, task_weights, jnp.asarray(reg_eps, gram.dtype)


def equal_cosine_direction(gram):
  """``beta = C^+ 1``: ``sum_i beta_i u_i`` has unit projection on every u_t.

  Returns (norms, nonzero, cos, beta), cos with zero rows for zero tasks.
  """
  norms, nonzero, cos = cosines(normalized(gram),
                                zero_diagonal_for_zero_tasks=True)
  t = gram.shape[0]
  pinv = psd_pinv(cos, t * jnp.finfo(cos.dtype).eps)
  beta = mm(pinv, nonzero.astype(cos.dtype))
  return norms, nonzero, cos, beta
