"""Mean and sum weightings: exact weights and updates.

One test checks the two side by side (so they share a file): on the
library's own float32 Gram matrix (``pcgrad_optax.gram_matrix``) the weights
are exactly 1/T and 1, and the updates ``w^T G`` are the mean and the sum of
the task gradients. The cases and the library path are in
tests/gram_cases.py.
"""

from __future__ import annotations

import numpy as np

import pcgrad_optax as po
from gram_cases import gram32, make_case, update

W = po.weighting


def test_mean_and_sum_are_exact():
  for t in (1, 3):
    g = make_case("scales", t, t)
    np.testing.assert_array_equal(W.mean(gram32(g)), np.full(t, 1 / t,
                                                             np.float32))
    np.testing.assert_array_equal(W.sum(gram32(g)), np.ones(t, np.float32))
    np.testing.assert_allclose(update(W.mean, g), g.mean(0), rtol=1e-6)
    np.testing.assert_allclose(update(W.sum, g), g.sum(0), rtol=1e-6)
