"""gram_matrix / weighted_sum against float64 NumPy, dtypes, and bad inputs.

Every bad input must be a ValueError raised while tracing (checked with
``jax.eval_shape`` or ``jax.jit``, where nothing runs) that names the
offending leaf or argument and its shape.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po

PARAMS = {"trunk": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
          "head": jnp.zeros((4, 2))}


def stacked(t, seed=0, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(np.asarray(
          scale * rng.standard_normal((t,) + p.shape), dtype)), PARAMS)


def flat64(tree, leaves_filter=None):
  leaves = jax.tree.leaves(tree)
  t = leaves[0].shape[0]
  return np.concatenate(
      [np.asarray(x, np.float64).reshape(t, -1)
       for i, x in enumerate(leaves)
       if leaves_filter is None or leaves_filter[i]], axis=1)


# Leaf order of PARAMS: head, trunk/bias, trunk/kernel.
assert [jax.tree_util.keystr(p) for p, _ in
        jax.tree_util.tree_flatten_with_path(PARAMS)[0]] == [
            "['head']", "['trunk']['bias']", "['trunk']['kernel']"]


# ---------------------------------------------------------------------------
# gram_matrix


@pytest.mark.parametrize("t", (1, 2, 5))
def test_gram_matrix_matches_numpy(t):
  grads = stacked(t, seed=t, scale=3.0)
  g = flat64(grads)
  gram = jax.jit(po.gram_matrix)(grads)
  assert gram.shape == (t, t) and gram.dtype == jnp.float32
  np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5,
                             atol=1e-6 * np.max(np.sum(g * g, axis=1)))
  np.testing.assert_array_equal(gram, np.asarray(gram).T)


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


def test_gram_matrix_shared_masks():
  grads = stacked(3, seed=1)
  trunk = flat64(grads, [False, True, True])
  kernel = flat64(grads, [False, False, True])
  cases = [
      ({"trunk": True, "head": False}, trunk),
      ({"trunk": {"kernel": True, "bias": True}, "head": False}, trunk),
      (lambda p: {"trunk": {"kernel": p["trunk"]["kernel"].ndim == 2,
                            "bias": False}, "head": False}, kernel),
      (True, flat64(grads)),
      (False, np.zeros((3, 0))),
      ({"trunk": False, "head": False}, np.zeros((3, 0))),
  ]
  for mask, g in cases:
    gram = po.gram_matrix(grads, shared=mask)
    assert gram.dtype == jnp.float32
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-5, atol=1e-5)


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


def test_float64_under_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    grads = {"a": jnp.asarray(rng.standard_normal((3, 5, 2))),
             "b": jnp.asarray(rng.standard_normal((3, 4)))}
    assert grads["a"].dtype == jnp.float64
    g = flat64(grads)
    weights = jnp.asarray([0.3, -1.0, 2.0])
    tx = po.pcgrad(0)

    @jax.jit
    def everything(grads, weights, state):
      gram = po.gram_matrix(grads)
      w = po.weighting.pcgrad(
          gram, key=jax.random.fold_in(jax.random.key(0), 0))
      return (gram, po.weighted_sum(grads, weights),
              tx.update(grads, state)[0], w)

    gram, out, upd, w = everything(grads, weights, tx.init(None))
    assert gram.dtype == jnp.float64
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-13, atol=1e-13)
    assert out["a"].dtype == jnp.float64
    np.testing.assert_allclose(
        out["b"], np.asarray(weights) @ np.asarray(grads["b"]), rtol=1e-13)
    # The transform keeps float64 end to end.
    assert upd["a"].dtype == jnp.float64 and upd["b"].dtype == jnp.float64
    assert w.dtype == jnp.float64
    np.testing.assert_allclose(upd["b"], np.asarray(w) @ np.asarray(
        grads["b"]), rtol=1e-12)
  assert jnp.asarray(1.0).dtype == jnp.float32   # x64 did not leak out


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


# ---------------------------------------------------------------------------
# Bad inputs: ValueError at trace time, naming the leaf and the shapes.


def traced(fn, *args):
  """Traces fn abstractly (nothing is run) and returns its output shapes."""
  return jax.eval_shape(fn, *args)


def pcgrad_update(grads, params=None, **kwargs):
  tx = po.pcgrad(**kwargs)
  return tx.update(grads, tx.init(PARAMS), params)


def has_all(*parts):
  return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


def test_task_axes_disagree():
  grads = stacked(3)
  bad = dict(grads, head=grads["head"][:2])
  msg = has_all("head", "(2, 4, 2)", "(3, 4)")
  for params in (None, PARAMS):
    with pytest.raises(ValueError, match=has_all("head", "(2, 4, 2)")):
      traced(lambda g: pcgrad_update(g, params), bad)
  with pytest.raises(ValueError, match=msg):
    traced(po.gram_matrix, bad)
  with pytest.raises(ValueError, match=msg):
    traced(lambda g: po.weighted_sum(g, jnp.ones(3)), bad)
  with pytest.raises(ValueError, match=msg):    # also under jit
    jax.jit(po.gram_matrix)(bad)


def test_leaf_without_task_axis():
  grads = stacked(3)
  no_axis = dict(grads, head=jnp.zeros((4, 2)))
  # With params: the leaf's shape equals its param's.
  with pytest.raises(ValueError,
                     match=has_all("head", "(4, 2)", "param", "task axis")):
    traced(lambda g: pcgrad_update(g, PARAMS), no_axis)
  # Without params: its leading axis disagrees with the others'.
  with pytest.raises(ValueError, match=has_all("head", "(4, 2)", "(3, 4)")):
    traced(lambda g: pcgrad_update(g), no_axis)
  # A scalar leaf has no task axis at all.
  with pytest.raises(ValueError, match=has_all("bias", "()")):
    traced(po.gram_matrix, dict(grads, bias=jnp.zeros(())))
  # With params, a leaf whose trailing shape is not the param's.
  wrong = dict(grads, head=jnp.zeros((3, 2, 4)))
  with pytest.raises(ValueError, match=has_all("head", "(3, 2, 4)",
                                               "(3, 4, 2)")):
    traced(lambda g: pcgrad_update(g, PARAMS), wrong)


def test_structure_and_dtype_errors():
  grads = stacked(3)
  with pytest.raises(ValueError, match="structure"):
    traced(lambda g: pcgrad_update(g, {"trunk": PARAMS["trunk"]}), grads)
  with pytest.raises(ValueError, match=has_all("head", "int32")):
    traced(po.gram_matrix, dict(grads, head=jnp.zeros((3, 4, 2), jnp.int32)))
  with pytest.raises(ValueError, match="no leaves"):
    traced(po.gram_matrix, {})


@pytest.mark.parametrize("mask", [
    {"trunk": True},
    {"trunk": True, "head": False, "extra": True},
    {"trunk": {"kernel": True}, "head": False},
    [True, False],
], ids=["missing", "extra", "inner_missing", "list"])
def test_mask_structure_mismatch(mask):
  grads = stacked(3)
  for fn in (lambda g: pcgrad_update(g, PARAMS, shared=mask),
             lambda g: pcgrad_update(g, None, shared=mask),
             lambda g: po.gram_matrix(g, shared=mask)):
    with pytest.raises(ValueError, match=has_all("mask", "structure")):
      traced(fn, grads)


@pytest.mark.parametrize("leaf", [1, 1.0, "yes", None, jnp.array(True),
                                  np.array([True, False])],
                         ids=["int", "float", "str", "none", "jax_bool",
                              "np_vector"])
def test_non_bool_mask_leaf(leaf):
  mask = {"trunk": leaf, "head": False}
  grads = stacked(3)
  with pytest.raises(ValueError, match=has_all("mask", "trunk")):
    traced(lambda g: pcgrad_update(g, PARAMS, shared=mask), grads)
  with pytest.raises(ValueError, match=has_all("mask", "trunk")):
    traced(lambda g: po.gram_matrix(g, shared=lambda p: mask), grads)


def test_traced_mask_leaf_rejected():
  grads = stacked(3)

  def fn(g, flag):
    return po.gram_matrix(g, shared={"trunk": flag, "head": False})

  with pytest.raises(ValueError, match=has_all("mask", "trunk")):
    traced(fn, grads, jnp.array(True))


def test_unknown_reduction():
  with pytest.raises(ValueError, match=has_all("median", "reduction")):
    po.pcgrad(reduction="median")


@pytest.mark.parametrize("shape", [(4,), (2,), (3, 1), ()])
def test_weights_wrong_shape(shape):
  grads = stacked(3)
  with pytest.raises(ValueError,
                     match=has_all("weights", "(3,)", str(shape))):
    traced(lambda g: po.weighted_sum(g, jnp.ones(shape)), grads)


@pytest.mark.parametrize("order", [np.zeros((3, 2), np.int32),
                                   np.zeros((3,), np.int32),
                                   np.zeros((2, 3), np.int32),
                                   np.zeros((3, 3), np.float32)],
                         ids=["3x2", "3", "2x3", "float"])
def test_order_wrong_shape(order):
  gram = jnp.eye(3)
  with pytest.raises(ValueError, match=has_all("order", "(3, 3)",
                                               str(order.shape))):
    traced(lambda k: po.weighting.pcgrad(k, order=jnp.asarray(order)), gram)


@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 2, 2)])
def test_gram_not_square(shape):
  with pytest.raises(ValueError, match=has_all("square", str(shape))):
    traced(lambda k: po.weighting.pcgrad(k, key=jax.random.key(0)),
           jnp.zeros(shape))


def test_weighting_needs_key_or_order():
  with pytest.raises(ValueError, match="key"):
    po.weighting.pcgrad(jnp.eye(2))


def test_plain_dict_mask_for_nnx_state():
  # An nnx.State is its own pytree node type: a plain nested dict mask with
  # the same keys is matched by key paths (each entry covers its subtree).
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.trunk = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

  _, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.stack([p, -2 * p, p + 1]), params)
  state_mask = jax.tree.map(lambda _: True, params)
  state_mask["head"] = jax.tree.map(lambda _: False, params["head"])
  expected = po.gram_matrix(grads, shared=state_mask)
  for mask in ({"trunk": True, "head": False},
               {"trunk": {"kernel": True, "bias": True}, "head": False}):
    np.testing.assert_allclose(po.gram_matrix(grads, shared=mask), expected)
    tx = po.pcgrad(0, shared=mask)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"][...],
                               grads["head"]["kernel"][...].sum(0),
                               rtol=1e-6)
  for bad in ({"trunk": True}, {"trunk": True, "head": False, "x": True},
              {"trunk": {"kernel": True}, "head": False}):
    with pytest.raises(ValueError, match=has_all("mask", "structure")):
      po.gram_matrix(grads, shared=bad)


def test_random_orders_are_uniform_permutations():
  # 2000 draws of T = 4: every row a permutation of range(4), and each task
  # in each position with frequency 1/4 (binomial sd ~0.0097; 5 sd bound).
  keys = jax.random.split(jax.random.key(0), 500)
  orders = np.asarray(jax.vmap(
      lambda k: po.weighting.random_orders(k, 4))(keys)).reshape(-1, 4)
  np.testing.assert_array_equal(np.sort(orders, axis=1),
                                np.tile(np.arange(4), (len(orders), 1)))
  freq = np.stack([(orders == v).mean(0) for v in range(4)])
  np.testing.assert_allclose(freq, 0.25, atol=0.05)
