"""gram_matrix against float64 NumPy, its dtypes, and check_gram.

``pcgrad_optax._core.gram``: the Gram matrix of stacked gradients (accumulated
in float32 for half-precision leaves), the tiled XLA:CPU path of large leaves
(slice products in a loop, the remainder added at the end), and the check
that a weighting's input is a square ``(T, T)`` matrix.

Every bad input must be a ValueError raised while tracing (checked with
``jax.eval_shape`` or ``jax.jit``, where nothing runs) that names the
offending leaf or argument and its shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from stacked_trees import flat64, stacked
from trace_errors import has_all, traced


@pytest.mark.parametrize("t", (1, 2, 5))
def test_gram_matrix_matches_numpy(t):
  grads = stacked(t, seed=t, scale=3.0)
  g = flat64(grads)
  gram = jax.jit(po.gram_matrix)(grads)
  assert gram.shape == (t, t) and gram.dtype == jnp.float32
  np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5,
                             atol=1e-6 * np.max(np.sum(g * g, axis=1)))
  np.testing.assert_array_equal(gram, np.asarray(gram).T)


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16))
def test_half_precision_gram_in_float32(dtype):
  # Large leaves with a nonzero mean make half-precision accumulation visibly
  # wrong (relative error ~1e-2); f32 accumulation of the exact half products
  # agrees with float64 to ~1e-6.
  rng = np.random.default_rng(0)
  leaf = rng.standard_normal((3, 4096)) + 1.0
  grads = {"a": jnp.asarray(leaf.astype(dtype)),
           "b": jnp.asarray(leaf[:, :7].astype(dtype))}
  g = flat64(grads)                   # the values actually stored
  gram = jax.jit(po.gram_matrix)(grads)
  assert gram.dtype == jnp.float32
  # f32 summation of 4096 terms: ~1e-6 relative (half-precision
  # accumulation would be off by ~1e-2).
  np.testing.assert_allclose(gram, g @ g.T, rtol=2e-5)
  # Mixed trees accumulate in the widest accumulation type.
  mixed = {"a": grads["a"], "b": jnp.asarray(leaf[:, :7].astype(np.float32))}
  assert po.gram_matrix(mixed).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 2, 2)])
def test_gram_not_square(shape):
  with pytest.raises(ValueError, match=has_all("square", str(shape))):
    traced(lambda k: po.weighting.pcgrad(k, key=jax.random.key(0)),
           jnp.zeros(shape))


@pytest.mark.parametrize("t,shape", [(1, (50_000,)), (2, (300, 170)),
                                     (40, (16 * 1024 * 3 + 777,))])
def test_large_leaf_gram_matches_numpy(t, shape):
  # Leaves this big take the CPU path (_core.gram._tiled_gram: concurrent slice
  # products in a loop, the remainder added at the end).
  x = np.random.default_rng(t).standard_normal((t,) + shape).astype(np.float32)
  g = x.reshape(t, -1).astype(np.float64)
  gram = jax.jit(po.gram_matrix)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5,
                             atol=1e-5 * np.max(np.sum(g * g, axis=1)))


@pytest.mark.parametrize("t,shape", [(2, (300, 170)),
                                     (5, (16 * 1024 + 777,))])
def test_large_leaf_cross_matches_numpy(t, shape):
  # <x_s, y_t> of two large leaves: the CPU path (_tiled_gram of the pair).
  from pcgrad_optax._core.gram import leaf_cross
  rng = np.random.default_rng(t)
  x, y = (rng.standard_normal((t,) + shape).astype(np.float32)
          for _ in range(2))
  want = x.reshape(t, -1).astype(np.float64) @ y.reshape(t, -1).T
  got = jax.jit(leaf_cross)(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
