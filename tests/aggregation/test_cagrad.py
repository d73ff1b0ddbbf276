"""CAGrad against an independent float64 reference.

The reference (``ref_cagrad``) follows the official code's recipe on the (T, P)
matrix of task gradients in float64: SciPy SLSQP on the dual over the simplex
(tight tolerance, several starts), then Algorithm 1's update. The update is
also checked against the primal ``max_d min_t g_t.d`` it solves (SLSQP in
parameter space), and, as a property test, for its guarantees (it stays in the
ball around the mean gradient and improves the worst task at least as much as
the mean does). Errors are measured on the library's float32 update ``w^T G``,
relative to the largest task gradient norm (the cases and the library path are
in tests/gram_cases.py).
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.optimize

import pcgrad_optax as po
from gram_cases import (KINDS, as64, gram32, make_case, rel_err, task_arrays,
                        update, worst_error)
from hypothesis_settings import HYP

W = po.weighting


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
