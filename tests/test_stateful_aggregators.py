"""GradVac, GradDrop, RLW, uncertainty, DWA and FAMO against float64 references.

Every reference below is written from the paper's formulas in float64 NumPy,
on flattened task gradients, one task / pair / step at a time; none of them
calls the library. Randomness is replayed from the transforms' documented
derivations (orders from ``weighting.random_orders(fold_in(key, n), T)``,
GradDrop's uniforms from ``uniform(fold_in(fold_in(key, n), leaf), shape)``,
RLW's normals from ``normal(fold_in(key, n), (T,))``).
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po

HYP = hypothesis.settings(deadline=None, max_examples=20, derandomize=True,
                          suppress_health_check=list(hypothesis.HealthCheck))

# ---------------------------------------------------------------------------
# Test data: a params-like tree with a module of two leaves and a head.

SHAPES = {"trunk": {"kernel": (3, 4), "bias": (4,)}, "head": (4, 2)}
PARAMS = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))
LEAF_SIZES = [int(np.prod(p.shape)) for p in jax.tree.leaves(PARAMS)]
NUM_PARAMS = sum(LEAF_SIZES)
# Leaf order of jax.tree.leaves(PARAMS): head, trunk/bias, trunk/kernel.
LEAF_SLICES = np.split(np.arange(NUM_PARAMS), np.cumsum(LEAF_SIZES)[:-1])
HEADS_MASK = {"trunk": True, "head": False}


def to_tree(mat: np.ndarray, dtype=jnp.float32):
  """(T, P) array -> stacked gradient tree shaped like PARAMS."""
  t = mat.shape[0]
  leaves, treedef = jax.tree.flatten(PARAMS)
  out = [jnp.asarray(mat[:, idx].reshape((t,) + leaf.shape), dtype)
         for leaf, idx in zip(leaves, LEAF_SLICES)]
  return jax.tree.unflatten(treedef, out)


def flat(tree) -> np.ndarray:
  """Params-shaped (or stacked) tree -> flat float64 (leaf order)."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                         for x in leaves])


def flat_tasks(tree) -> np.ndarray:
  leaves = jax.tree.leaves(tree)
  t = leaves[0].shape[0]
  return np.concatenate(
      [np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)


def random_grads(t: int, seed: int, scales=None) -> np.ndarray:
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, NUM_PARAMS))
  if scales is not None:
    g = g * np.asarray(scales, np.float64)[:, None]
  return g


def step_orders(seed: int, n: int, t: int) -> np.ndarray:
  return np.asarray(po.weighting.random_orders(
      jax.random.fold_in(jax.random.key(seed), n), t))


def assert_close(actual, expected, rtol=2e-5, atol=1e-5):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------
# GradVac.


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


# ---------------------------------------------------------------------------
# GradDrop.


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


# ---------------------------------------------------------------------------
# RLW.


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


# ---------------------------------------------------------------------------
# Loss-based weightings: step-by-step references.

LOSS_SEQUENCE = np.array([[2.0, 1.0, 4.0],
                          [1.5, 0.9, 3.0],
                          [1.2, 0.85, 1.5],
                          [1.1, 0.8, 1.2],
                          [0.9, 0.82, 1.0]])


def run_transform(tx, grads_seq, losses_seq, extra_seq=None):
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  outs, states = [], []
  for n, (g, losses) in enumerate(zip(grads_seq, losses_seq)):
    extra = {} if extra_seq is None else extra_seq[n]
    out, state = update(to_tree(g), state, PARAMS,
                        losses=jnp.asarray(losses, jnp.float32), **extra)
    outs.append(flat(out))
    states.append(state)
  return outs, states


@pytest.mark.parametrize("task_types", [None, ("regression", "classification",
                                               "regression")])
def test_uncertainty_matches_reference(task_types):
  t, lr = 3, 0.1
  grads_seq = [random_grads(t, 40 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.uncertainty(num_tasks=t, learning_rate=lr, task_types=task_types,
                      init_log_vars=np.array([0.0, 0.5, -0.5]))
  outs, states = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  if task_types is None:
    a, b = np.ones(t), np.ones(t)
  else:  # Kendall et al.: 1/(2 sigma^2) L + log sigma, 1/sigma^2 L + log sigma
    a = np.array([0.5, 1.0, 0.5])
    b = np.full(t, 0.5)
  s = np.array([0.0, 0.5, -0.5])
  for g, losses, out, state in zip(grads_seq, LOSS_SEQUENCE, outs, states):
    weights = a * np.exp(-s)
    assert_close(out, weights @ g, rtol=1e-5)
    # d/ds_t of sum a_t exp(-s_t) L_t + b_t s_t
    s = s - lr * (b - a * np.exp(-s) * losses)
    np.testing.assert_allclose(state.log_vars, s, rtol=1e-5, atol=1e-6)


def test_uncertainty_optimizer_and_fixed_point():
  # With enough plain GD steps on constant losses, s -> log(a L / b).
  tx = po.uncertainty(num_tasks=3, learning_rate=0.5)
  losses = np.array([0.5, 2.0, 8.0])
  g = [random_grads(3, 1)] * 60
  _, states = run_transform(tx, g, [losses] * 60)
  np.testing.assert_allclose(states[-1].log_vars, np.log(losses), atol=1e-3)
  # A user optimizer is used in place of SGD.
  tx_sgd = po.uncertainty(num_tasks=3, optimizer=optax.sgd(0.5))
  _, states_sgd = run_transform(tx_sgd, g[:3], [losses] * 3)
  np.testing.assert_allclose(states_sgd[-1].log_vars, states[2].log_vars,
                             rtol=1e-6)


def reference_dwa_weights(history, temperature):
  """Liu et al. (2019): T * softmax(L(k-1) / L(k-2) / temperature)."""
  if len(history) < 2:
    return np.ones(history[0].shape if history else 3)
  ratio = history[-1] / history[-2]
  e = np.exp(ratio / temperature)
  return len(ratio) * e / e.sum()


@pytest.mark.parametrize("period", [1, 2])
def test_dwa_matches_reference(period):
  t, temperature = 3, 2.0
  grads_seq = [random_grads(t, 50 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.dwa(num_tasks=t, temperature=temperature, period=period,
              shared=HEADS_MASK)
  outs, _ = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  period_means, current = [], []
  for g, losses, out in zip(grads_seq, LOSS_SEQUENCE, outs):
    weights = reference_dwa_weights(period_means, temperature)
    expected = weights @ g
    head = LEAF_SLICES[0]
    expected[head] = g[:, head].sum(0)
    assert_close(out, expected, rtol=1e-5)
    current.append(losses)
    if len(current) == period:
      period_means.append(np.mean(current, axis=0))
      current = []


def test_dwa_first_two_steps_are_equal_weights_and_pure_function():
  tx = po.dwa(num_tasks=3)
  g = [random_grads(3, 1)] * 3
  outs, _ = run_transform(tx, g, LOSS_SEQUENCE[:3])
  assert_close(outs[0], g[0].sum(0))
  assert_close(outs[1], g[0].sum(0))
  assert not np.allclose(outs[2], g[0].sum(0))
  w = po.weighting.dwa(LOSS_SEQUENCE[1], LOSS_SEQUENCE[0], temperature=0.5)
  ratio = LOSS_SEQUENCE[1] / LOSS_SEQUENCE[0]
  np.testing.assert_allclose(w, 3 * np.exp(ratio / 0.5)
                             / np.exp(ratio / 0.5).sum(), rtol=1e-5)


def reference_famo(losses_seq, grads_seq, lr, gamma, min_losses, eps,
                   after_seq=None):
  """Liu et al. (2023), Algorithm 1, with a plain gradient step on xi.

  ``after_seq[n]`` is the "after" loss of the step before step n (the
  previous batch at the current params); by default the current losses.
  """
  t = len(losses_seq[0])
  xi = np.zeros(t)
  prev = None
  updates, logits = [], []
  for n, (losses, g) in enumerate(zip(losses_seq, grads_seq)):
    if prev is not None:
      after = losses if after_seq is None else after_seq[n]
      delta = np.log(prev - min_losses + eps) - np.log(after - min_losses + eps)
      z = np.exp(xi) / np.exp(xi).sum()
      jacobian = np.diag(z) - np.outer(z, z)     # d softmax / d xi
      xi = xi - lr * (jacobian.T @ delta + gamma * xi)
    z = np.exp(xi) / np.exp(xi).sum()
    shifted = losses - min_losses + eps
    c = 1.0 / np.sum(z / shifted)
    weights = c * z / shifted
    updates.append(weights @ g)
    logits.append(xi.copy())
    prev = losses
  return updates, logits


@pytest.mark.parametrize("exact", [False, True])
def test_famo_matches_reference(exact):
  t, lr, gamma = 3, 0.5, 0.01     # a large lr so the logits move visibly
  min_losses = np.array([0.0, 0.1, 0.0])
  grads_seq = [random_grads(t, 60 + n) for n in range(len(LOSS_SEQUENCE))]
  after_seq = None
  extra_seq = None
  if exact:
    after_seq = [None] + [LOSS_SEQUENCE[n - 1] * np.array([0.7, 0.95, 0.8])
                          for n in range(1, len(LOSS_SEQUENCE))]
    extra_seq = [{}] + [{"prev_batch_losses": jnp.asarray(a, jnp.float32)}
                        for a in after_seq[1:]]
  tx = po.famo(num_tasks=t, learning_rate=lr, weight_decay=gamma,
               min_losses=min_losses)
  outs, states = run_transform(tx, grads_seq, LOSS_SEQUENCE, extra_seq)
  ref_updates, ref_logits = reference_famo(
      LOSS_SEQUENCE, grads_seq, lr, gamma, min_losses, 1e-8, after_seq)
  for out, state, ref_u, ref_xi in zip(outs, states, ref_updates, ref_logits):
    assert_close(out, ref_u, rtol=1e-5)
    np.testing.assert_allclose(state.logits, ref_xi, rtol=1e-5, atol=1e-6)
  assert np.abs(ref_logits[-1]).max() > 0.05   # the logits did move


def test_famo_adam_option_and_balanced_weights():
  # The authors' code: Adam on J^T delta + gamma xi.
  t = 3
  grads_seq = [random_grads(t, 70 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.famo(num_tasks=t, optimizer=optax.adam(0.025), weight_decay=0.01)
  _, states = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  xi, m, v = np.zeros(t), np.zeros(t), np.zeros(t)
  for n in range(1, len(LOSS_SEQUENCE)):
    delta = (np.log(LOSS_SEQUENCE[n - 1] + 1e-8)
             - np.log(LOSS_SEQUENCE[n] + 1e-8))
    z = np.exp(xi) / np.exp(xi).sum()
    grad = z * (delta - z @ delta) + 0.01 * xi
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad**2
    m_hat, v_hat = m / (1 - 0.9**n), v / (1 - 0.999**n)
    xi = xi - 0.025 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(states[n].logits, xi, rtol=1e-4, atol=1e-6)
  # pure weighting: z_t / l_t normalised
  w = po.weighting.famo(jnp.array([0.0, 1.0, -1.0]), jnp.array([1.0, 2.0, 4.0]))
  z = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
  ref = z / np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-5)


@HYP
@hypothesis.given(
    hnp.arrays(np.float64, (3, NUM_PARAMS), elements=st.floats(-5, 5)),
    hnp.arrays(np.float64, (3, 3), elements=st.floats(0.1, 10)),
    st.permutations(range(3)),
    st.sampled_from(["uncertainty", "dwa", "famo"]))
def test_loss_weightings_permutation_equivariant(g, losses, perm, method):
  perm = np.asarray(perm)
  update = LOSS_UPDATES[method]
  out = update(to_tree(g), jnp.asarray(losses, jnp.float32))
  out_p = update(to_tree(g[perm]), jnp.asarray(losses[:, perm], jnp.float32))
  np.testing.assert_allclose(flat(out), flat(out_p), rtol=1e-4,
                             atol=1e-4 * (np.abs(g).max() + 1))


def _three_steps(make):
  tx = make()

  @jax.jit
  def run(grads, losses):
    state = tx.init(PARAMS)
    for n in range(2):
      _, state = tx.update(grads, state, PARAMS, losses=losses[n])
    return tx.update(grads, state, PARAMS, losses=losses[2])[0]

  return run


LOSS_UPDATES = {
    "uncertainty": _three_steps(lambda: po.uncertainty(num_tasks=3,
                                                     learning_rate=0.3)),
    "dwa": _three_steps(lambda: po.dwa(num_tasks=3, period=1)),
    "famo": _three_steps(lambda: po.famo(num_tasks=3, learning_rate=0.5)),
}


@pytest.mark.parametrize("make", [
    lambda: po.uncertainty(num_tasks=3), lambda: po.dwa(num_tasks=3),
    lambda: po.famo(num_tasks=3)], ids=["uncertainty", "dwa", "famo"])
def test_loss_based_need_losses_at_trace_time(make):
  tx = make()
  grads, state = to_tree(random_grads(3, 0)), tx.init(PARAMS)
  update = jax.jit(tx.update)
  with pytest.raises(ValueError, match="losses"):
    update(grads, state, PARAMS)
  with pytest.raises(ValueError, match=r"losses.*\(3,\).*\(2,\)"):
    update(grads, state, PARAMS, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="num_tasks=3"):
    update(to_tree(random_grads(2, 0)), state, PARAMS, losses=jnp.ones(2))
  # chained with an optimiser, the losses pass through optax.chain
  chained = optax.chain(make(), optax.sgd(0.1))
  out, _ = jax.jit(chained.update)(grads, chained.init(PARAMS), PARAMS,
                                   losses=jnp.ones(3))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_loss_based_bad_arguments():
  with pytest.raises(ValueError, match="task_types"):
    po.uncertainty(num_tasks=3, task_types=("regression",))
  with pytest.raises(ValueError, match="task type"):
    po.uncertainty(num_tasks=1, task_types="ranking")
  with pytest.raises(ValueError, match="init_log_vars"):
    po.uncertainty(num_tasks=3, init_log_vars=jnp.zeros(2))
  with pytest.raises(ValueError, match="temperature"):
    po.dwa(num_tasks=3, temperature=0.0)
  with pytest.raises(ValueError, match="period"):
    po.dwa(num_tasks=3, period=0)
  with pytest.raises(ValueError, match="min_losses"):
    po.famo(num_tasks=3, min_losses=jnp.zeros(2))
  with pytest.raises(ValueError, match="prev_prev_losses"):
    po.weighting.dwa(jnp.ones(3), jnp.ones(2))
