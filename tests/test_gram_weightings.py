"""The Gram-based aggregators against independent float64 references.

Every reference below is written from the paper's own formulation, on the
(T, P) matrix of task gradients in float64 NumPy/SciPy, never on the
library's Gram-matrix reformulations:

* MGDA: exhaustive enumeration of the supports of the simplex QP (each
  support's KKT system solved by least squares), keeping the feasible one
  with the smallest norm.
* UPGrad / DualProj: the dual-cone projection of Lopez-Paz & Ranzato's QP,
  solved by SciPy's NNLS on ``G^T`` in parameter space.
* CAGrad: the official code's recipe, SciPy SLSQP on the dual over the
  simplex (tight tolerance, several starts), then Algorithm 1's update; also
  checked against the primal ``max_d min_t g_t.d`` it solves.
* IMTL-G: the paper's closed form with the ``D`` and ``U`` difference
  matrices.
* Aligned-MTL: the SVD of the gradient matrix.
* ConFIG: ``pinv`` of the unit-gradient matrix and the projection length.
* Nash-MTL: ``K a = 1/a`` solved with SciPy's ``root`` (checked residual).

Errors are measured on the update ``w^T G`` relative to the largest task
gradient norm. The library runs in float32 (its default); the Gram matrix is
the library's own (``pcgrad_optax.gram_matrix``).
"""

from __future__ import annotations

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import pcgrad_optax as po

W = po.weighting
HYP = hypothesis.settings(deadline=None, max_examples=20, derandomize=True,
                          suppress_health_check=list(hypothesis.HealthCheck))
P = 24   # parameters per task in the reference cases

# ---------------------------------------------------------------------------
# References (float64, on the gradients).


def ref_mgda(g: np.ndarray) -> np.ndarray:
  """Min-norm point of conv{g_t}: the best feasible support (enumerated)."""
  # For each support S, the affine minimiser of |sum_S w_i g_i| with
  # sum_S w_i = 1 from its KKT system. Written in y_i = |g_i| w_i (unit
  # gradients; the constraint sum_i y_i / |g_i| = 1, scaled by the smallest
  # norm) so that norms spanning 1e-4..1e4 cost no float64 precision.
  t = g.shape[0]
  norms = np.linalg.norm(g, axis=1)
  if np.min(norms) == 0:
    return np.zeros(g.shape[1])
  unit = g / norms[:, None]
  cos = unit @ unit.T
  m = np.min(norms) / norms
  best, best_w = np.inf, None
  for r in range(1, t + 1):
    for support in itertools.combinations(range(t), r):
      s = list(support)
      kkt = np.zeros((r + 1, r + 1))
      kkt[:r, :r] = cos[np.ix_(s, s)]
      kkt[:r, r] = kkt[r, :r] = m[s]
      rhs = np.zeros(r + 1)
      rhs[r] = 1.0
      y = np.linalg.lstsq(kkt, rhs, rcond=1e-13)[0][:r]
      if np.all(y >= -1e-12):
        w = np.zeros(t)
        w[s] = np.maximum(y, 0) / norms[s]
        w /= np.sum(w)
        value = np.sum((w @ g) ** 2)
        if value < best * (1 - 1e-12):
          best, best_w = value, w
  return best_w @ g


def ref_project(g: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Projection of x onto {y : g y >= 0} (GEM's dual QP, by NNLS)."""
  # x + g^T z with z = argmin_{z >= 0} |g^T z + x|: Lopez-Paz & Ranzato's
  # dual, solved in parameter space.
  scale = np.max(np.linalg.norm(g, axis=1)) or 1.0
  z, _ = scipy.optimize.nnls(g.T / scale, -x / scale, maxiter=10000)
  proj = x + g.T @ z
  assert np.all(g @ proj >= -1e-9 * scale * np.linalg.norm(x)), "nnls"
  return proj


def ref_upgrad(g):
  return np.mean([ref_project(g, row) for row in g], axis=0)


def ref_dualproj(g):
  return ref_project(g, g.mean(axis=0))


def ref_cagrad(g: np.ndarray, c: float) -> np.ndarray:
  t = g.shape[0]
  scale = np.max(np.linalg.norm(g, axis=1))
  if scale == 0:
    return np.zeros(g.shape[1])
  gn = g / scale
  g0 = gn.mean(axis=0)
  rho = c * np.linalg.norm(g0)
  if rho == 0:
    return g0 * scale

  def dual(w):
    gw = w @ gn
    return gw @ g0 + rho * np.sqrt(gw @ gw + 1e-30)

  starts = [np.full(t, 1.0 / t)] + list(np.eye(t) * 0.9 + 0.1 / t)
  results = [scipy.optimize.minimize(
      dual, w0, method="SLSQP", bounds=[(0, 1)] * t,
      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1}],
      options={"ftol": 1e-16, "maxiter": 2000}) for w0 in starts]
  w = min(results, key=lambda r: r.fun).x
  gw = w @ gn
  return (g0 + rho * gw / np.linalg.norm(gw)) * scale


def ref_imtl_g(g: np.ndarray) -> np.ndarray:
  if g.shape[0] == 1:
    return g[0]
  unit = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = g[:1] - g[1:]
  u = unit[:1] - unit[1:]
  alpha = g[0] @ u.T @ np.linalg.inv(d @ u.T)
  alpha = np.concatenate([[1 - alpha.sum()], alpha])
  return alpha @ g


def ref_aligned_mtl(g: np.ndarray, mode: str = "min") -> np.ndarray:
  u, sing, _ = np.linalg.svd(g, full_matrices=False)
  lam = sing ** 2
  keep = lam > lam.max() * g.shape[0] * np.finfo(np.float32).eps
  u, sing = u[:, keep], sing[keep]
  scale = {"min": sing.min() ** 2, "median": np.sort(sing ** 2)[
      (len(sing) - 1) // 2], "rmse": np.mean(sing ** 2)}[mode]
  balance = np.sqrt(scale) * (u / sing) @ u.T
  return (balance @ g).sum(axis=0)   # sum of the aligned gradients


def ref_config(g: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(g, axis=1, keepdims=True)
  unit = np.where(norms > 0, g / np.where(norms > 0, norms, 1), 0)
  # The inputs are float32 numbers: singular values below 1e-5 of the
  # largest are their round-off, i.e. zero.
  direction = np.linalg.pinv(unit, rcond=1e-5) @ np.ones(g.shape[0])
  if np.linalg.norm(direction) == 0:
    return np.zeros(g.shape[1])
  direction /= np.linalg.norm(direction)
  return np.sum(g @ direction) * direction


def ref_nash_mtl(g: np.ndarray) -> np.ndarray:
  k = g @ g.T
  start = 1.0 / np.linalg.norm(g, axis=1)
  sol = scipy.optimize.root(lambda a: k @ a - 1 / a, start,
                            jac=lambda a: k + np.diag(1 / a ** 2), tol=1e-14)
  alpha = sol.x
  assert np.all(alpha > 0)
  assert np.linalg.norm(k @ alpha - 1 / alpha) < 1e-8 * np.linalg.norm(
      1 / alpha)
  return alpha @ g


# ---------------------------------------------------------------------------
# Cases and the library path.


def make_case(kind: str, t: int, seed: int) -> np.ndarray:
  """(T, P) float64 gradients (exactly representable in float32)."""
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, P))
  if kind == "conflicting" and t >= 2:
    basis = np.linalg.qr(rng.standard_normal((P, t)))[0]
    g = (np.eye(t) - 1.0 / t) @ basis.T + 1e-3 * rng.standard_normal((t, P))
    g *= 10.0 ** rng.uniform(-1, 1, (t, 1))
  elif kind == "scales":
    g *= 10.0 ** rng.uniform(-2, 2, (t, 1))
  elif kind == "ill_conditioned":   # a narrow cone, norms 1e-2..1e2
    g = rng.standard_normal((1, P)) + 0.02 * g
    g *= 10.0 ** rng.uniform(-2, 2, (t, 1))
  elif kind == "near_degenerate":   # almost rank 2, a little noise
    g = rng.standard_normal((t, 2)) @ rng.standard_normal((2, P))
    g += 1e-4 * rng.standard_normal((t, P))
  elif kind == "rank_deficient":    # exactly rank 2 (for T >= 3)
    g = rng.standard_normal((t, 2)) @ rng.standard_normal((2, P))
  return g.astype(np.float32).astype(np.float64)


KINDS = ("random", "conflicting", "scales", "ill_conditioned",
         "near_degenerate", "rank_deficient")
TS = (2, 3, 6)


def gram32(g: np.ndarray) -> jax.Array:
  return po.gram_matrix({"g": jnp.asarray(g, jnp.float32)})


def update(weighting, g: np.ndarray, **kwargs) -> np.ndarray:
  """The library's update (float32 Gram and weights) as float64."""
  w = np.asarray(weighting(gram32(g), **kwargs), np.float64)
  assert np.all(np.isfinite(w))
  return w @ g


def rel_err(u, ref, g) -> float:
  return float(np.linalg.norm(u - ref) / np.max(np.linalg.norm(g, axis=1)))


def worst_error(weighting, reference, kinds=KINDS, ts=TS, seeds=(0, 1, 2),
                **kwargs):
  worst = 0.0
  for t, kind, seed in itertools.product(ts, kinds, seeds):
    g = make_case(kind, t, 1000 * t + 10 * seed + KINDS.index(kind))
    err = rel_err(update(weighting, g, **kwargs), reference(g), g)
    assert err < 1.0, (kind, t, seed, err)
    worst = max(worst, err)
  return worst


# ---------------------------------------------------------------------------
# 1. Against the references.


def test_mean_and_sum_are_exact():
  for t in (1, 3):
    g = make_case("scales", t, t)
    np.testing.assert_array_equal(W.mean(gram32(g)), np.full(t, 1 / t,
                                                             np.float32))
    np.testing.assert_array_equal(W.sum(gram32(g)), np.ones(t, np.float32))
    np.testing.assert_allclose(update(W.mean, g), g.mean(0), rtol=1e-6)
    np.testing.assert_allclose(update(W.sum, g), g.sum(0), rtol=1e-6)


def test_mgda_is_the_exact_min_norm_point():
  # Within 1e-3 of the largest gradient norm on every kind of case, also
  # the ill-conditioned and nearly degenerate ones.
  assert worst_error(W.mgda, ref_mgda, ts=(2, 3, 6, 8)) < 1e-3


def test_mgda_well_conditioned_to_round_off():
  assert worst_error(W.mgda, ref_mgda, kinds=("random", "conflicting"),
                     ts=(3, 6)) < 1e-5


def frank_wolfe(k, iters):
  """The Frank-Wolfe solver of Sener & Koltun's Algorithm 2."""
  w = np.full(k.shape[0], 1.0 / k.shape[0])
  for _ in range(iters):
    j = np.argmin(k @ w)
    a, b, c = w @ k[:, j], w @ k @ w, k[j, j]
    gamma = 1.0 if c <= a else 0.0 if b <= a else (b - a) / (b + c - 2 * a)
    w = (1 - gamma) * w + gamma * np.eye(len(w))[j]
  return w


def test_mgda_beats_frank_wolfe_on_an_ill_conditioned_case():
  # Six gradients in a cone, min-norm point inside a face: 100 Frank-Wolfe
  # steps stop short of it (by 2e-3 of the gradient norm); the exact solver
  # does not.
  rng = np.random.default_rng(1)
  g = rng.standard_normal((1, P)) + 0.3 * rng.standard_normal((6, P))
  g = g.astype(np.float32).astype(np.float64)
  ref = ref_mgda(g)
  fw = frank_wolfe(g @ g.T, 100) @ g
  assert rel_err(fw, ref, g) > 1e-3
  assert rel_err(update(W.mgda, g), ref, g) < 1e-4


def test_mgda_l2_normalization():
  # Official code's "l2": weights from the unit gradients, applied to the raw
  # gradients.
  for t, kind in itertools.product((3, 6), ("random", "scales")):
    g = make_case(kind, t, t)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected_w = np.linalg.lstsq(unit.T, ref_mgda(unit), rcond=None)[0]
    u = update(W.mgda, g, normalization="l2")
    np.testing.assert_allclose(u, expected_w @ g, rtol=0,
                               atol=1e-4 * np.abs(g).max())


def test_upgrad_matches_reference():
  assert worst_error(W.upgrad, ref_upgrad) < 2e-3


def test_dualproj_matches_reference():
  assert worst_error(W.dualproj, ref_dualproj) < 2e-3


def test_dual_cone_projections_well_conditioned_to_round_off():
  kinds = ("random", "conflicting", "scales", "rank_deficient")
  assert worst_error(W.upgrad, ref_upgrad, kinds=kinds) < 1e-5
  assert worst_error(W.dualproj, ref_dualproj, kinds=kinds) < 1e-5


def test_upgrad_task_weights_and_torchjd_regularisation():
  g = make_case("conflicting", 3, 4)
  p = np.array([0.2, 0.5, 0.3])
  expected = np.sum([ref_project(g, pi * row) for pi, row in zip(p, g)],
                    axis=0)
  assert rel_err(update(W.upgrad, g, task_weights=jnp.asarray(p)), expected,
                 g) < 1e-5
  # reg_eps: the QP on K/trace(K) + reg_eps I; the projection of row i is
  # J^T v with v = argmin_{v >= e_i / T} v^T (K/tr K + eps I) v.
  k = g @ g.T / np.trace(g @ g.T) + 1e-2 * np.eye(3)
  root = np.linalg.cholesky(k).T              # root^T root = k
  vs = []
  for i in range(3):
    low = np.eye(3)[i] / 3
    z, _ = scipy.optimize.nnls(root, -root @ low)
    vs.append(low + z)
  w = np.asarray(W.upgrad(gram32(g), reg_eps=1e-2), np.float64)
  np.testing.assert_allclose(w, np.sum(vs, axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", (0.5, 0.1, 0.9))
def test_cagrad_matches_reference(c):
  kinds = KINDS if c == 0.5 else ("random", "conflicting")
  assert worst_error(lambda k: W.cagrad(k, c), lambda g: ref_cagrad(g, c),
                     kinds=kinds, ts=(2, 3, 6) if c == 0.5 else (3,)) < 1e-3


def test_cagrad_solves_the_primal():
  # d maximises min_t g_t.d over the ball |d - g0| <= c|g0| (SLSQP on the
  # primal, in parameter space, as an independent check of the dual).
  for seed in range(3):
    g = make_case("conflicting", 3, seed)
    c = 0.5
    g0 = g.mean(0)
    rho = c * np.linalg.norm(g0)
    cons = [{"type": "ineq", "fun": lambda x: rho ** 2 - np.sum(
        (x[:-1] - g0) ** 2)}] + [
            {"type": "ineq", "fun": lambda x, r=r: r @ x[:-1] - x[-1]}
            for r in g]
    res = scipy.optimize.minimize(lambda x: -x[-1], np.r_[g0, 0.0],
                                  constraints=cons, method="SLSQP",
                                  options={"ftol": 1e-15, "maxiter": 1000})
    u = update(W.cagrad, g)
    assert np.linalg.norm(u - g0) <= rho * (1 + 1e-5)
    assert np.min(g @ u) >= -res.fun - 1e-4 * np.max(np.abs(g @ g.T))
    assert rel_err(u, res.x[:-1], g) < 1e-3


def test_cagrad_rescale_options():
  g = make_case("random", 3, 0)
  k = gram32(g)
  base = np.asarray(W.cagrad(k, 0.4))
  np.testing.assert_allclose(W.cagrad(k, 0.4, rescale=1), base / 1.16,
                             rtol=1e-6)
  np.testing.assert_allclose(W.cagrad(k, 0.4, rescale=2), base / 1.4,
                             rtol=1e-6)
  np.testing.assert_allclose(W.cagrad(k, 0.0), np.full(3, 1 / 3), rtol=1e-6)


def test_imtl_g_matches_paper_closed_form():
  assert worst_error(W.imtl_g, ref_imtl_g,
                     kinds=("random", "conflicting", "scales")) < 1e-5
  # Nearly parallel gradients make the closed form ill-conditioned.
  assert worst_error(W.imtl_g, ref_imtl_g, kinds=("ill_conditioned",)) < 1e-3


def test_aligned_mtl_matches_reference():
  kinds = ("random", "conflicting", "rank_deficient")
  assert worst_error(W.aligned_mtl, ref_aligned_mtl, kinds=kinds) < 1e-4
  # "median"/"rmse" multiply the smallest direction by sigma_max/sigma_min
  # instead of 1, so a nearly singular Gram ("conflicting": one eigenvalue
  # 1e-6 of the largest) amplifies float32 eigen-errors; test them on
  # well-conditioned cases.
  for mode in ("median", "rmse"):
    assert worst_error(
        lambda k, mode=mode: W.aligned_mtl(k, scale_mode=mode),
        lambda g, mode=mode: ref_aligned_mtl(g, mode),
        kinds=("random", "rank_deficient"), ts=(3, 6)) < 1e-4
  # torchjd's default: task weights 1/T (== reduction="mean").
  g = make_case("random", 3, 0)
  np.testing.assert_allclose(
      W.aligned_mtl(gram32(g), task_weights=jnp.full(3, 1 / 3)),
      np.asarray(W.aligned_mtl(gram32(g))) / 3, rtol=1e-6)


def test_config_matches_reference():
  assert worst_error(W.config, ref_config,
                     kinds=("random", "conflicting", "scales",
                            "ill_conditioned", "rank_deficient")) < 1e-4


def test_nash_mtl_matches_reference():
  assert worst_error(lambda k: W.nash_mtl(k, ridge=0.0), ref_nash_mtl,
                     kinds=("random", "scales")) < 1e-4
  # Nearly Pareto-stationary ("conflicting": 0 almost in the cone of the
  # gradients) the bargaining weights blow up and float32 costs accuracy.
  assert worst_error(lambda k: W.nash_mtl(k, ridge=0.0), ref_nash_mtl,
                     kinds=("conflicting",)) < 5e-3
  # The default ridge (1e-6 on the cosine matrix) is invisible here.
  assert worst_error(W.nash_mtl, ref_nash_mtl, kinds=("random",)) < 1e-4


def test_nash_mtl_official_scaling_and_max_norm():
  g = make_case("random", 3, 1)
  k = g @ g.T
  # The official code solves K' a = 1/a for K' = K / |K|_F.
  kf = k / np.linalg.norm(k)
  alpha = scipy.optimize.root(lambda a: kf @ a - 1 / a, np.ones(3),
                              jac=lambda a: kf + np.diag(1 / a ** 2),
                              tol=1e-14).x
  w = np.asarray(W.nash_mtl(gram32(g), normalization="frobenius", ridge=0.0))
  np.testing.assert_allclose(w, alpha, rtol=1e-4)
  clipped = np.asarray(W.nash_mtl(gram32(g), normalization="frobenius",
                                  ridge=0.0, max_norm=0.1), np.float64)
  np.testing.assert_allclose(np.linalg.norm(clipped @ g), 0.1, rtol=1e-4)
  np.testing.assert_allclose(clipped / np.linalg.norm(clipped),
                             alpha / np.linalg.norm(alpha), rtol=1e-4)


def test_float64_solves_to_float64_round_off():
  with jax.enable_x64(True):
    for kind in ("near_degenerate", "scales", "conflicting"):
      t = 6
      g = make_case(kind, t, t)
      k = jnp.asarray(g @ g.T)
      for weighting, reference in ((W.mgda, ref_mgda),
                                   (W.upgrad, ref_upgrad)):
        w = weighting(k)
        assert w.dtype == jnp.float64
        assert rel_err(np.asarray(w) @ g, reference(g), g) < 1e-8


# ---------------------------------------------------------------------------
# 2. Properties.

finite = dict(allow_nan=False, allow_infinity=False, width=32)


def task_arrays(t, p=5):
  return hnp.arrays(np.float32, (t, p), elements=st.floats(
      -10, 10, **finite).map(lambda x: 0.0 if abs(x) < 1e-3 else x))


def as64(g):
  return np.asarray(g, np.float64)


def never_conflicts(u, g, rel=1e-5):
  norms = np.linalg.norm(g, axis=1)
  return np.all(g @ u >= -rel * norms * max(np.max(norms), 1e-30) * g.shape[0])


@HYP
@hypothesis.given(task_arrays(3))
def test_mgda_upgrad_dualproj_never_conflict(g):
  g = as64(g)
  for weighting in (W.mgda, W.upgrad, W.dualproj):
    assert never_conflicts(update(weighting, g), g), weighting
  u = update(W.mgda, g)
  # MGDA: g_t . u >= |u|^2 for every t (the min-norm point's optimality).
  norms = np.linalg.norm(g, axis=1)
  assert np.all(g @ u >= u @ u - 1e-5 * np.max(norms) ** 2)


@HYP
@hypothesis.given(task_arrays(3))
def test_config_and_imtl_g_equal_cosines(g):
  g = as64(g)
  norms = np.linalg.norm(g, axis=1)
  hypothesis.assume(np.min(norms) > 1e-2 and np.linalg.matrix_rank(
      g / norms[:, None], tol=1e-2) == 3)
  for weighting in (W.config, W.imtl_g):
    u = update(weighting, g)
    cos = (g @ u) / norms / np.linalg.norm(u)
    np.testing.assert_allclose(cos, cos[0], atol=1e-3)
    assert cos[0] > 0
  # IMTL-G's weights sum to one.
  np.testing.assert_allclose(np.sum(W.imtl_g(gram32(g))), 1.0, rtol=1e-4)


ALL = {
    "mean": W.mean, "sum": W.sum, "mgda": W.mgda, "upgrad": W.upgrad,
    "dualproj": W.dualproj, "cagrad": W.cagrad, "imtl_g": W.imtl_g,
    "aligned_mtl": W.aligned_mtl, "config": W.config,
    "nash_mtl": W.nash_mtl,
}


@HYP
@hypothesis.given(task_arrays(3), st.permutations([0, 1, 2]))
def test_permuting_tasks_permutes_weights(g, perm):
  g = as64(g)
  hypothesis.assume(np.linalg.matrix_rank(g, tol=1e-2) == 3)
  perm = np.asarray(perm)
  for name, weighting in ALL.items():
    w = np.asarray(weighting(gram32(g)), np.float64)
    w_perm = np.asarray(weighting(gram32(g[perm])), np.float64)
    u = w @ g
    np.testing.assert_allclose(w_perm @ g[perm], u, rtol=0, atol=2e-4 * (
        np.abs(u).max() + np.abs(g).max()), err_msg=name)
    np.testing.assert_allclose(w_perm, w[perm], rtol=2e-3,
                               atol=2e-3 * np.abs(w).max(), err_msg=name)


# What multiplying every gradient by s > 0 does to the update: scales it by s
# (homogeneous of degree 1) for every method except Nash-MTL's paper form,
# which is scale-free (degree 0).
DEGREE = dict.fromkeys(ALL, 1)
DEGREE["nash_mtl"] = 0


@HYP
@hypothesis.given(task_arrays(3), st.floats(1e-2, 1e2))
def test_positive_scaling(g, s):
  g = as64(g)
  hypothesis.assume(np.min(np.linalg.norm(g, axis=1)) > 1e-2)
  gs = (g * np.float32(s)).astype(np.float32).astype(np.float64)
  for name, weighting in ALL.items():
    u, us = update(weighting, g), update(weighting, gs)
    expected = u * s ** DEGREE[name]
    np.testing.assert_allclose(us, expected, rtol=0, atol=1e-3 * (
        np.abs(expected).max() + s ** DEGREE[name] * np.abs(g).max() * 1e-2),
                               err_msg=name)
  u = update(lambda k: W.nash_mtl(k, normalization="frobenius"), g)
  us = update(lambda k: W.nash_mtl(k, normalization="frobenius"), gs)
  np.testing.assert_allclose(us, s * u, rtol=2e-3, atol=1e-4 * s * np.abs(
      g).max())


@HYP
@hypothesis.given(task_arrays(3), hnp.arrays(np.float64, (3,), elements=
                                              st.floats(1e-2, 1e2)))
def test_per_task_scaling(g, scales):
  # Nash-MTL's update is invariant to every task's gradient scale; IMTL-G's
  # and ConFIG's directions are; MGDA "l2"'s weights are.
  g = as64(g)
  norms = np.linalg.norm(g, axis=1)
  hypothesis.assume(np.min(norms) > 1e-1 and np.linalg.matrix_rank(
      g / norms[:, None], tol=1e-2) == 3)
  gs = (g * scales[:, None]).astype(np.float32).astype(np.float64)
  u, us = update(W.nash_mtl, g), update(W.nash_mtl, gs)
  np.testing.assert_allclose(us, u, rtol=0, atol=1e-3 * np.abs(u).max())
  for weighting in (W.imtl_g, W.config):
    u, us = update(weighting, g), update(weighting, gs)
    np.testing.assert_allclose(us / np.linalg.norm(us), u / np.linalg.norm(u),
                               atol=1e-3)
  np.testing.assert_allclose(W.mgda(gram32(gs), normalization="l2"),
                             W.mgda(gram32(g), normalization="l2"), atol=1e-4)


@HYP
@hypothesis.given(hnp.arrays(np.float32, (3, 5), elements=st.floats(
    0, 10, **finite)))
def test_no_conflict_gives_the_mean(g):
  # Non-negative entries: no pair conflicts, so UPGrad and DualProj are the
  # mean gradient.
  g = as64(g)
  for weighting in (W.upgrad, W.dualproj):
    np.testing.assert_allclose(update(weighting, g), g.mean(0), rtol=0,
                               atol=1e-5 * np.abs(g).max())


@HYP
@hypothesis.given(task_arrays(3), st.floats(0.0, 0.99))
def test_cagrad_guarantees(g, c):
  g = as64(g)
  u = update(lambda k: W.cagrad(k, c), g)
  g0 = g.mean(0)
  scale = np.max(np.linalg.norm(g, axis=1)) + 1e-30
  # Stays in the ball and improves the worst task at least as much as g0.
  assert np.linalg.norm(u - g0) <= c * np.linalg.norm(g0) + 1e-5 * scale
  assert np.min(g @ u) >= np.min(g @ g0) - 1e-4 * scale ** 2


@HYP
@hypothesis.given(task_arrays(3))
def test_nash_mtl_bargaining_equation(g):
  # g_t . u = 1 / alpha_t for every task (the solution's defining property).
  g = as64(g)
  norms = np.linalg.norm(g, axis=1)
  hypothesis.assume(np.min(norms) > 1e-1)
  hypothesis.assume(np.min(np.linalg.svd(g / norms[:, None])[1]) > 0.1)
  w = np.asarray(W.nash_mtl(gram32(g), ridge=0.0), np.float64)
  assert np.all(w > 0)
  np.testing.assert_allclose(g @ (w @ g), 1 / w, rtol=1e-3)


# ---------------------------------------------------------------------------
# 3. Edge cases.


@pytest.mark.parametrize("name", sorted(ALL))
def test_single_task(name):
  g = np.array([[3.0, -4.0, 0.0, 1.0]])
  u = update(ALL[name], g)
  expected = {"cagrad": 1.5 * g[0], "nash_mtl": g[0] / np.linalg.norm(g[0])
              }.get(name, g[0])
  np.testing.assert_allclose(u, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_and_opposite_gradients(name):
  weighting = ALL[name]
  zeros = np.zeros((3, 4))
  assert np.all(update(weighting, zeros) == 0)
  g = make_case("random", 3, 0)
  g[1] = 0.0
  u = update(weighting, g)
  assert np.all(np.isfinite(u))
  if name in ("mgda", "dualproj", "upgrad"):
    assert never_conflicts(u, g)
  if name == "mgda":
    np.testing.assert_array_equal(u, 0.0)   # a zero gradient is in the hull
  opposite = np.stack([g[0], -g[0]])
  u = update(weighting, opposite)
  assert np.all(np.isfinite(u))
  if name not in ("mean", "sum", "aligned_mtl"):
    # Pareto-stationary: every conflict-averse method stops.
    np.testing.assert_allclose(u, 0.0, atol=1e-3 * np.abs(g[0]).max())


def test_huge_scale_differences():
  # Norms 1e-4 and 1e4 (K entries span 1e16): directions still resolved.
  rng = np.random.default_rng(0)
  g = rng.standard_normal((3, P))
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  g *= np.array([[1e4], [1.0], [1e-4]])
  g = g.astype(np.float32).astype(np.float64)
  assert rel_err(update(W.mgda, g), ref_mgda(g), g) < 1e-6
  np.testing.assert_allclose(update(W.mgda, g), ref_mgda(g), rtol=1e-3,
                             atol=1e-7)   # the tiny min-norm point itself
  for weighting, reference in ((W.upgrad, ref_upgrad),
                               (W.dualproj, ref_dualproj),
                               (W.config, ref_config),
                               (W.nash_mtl, ref_nash_mtl)):
    ref = reference(g)
    np.testing.assert_allclose(update(weighting, g), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())
  # IMTL-G's closed form (D U^T)^-1 loses ~1e-4 even in float64 here, so
  # check its defining property instead: weights summing to one and equal
  # cosines with every task gradient.
  w = np.asarray(W.imtl_g(gram32(g)), np.float64)
  u = w @ g
  cos = g @ u / np.linalg.norm(g, axis=1) / np.linalg.norm(u)
  np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cos, cos[0], rtol=1e-5)


def test_duplicated_tasks_rank_deficient():
  # A duplicated task: MGDA and IMTL-G give the same update as with the
  # duplicate merged, ConFIG the same direction (its length sums the
  # projections of all T gradients, so it counts the duplicate twice).
  g = make_case("random", 2, 3)
  dup = np.concatenate([g, g[:1]])
  for weighting in (W.mgda, W.imtl_g):
    np.testing.assert_allclose(update(weighting, dup), update(weighting, g),
                               atol=1e-4 * np.abs(g).max())
  u, u_dup = update(W.config, g), update(W.config, dup)
  np.testing.assert_allclose(u_dup / np.linalg.norm(u_dup),
                             u / np.linalg.norm(u), atol=1e-4)
  assert rel_err(u_dup, ref_config(dup), dup) < 1e-4
  for weighting, reference in ((W.upgrad, ref_upgrad),
                               (W.dualproj, ref_dualproj)):
    assert rel_err(update(weighting, dup), reference(dup), dup) < 1e-5


def test_low_precision_gram():
  g = make_case("conflicting", 3, 0)
  k16 = jnp.asarray(g @ g.T, jnp.bfloat16)
  for name, weighting in ALL.items():
    w = weighting(k16)
    assert w.dtype == jnp.float32, name   # check_gram widens to f32
    assert np.all(np.isfinite(np.asarray(w))), name


def test_transforms_apply_the_weightings():
  # Shared leaves get w^T G, heads the sum (or mean) over tasks.
  g = make_case("conflicting", 3, 7)
  heads = make_case("random", 3, 8)[:, :6]
  grads = {"trunk": jnp.asarray(g, jnp.float32),
           "head": jnp.asarray(heads.reshape(3, 2, 3), jnp.float32)}
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
  mask = {"trunk": True, "head": False}
  for name, weighting in ALL.items():
    for reduction, divisor in (("sum", 1), ("mean", 3)):
      tx = getattr(po, name)(shared=mask, reduction=reduction)
      out, state = tx.update(grads, tx.init(params), params)
      w = np.asarray(weighting(gram32(g)), np.float64)
      expected = w @ g / divisor
      # float32 round-off of the weighted sum itself (weights reach 1e3 in
      # this nearly Pareto-stationary case).
      atol = 1e-6 * np.max(np.abs(w) @ np.abs(g))
      np.testing.assert_allclose(out["trunk"], expected, rtol=1e-5,
                                 atol=atol, err_msg=name)
      np.testing.assert_allclose(out["head"].reshape(-1),
                                 heads.sum(0) / divisor, rtol=1e-6)


def test_bad_inputs():
  k = jnp.eye(3)
  with pytest.raises(ValueError, match="square"):
    W.mgda(jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="normalization"):
    W.mgda(k, normalization="loss")
  with pytest.raises(ValueError, match="c must be"):
    W.cagrad(k, -0.1)
  with pytest.raises(ValueError, match="rescale"):
    W.cagrad(k, rescale=3)
  with pytest.raises(ValueError, match=r"task_weights.*\(3,\)"):
    W.upgrad(k, task_weights=jnp.ones(2))
  with pytest.raises(ValueError, match="reg_eps"):
    W.dualproj(k, reg_eps=-1.0)
  with pytest.raises(ValueError, match="scale_mode"):
    W.aligned_mtl(k, scale_mode="max")
  with pytest.raises(ValueError, match="ridge"):
    W.nash_mtl(k, ridge=-1.0)
  with pytest.raises(ValueError, match="normalization"):
    po.nash_mtl(normalization="l2")
  with pytest.raises(ValueError, match="c must be"):
    po.cagrad(c=-1.0)
  with pytest.raises(ValueError, match="scale_mode"):
    po.aligned_mtl(scale_mode="max")
  with pytest.raises(ValueError, match="reduction"):
    po.mean(reduction="median")
