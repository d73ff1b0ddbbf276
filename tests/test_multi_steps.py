"""multi_steps, checked against its definition.

k micro-batches, then one step of the inner transformation on the mean of
their stacked gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po


T = 3
MS_PARAMS = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((4,))}


def micro_batches(n, seed=0):
  rng = np.random.default_rng(seed)
  # Conflicting tasks, so that averaging before vs after surgery differs.
  base = rng.standard_normal((T, 10))
  base[1] = -0.8 * base[0] + 0.3 * base[1]
  out = []
  for _ in range(n):
    g = base + 0.7 * rng.standard_normal((T, 10))
    out.append({"a": g[:, :6].reshape(T, 2, 3).astype(np.float32),
                "b": g[:, 6:].astype(np.float32)})
  return out


def mean_tree(trees):
  return jax.tree.map(
      lambda *xs: np.mean(np.stack(xs), axis=0, dtype=np.float64).astype(
          np.float32), *trees)


def raw(x):
  """Array data of x (the key data for a typed PRNG key)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def test_multi_steps_equals_pcgrad_on_mean():
  k, key = 3, 7
  tx = po.multi_steps(po.pcgrad(key), k, num_tasks=T)
  plain = po.pcgrad(key)
  step = jax.jit(lambda g, s: tx.update(g, s, MS_PARAMS))
  plain_step = jax.jit(lambda g, s: plain.update(g, s, MS_PARAMS))
  state = tx.init(MS_PARAMS)
  plain_state = plain.init(MS_PARAMS)
  batches = micro_batches(2 * k)
  for cycle in range(2):
    chunk = batches[cycle * k:(cycle + 1) * k]
    for m, g in enumerate(chunk):
      inner_before = state.inner_state
      out, state = step(g, state)
      if m < k - 1:
        # Intermediate calls: zero updates, inner state untouched, the
        # accumulator holds the running mean.
        for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(MS_PARAMS)):
          assert o.shape == p.shape
          np.testing.assert_array_equal(o, 0.0)
        for a, b in zip(jax.tree.leaves(state.inner_state),
                        jax.tree.leaves(inner_before)):
          np.testing.assert_array_equal(raw(a), raw(b))
        assert int(state.mini_step) == m + 1
        for a, b in zip(jax.tree.leaves(state.acc_grads),
                        jax.tree.leaves(mean_tree(chunk[:m + 1]))):
          np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The k-th call: one PCGrad step (the cycle-th of the inner transform,
    # so its random orders) on the mean of the k stacked gradients.
    expected, plain_state = plain_step(mean_tree(chunk), plain_state)
    for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
      np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-5)
    assert int(state.mini_step) == 0
    assert int(state.inner_state.count) == cycle + 1
    for a in jax.tree.leaves(state.acc_grads):
      np.testing.assert_array_equal(a, 0.0)
  # Surgery is nonlinear: averaging surgery outputs would be different.
  s1 = plain.init(MS_PARAMS)
  per_batch = [plain_step(g, s1)[0] for g in batches[:k]]
  first, _ = plain_step(mean_tree(batches[:k]), s1)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(mean_tree(per_batch)), jax.tree.leaves(first)))
  assert diff > 1e-3


def test_multi_steps_in_scan_with_chain():
  k, lr = 2, 0.1
  inner = optax.chain(po.pcgrad(1), optax.sgd(lr))
  tx = po.multi_steps(inner, k, num_tasks=T)
  batches = micro_batches(4, seed=1)
  stacked_batches = jax.tree.map(lambda *xs: np.stack(xs), *batches)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), u

  (final, state), updates = jax.jit(
      lambda c: jax.lax.scan(body, c, stacked_batches))(
          (MS_PARAMS, tx.init(MS_PARAMS)))
  plain = po.pcgrad(1)
  plain_step = jax.jit(lambda g, s: plain.update(g, s, MS_PARAMS))
  ps = plain.init(MS_PARAMS)
  params = MS_PARAMS
  for n in range(4):
    u = jax.tree.map(lambda x: x[n], updates)
    if n % k < k - 1:
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
    else:
      surg, ps = plain_step(mean_tree(batches[n - k + 1:n + 1]), ps)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(surg)):
        np.testing.assert_allclose(a, -lr * np.asarray(b), rtol=1e-5,
                                   atol=1e-6)
      params = jax.tree.map(
          lambda p, s: np.asarray(p) - lr * np.asarray(s), params, surg)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(state.mini_step) == 0


def test_multi_steps_every_one_is_inner():
  tx = po.multi_steps(po.pcgrad(4), 1, num_tasks=T)
  plain = po.pcgrad(4)
  s, ps = tx.init(MS_PARAMS), plain.init(MS_PARAMS)
  both = jax.jit(lambda g, s, ps: (tx.update(g, s, MS_PARAMS),
                                   plain.update(g, ps, MS_PARAMS)))
  for g in micro_batches(2, seed=2):
    (out, s), (ref, ps) = both(g, s, ps)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"num_tasks": 0}, {"num_tasks": -2},
                                    {"num_tasks": 2.0},
                                    {"num_tasks": 2, "every_k": 0},
                                    {"num_tasks": 2, "every_k": 1.5}],
                         ids=["zero", "negative", "float", "k0", "kfloat"])
def test_multi_steps_bad_construction(kwargs):
  kwargs = {"every_k": 2} | kwargs
  with pytest.raises(ValueError, match="every_k|num_tasks"):
    po.multi_steps(po.pcgrad(), **kwargs)


@pytest.mark.parametrize("declared", (1, 2, 4))
def test_multi_steps_num_tasks_mismatch(declared):
  # T = 3 gradients into an accumulator allocated for `declared` tasks: a
  # ValueError at trace time naming the leaf and both shapes (never a silent
  # broadcast of a (1, ...) accumulator).
  tx = po.multi_steps(po.pcgrad(), 2, num_tasks=declared)
  g = micro_batches(1)[0]
  with pytest.raises(ValueError, match="num_tasks") as err:
    jax.eval_shape(lambda g, s: tx.update(g, s, MS_PARAMS), g,
                   tx.init(MS_PARAMS))
  assert "(3, 2, 3)" in str(err.value) or "(3, 4)" in str(err.value)
  assert f"({declared}," in str(err.value)


def test_multi_steps_structure_mismatch():
  tx = po.multi_steps(po.pcgrad(), 2, num_tasks=T)
  g = micro_batches(1)[0]
  with pytest.raises(ValueError, match="multi_steps"):
    jax.eval_shape(lambda g, s: tx.update({"a": g["a"]}, s, MS_PARAMS), g,
                   tx.init(MS_PARAMS))
