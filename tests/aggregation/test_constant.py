"""Constant weights: torchjd's value and its property suite.

Over torchjd's matrix families: linear under scaling (``A(diag(a c1 + b
c2) J) = a A(diag(c1) J) + b A(diag(c2) J)``) and strongly stationary (with
uniform weights the update of a non-strongly-stationary matrix is not 0),
as torchjd asserts for ``Constant``; plus traced weights and bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import matrix_families as mf
import pcgrad_optax as po
from gram_cases import gram32, update

W = po.weighting


def test_torchjd_published_value():
  g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  np.testing.assert_allclose(update(lambda k: W.constant(k, [1.0, 2.0]), g),
                             [8.0, 3.0, 3.0])
  tx = po.constant(jnp.array([1.0, 2.0]))
  out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)},
                     tx.init({"w": jnp.zeros(3)}))
  np.testing.assert_allclose(out["w"], [8.0, 3.0, 3.0])


@pytest.mark.parametrize("name,g", mf.typical(), ids=mf.ids(mf.typical()))
def test_linear_under_scaling(name, g):
  rng = np.random.default_rng(0)
  t = g.shape[0]
  weights = np.full(t, 1.0 / t)
  agg = lambda j: update(lambda k: W.constant(k, weights), j)  # noqa: E731
  for _ in range(3):
    c1, c2 = rng.uniform(size=t), rng.uniform(size=t)
    a, b = rng.uniform(size=2)
    x = agg((a * c1 + b * c2)[:, None] * g)
    expected = a * agg(c1[:, None] * g) + b * agg(c2[:, None] * g)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,g", mf.non_strong(), ids=mf.ids(mf.non_strong()))
def test_strongly_stationary(name, g):
  t = g.shape[0]
  u = update(lambda k: W.constant(k, np.full(t, 1.0 / t)), g)
  assert np.linalg.norm(u) > 5e-3


def test_traced_weights_and_checks():
  g = np.random.default_rng(1).standard_normal((3, 4))
  f = jax.jit(lambda k, w: W.constant(k, w))
  np.testing.assert_allclose(f(gram32(g), jnp.array([1.0, 0.0, 2.0])),
                             [1.0, 0.0, 2.0])
  with pytest.raises(ValueError, match=r"weights.*\(3,\)"):
    W.constant(gram32(g), [1.0, 2.0])
  with pytest.raises(ValueError, match="weights"):
    po.constant(jnp.ones((2, 2)))
  tx = po.constant([1.0, 2.0])
  with pytest.raises(ValueError, match=r"\(T,\) = \(3,\)"):
    tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros(4)}))
  # Integer weights are used as floats.
  assert W.constant(gram32(g), np.array([1, 2, 3])).dtype == jnp.float32


def test_recorded_weights_and_gram():
  g = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
  params = {"w": jnp.zeros(3)}
  for keep_gram in (False, True):
    tx = po.constant(jnp.array([1., 2.]), num_tasks=2, keep_gram=keep_gram)
    state = tx.init(params)
    np.testing.assert_array_equal(state.weights, [0., 0.])
    u, state = tx.update({"w": g}, state, params)
    np.testing.assert_allclose(u["w"], [8., 3., 3.])
    np.testing.assert_allclose(state.weights, [1., 2.])
    if keep_gram:
      np.testing.assert_allclose(state.gram, g @ g.T)
    else:
      assert state.gram is None
  with pytest.raises(ValueError, match="shape"):
    po.constant(jnp.array([1., 2.]), num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks"):
    po.constant(jnp.array([1., 2.]), keep_gram=True)
