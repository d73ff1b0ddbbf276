"""GradVac (weighting and transform) against an independent float64 reference.

The reference (``reference_gradvac``) is Algorithm 1 of Wang et al. (2021)
written from the paper's formulas in float64 NumPy, on flattened task
gradients, one task and pair at a time; it never calls the library. Its
per-task orders are replayed from the transform's documented derivation:
``weighting.random_orders(fold_in(key, n), T)`` at step n (``step_orders``).

The test data (a params-like tree with a module of two leaves and a head) and
its converters are in tests/stacked_trees.py.
"""

from __future__ import annotations

import functools

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


def step_orders(seed: int, n: int, t: int) -> np.ndarray:
  return np.asarray(po.weighting.random_orders(
      jax.random.fold_in(jax.random.key(seed), n), t))


def reference_gradvac(grads, targets, orders, beta, ema_of="modified"):
  """Algorithm 1 of Wang et al. (2021) on (T, P) float64 gradients.

  Returns the summed update and the new (T, T) targets.
  """
  grads = np.asarray(grads, np.float64)
  targets = np.array(targets, np.float64)
  t = grads.shape[0]
  vaccinated = []
  for i in range(t):
    g_i = grads[i].copy()
    for j in orders[i]:
      j = int(j)
      if j == i:
        continue
      norm_i, norm_j = np.linalg.norm(g_i), np.linalg.norm(grads[j])
      if norm_i == 0 or norm_j == 0:
        continue
      phi = np.clip(g_i @ grads[j] / (norm_i * norm_j), -1, 1)
      phi_hat = targets[i, j]
      if phi < phi_hat:
        g_i = g_i + (norm_i * (phi_hat * np.sqrt(1 - phi**2)
                               - phi * np.sqrt(1 - phi_hat**2))
                     / (norm_j * np.sqrt(1 - phi_hat**2))) * grads[j]
      if ema_of == "modified":
        measured = phi
      else:
        measured = grads[i] @ grads[j] / (np.linalg.norm(grads[i]) * norm_j)
      targets[i, j] = (1 - beta) * phi_hat + beta * measured
    vaccinated.append(g_i)
  return np.sum(vaccinated, axis=0), targets


@functools.partial(jax.jit, static_argnames=("beta", "ema_of"))
def gradvac_weighting(gram, targets, order, beta, ema_of="modified"):
  return po.weighting.gradvac(gram, targets, beta=beta, order=order,
                              ema_of=ema_of)


@pytest.mark.parametrize("ema_of", ["modified", "original"])
def test_gradvac_weighting_matches_reference_over_steps(ema_of):
  t, beta = 4, 0.3
  rng = np.random.default_rng(1)
  targets = np.zeros((t, t))
  ref_targets = targets.copy()
  lib_targets = jnp.zeros((t, t), jnp.float32)
  for n in range(4):
    g = rng.standard_normal((t, 6)) + np.array([1.0, 0, 0, 0, 0, 0])
    orders = np.stack([rng.permutation(t) for _ in range(t)])
    ref_update, ref_targets = reference_gradvac(g, ref_targets, orders, beta,
                                                ema_of)
    w, lib_targets = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                                       lib_targets, jnp.asarray(orders), beta,
                                       ema_of)
    assert_close(np.asarray(w, np.float64) @ g, ref_update, rtol=1e-4)
    assert_close(lib_targets, ref_targets, rtol=1e-4, atol=1e-5)


def test_gradvac_zero_targets_is_pcgrad_projection():
  # With phi_hat = 0 the closed form is exactly PCGrad's projection. The
  # papers.md golden value: g1 = [-4, 1, 1], g2 = [6, 1, 1].
  g = np.array([[-4.0, 1, 1], [6.0, 1, 1]])
  w, _ = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                           jnp.zeros((2, 2)), jnp.array([[0, 1], [1, 0]]), 0.5)
  np.testing.assert_allclose(np.asarray(w) @ g, [0.5848, 3.8012, 3.8012],
                             atol=1e-4)


def test_gradvac_raises_cosine_to_target():
  # T = 2: w = [1 + a_10, 1 + a_01] where g_0' = g_0 + a_01 g_1 and
  # g_1' = g_1 + a_10 g_0; each corrected cosine must equal the target.
  g = np.array([[1.0, 0.2, -0.3], [-0.8, 1.0, 0.1]])
  target = 0.4
  w, _ = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                           jnp.full((2, 2), target),
                           jnp.array([[0, 1], [1, 0]]), 0.0)
  w = np.asarray(w, np.float64)
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  np.testing.assert_allclose(cos(g[0] + (w[1] - 1) * g[1], g[1]), target,
                             atol=1e-5)
  np.testing.assert_allclose(cos(g[1] + (w[0] - 1) * g[0], g[0]), target,
                             atol=1e-5)
  # an already aligned pair is left alone
  w, _ = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                           jnp.full((2, 2), -0.9), jnp.array([[0, 1], [1, 0]]),
                           0.0)
  np.testing.assert_allclose(w, [1.0, 1.0])


@pytest.mark.parametrize("granularity", ["all", "module", "leaf"])
def test_gradvac_transform_matches_reference(granularity):
  t, seed, beta = 3, 5, 0.25
  tx = po.gradvac(seed, num_tasks=t, beta=beta, granularity=granularity)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  # Parameter groups as index sets into the flat vector.
  if granularity == "all":
    groups = [np.arange(NUM_PARAMS)]
  elif granularity == "leaf":
    groups = LEAF_SLICES
  else:  # "module": head alone, trunk's bias + kernel together
    groups = [LEAF_SLICES[0], np.concatenate(LEAF_SLICES[1:])]
  ref_targets = [np.zeros((t, t)) for _ in groups]
  assert state.targets.shape == (len(groups), t, t)
  for n in range(3):
    g = random_grads(t, 10 + n) + 0.5
    out, state = update(to_tree(g), state, PARAMS)
    orders = step_orders(seed, n, t)
    expected = np.zeros(NUM_PARAMS)
    for k, idx in enumerate(groups):
      upd, ref_targets[k] = reference_gradvac(g[:, idx], ref_targets[k],
                                              orders, beta)
      expected[idx] = upd
    assert_close(flat(out), expected, rtol=1e-4)
    for k in range(len(groups)):
      assert_close(state.targets[k], ref_targets[k], rtol=1e-4, atol=1e-5)


def test_gradvac_shared_mask_heads_and_mean():
  t, seed = 3, 2
  tx = po.gradvac(seed, num_tasks=t, shared=HEADS_MASK, reduction="mean")
  g = random_grads(t, 3)
  out, _ = tx.update(to_tree(g), tx.init(PARAMS), PARAMS)
  trunk = np.concatenate(LEAF_SLICES[1:])
  ref, _ = reference_gradvac(g[:, trunk], np.zeros((t, t)),
                             step_orders(seed, 0, t), 1e-2)
  expected = np.zeros(NUM_PARAMS)
  expected[trunk] = ref / t
  expected[LEAF_SLICES[0]] = g[:, LEAF_SLICES[0]].mean(0)
  assert_close(flat(out), expected, rtol=1e-4)


def test_gradvac_zero_opposite_and_huge_scales():
  t = 3
  ref_targets = np.full((t, t), 0.3)
  orders = np.array([[1, 2, 0], [2, 0, 1], [0, 1, 2]])
  # A zero task, an exact opposite pair, and 1e6 scale differences.
  cases = [np.array([[1.0, 2, 3], [0, 0, 0], [-1, 1, 0]]),
           np.array([[1.0, 2, 3], [-1, -2, -3], [0, 1, 0]]),
           np.array([[1e3, 2e3, -1e3], [1e-3, -2e-3, 1e-3], [0.1, 0, 0.2]])]
  for g in cases:
    w, new = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                               jnp.asarray(ref_targets, jnp.float32),
                               jnp.asarray(orders), 0.5)
    ref, ref_new = reference_gradvac(g, ref_targets, orders, 0.5)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(new))
    assert_close(np.asarray(w, np.float64) @ g, ref, rtol=1e-3, atol=1e-4)
    assert_close(new, ref_new, rtol=1e-3, atol=1e-4)


@HYP
@hypothesis.given(
    hnp.arrays(np.float64, (4, 5), elements=st.floats(-10, 10)),
    st.permutations(range(4)))
def test_gradvac_permutation_equivariance(g, perm):
  perm = np.asarray(perm)
  targets = np.linspace(-0.5, 0.5, 16).reshape(4, 4)
  orders = np.array([[1, 2, 3, 0], [3, 0, 2, 1], [0, 1, 3, 2], [2, 3, 1, 0]])
  w, new = gradvac_weighting(jnp.asarray(g @ g.T, jnp.float32),
                             jnp.asarray(targets, jnp.float32),
                             jnp.asarray(orders), 0.2)
  # Relabel tasks: task perm[k] becomes task k, with its order relabelled.
  inv = np.argsort(perm)
  gp = g[perm]
  orders_p = inv[orders[perm]]
  wp, new_p = gradvac_weighting(jnp.asarray(gp @ gp.T, jnp.float32),
                                jnp.asarray(targets[np.ix_(perm, perm)],
                                            jnp.float32),
                                jnp.asarray(orders_p), 0.2)
  scale = max(np.abs(np.asarray(w) @ g).max(), np.abs(g).max(), 1e-3)
  np.testing.assert_allclose(np.asarray(wp) @ gp, np.asarray(w) @ g,
                             atol=1e-3 * scale, rtol=1e-3)
  np.testing.assert_allclose(new_p, np.asarray(new)[np.ix_(perm, perm)],
                             atol=1e-4)


def test_gradvac_bad_arguments():
  with pytest.raises(ValueError, match="granularity"):
    po.gradvac(num_tasks=2, granularity="layer")
  with pytest.raises(ValueError, match="beta"):
    po.gradvac(num_tasks=2, beta=1.5)
  with pytest.raises(ValueError, match="ema_of"):
    po.gradvac(num_tasks=2, ema_of="both")
  with pytest.raises(ValueError, match="num_tasks"):
    po.gradvac(num_tasks=0)
  tx = po.gradvac(num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks=2"):
    jax.jit(tx.update)(to_tree(random_grads(3, 0)), tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="targets"):
    po.weighting.gradvac(jnp.eye(2), jnp.zeros((3, 3)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="key"):
    po.weighting.gradvac(jnp.eye(2), jnp.zeros((2, 2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("granularity", ["all", "module"])
def test_gradvac_nonfinite_step_keeps_the_state(bad, granularity):
  # A step with a NaN/inf shared gradient is as if it had not happened, for
  # the state: targets, count (the next orders), key and weights record.
  # (Its update is non-finite; apply_if_finite is the way to skip it.)
  params = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.zeros(2)}}
  rng = np.random.default_rng(0)

  def batch():
    return {"a": {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)},
            "b": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}

  tx = po.gradvac(num_tasks=3, beta=0.5, granularity=granularity,
                  keep_gram=True)
  update = jax.jit(tx.update)
  good = [batch() for _ in range(3)]
  bad_g = batch()
  bad_g["a"]["w"] = bad_g["a"]["w"].at[1, 0].set(bad)
  _, state = update(good[0], tx.init(params), params)
  u, with_bad = update(bad_g, state, params)
  assert not np.all(np.isfinite(np.asarray(u["a"]["w"])))
  for x, y in zip(jax.tree.leaves(with_bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
  clean = state
  for g in good[1:]:
    u1, with_bad = update(g, with_bad, params)
    u2, clean = update(g, clean, params)
    np.testing.assert_array_equal(u1["a"]["w"], u2["a"]["w"])
  for x, y in zip(jax.tree.leaves(with_bad), jax.tree.leaves(clean)):
    np.testing.assert_array_equal(x, y)
  assert np.all(np.isfinite(np.asarray(with_bad.targets)))
