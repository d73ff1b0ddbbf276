"""GLS (the geometric mean of the losses) against float64 references.

Two independent references, never calling the library: the closed form
``w_t = G / (T L_t)`` with ``G = (prod_t L_t)^(1/T)`` (Chennupati et al.,
2019), and central finite differences of ``G`` in float64. Also: losses
spanning 60 orders of magnitude (the log-domain form does not overflow),
scale invariance, T = 1, and positive losses only.
"""

from __future__ import annotations

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import PARAMS, assert_close, flat, random_grads, to_tree


def gls(losses):
  return np.prod(losses) ** (1.0 / len(losses))


def finite_difference(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i in range(len(x)):
    e = np.zeros_like(x)
    e[i] = h * x[i]
    out[i] = (f(x + e) - f(x - e)) / (2 * h * x[i])
  return out


@pytest.mark.parametrize("losses", [[1.0, 4.0], [0.3, 2.0, 5.0],
                                    [1e-3, 1.0, 10.0, 100.0]])
def test_geometric_mean_weights_match_references(losses):
  losses = np.asarray(losses)
  t = len(losses)
  w = po.weighting.geometric_mean(jnp.asarray(losses, jnp.float32))
  np.testing.assert_allclose(w, gls(losses) / (t * losses), rtol=1e-5)
  np.testing.assert_allclose(w, finite_difference(gls, losses), rtol=1e-5)
  g = random_grads(t, 4)
  tx = po.geometric_mean()
  out, _ = tx.update(to_tree(g), tx.init(PARAMS), PARAMS,
                     losses=jnp.asarray(losses, jnp.float32))
  assert_close(flat(out), (gls(losses) / (t * losses)) @ g, rtol=1e-5)


def test_geometric_mean_huge_scale_differences_and_t1():
  losses = np.array([1e-30, 1.0, 1e30])
  w = po.weighting.geometric_mean(jnp.asarray(losses, jnp.float32))
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w, 1.0 / (3 * losses), rtol=1e-4)  # G = 1
  np.testing.assert_allclose(po.weighting.geometric_mean(jnp.array([7.0])),
                             [1.0], rtol=1e-6)


@HYP
@hypothesis.given(hnp.arrays(np.float64, (4,), elements=st.floats(0.01, 100)),
                  st.floats(1e-3, 1e3))
def test_geometric_mean_scale_invariant(losses, c):
  w = po.weighting.geometric_mean(jnp.asarray(losses, jnp.float32))
  wc = po.weighting.geometric_mean(jnp.asarray(c * losses, jnp.float32))
  np.testing.assert_allclose(w, wc, rtol=1e-4)


def test_geometric_mean_needs_positive_losses():
  with pytest.raises(ValueError, match=r"geometric_mean.*> 0.*0\.0.*\[1\]"):
    po.weighting.geometric_mean(jnp.array([1.0, 0.0]))
  tx = po.geometric_mean()
  grads = to_tree(random_grads(2, 0))
  with pytest.raises(ValueError, match=r"> 0.*-2\.0"):
    tx.update(grads, tx.init(PARAMS), PARAMS, losses=jnp.array([1.0, -2.0]))
  with pytest.raises(ValueError, match="losses"):
    jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
