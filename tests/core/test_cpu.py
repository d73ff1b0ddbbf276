"""The XLA:CPU fast paths against float64 NumPy.

``pcgrad_optax._core.cpu``: the tiled Gram of large leaves (slice products in
a loop, the remainder added at the end) and ``sum_over_tasks``, the row loop
that replaces a reduction over the task axis on CPU.
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
  # Leaves this big take the CPU path (_core._cpu_gram: concurrent slice
  # products in a loop, the remainder added at the end).
  x = np.random.default_rng(t).standard_normal((t,) + shape).astype(np.float32)
  g = x.reshape(t, -1).astype(np.float64)
  gram = jax.jit(po.gram_matrix)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5,
                             atol=1e-5 * np.max(np.sum(g * g, axis=1)))


@pytest.mark.parametrize("t", (1, 2, 5))
def test_sum_over_tasks(t):
  from pcgrad_optax import _core  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(t).standard_normal((t, 3, 4)).astype(np.float32)
  total, weighted = jax.jit(lambda x: _core.sum_over_tasks(
      x, lambda row, i: (row, (i + 1) * jnp.abs(row))))(jnp.asarray(x))
  np.testing.assert_allclose(total, x.sum(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      weighted, np.tensordot(np.arange(1, t + 1), np.abs(x), axes=1),
      rtol=1e-6, atol=1e-6)
