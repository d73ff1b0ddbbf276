"""The search phase of pcgrad_optax.recon: layer cosines, conflict scores.

pairwise_cosines, track_conflicts and select_layers. References are written
here from the Recon paper's definitions, in float64 NumPy: a layer's gradient
is its leaves' gradients concatenated; the S-conflict score counts (step,
pair i<j) entries with cosine strictly below S.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pcgrad_optax
from pcgrad_optax import recon
from recon_trees import params_like


# ----------------------------------------------------------------------------
# Independent NumPy references.


def np_leaves(tree, prefix=()):
  """(path tuple, array) pairs of a nested dict, keys sorted (jax's order)."""
  out = []
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, dict):
      out += np_leaves(v, prefix + (k,))
    else:
      out.append((prefix + (k,), np.asarray(v, np.float64)))
  return out


def np_layer_vectors(stacked, layer_of):
  """layer -> (T, P_layer) float64 matrix of concatenated task gradients."""
  groups = collections.OrderedDict()
  for path, x in np_leaves(stacked):
    layer = layer_of(path)
    if layer is None:
      continue
    groups.setdefault(layer, []).append(x.reshape(x.shape[0], -1))
  return collections.OrderedDict(
      (k, np.concatenate(v, axis=1)) for k, v in groups.items())


def np_cosines(g):
  t = g.shape[0]
  norms = np.linalg.norm(g, axis=1)
  cos = np.zeros((t, t))
  for i in range(t):
    for j in range(t):
      if norms[i] > 0 and norms[j] > 0:
        cos[i, j] = g[i] @ g[j] / (norms[i] * norms[j])
  return cos


def np_conflicts(g, threshold):
  t = g.shape[0]
  norms = np.linalg.norm(g, axis=1)
  cos = np_cosines(g)
  return sum(1 for i in range(t) for j in range(i + 1, t)
             if norms[i] > 0 and norms[j] > 0 and cos[i, j] < threshold)


def module_of(path):
  return "/".join(path[:-1]) or "<root>"


def random_stacked(t, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((t,) + p.shape), dtype),
      params_like())


# ----------------------------------------------------------------------------
# pairwise_cosines.


GROUPINGS = {
    "module": (None, module_of),
    "leaf": ("leaf", lambda path: "/".join(path)),
    "callable": (lambda n: None if n.startswith("head") else "trunk",
                 lambda path: None if path[0] == "head" else "trunk"),
    "mapping": ({"Dense_0/bias": "biases", "LayerNorm_0/bias": "biases",
                 "head": None},
                lambda path: ("biases" if path in (("Dense_0", "bias"), (
                    "LayerNorm_0", "bias")) else None if path == ("head",)
                              else module_of(path))),
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_pairwise_cosines_matches_numpy(grouping):
  layers, layer_of = GROUPINGS[grouping]
  g = random_stacked(3, seed=1)
  # a task with a zero gradient in one layer, and a pair of opposite ones
  g["Dense_0"]["kernel"] = g["Dense_0"]["kernel"].at[1].set(0.0)
  g["Dense_0"]["bias"] = g["Dense_0"]["bias"].at[1].set(0.0)
  g["LayerNorm_0"] = jax.tree.map(lambda x: x.at[2].set(-x[0]),
                                  g["LayerNorm_0"])
  got = recon.pairwise_cosines(g, layers=layers)
  ref = np_layer_vectors(jax.tree.map(np.asarray, g), layer_of)
  # first appearance in flatten order = network order
  assert list(got) == list(ref)
  for name, vec in ref.items():
    np.testing.assert_allclose(got[name], np_cosines(vec), atol=2e-6)
  if grouping == "module":
    np.testing.assert_array_equal(got["Dense_0"][1], 0.0)
    np.testing.assert_allclose(got["LayerNorm_0"][0, 2], -1.0, atol=1e-6)


def test_pairwise_cosines_shared_mask_and_jit():
  g = random_stacked(2, seed=2)
  mask = {"encoder": True, "Dense_0": True, "LayerNorm_0": False,
          "head": False}
  got = jax.jit(lambda g: recon.pairwise_cosines(g, shared=mask))(g)
  assert list(got) == ["Dense_0", "encoder/Conv_1"]
  ref = np_layer_vectors(jax.tree.map(np.asarray, g), module_of)
  np.testing.assert_allclose(got["Dense_0"], np_cosines(ref["Dense_0"]),
                             atol=2e-6)


def test_pairwise_cosines_scale_and_dtype():
  g = random_stacked(2, seed=3)
  scaled = jax.tree.map(lambda x: x * jnp.array([1e-6, 1e6]).reshape(
      (2,) + (1,) * (x.ndim - 1)), g)
  a, b = recon.pairwise_cosines(g), recon.pairwise_cosines(scaled)
  for name in a:
    np.testing.assert_allclose(a[name], b[name], atol=1e-5)
  low = recon.pairwise_cosines(jax.tree.map(
      lambda x: x.astype(jnp.bfloat16), g))
  for name in a:
    assert low[name].dtype == jnp.float32
    np.testing.assert_allclose(low[name], a[name], atol=0.03)


@jax.jit
def _cosines_scaled_flipped(g, scales):
  t = scales.shape[0]
  return (recon.pairwise_cosines(g),
          recon.pairwise_cosines(jax.tree.map(
              lambda x: x * scales.reshape((t,) + (1,) * (x.ndim - 1)), g)),
          recon.pairwise_cosines(jax.tree.map(
              lambda x: x.at[0].multiply(-1.0), g)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(1, 4),
       log_scales=st.lists(st.floats(-3, 3), min_size=4, max_size=4))
def test_pairwise_cosines_properties(seed, t, log_scales):
  g = random_stacked(t, seed=seed)
  scales = jnp.asarray(10.0 ** np.array(log_scales[:t]), jnp.float32)
  cos, scaled, flipped = _cosines_scaled_flipped(g, scales)
  sign = np.ones(t)
  sign[0] = -1
  for name, c in cos.items():
    c = np.asarray(c)
    np.testing.assert_allclose(c, c.T, atol=1e-6)
    assert np.all(np.abs(c) <= 1.0)
    np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-6)
    np.testing.assert_allclose(scaled[name], c, atol=1e-4)
    expect = c * np.outer(sign, sign)
    np.fill_diagonal(expect, 1.0)
    np.testing.assert_allclose(flipped[name], expect, atol=1e-5)


# ----------------------------------------------------------------------------
# track_conflicts.


THRESHOLDS = (-0.1, 0.0, 0.3)


def test_track_conflicts_matches_numpy():
  t, steps = 3, 6
  grads = [random_stacked(t, seed=s) for s in range(steps)]
  # a zero task gradient (never counts), opposite and identical gradients
  grads[1]["Dense_0"] = jax.tree.map(lambda x: x.at[0].set(0.0),
                                     grads[1]["Dense_0"])
  grads[2]["LayerNorm_0"] = jax.tree.map(lambda x: x.at[1].set(-x[0]),
                                         grads[2]["LayerNorm_0"])
  grads[3]["encoder"] = jax.tree.map(lambda x: x.at[2].set(x[0]),
                                     grads[3]["encoder"])
  mask = lambda p: {k: k != "head" for k in p}
  # one tracker per threshold, chained (each passes the gradients on)
  txs = [recon.track_conflicts(s, shared=mask) for s in THRESHOLDS]
  tx = optax.chain(*txs)
  params = params_like()
  state = tx.init(params)
  assert all(isinstance(s, recon.ConflictState) for s in state)
  assert list(state[0].scores) == ["Dense_0", "LayerNorm_0",
                                   "encoder/Conv_1"]

  def body(state, g):
    out, state = tx.update(g, state, params)
    return state, out

  stacked_steps = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  state, outs = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(
      state, stacked_steps)
  # the updates pass through unchanged
  for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(stacked_steps)):
    np.testing.assert_array_equal(a, b)
  for threshold, s in zip(THRESHOLDS, state):
    expect = collections.Counter()
    for g in grads:
      vecs = np_layer_vectors(
          jax.tree.map(np.asarray, g),
          lambda p: None if p[0] == "head" else module_of(p))
      for name, v in vecs.items():
        expect[name] += np_conflicts(v, threshold)
    assert {k: int(v) for k, v in s.scores.items()} == {
        k: expect[k] for k in s.scores}, threshold
    assert int(s.count) == steps
    assert all(v.dtype == jnp.int32 for v in s.scores.values())
    # the network order survives jit and scan
    assert list(s.scores) == ["Dense_0", "LayerNorm_0", "encoder/Conv_1"]
  # optax.tree_utils.tree_get finds the scores inside a chain
  assert list(optax.tree_utils.tree_get(
      (optax.EmptyState(), state[1]), "scores")) == list(state[1].scores)


def test_track_conflicts_single_task_zero_and_chain():
  params = params_like()
  tx = recon.track_conflicts(0.5)
  state = tx.init(params)
  _, state = tx.update(random_stacked(1), state, params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, random_stacked(3)),
                       state, params)
  assert all(int(v) == 0 for v in state.scores.values())
  assert int(state.count) == 2
  # before an aggregator in a chain: the aggregator sees the same gradients
  g = random_stacked(2)
  chained = optax.chain(recon.track_conflicts(), pcgrad_optax.pcgrad())
  alone = pcgrad_optax.pcgrad()
  a, b = jax.jit(lambda g: (chained.update(g, chained.init(params), params)[0],
                            alone.update(g, alone.init(params), params)[0]))(g)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_track_conflicts_bad_inputs():
  params = params_like()
  with pytest.raises(ValueError, match="threshold"):
    recon.track_conflicts(float("nan"))
  with pytest.raises(ValueError, match="threshold"):
    recon.track_conflicts("low")
  with pytest.raises(ValueError, match="layers"):
    recon.track_conflicts(layers="module_or_leaf")
  with pytest.raises(ValueError, match="unknown leaf name.*nope"):
    recon.track_conflicts(layers={"nope": "x"}).init(params)
  tx = recon.track_conflicts()
  state = tx.init(params)
  g = random_stacked(3)
  with pytest.raises(ValueError, match="head"):
    tx.update(dict(g, head=g["head"][:2]), state, params)
  with pytest.raises(ValueError, match="differ from the layers named at init"):
    tx.update({k: v for k, v in g.items() if k != "head"}, state)
  with pytest.raises(ValueError, match="head"):
    jax.jit(lambda g, s: tx.update(g, s, params))(
        dict(g, head=jnp.zeros((4, 2))), state)


# ----------------------------------------------------------------------------
# select_layers.


def test_select_layers_order_ties_and_fraction():
  scores = collections.OrderedDict(
      [("z", 5), ("a", 2), ("m", 5), ("b", 0), ("c", 2)])
  assert recon.select_layers(scores, 3) == ["z", "m", "a"]
  assert recon.select_layers(scores, 0) == []
  assert recon.select_layers(scores, 5) == ["z", "m", "a", "c", "b"]
  assert recon.select_layers(scores, 0.4) == ["z", "m"]
  assert recon.select_layers(scores, 0.5) == ["z", "m", "a"]  # ceil(2.5)
  assert recon.select_layers(scores, 1.0) == ["z", "m", "a", "c", "b"]
  assert recon.select_layers(scores, 0.6) == ["z", "m", "a"]  # not 4
  jax_scores = collections.OrderedDict(
      (k, jnp.asarray(v, jnp.int32)) for k, v in scores.items())
  assert recon.select_layers(jax_scores, 2) == ["z", "m"]
  state = recon.ConflictState(jax_scores, jnp.asarray(1))
  assert recon.select_layers(state, 1) == ["z"]
  # ties follow the params' flatten order (tracked scores keep it)
  params = {"L1": {"w": jnp.zeros(2)}, "L0": {"w": jnp.zeros(2)}}
  tx = recon.track_conflicts()
  s = tx.init(params)
  assert recon.select_layers(s.scores, 2) == ["L0", "L1"]


@pytest.mark.parametrize("k, match", [
    (6, "k=6 is larger than the number of layers \\(5\\)"),
    (-1, "k=-1"), (0.0, "fraction"), (1.5, "fraction"), (True, "`k`"),
    ("2", "`k`")])
def test_select_layers_bad_k(k, match):
  scores = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
  with pytest.raises(ValueError, match=match):
    recon.select_layers(scores, k)


def test_select_layers_bad_scores():
  with pytest.raises(ValueError, match="scores"):
    recon.select_layers({}, 1)
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda v: jnp.asarray(len(recon.select_layers({"a": v}, 1))))(
        jnp.ones(()))


def test_track_conflicts_state_through_flax_serialization():
  # The OrderedDict of scores saves and restores with flax.serialization,
  # in a chain with Adam, the layers' order and values kept.
  from flax import serialization
  params = params_like()
  tx = optax.chain(recon.track_conflicts(0.0), pcgrad_optax.pcgrad(),
                   optax.adam(1e-3))
  state = tx.init(params)
  for seed in range(2):
    _, state = tx.update(random_stacked(3, seed=seed), state, params)
  restored = serialization.from_bytes(tx.init(params),
                                      serialization.to_bytes(state))
  assert list(restored[0].scores) == list(state[0].scores)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  other = recon.track_conflicts().init({"x": {"kernel": jnp.zeros(2)}})
  with pytest.raises(ValueError, match="other layers"):
    serialization.from_state_dict(other, serialization.to_state_dict(
        state[0]))
