"""The XLA:CPU fast paths against float64 NumPy.

``pcgrad_optax._core.cpu``: the tiled Gram of large leaves (slice products in
a loop, the remainder added at the end). The CPU row loops of the weighted
sum and of ``sum_over_tasks`` are tested in test_weighted_sum.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po


@pytest.mark.parametrize("t,shape", [(1, (50_000,)), (2, (300, 170)),
                                     (40, (16 * 1024 * 3 + 777,))])
def test_large_leaf_gram_matches_numpy(t, shape):
  # Leaves this big take the CPU path (_core.cpu.tiled_gram: concurrent slice
  # products in a loop, the remainder added at the end).
  x = np.random.default_rng(t).standard_normal((t,) + shape).astype(np.float32)
  g = x.reshape(t, -1).astype(np.float64)
  gram = jax.jit(po.gram_matrix)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5,
                             atol=1e-5 * np.max(np.sum(g * g, axis=1)))
