"""DualProj against an independent float64 reference.

The reference (``ref_dualproj``, in tests/gram_references.py since the
cross-method tests use it too) projects the mean gradient onto the dual cone of
the task gradients: Lopez-Paz & Ranzato's QP, solved by SciPy's NNLS on ``G^T``
in parameter space, never on the library's Gram-matrix reformulation. Errors
are measured on the library's float32 update ``w^T G``, relative to the largest
task gradient norm (the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import pcgrad_optax as po
from gram_cases import worst_error
from gram_references import ref_dualproj

W = po.weighting


def test_dualproj_matches_reference():
  assert worst_error(W.dualproj, ref_dualproj) < 2e-3
