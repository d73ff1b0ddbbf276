"""Tests of pcgrad_optax.recon (and the multi-digit data helper).

References are written here from the Recon paper's definitions, in float64
NumPy: a layer's gradient is its leaves' gradients concatenated; the
S-conflict score counts (step, pair i<j) entries with cosine strictly below S.
"""

import collections
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pcgrad_optax
from pcgrad_optax import datasets
from pcgrad_optax import recon


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


def params_like():
  return {
      "encoder": {"Conv_1": {"kernel": jnp.zeros((2, 2, 1, 3)),
                             "bias": jnp.zeros(3)}},
      "Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      "LayerNorm_0": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
      "head": jnp.zeros((4, 2)),
  }


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


def test_layer_names_linen_nnx_and_plain():
  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.LayerNorm()(nn.Dense(4)(x))
      return nn.Dense(2, name="head")(x)

  # names depend only on the structure: no need to run the init
  params = jax.eval_shape(Linen().init, jax.random.key(0),
                          jnp.ones((1, 3)))["params"]
  assert recon.layer_names(params) == ["Dense_0", "LayerNorm_0", "head"]

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])
      self.norm = nnx.LayerNorm(3, rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

  _, state = nnx.split(nnx.eval_shape(lambda: NNX(nnx.Rngs(0))), nnx.Param)
  assert recon.layer_names(state) == ["head", "layers/0", "layers/1", "norm"]
  assert recon.layer_names(state, layers="leaf")[:2] == ["head/bias",
                                                         "head/kernel"]
  assert recon.layer_names(jnp.ones(3)) == ["<root>"]
  assert recon.layer_names({"w": jnp.ones(3), "b": {"c": jnp.ones(2)}}) == [
      "b", "<root>"]
  assert recon.layer_names({"w": {"k": jnp.ones(3)},
                            "e": {"k": jnp.ones((0,))}}) == ["w"]


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


# ----------------------------------------------------------------------------
# branch, task_params, shared_mask.


def test_branch_shapes_and_values():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)),
                        params_like())
  params["LayerNorm_0"]["scale"] = params["LayerNorm_0"]["scale"].astype(
      jnp.bfloat16)
  b = recon.branch(params, ["LayerNorm_0", "encoder/Conv_1"], 3)
  assert jax.tree.structure(b) == jax.tree.structure(params)
  for name in ("scale", "bias"):
    leaf = b["LayerNorm_0"][name]
    assert leaf.shape == (3, 4)
    assert leaf.dtype == params["LayerNorm_0"][name].dtype
    for t in range(3):
      np.testing.assert_array_equal(leaf[t], params["LayerNorm_0"][name])
  assert b["encoder"]["Conv_1"]["kernel"].shape == (3, 2, 2, 1, 3)
  assert b["Dense_0"]["kernel"] is params["Dense_0"]["kernel"]
  assert b["head"] is params["head"]
  # per-leaf grouping branches one leaf only; a single name is accepted
  c = recon.branch(params, "Dense_0/bias", 2, grouping="leaf")
  assert c["Dense_0"]["bias"].shape == (2, 4)
  assert c["Dense_0"]["kernel"].shape == (3, 4)
  # task views give back the shared weights, shared mask marks copies
  view = recon.task_params(b, ["LayerNorm_0", "encoder/Conv_1"], 2)
  for x, y in zip(jax.tree.leaves(view), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  mask = recon.shared_mask(b, ["LayerNorm_0", "encoder/Conv_1"],
                           shared=lambda p: {k: k != "head" for k in p})
  assert mask == {"encoder": {"Conv_1": {"kernel": False, "bias": False}},
                  "Dense_0": {"kernel": True, "bias": True},
                  "LayerNorm_0": {"scale": False, "bias": False},
                  "head": False}


def test_branch_reinitialises_with_init():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="head")(nn.Dense(4)(x))

  x = jnp.ones((1, 3))
  init = jax.jit(lambda k: Net().init(k, x)["params"])
  params = init(jax.random.key(0))
  b = recon.branch(params, ["Dense_0"], 2, key=7, init=init)
  keys = jax.random.split(jax.random.key(7), 2)
  for t in range(2):
    np.testing.assert_allclose(b["Dense_0"]["kernel"][t],
                               init(keys[t])["Dense_0"]["kernel"], atol=1e-6)
  assert not np.allclose(b["Dense_0"]["kernel"][0], b["Dense_0"]["kernel"][1])
  np.testing.assert_array_equal(b["head"]["kernel"], params["head"]["kernel"])
  # NNX: init from a fresh module's state
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  _, state = nnx.split(model, nnx.Param)
  nb = recon.branch(state, ["<root>"], 3, key=1, init=lambda k: nnx.state(
      nnx.Linear(3, 2, rngs=nnx.Rngs(k)), nnx.Param))
  assert nb["kernel"].shape == (3, 3, 2)
  assert not np.allclose(nb["kernel"][0], nb["kernel"][1])


def test_branch_bad_inputs():
  params = params_like()
  with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['Dense_9'\]"):
    recon.branch(params, ["Dense_0", "Dense_9"], 2)
  with pytest.raises(ValueError, match="num_tasks"):
    recon.branch(params, ["Dense_0"], 0)
  with pytest.raises(ValueError, match="without `init`"):
    recon.branch(params, ["Dense_0"], 2, key=0)
  with pytest.raises(ValueError, match="needs a PRNG `key`"):
    recon.branch(params, ["Dense_0"], 2, init=lambda k: params)
  with pytest.raises(ValueError, match="structure differs"):
    recon.branch(params, ["Dense_0"], 2, key=0,
                 init=lambda k: {"Dense_0": params["Dense_0"]})
  wrong = lambda k: dict(params, Dense_0={"kernel": jnp.zeros((3, 5)),
                                          "bias": jnp.zeros(4)})
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    recon.branch(params, ["Dense_0"], 2, key=0, init=wrong)
  b = recon.branch(params, ["Dense_0", "LayerNorm_0"], 2)
  with pytest.raises(ValueError, match="Unknown layer name"):
    recon.task_params(b, ["Dense_1"], 0)
  with pytest.raises(ValueError, match="out of range"):
    recon.task_params(b, ["Dense_0"], 2)
  mismatched = dict(b, LayerNorm_0=jax.tree.map(lambda x: x[:1],
                                                b["LayerNorm_0"]))
  with pytest.raises(ValueError, match="LayerNorm_0/.*leading task axis"):
    recon.task_params(mismatched, ["Dense_0", "LayerNorm_0"], 0)
  with pytest.raises(ValueError, match="Dense_0/bias.*no leading task axis"):
    recon.task_params(dict(b, Dense_0={"bias": jnp.zeros(()),
                                       "kernel": b["Dense_0"]["kernel"]}),
                      ["Dense_0"], 0)
  with pytest.raises(ValueError, match="grouping"):
    recon.shared_mask(b, ["Dense_0"], grouping=3)


# ----------------------------------------------------------------------------
# Training a branched model.


class TinyLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.LayerNorm(name="b_norm")(nn.Dense(6, name="a_dense")(x)))
    h = nn.relu(nn.Dense(6, name="c_dense")(h))
    return jnp.stack([nn.Dense(1, name="head_0")(h)[:, 0],
                      nn.Dense(1, name="head_1")(h)[:, 0]])


def tiny_linen_init(key, x):
  return TinyLinen().init(key, x)["params"]


def regression_data():
  # NumPy-made: eager jnp ops would each compile on first use
  x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
  y = np.stack([np.sin(2 * x[:, 0]), x[:, 1] * x[:, 2] - x[:, 0]])
  return jnp.asarray(x), jnp.asarray(y)


@functools.lru_cache(maxsize=1)
def linen_problem():
  x, y = regression_data()
  net = TinyLinen()
  params = jax.jit(tiny_linen_init)(jax.random.key(1), x)

  def task_loss(p, t, x, y):
    return jnp.mean((net.apply({"params": p}, x)[t] - y[t]) ** 2)

  return params, task_loss, x, y


HEADS = lambda p: {k: not k.startswith("head") for k in p}


def test_branched_gradients_reach_only_their_own_copy():
  params, task_loss, x, y = linen_problem()
  chosen = ["b_norm", "c_dense"]
  b = recon.branch(params, chosen, 2, key=3,
                   init=lambda k: tiny_linen_init(k, x))
  simple = pcgrad_optax.pcgrad(shared=recon.shared_mask(b, chosen,
                                                        shared=HEADS))
  wrapped = recon.with_branches(pcgrad_optax.pcgrad(shared=HEADS), chosen)
  mean = recon.with_branches(
      pcgrad_optax.pcgrad(shared=HEADS, reduction="mean"), chosen,
      reduction="mean")

  @jax.jit
  def compute(b):
    # simple path: standard stacked layout, (T, T, ...) blocks for copies
    losses_fn = recon.task_losses(task_loss, chosen, 2)
    losses, stacked = pcgrad_optax.task_value_and_grad(losses_fn)(b, x, y)
    # lean path
    lean_losses, lean = recon.value_and_grad(task_loss, chosen, 2)(b, x, y)
    # references: task t's loss and gradient on the ordinary params of its
    # own view, computed without any of the machinery above
    views = [recon.task_params(b, chosen, t) for t in range(2)]
    ref_losses = jnp.stack([task_loss(v, t, x, y)
                            for t, v in enumerate(views)])
    refs = [jax.grad(task_loss)(v, t, x, y) for t, v in enumerate(views)]
    u_simple, _ = simple.update(stacked, simple.init(b), b)
    u_wrapped, _ = wrapped.update(lean, wrapped.init(b), b)
    u_mean, _ = mean.update(lean, mean.init(b), b)
    return dict(losses=losses, stacked=stacked, lean_losses=lean_losses,
                lean=lean, ref_losses=ref_losses, refs=refs,
                u_simple=u_simple, u_wrapped=u_wrapped, u_mean=u_mean)

  r = jax.tree.map(np.asarray, compute(b))
  np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-6)
  np.testing.assert_allclose(r["lean_losses"], r["ref_losses"], rtol=1e-6)
  stacked, lean = r["stacked"], r["lean"]
  for t in range(2):
    ref = r["refs"][t]
    for name in chosen:
      for leaf in ref[name]:
        s = stacked[name][leaf]
        assert s.shape == (2,) + b[name][leaf].shape
        np.testing.assert_allclose(s[t, t], ref[name][leaf], atol=1e-6)
        np.testing.assert_array_equal(s[t, 1 - t], 0.0)   # other copy
        assert lean[name][leaf].shape == b[name][leaf].shape
        np.testing.assert_allclose(lean[name][leaf][t], ref[name][leaf],
                                   atol=1e-6)
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(stacked["a_dense"][leaf][t],
                                 ref["a_dense"][leaf], atol=1e-6)
      np.testing.assert_allclose(lean["a_dense"][leaf][t],
                                 ref["a_dense"][leaf], atol=1e-6)
  # the two paths give the same PCGrad update; copies get their own grads
  for a, c in zip(jax.tree.leaves(r["u_simple"]),
                  jax.tree.leaves(r["u_wrapped"])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  for name in chosen:
    for leaf in b[name]:
      np.testing.assert_allclose(r["u_wrapped"][name][leaf],
                                 lean[name][leaf])
  # mean reduction divides the copies' grads by T, as for the heads
  np.testing.assert_allclose(r["u_mean"]["c_dense"]["kernel"],
                             lean["c_dense"]["kernel"] / 2, rtol=1e-6)
  np.testing.assert_allclose(r["u_mean"]["head_0"]["kernel"],
                             lean["head_0"]["kernel"].mean(0), rtol=1e-6)


def test_branched_training_bad_inputs():
  params, task_loss, x, y = linen_problem()
  b = recon.branch(params, ["c_dense"], 2)
  with pytest.raises(ValueError, match="c_dense/.*num_tasks=3"):
    recon.value_and_grad(task_loss, ["c_dense"], 3)(b, x, y)
  with pytest.raises(ValueError, match="scalar"):
    recon.task_losses(lambda p, t, x, y: x[:, 0], ["c_dense"], 2)(b, x, y)
  with pytest.raises(ValueError, match="Unknown layer name"):
    recon.value_and_grad(task_loss, ["d_dense"], 2)(b, x, y)
  # the errors come from shapes alone: zeros in the lean layout will do
  lean = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      recon.value_and_grad(task_loss, ["c_dense"], 2), b, x, y)[1])
  tx = recon.with_branches(pcgrad_optax.pcgrad(shared=HEADS), ["c_dense"])
  state = tx.init(b)
  stacked_copy = dict(lean, c_dense=jax.tree.map(
      lambda g: jnp.stack([g, g]), lean["c_dense"]))
  with pytest.raises(ValueError, match="c_dense/.*param's shape"):
    tx.update(stacked_copy, state, b)
  with pytest.raises(ValueError, match="a_dense"):
    tx.update(dict(lean, a_dense=jax.tree.map(lambda g: g[:1],
                                              lean["a_dense"])), state, b)
  with pytest.raises(ValueError, match="reduction"):
    recon.with_branches(pcgrad_optax.pcgrad(), ["c_dense"], reduction="max")


def _fit(params, grad_fn, tx, args, steps):
  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      losses, grads = grad_fn(params, *args)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), losses.sum()
    (params, state), losses = jax.lax.scan(step, (params, tx.init(params)),
                                           None, length=steps)
    return params, state, losses

  return run(params)


def test_search_branch_retrain_linen():
  params, task_loss, x, y = linen_problem()
  # 1. search with joint-style PCGrad training, scores on shared layers
  tx = optax.chain(recon.track_conflicts(0.0, shared=HEADS),
                   pcgrad_optax.pcgrad(shared=HEADS), optax.adam(1e-2))
  grad_fn = recon.value_and_grad(task_loss, [], 2)
  params, state, _ = _fit(params, grad_fn, tx, (x, y), 40)
  scores = state[0].scores
  assert list(scores) == ["a_dense", "b_norm", "c_dense"]
  assert int(state[0].count) == 40
  # 2. branch the top-2 layers, fresh copies
  chosen = recon.select_layers(scores, 2)
  assert len(chosen) == 2 and set(chosen) <= set(scores)
  b = recon.branch(params, chosen, 2, key=0,
                   init=lambda k: tiny_linen_init(k, x))
  # 3. retrain; the conflict tracker now sees only the remaining layers
  mask = recon.shared_mask(b, chosen, shared=HEADS)
  tx = optax.chain(
      recon.with_branches(optax.chain(
          recon.track_conflicts(shared=mask),
          pcgrad_optax.pcgrad(shared=HEADS)), chosen), optax.adam(1e-2))
  b, state, losses = _fit(b, recon.value_and_grad(task_loss, chosen, 2), tx,
                          (x, y), 60)
  assert list(state[0][0].scores) == [n for n in scores if n not in chosen]
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.7 * losses[:5].mean()


class TinyNNX(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 6, rngs=rngs)
    self.head_0 = nnx.Linear(6, 1, rngs=rngs)
    self.head_1 = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.out(nnx.relu(self.norm(self.dense(x)))))
    return jnp.stack([self.head_0(h)[:, 0], self.head_1(h)[:, 0]])


def test_search_branch_retrain_nnx():
  x, y = regression_data()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TinyNNX(nnx.Rngs(0))))
  state = jax.jit(lambda k: nnx.state(TinyNNX(nnx.Rngs(k)), nnx.Param))(
      jax.random.key(0))

  def task_loss(s, t, x, y):
    return jnp.mean((nnx.merge(graphdef, s)(x)[t] - y[t]) ** 2)

  # an NNX state's mask must be a State (a plain dict is not its prefix)
  heads = lambda s: nnx.State({k: not k.startswith("head") for k in s})
  # simple path for the search: standard stacked gradients
  tx = optax.chain(recon.track_conflicts(shared=heads),
                   pcgrad_optax.pcgrad(shared=heads), optax.adam(1e-2))
  grad_fn = pcgrad_optax.task_value_and_grad(
      recon.task_losses(task_loss, [], 2))
  state, opt_state, _ = _fit(state, grad_fn, tx, (x, y), 30)
  scores = opt_state[0].scores
  assert list(scores) == ["dense", "norm", "out"]
  chosen = recon.select_layers(scores, 1)
  b = recon.branch(state, chosen, 2)
  leaf = jax.tree.leaves(b[chosen[0]])[0]
  assert leaf.shape[0] == 2
  # simple path for retraining too: the shared mask makes copies task-specific
  mask = recon.shared_mask(b, chosen, shared=heads)
  tx = optax.chain(pcgrad_optax.pcgrad(shared=mask), optax.adam(1e-2))
  grad_fn = pcgrad_optax.task_value_and_grad(
      recon.task_losses(task_loss, chosen, 2))
  b2, _, losses = _fit(b, grad_fn, tx, (x, y), 40)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()
  # the copies moved apart (each follows its own task)
  copies = jax.tree.leaves(b2[chosen[0]])[0]
  assert not np.allclose(copies[0], copies[1])
  # a task's view merges back into a working module
  out = nnx.merge(graphdef, recon.task_params(b2, chosen, 1))(x)
  assert out.shape == (2, 32)


# ----------------------------------------------------------------------------
# The multi-digit data set.


def test_multi_digits_deterministic_and_well_formed():
  a = datasets.multi_digits(64, 32, seed=3)
  b = datasets.multi_digits(64, 32, seed=3)
  c = datasets.multi_digits(64, 32, seed=4)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a.x_train, c.x_train)
  assert a.x_train.shape == (64, 12, 12) and a.x_train.dtype == np.float32
  assert a.y_train.shape == (64, 2) and a.y_train.dtype == np.int32
  assert a.x_test.shape == (32, 12, 12) and a.y_test.shape == (32, 2)
  assert a.y_train.min() >= 0 and a.y_train.max() <= 9
  assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
  clean = datasets.multi_digits(16, 8, seed=0, canvas=(8, 16), noise=0.0)
  assert clean.x_train.shape == (16, 8, 16)
  # without noise on an 8 x 16 canvas the digits overlap by at most two
  # columns: the outer six columns of each are an exact digit of its label
  from sklearn.datasets import load_digits
  digits = load_digits()
  imgs = (digits.images / 16.0).astype(np.float32)
  for img, (left, right) in zip(clean.x_train[:4], clean.y_train[:4]):
    assert any(np.array_equal(img[:, c:c + 6], d[:, :6])
               for c in (0, 1) for d in imgs[digits.target == left])
    assert any(np.array_equal(img[:, 10 - c:16 - c], d[:, 2:])
               for c in (0, 1) for d in imgs[digits.target == right])


@pytest.mark.parametrize("kwargs, match", [
    (dict(canvas=(7, 12)), "canvas"), (dict(canvas=(12, 17)), "canvas"),
    (dict(noise=-1.0), "noise"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(num_train=0), "num_train")])
def test_multi_digits_bad_input(kwargs, match):
  args = dict(num_train=8, num_test=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    datasets.multi_digits(**args)


def test_multi_digits_without_sklearn(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  with pytest.raises(ImportError, match="scikit-learn"):
    datasets.multi_digits(8, 8)


# ----------------------------------------------------------------------------
# with_branches with nothing branched is an ordinary aggregator: the parts of
# the checklist about the wrapper itself (the rest is pcgrad's own contract).

import contract  # noqa: E402
from contract import Spec  # noqa: E402


def _wrapped_pcgrad(shared=None, reduction="sum"):
  return recon.with_branches(
      pcgrad_optax.pcgrad(shared=shared, reduction=reduction), [],
      reduction=reduction)


@pytest.mark.parametrize("check", [
    contract.check_jit_shapes_and_finite, contract.check_bad_inputs,
    contract.check_chain_and_scan], ids=lambda c: c.__name__)
def test_with_branches_contract(check):
  check(Spec("recon.with_branches", _wrapped_pcgrad))
