"""ConFIG against an independent float64 reference.

The reference (``ref_config``, in tests/gram_references.py since the
cross-method tests use it too) takes the ``pinv`` of the unit-gradient matrix
and the projection length, on the (T, P) matrix of task gradients in float64
NumPy, never on the library's Gram-matrix reformulation. Errors are measured on
the library's float32 update ``w^T G``, relative to the largest task gradient
norm (the cases and the library path are in tests/gram_cases.py).
"""

from __future__ import annotations

import pcgrad_optax as po
from gram_cases import worst_error
from gram_references import ref_config

W = po.weighting


def test_config_matches_reference():
  assert worst_error(W.config, ref_config,
                     kinds=("random", "conflicting", "scales",
                            "ill_conditioned", "rank_deficient")) < 1e-4
