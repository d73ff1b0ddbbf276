"""Aligned-MTL against an independent float64 reference.

The reference (``ref_aligned_mtl``) is built from the SVD of the (T, P)
gradient matrix in float64 NumPy, never from the library's Gram-matrix
eigendecomposition, for each ``scale_mode``. Errors are measured on the
library's float32 update ``w^T G``, relative to the largest task gradient norm
(the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import pcgrad_optax as po
from gram_cases import gram32, make_case, worst_error

W = po.weighting


def ref_aligned_mtl(g: np.ndarray, mode: str = "min") -> np.ndarray:
  u, sing, _ = np.linalg.svd(g, full_matrices=False)
  lam = sing ** 2
  keep = lam > lam.max() * g.shape[0] * np.finfo(np.float32).eps
  u, sing = u[:, keep], sing[keep]
  scale = {"min": sing.min() ** 2, "median": np.sort(sing ** 2)[
      (len(sing) - 1) // 2], "rmse": np.mean(sing ** 2)}[mode]
  balance = np.sqrt(scale) * (u / sing) @ u.T
  return (balance @ g).sum(axis=0)   # sum of the aligned gradients


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
