"""Nash-MTL against an independent float64 reference.

The reference (``ref_nash_mtl``, in tests/gram_references.py since the
cross-method tests use it too) solves the bargaining equation ``K a = 1/a``
with SciPy's ``root`` (checked residual) in float64; the official code's
Frobenius scaling is solved the same way here. A property test checks the
defining equation ``g_t . u = 1 / alpha_t`` on random gradients. Errors are
measured on the library's float32 update ``w^T G``, relative to the largest
task gradient norm (the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import hypothesis
import numpy as np
import scipy.optimize

import pcgrad_optax as po
from gram_cases import as64, gram32, make_case, task_arrays, worst_error
from gram_references import ref_nash_mtl
from hypothesis_settings import HYP

W = po.weighting


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
