"""RLW (random loss weighting) against float64 references.

The expected weights are the softmax of the transform's documented draws,
replayed in float64 NumPy: ``normal(fold_in(key, n), (T,))`` at step n (and
``uniform`` for ``distribution="uniform"``); the library is not called to
compute them. The weights of every distribution are checked to lie on the
simplex and to be exchangeable across tasks.

The test data (a params-like tree with a module of two leaves and a head) and
its converters are in tests/stacked_trees.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from stacked_trees import (HEADS_MASK, LEAF_SLICES, PARAMS, assert_close,
                           flat, random_grads, to_tree)


def test_rlw_transform_matches_reference():
  t, seed = 3, 4
  tx = po.rlw(seed, shared=HEADS_MASK)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for n in range(3):
    g = random_grads(t, 30 + n)
    out, state = update(to_tree(g), state, PARAMS)
    draws = np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.key(seed), n), (t,), jnp.float32),
        np.float64)
    weights = np.exp(draws) / np.exp(draws).sum()
    expected = weights @ g
    head = LEAF_SLICES[0]
    expected[head] = g[:, head].sum(0)
    assert_close(flat(out), expected, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=(1,))
def rlw_many(keys, distribution):
  return jax.vmap(
      lambda k: po.weighting.rlw(k, 4, distribution=distribution))(keys)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_rlw_weights_on_simplex(distribution):
  keys = jax.random.split(jax.random.key(0), 256)
  w = np.asarray(rlw_many(keys, distribution), np.float64)
  assert w.shape == (256, 4)
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(w.std(axis=0) > 0.01)          # random, not constant
  # exchangeable tasks: each task's mean weight is about 1/T
  np.testing.assert_allclose(w.mean(axis=0), 0.25, atol=0.05)
  if distribution != "dirichlet":   # (its gamma sampler is slow to compile)
    one = po.weighting.rlw(jax.random.key(1), 1, distribution=distribution)
    np.testing.assert_allclose(one, [1.0], rtol=1e-6)


def test_rlw_uniform_reference_and_errors():
  key = jax.random.key(9)
  draws = np.asarray(jax.random.uniform(key, (4,), jnp.float32), np.float64)
  np.testing.assert_allclose(
      po.weighting.rlw(key, 4, distribution="uniform"),
      np.exp(draws) / np.exp(draws).sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="distribution"):
    po.rlw(distribution="bernoulli")
  with pytest.raises(ValueError, match="num_tasks"):
    po.weighting.rlw(key, 0)
