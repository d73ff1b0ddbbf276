"""weighted_sum against float64 NumPy, its dtypes, and bad weights.

``pcgrad_optax._core.weighted_sum``: ``sum_t w[t] * g[t]`` per leaf,
accumulated in float32 and returned in the leaf's dtype (also as a
transformation's output), the ValueError on weights of the wrong shape, and
``sum_over_tasks`` (on CPU the row loop that replaces a reduction over the
task axis).

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
from pcgrad_optax._core.weighted_sum import sum_over_tasks
from stacked_trees import PARAMS, stacked
from trace_errors import has_all, traced


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16))
def test_half_precision_weighted_sum(dtype):
  rng = np.random.default_rng(1)
  leaf = rng.standard_normal((5, 2048)) + 0.5
  grads = {"a": jnp.asarray(leaf.astype(dtype)),
           "b": jnp.asarray(leaf[:, :3].astype(dtype))}
  weights = jnp.asarray(rng.uniform(0.1, 2.0, 5).astype(np.float32))
  out = jax.jit(po.weighted_sum)(grads, weights)
  eps = float(jnp.finfo(dtype).eps)
  for name in ("a", "b"):
    assert out[name].dtype == dtype
    ref = np.asarray(weights, np.float64) @ np.asarray(grads[name], np.float64)
    # Accumulated in f32 then rounded once: within one half-precision ulp.
    np.testing.assert_allclose(np.asarray(out[name], np.float64), ref,
                               rtol=eps, atol=eps * np.abs(ref).max() * 1e-3)


def test_weighted_sum_matches_numpy():
  grads = stacked(4, seed=3)
  weights = np.array([0.5, -1.0, 2.0, 0.0])
  out = jax.jit(po.weighted_sum)(grads, weights)
  assert jax.tree.structure(out) == jax.tree.structure(PARAMS)
  for o, g, p in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                     jax.tree.leaves(PARAMS)):
    assert o.shape == p.shape and o.dtype == jnp.float32
    np.testing.assert_allclose(
        o, np.tensordot(weights, np.asarray(g, np.float64), axes=1),
        rtol=1e-6, atol=1e-6)
  # A list of weights is fine too.
  out_list = po.weighted_sum(grads, [0.5, -1.0, 2.0, 0.0])
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_list)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_transform_half_precision_output_dtype():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  grads = stacked(3, seed=4, dtype=jnp.bfloat16)
  tx = po.pcgrad(shared={"trunk": True, "head": False})
  out, _ = jax.jit(lambda g, s: tx.update(g, s, params))(grads,
                                                         tx.init(params))
  for o in jax.tree.leaves(out):
    assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(out["head"], np.float64),
      np.asarray(grads["head"], np.float64).sum(0), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("shape", [(4,), (2,), (3, 1), ()])
def test_weights_wrong_shape(shape):
  grads = stacked(3)
  with pytest.raises(ValueError,
                     match=has_all("weights", "(3,)", str(shape))):
    traced(lambda g: po.weighted_sum(g, jnp.ones(shape)), grads)


@pytest.mark.parametrize("t", (1, 2, 5))
def test_sum_over_tasks(t):
  x = np.random.default_rng(t).standard_normal((t, 3, 4)).astype(np.float32)
  total, weighted = jax.jit(lambda x: sum_over_tasks(
      x, lambda row, i: (row, (i + 1) * jnp.abs(row))))(jnp.asarray(x))
  np.testing.assert_allclose(total, x.sum(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      weighted, np.tensordot(np.arange(1, t + 1), np.abs(x), axes=1),
      rtol=1e-6, atol=1e-6)
