"""UPGrad against an independent float64 reference.

The reference (``ref_upgrad`` through ``ref_project``, in
tests/gram_references.py since DualProj and the cross-method tests use them
too) is the dual-cone projection of Lopez-Paz & Ranzato's QP, solved by SciPy's
NNLS on ``G^T`` in parameter space, never on the library's Gram-matrix
reformulation. torchjd's regularised form (``reg_eps``) is checked against its
own QP, solved here by NNLS on a Cholesky factor. Errors are measured on the
library's float32 update ``w^T G``, relative to the largest task gradient norm
(the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.optimize

import pcgrad_optax as po
from gram_cases import gram32, make_case, rel_err, update, worst_error
from gram_references import ref_project, ref_upgrad

W = po.weighting


def test_upgrad_matches_reference():
  assert worst_error(W.upgrad, ref_upgrad) < 2e-3


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
