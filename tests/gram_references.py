"""Float64 references of the Gram-based aggregators used by several test files.

Every reference is written from the paper's own formulation, on the (T, P)
matrix of task gradients in float64 NumPy/SciPy, never on the library's
Gram-matrix reformulations:

* MGDA (``ref_mgda``): exhaustive enumeration of the supports of the simplex
  QP (each support's KKT system solved by least squares), keeping the
  feasible one with the smallest norm.
* UPGrad / DualProj (``ref_upgrad``, ``ref_dualproj``, both through
  ``ref_project``): the dual-cone projection of Lopez-Paz & Ranzato's QP,
  solved by SciPy's NNLS on ``G^T`` in parameter space.
* ConFIG (``ref_config``): ``pinv`` of the unit-gradient matrix and the
  projection length.
* Nash-MTL (``ref_nash_mtl``): ``K a = 1/a`` solved with SciPy's ``root``
  (checked residual).

They are here, not in their method's test file, because
tests/aggregation/test_properties.py checks several methods against them at
once. The references used by one file only (CAGrad, IMTL-G, Aligned-MTL) are
in that file.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.optimize


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
