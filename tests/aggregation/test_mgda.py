"""MGDA against an independent float64 reference.

The reference (``ref_mgda``, in tests/gram_references.py since the cross-method
tests use it too) is written from the paper's formulation on the (T, P) matrix
of task gradients in float64 NumPy, never on the library's Gram-matrix
reformulation: exhaustive enumeration of the supports of the simplex QP (each
support's KKT system solved by least squares), keeping the feasible one with
the smallest norm. Sener & Koltun's Frank-Wolfe solver (Algorithm 2) is written
here too, to show where it stops short. Errors are measured on the library's
float32 update ``w^T G``, relative to the largest task gradient norm (the cases
and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import itertools

import numpy as np

import pcgrad_optax as po
from gram_cases import P, make_case, rel_err, update, worst_error
from gram_references import ref_mgda

W = po.weighting


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
