"""GradDrop against an independent float64 reference.

The reference (``reference_graddrop``) is lines 10-15 of Algorithm 1 of Chen
et al. (2020), written in float64 NumPy on flattened task gradients, one
coordinate and task at a time; it never calls the library. Its uniforms are
replayed from the transform's documented derivation:
``uniform(fold_in(fold_in(key, n), leaf), shape)`` at step n
(``graddrop_uniforms``). Also checked: one sign is kept per coordinate (a
hypothesis property test), the result does not depend on the task order, and
every step draws fresh uniforms.

The test data (a params-like tree with a module of two leaves and a head) and
its converters are in tests/stacked_trees.py.
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
from stacked_trees import (HEADS_MASK, LEAF_SLICES, NUM_PARAMS, PARAMS,
                           assert_close, flat, random_grads, to_tree)


def graddrop_uniforms(seed: int, n: int, t_shape_leaves) -> list[np.ndarray]:
  """The documented draws: uniform(fold_in(fold_in(key, n), leaf), shape)."""
  step = jax.random.fold_in(jax.random.key(seed), n)
  return [np.asarray(jax.random.uniform(jax.random.fold_in(step, index), shape,
                                        jnp.float32), np.float64)
          for index, shape in enumerate(t_shape_leaves)]


def reference_graddrop(grads, uniform, leak):
  """Chen et al. (2020), lines 10-15 of Algorithm 1, on (T, P) float64."""
  grads = np.asarray(grads, np.float64)
  out = np.zeros(grads.shape[1])
  for p in range(grads.shape[1]):
    col = grads[:, p]
    total_abs = np.abs(col).sum()
    purity = 0.5 * (1 + col.sum() / total_abs) if total_abs > 0 else 0.5
    for i, g_ip in enumerate(col):
      keep = (purity > uniform[p] and g_ip > 0) or (
          purity < uniform[p] and g_ip < 0)
      out[p] += (leak[i] + (1 - leak[i]) * keep) * g_ip
  return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_graddrop_matches_reference(reduction):
  t, seed = 3, 11
  leak = np.array([0.0, 0.25, 1.0])
  tx = po.graddrop(seed, leak=leak, shared=HEADS_MASK, reduction=reduction)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  shapes = [p.shape for p in jax.tree.leaves(PARAMS)]
  for n in range(2):
    g = random_grads(t, 20 + n)
    g[:, 3] = 0.0          # a coordinate where every task is zero
    out, state = update(to_tree(g), state, PARAMS)
    uniforms = np.concatenate([u.reshape(-1) for u in
                               graddrop_uniforms(seed, n, shapes)])
    expected = reference_graddrop(g, uniforms, leak)
    head = LEAF_SLICES[0]
    expected[head] = g[:, head].sum(0)
    if reduction == "mean":
      expected /= t
    assert_close(flat(out), expected, rtol=1e-5)


@HYP
@hypothesis.given(
    hnp.arrays(np.float32, (3, NUM_PARAMS),
               elements=st.floats(-100, 100, width=32)),
    st.integers(0, 2**31 - 1))
def test_graddrop_keeps_one_sign_per_coordinate(g, seed):
  out = flat(graddrop_jit(to_tree(g), jax.random.key(seed)))
  g = g.astype(np.float64)
  positive = np.where(g > 0, g, 0).sum(0)
  negative = np.where(g < 0, g, 0).sum(0)
  kept_pos = np.isclose(out, positive, rtol=1e-5, atol=1e-4)
  kept_neg = np.isclose(out, negative, rtol=1e-5, atol=1e-4)
  assert np.all(kept_pos | kept_neg)
  # the output's sign agrees with the kept components
  assert np.all(out[~kept_neg] >= 0) and np.all(out[~kept_pos] <= 0)
  # pure-sign coordinates are never dropped
  all_pos = np.all(g >= 0, axis=0)
  all_neg = np.all(g <= 0, axis=0)
  np.testing.assert_allclose(out[all_pos], positive[all_pos], rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(out[all_neg], negative[all_neg], rtol=1e-5,
                             atol=1e-4)


@jax.jit
def graddrop_jit(grads, key):
  tx = po.graddrop(key)
  return tx.update(grads, tx.init(PARAMS), PARAMS)[0]


def test_graddrop_task_permutation_invariant_and_random_per_step():
  g = random_grads(4, 7)
  out = flat(graddrop_jit(to_tree(g), jax.random.key(3)))
  out_perm = flat(graddrop_jit(to_tree(g[[2, 0, 3, 1]]), jax.random.key(3)))
  np.testing.assert_allclose(out, out_perm, rtol=1e-5, atol=1e-5)
  # successive steps draw fresh uniforms
  tx = po.graddrop(3)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  outs = []
  for _ in range(3):
    o, state = update(to_tree(g), state, PARAMS)
    outs.append(flat(o))
  assert not np.allclose(outs[0], outs[1]) or not np.allclose(outs[1], outs[2])


def test_graddrop_bad_leak():
  with pytest.raises(ValueError, match="leak"):
    po.graddrop(leak=2.0)
  tx = po.graddrop(leak=jnp.zeros(2))
  with pytest.raises(ValueError, match="leak"):
    tx.update(to_tree(random_grads(3, 0)), tx.init(PARAMS), PARAMS)
