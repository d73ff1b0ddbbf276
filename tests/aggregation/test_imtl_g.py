"""IMTL-G against an independent float64 reference.

The reference (``ref_imtl_g``) is the paper's closed form with the ``D`` and
``U`` difference matrices, on the (T, P) matrix of task gradients in float64
NumPy, never on the library's Gram-matrix reformulation. Errors are measured on
the library's float32 update ``w^T G``, relative to the largest task gradient
norm (the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import numpy as np

import pcgrad_optax as po
from gram_cases import worst_error

W = po.weighting


def ref_imtl_g(g: np.ndarray) -> np.ndarray:
  if g.shape[0] == 1:
    return g[0]
  unit = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = g[:1] - g[1:]
  u = unit[:1] - unit[1:]
  alpha = g[0] @ u.T @ np.linalg.inv(d @ u.T)
  alpha = np.concatenate([[1 - alpha.sum()], alpha])
  return alpha @ g


def test_imtl_g_matches_paper_closed_form():
  assert worst_error(W.imtl_g, ref_imtl_g,
                     kinds=("random", "conflicting", "scales")) < 1e-5
  # Nearly parallel gradients make the closed form ill-conditioned.
  assert worst_error(W.imtl_g, ref_imtl_g, kinds=("ill_conditioned",)) < 1e-3
