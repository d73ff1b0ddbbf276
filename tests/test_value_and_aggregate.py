"""value_and_aggregate: the Gram engine against the stacked path.

The reference is the documented two-call path: ``task_value_and_grad`` for
the stacked per-task gradients, then ``aggregator(shared=mask).update``.
Every engine must give its update, its losses and its state (PCGrad's key
and count) under ``jit``, over several steps of plain SGD, on an MLP, a
Linen CNN (convolutions fall back), a Linen transformer block (attention
einsums, layer norms, an embedding) and a Flax NNX model.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore

import pcgrad_optax as po
from pcgrad_optax._core import cpu, taps

T = 3
RNG = np.random.default_rng(0)


def normal(*shape, scale=1.0, rng=None):
  rng = RNG if rng is None else rng
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


# --- models -----------------------------------------------------------------

def mlp_losses(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jax.nn.relu(jnp.einsum("ni,io->no", h, p["w2"]))
  return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)


MLP_PARAMS = {"w1": normal(5, 12, scale=0.5), "b1": normal(12, scale=0.1),
              "w2": normal(12, 7, scale=0.4), "heads": normal(7, T)}
MLP_MASK = {"w1": True, "b1": True, "w2": True, "heads": False}
MLP_BATCH = (normal(8, 5), normal(8, T))   # N^2 = 64 <= T C F: X-Gram route


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(10, name="trunk_dense")(x))
    return nn.Dense(T, name="head")(x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens)
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(h)))
    return nn.Dense(T, name="head")(jnp.mean(x, axis=1))


def linen_losses(model):
  def losses(params, x, y):
    pred = model.apply(params, x)
    return jnp.mean((pred - y) ** 2, axis=0)
  return losses


def head_mask(params):
  """Everything shared except the top-level "head" module."""
  return {"params": {k: k != "head" for k in params["params"]}}


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(9, 6, rngs=rngs)
    self.trunk = nnx.Linear(6, 10, rngs=rngs)
    self.norm = nnx.LayerNorm(10, rngs=rngs)
    self.head = nnx.Linear(10, T, rngs=rngs)

  def __call__(self, tokens):
    h = jnp.tanh(self.norm(self.trunk(self.embed(tokens))))
    return self.head(jnp.mean(h, axis=1))


# --- the reference and the comparison ----------------------------------------

def reference_step(loss_fn, aggregator):
  """task_value_and_grad, then aggregator.update: what the engine replaces."""
  def step(params, state, *batch):
    losses, grads = po.task_value_and_grad(loss_fn)(params, *batch)
    update, state = aggregator.update(grads, state, params)
    return losses, update, state
  return step


def state_leaves(state):
  return [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x)
          for x in jax.tree.leaves(state)]


def run_steps(step, params, state, batch, steps=3, lr=0.1):
  """Applies ``steps`` SGD steps; returns every step's outputs."""
  step = jax.jit(step)
  outs = []
  for _ in range(steps):
    losses, update, state = step(params, state, *batch)
    outs.append((losses, update, state_leaves(state)))
    params = jax.tree.map(lambda p, u: p - lr * u, params, update)
  return outs


def assert_same_run(got, want, rtol=2e-5, atol=2e-6):
  """Same losses, updates and states; ``atol`` relative to the update's size.

  (A leaf whose gradient is zero in exact arithmetic, like an attention key
  bias, holds rounding noise only, in both engines.)
  """
  for (l1, u1, s1), (l2, u2, s2) in zip(got, want):
    np.testing.assert_allclose(l1, l2, rtol=rtol, atol=atol)
    assert jax.tree.structure(u1) == jax.tree.structure(u2)
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(u2))
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)
    for a, b in zip(s1, s2):
      np.testing.assert_array_equal(a, b)


AGGREGATORS = {"pcgrad": lambda **kw: po.pcgrad(key=3, **kw),
               "mgda": po.mgda, "upgrad": po.upgrad}


def check_engines(loss_fn, params, mask, batch, aggregators=AGGREGATORS,
                  engines=("stacked", "gram", "auto"), lr=0.1, **tol):
  for name, factory in aggregators.items():
    ref_agg = factory(shared=mask)
    want = run_steps(reference_step(loss_fn, ref_agg), params,
                     ref_agg.init(params), batch, lr=lr)
    for engine in engines:
      agg = factory()
      step = po.value_and_aggregate(loss_fn, agg, engine=engine, shared=mask)
      got = run_steps(step, params, agg.init(params), batch, lr=lr)
      try:
        assert_same_run(got, want, **tol)
      except AssertionError as e:
        raise AssertionError(f"{name}, engine={engine}: {e}") from None


def dense_leaves(loss_fn, params, batch):
  """Names of the leaves the Gram engine treats as dense."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  closed = jax.make_jaxpr(
      lambda *flat: loss_fn(jax.tree.unflatten(jax.tree.structure(params),
                                               flat), *batch))(
          *[x for _, x in leaves])
  uses = taps.find_dense_uses(closed.jaxpr, len(leaves))
  return {jax.tree_util.keystr(p) for (p, _), u in zip(leaves, uses)
          if u is not None}


# --- equal to the stacked path ------------------------------------------------

def test_mlp_plain_function():
  assert dense_leaves(mlp_losses, MLP_PARAMS, MLP_BATCH) == {
      "['heads']", "['w1']", "['w2']"}
  check_engines(mlp_losses, MLP_PARAMS, MLP_MASK, MLP_BATCH)


def test_mlp_large_batch_forms_leaf_gradients():
  # N^2 > T C F: the dense leaves take the per-task-gradient route.
  batch = (normal(40, 5), normal(40, T))
  check_engines(mlp_losses, MLP_PARAMS, MLP_MASK, batch,
                aggregators={"upgrad": po.upgrad}, engines=("gram",))


def test_all_shared_and_mean_reduction():
  for reduction in ("sum", "mean"):
    check_engines(mlp_losses, MLP_PARAMS, None, MLP_BATCH,
                  aggregators={"pcgrad": lambda **kw: po.pcgrad(
                      key=1, reduction=reduction, **kw)},
                  engines=("gram",))


def test_mask_given_to_the_aggregator():
  agg = po.pcgrad(key=2, reduction="mean", shared=MLP_MASK)
  want = run_steps(reference_step(mlp_losses, agg), MLP_PARAMS,
                   agg.init(MLP_PARAMS), MLP_BATCH)
  got = run_steps(po.value_and_aggregate(mlp_losses, agg, engine="gram"),
                  MLP_PARAMS, agg.init(MLP_PARAMS), MLP_BATCH)
  assert_same_run(got, want)


def test_linen_cnn_convolutions_fall_back():
  model = CNN()
  rng = np.random.default_rng(3)   # its own data, whatever ran before
  x = normal(4, 8, 8, 2, rng=rng)
  params = model.init(jax.random.key(0), x)
  batch = (x, normal(4, T, rng=rng))
  loss_fn = linen_losses(model)
  dense = dense_leaves(loss_fn, params, batch)
  assert dense == {"['params']['trunk_dense']['kernel']",
                   "['params']['head']['kernel']"}, dense
  check_engines(loss_fn, params, head_mask, batch, engines=("gram",))


def test_linen_transformer_block():
  model = Block()
  rng = np.random.default_rng(7)   # its own data, whatever ran before
  tokens = jnp.asarray(rng.integers(0, 11, (2, 5)))
  params = model.init(jax.random.key(1), tokens)
  batch = (tokens, jnp.asarray(rng.standard_normal((2, T)), jnp.float32))
  loss_fn = linen_losses(model)
  dense = dense_leaves(loss_fn, params, batch)
  attention = {f"['params']['MultiHeadDotProductAttention_0']['{n}']"
               "['kernel']" for n in ("query", "key", "value", "out")}
  assert attention <= dense
  assert not any("Embed" in d or "LayerNorm" in d or "bias" in d
                 for d in dense)
  # A small step: at lr=0.1 the block diverges (updates ~1e8) and the two
  # engines' rounding differences grow with it.
  check_engines(loss_fn, params, head_mask, batch, engines=("gram",),
                lr=0.01)


def test_nnx_state():
  graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)

  def loss_fn(p, tokens, y):
    model = nnx.merge(graphdef, p)
    return jnp.mean((model(tokens) - y) ** 2, axis=0)

  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, 9, (3, 4)))
  batch = (tokens, normal(3, T, rng=rng))
  mask = {"embed": True, "trunk": True, "norm": True, "head": False}
  check_engines(loss_fn, params, mask, batch, engines=("gram",))
  agg = po.pcgrad()
  _, update, _ = po.value_and_aggregate(loss_fn, agg, shared=mask)(
      params, agg.init(params), *batch)
  assert isinstance(update, nnx.State)


def test_weight_used_twice_falls_back():
  def tied(p, x, y):   # the same matrix encodes and decodes (transposed)
    h = jnp.tanh(x @ p["w"])
    return jnp.mean((h @ p["w"].T @ p["heads"] - y) ** 2, axis=0)

  params = {"w": normal(5, 6, scale=0.5), "heads": normal(5, T)}
  assert dense_leaves(tied, params, MLP_BATCH) == {"['heads']"}
  check_engines(tied, params, {"w": True, "heads": False}, MLP_BATCH,
                aggregators={"mgda": po.mgda}, engines=("gram",))


def test_jit_inside_the_loss_and_layout_ops():
  @jax.jit
  def layer(x, w):   # a jitted sub-function; the weight reaches it reshaped
    return jnp.tanh(x @ w.reshape(6, 5).T)   # and transposed

  def loss_fn(p, x, y):
    return jnp.mean((layer(x, p["w"]) @ p["heads"] - y) ** 2, axis=0)

  params = {"w": normal(30, scale=0.5), "heads": normal(6, T)}
  assert dense_leaves(loss_fn, params, MLP_BATCH) == {"['w']", "['heads']"}
  check_engines(loss_fn, params, {"w": True, "heads": False}, MLP_BATCH,
                aggregators={"upgrad": po.upgrad}, engines=("gram",))


def test_has_aux_and_argnums():
  def loss_fn(trunk, heads, x, y):
    h = jnp.tanh(x @ trunk)
    losses = jnp.mean((h @ heads - y) ** 2, axis=0)
    return losses, {"h": h}

  trunk, heads = normal(5, 6), normal(6, T)
  agg = po.mgda(shared=(True, False))
  ref_losses, g = po.task_value_and_grad(loss_fn, argnums=(0, 1),
                                         has_aux=True)(trunk, heads,
                                                       *MLP_BATCH)
  ref, _ = agg.update(g, agg.init((trunk, heads)), (trunk, heads))
  for engine in ("stacked", "gram"):
    step = jax.jit(po.value_and_aggregate(loss_fn, agg, engine=engine,
                                          argnums=(0, 1), has_aux=True))
    (losses, aux), update, _ = step(trunk, agg.init((trunk, heads)), heads,
                                    *MLP_BATCH)
    np.testing.assert_allclose(losses, ref_losses[0], rtol=1e-6)
    np.testing.assert_allclose(aux["h"], ref_losses[1]["h"], rtol=1e-6)
    for a, b in zip(update, ref):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_mixed_precision_compute():
  # The weight reaches its dot_general cast; the stacked path rounds each
  # task's gradient to bf16, the Gram engine only the update.
  def loss_fn(p, x, y):   # f32 params, bf16 matmuls
    h = jnp.tanh(x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16))
    pred = h.astype(jnp.float32) @ p["heads"]
    return jnp.mean((pred - y) ** 2, axis=0)

  params = {"w": normal(5, 6, scale=0.5), "heads": normal(6, T)}
  check_engines(loss_fn, params, {"w": True, "heads": False}, MLP_BATCH,
                aggregators={"mgda": po.mgda}, engines=("gram",),
                rtol=3e-2, atol=3e-2)


def test_not_gram_based_aggregators_take_the_stacked_path():
  losses, g = po.task_value_and_grad(mlp_losses)(MLP_PARAMS, *MLP_BATCH)
  for agg in (po.graddrop(key=1, shared=MLP_MASK),
              po.uncertainty(num_tasks=T)):
    ref, ref_state = agg.update(g, agg.init(MLP_PARAMS), MLP_PARAMS,
                                losses=losses)
    out, update, state = jax.jit(po.value_and_aggregate(mlp_losses, agg))(
        MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)
    # f32 tolerance: the jitted step and the eager reference fuse (and on
    # CPU loop over the tasks) differently.
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(state_leaves(state), state_leaves(ref_state)):
      np.testing.assert_allclose(a, b, rtol=1e-5)


def test_auto_rule():
  # Convolution kernels dominate the CNN's shared params: auto is stacked;
  # the MLP is dense: auto is the Gram engine (no (T,) + W.shape arrays).
  assert not _has_stacked_weight(
      po.value_and_aggregate(mlp_losses, po.mgda(), shared=MLP_MASK),
      MLP_PARAMS, po.mgda().init(MLP_PARAMS), MLP_BATCH, ["w1", "w2"])
  model = CNN()
  x = normal(2, 8, 8, 2)
  params = model.init(jax.random.key(0), x)
  kernel = params["params"]["Conv_0"]["kernel"]
  step = po.value_and_aggregate(linen_losses(model), po.mgda(),
                                shared=head_mask)
  jaxpr = jax.make_jaxpr(step)(params, optax.EmptyState(), x, normal(2, T))
  assert (T,) + kernel.shape in _avals(jaxpr.jaxpr)


# --- structure: no per-task weight gradient ----------------------------------

def _avals(jaxpr, acc=None):
  """Every shape in a jaxpr, its sub-jaxprs included."""
  acc = set() if acc is None else acc
  for v in list(jaxpr.invars) + list(jaxpr.constvars):
    acc.add(tuple(v.aval.shape))
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      acc.add(tuple(getattr(v.aval, "shape", ())))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jcore.ClosedJaxpr):
          _avals(sub.jaxpr, acc)
        elif isinstance(sub, jcore.Jaxpr):
          _avals(sub, acc)
  return acc


def _has_stacked_weight(step, params, state, batch, names):
  shapes = _avals(jax.make_jaxpr(step)(params, state, *batch).jaxpr)
  return any((T,) + params[n].shape in shapes for n in names)


@pytest.mark.parametrize("name", ["pcgrad", "upgrad"])
def test_gram_engine_never_stacks_dense_weight_gradients(name):
  agg = AGGREGATORS[name]()
  state = agg.init(MLP_PARAMS)
  dense = ["w1", "w2", "heads"]
  gram = po.value_and_aggregate(mlp_losses, agg, engine="gram",
                                shared=MLP_MASK)
  assert not _has_stacked_weight(gram, MLP_PARAMS, state, MLP_BATCH, dense)
  # The check sees them on the stacked path.
  stacked = po.value_and_aggregate(mlp_losses, agg, engine="stacked",
                                   shared=MLP_MASK)
  assert _has_stacked_weight(stacked, MLP_PARAMS, state, MLP_BATCH, dense)
  # ... and in the compiled program neither.
  hlo = jax.jit(gram).lower(MLP_PARAMS, state, *MLP_BATCH).compile().as_text()
  for n in dense:
    dims = ",".join(map(str, (T,) + MLP_PARAMS[n].shape))
    assert f"f32[{dims}]" not in hlo, n


# --- errors -------------------------------------------------------------------

def test_errors():
  step = lambda agg, **kw: po.value_and_aggregate(mlp_losses, agg, **kw)
  with pytest.raises(ValueError, match="engine must be one of"):
    step(po.mgda(), engine="fast")
  # Whether an aggregator is Gram-based behind a wrapper is only known from
  # its state, so these are raised when the step is called (traced).
  drop = po.graddrop()
  with pytest.raises(ValueError, match="engine='gram' needs a Gram-based"):
    step(drop, engine="gram")(MLP_PARAMS, drop.init(MLP_PARAMS), *MLP_BATCH)
  with pytest.raises(ValueError, match="give it once"):
    step(po.mgda(shared=MLP_MASK), shared=MLP_MASK)
  with pytest.raises(ValueError, match="its own shared="):
    step(drop, shared=MLP_MASK)(MLP_PARAMS, drop.init(MLP_PARAMS),
                                *MLP_BATCH)
  with pytest.raises(ValueError, match="optax transformation"):
    step(po.weighting.mgda)
  agg = po.mgda()
  with pytest.raises(ValueError, match=r"argnums=3"):
    po.value_and_aggregate(mlp_losses, agg, argnums=3)(
        MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)
  for engine in ("stacked", "gram"):
    with pytest.raises(ValueError, match=r"\(T,\) vector"):
      po.value_and_aggregate(lambda p, x, y: jnp.sum(mlp_losses(p, x, y)),
                             agg, engine=engine)(
                                 MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)
  with pytest.raises(ValueError, match=r"leaf '\['n'\]' is int32"):
    po.value_and_aggregate(lambda p: jnp.stack([p["w"], p["w"]]), agg)(
        {"w": jnp.ones(()), "n": jnp.ones((), jnp.int32)}, agg.init(None))
  with pytest.raises(ValueError, match="mask leaves must be static"):
    po.value_and_aggregate(mlp_losses, agg, shared={
        "w1": True, "b1": True, "w2": True, "heads": "no"})(
            MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)


# --- the state's record, optax.inject_hyperparams, wrappers -----------------

def _close_states(got, want, rtol=2e-5, atol=2e-6):
  for (_, _, s1), (_, _, s2) in zip(got, want):
    assert len(s1) == len(s2)
    for a, b in zip(s1, s2):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad"])
def test_recorded_weights_and_gram_equal_the_stacked_path(name):
  factory = AGGREGATORS[name]
  for reduction in ("sum", "mean"):
    kw = dict(num_tasks=T, keep_gram=True, reduction=reduction)
    ref = factory(shared=MLP_MASK, **kw)
    want = run_steps(reference_step(mlp_losses, ref), MLP_PARAMS,
                     ref.init(MLP_PARAMS), MLP_BATCH)
    w = np.asarray(want[-1][2][-2])   # the record: (..., weights, gram)
    assert w.shape == (T,) and np.any(w != 0)
    for engine in ("stacked", "gram"):
      agg = factory(**kw)
      step = po.value_and_aggregate(mlp_losses, agg, engine=engine,
                                    shared=MLP_MASK)
      got = run_steps(step, MLP_PARAMS, agg.init(MLP_PARAMS), MLP_BATCH)
      assert_same_run([(l, u, []) for l, u, _ in got],
                      [(l, u, []) for l, u, _ in want])
      _close_states(got, want)
      final = got[-1][2]
      np.testing.assert_allclose(
          po.diagnostics.task_weights(jax.tree.unflatten(
              jax.tree.structure(agg.init(MLP_PARAMS)), final)),
          w, rtol=2e-5, atol=2e-6)


def test_inject_hyperparams_reaches_the_method():
  # inject_hyperparams rebuilds the aggregator from the state's
  # hyperparameters at every update; the engine still gets its GramStep.
  inj = optax.inject_hyperparams(po.cagrad)(c=0.5, shared=MLP_MASK,
                                            num_tasks=T)
  state0 = inj.init(MLP_PARAMS)
  state0.hyperparams["c"] = jnp.asarray(0.2)
  want = run_steps(reference_step(mlp_losses, inj), MLP_PARAMS, state0,
                   MLP_BATCH)
  plain = po.cagrad(c=0.2, shared=MLP_MASK, num_tasks=T)
  direct = run_steps(reference_step(mlp_losses, plain), MLP_PARAMS,
                     plain.init(MLP_PARAMS), MLP_BATCH)
  assert_same_run([(l, u, []) for l, u, _ in want],
                  [(l, u, []) for l, u, _ in direct])
  for engine in ("stacked", "gram", "auto"):
    step = po.value_and_aggregate(mlp_losses, inj, engine=engine)
    got = run_steps(step, MLP_PARAMS, state0, MLP_BATCH)
    assert_same_run([(l, u, []) for l, u, _ in got],
                    [(l, u, []) for l, u, _ in want])
    _close_states(got, want)
    assert int(got[-1][2][0]) == 3   # InjectHyperparamsState.count
  # PCGrad: its key and count live in the inner state.
  inj = optax.inject_hyperparams(po.pcgrad)(key=3, num_tasks=T)
  want = run_steps(reference_step(mlp_losses, inj), MLP_PARAMS,
                   inj.init(MLP_PARAMS), MLP_BATCH)
  got = run_steps(po.value_and_aggregate(mlp_losses, inj, engine="gram"),
                  MLP_PARAMS, inj.init(MLP_PARAMS), MLP_BATCH)
  assert_same_run([(l, u, []) for l, u, _ in got],
                  [(l, u, []) for l, u, _ in want])
  _close_states(got, want)


def _assert_stacked_path_only(agg, state, ref):
  """auto gives ``ref`` (the two-call update) on the MLP; "gram" refuses."""
  _, update, _ = po.value_and_aggregate(mlp_losses, agg)(
      MLP_PARAMS, state, *MLP_BATCH)
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="engine='gram' needs a Gram-based"):
    po.value_and_aggregate(mlp_losses, agg, engine="gram")(
        MLP_PARAMS, state, *MLP_BATCH)


def test_wrappers_that_hide_the_method():
  chained = optax.chain(po.pcgrad(), optax.scale(-0.1))
  state = chained.init(MLP_PARAMS)
  with pytest.raises(ValueError, match="optax.chain"):
    po.value_and_aggregate(mlp_losses, chained, engine="gram")(
        MLP_PARAMS, state, *MLP_BATCH)
  # auto: the stacked path through the chain's own update.
  losses, g = po.task_value_and_grad(mlp_losses)(MLP_PARAMS, *MLP_BATCH)
  ref, _ = chained.update(g, state, MLP_PARAMS)
  _, update, _ = po.value_and_aggregate(mlp_losses, chained)(
      MLP_PARAMS, state, *MLP_BATCH)
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # apply_if_finite around such a chain: the stacked path too.
  guarded = po.apply_if_finite(optax.chain(po.pcgrad(shared=MLP_MASK),
                                           optax.scale(-0.1)), 2)
  state = guarded.init(MLP_PARAMS)
  ref, _ = guarded.update(g, state, MLP_PARAMS, losses=losses)
  _assert_stacked_path_only(guarded, state, ref)


class BNDropModel(nnx.Module):
  """A shared trunk with BatchNorm and Dropout, one output per task."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(5, 12, rngs=rngs)
    self.bn = nnx.BatchNorm(12, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.mid = nnx.Linear(12, 8, rngs=rngs)
    self.heads = nnx.Linear(8, T, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.trunk(x))))
    return self.heads(jnp.tanh(self.mid(h)))


def _nnx_task_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)


NNX_MASK = {"trunk": True, "bn": True, "mid": True, "heads": False}


def _nnx_run(step_fn, steps=3):
  """``steps`` SGD steps of a fresh BNDropModel under nnx.jit: per step the
  losses, update, aggregator state; then the module's non-Param state."""
  model = BNDropModel(nnx.Rngs(0, dropout=1))
  agg = po.pcgrad(key=2, num_tasks=T)
  state = agg.init(nnx.state(model, nnx.Param))

  @nnx.jit
  def train(model, state, x, y):
    losses, update, state = step_fn(agg)(model, state, x, y)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, u: p - 0.1 * u, params, update))
    return losses, update, state

  outs = []
  for _ in range(steps):
    losses, update, state = train(model, state, *MLP_BATCH)
    outs.append((losses, update, state_leaves(state)))
  return outs, nnx.state(model, nnx.Not(nnx.Param))


def test_nnx_module_batchnorm_dropout():
  def reference(agg):   # task_value_and_grad on the module, then the update
    def step(model, state, x, y):
      losses, grads = po.task_value_and_grad(_nnx_task_losses)(model, x, y)
      update, state = po.pcgrad(key=2, num_tasks=T, shared=NNX_MASK).update(
          grads, state, nnx.state(model, nnx.Param))
      return losses, update, state
    return step

  want, want_rest = _nnx_run(reference)
  assert float(jnp.max(jnp.abs(want_rest["bn"]["mean"][...]))) > 0
  for engine in ("stacked", "gram"):
    got, rest = _nnx_run(lambda agg: po.value_and_aggregate(
        _nnx_task_losses, agg, engine=engine, shared=NNX_MASK))
    assert isinstance(got[0][1], nnx.State)
    assert_same_run([(l, u, []) for l, u, _ in got],
                    [(l, u, []) for l, u, _ in want])
    _close_states(got, want)
    # Batch statistics and the dropout RNG count moved once per step.
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(want_rest)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_nnx_module_diff_state_and_errors():
  # nnx.DiffState(0, filter): only the trunk's Params are differentiated.
  model = BNDropModel(nnx.Rngs(0, dropout=1))
  model.eval()
  filt = nnx.All(nnx.Param, nnx.PathContains("trunk"))
  agg = po.mgda()
  diff = nnx.state(model, filt)
  _, update, _ = po.value_and_aggregate(
      _nnx_task_losses, agg, engine="gram",
      argnums=nnx.DiffState(0, filt))(model, agg.init(diff), *MLP_BATCH)
  assert jax.tree.structure(update) == jax.tree.structure(diff)
  with pytest.raises(ValueError, match="one argnum"):
    po.value_and_aggregate(_nnx_task_losses, agg, argnums=(0, 1))(
        model, agg.init(diff), *MLP_BATCH)
  with pytest.raises(ValueError, match="holds an NNX module too"):
    po.value_and_aggregate(lambda m, x, other: _nnx_task_losses(m, x, x),
                           agg)(model, agg.init(diff), MLP_BATCH[0], model)


# --- which aggregators are Gram-based: by type, never by a swallowed error --

def _gram_run_matches_two_calls(factory):
  """The Gram engine's MLP run of ``factory()`` equals the two-call path's
  (losses, updates, states); returns its per-step outputs."""
  ref = factory(shared=MLP_MASK)
  want = run_steps(reference_step(mlp_losses, ref), MLP_PARAMS,
                   ref.init(MLP_PARAMS), MLP_BATCH)
  agg = factory()
  got = run_steps(po.value_and_aggregate(mlp_losses, agg, engine="gram",
                                         shared=MLP_MASK),
                  MLP_PARAMS, agg.init(MLP_PARAMS), MLP_BATCH)
  assert_same_run([(l, u, []) for l, u, _ in got],
                  [(l, u, []) for l, u, _ in want])
  _close_states(got, want)
  return got


def test_cr_mogm_on_the_gram_engine():
  # CR-MOGM's EMA of the weights lives in its state: both engines step it
  # as its own update does (the first step restarts from the fresh weights).
  for initial in (None, jnp.asarray([0.2, 0.3, 0.5])):
    factory = lambda **kw: po.cr_mogm(po.weighting.mgda, 0.5, num_tasks=T,
                                      keep_gram=True,
                                      initial_weights=initial, **kw)
    got = _gram_run_matches_two_calls(factory)
    assert int(got[-1][2][0]) == 3   # the count


def test_not_gram_based_behind_inject_hyperparams_takes_the_stacked_path():
  inj = optax.inject_hyperparams(po.graddrop)(key=1, shared=MLP_MASK)
  state = inj.init(MLP_PARAMS)
  losses, g = po.task_value_and_grad(mlp_losses)(MLP_PARAMS, *MLP_BATCH)
  ref, _ = inj.update(g, state, MLP_PARAMS)
  _assert_stacked_path_only(inj, state, ref)


class _Bug(Exception):
  pass


def test_a_bug_inside_an_aggregator_surfaces():
  # A Gram-based factory with a bug that shows when inject_hyperparams
  # rebuilds it inside update: the bug propagates on both engines, instead
  # of reading as "not Gram-based" (a silent fall back to the stacked path,
  # or engine="gram"'s ValueError).
  def buggy(c):
    if isinstance(c, jax.core.Tracer) or float(c) > 0.3:
      raise _Bug("inside the aggregator")
    return po.cagrad(c=c)

  inj = optax.inject_hyperparams(buggy)(c=0.1)
  state = inj.init(MLP_PARAMS)
  state.hyperparams["c"] = jnp.asarray(0.5)
  for engine in ("auto", "gram"):
    with pytest.raises(_Bug, match="inside the aggregator"):
      po.value_and_aggregate(mlp_losses, inj, engine=engine)(
          MLP_PARAMS, state, *MLP_BATCH)
  # A bug in a Gram-based method's weighting surfaces too.
  def broken(gram):
    raise _Bug("in the weighting")
  from pcgrad_optax._core.transform import gram_transform
  tx = gram_transform(broken, shared=None, reduction="sum", method="broken")
  with pytest.raises(_Bug, match="in the weighting"):
    po.value_and_aggregate(mlp_losses, tx)(MLP_PARAMS, tx.init(MLP_PARAMS),
                                           *MLP_BATCH)


def test_every_package_aggregator_is_classified():
  # Gram-based methods answer a probe with their GramStep (through
  # inject_hyperparams too); every other one rejects it with NotGramBased.
  from pcgrad_optax._core.stacked import NotGramBased
  from pcgrad_optax._core.transform import GramProbe, gram_step_of
  gram_based = {
      "pcgrad": {}, "mgda": {}, "upgrad": {}, "cagrad": {}, "dualproj": {},
      "imtl_g": {}, "aligned_mtl": {}, "config": {}, "nash_mtl": {},
      "mean": {}, "sum": {}, "fairgrad": {}, "krum": {"num_byzantine": 0},
      "constant": {"weights": jnp.ones(T)},
      "cr_mogm": {"weighting": po.weighting.mgda, "num_tasks": T}}
  stacked_only = {
      "graddrop": {}, "gradvac": {"num_tasks": T}, "trimmed_mean":
      {"trim": 0}, "excess_mtl": {"num_tasks": T}, "moco": {"num_tasks": T},
      "db_mtl": {"num_tasks": T}, "gradnorm": {"num_tasks": T},
      "sdmgrad": {"num_tasks": T}, "modo": {"num_tasks": T},
      "rlw": {"num_tasks": T}, "uncertainty": {"num_tasks": T},
      "dwa": {"num_tasks": T}, "famo": {"num_tasks": T},
      "imtl_l": {"num_tasks": T}, "geometric_mean": {}}
  answer = lambda h, s: (h, s)
  for name, kw in gram_based.items():
    agg = getattr(po, name)(**kw)
    assert gram_step_of(agg) is not None, name
    found, _ = agg.update(GramProbe(answer), agg.init(MLP_PARAMS))
    assert found is gram_step_of(agg), name
  for name, kw in stacked_only.items():
    agg = getattr(po, name)(**kw)
    assert gram_step_of(agg) is None, name
    with pytest.raises(NotGramBased):
      agg.update(GramProbe(answer), agg.init(MLP_PARAMS), MLP_PARAMS)


def test_constant_weights_on_the_gram_engine():
  w = jnp.asarray([0.5, 1.0, 2.0])
  for kw in ({}, {"num_tasks": T}, {"num_tasks": T, "keep_gram": True}):
    factory = lambda **k: po.constant(w, **kw, **k)
    _gram_run_matches_two_calls(factory)


def _eqns(jaxpr):
  """Every equation of a jaxpr, its sub-jaxprs' included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from _eqns(sub)


def _sums_over_tasks(step, params, state, batch, shape):
  """Whether an equation turns a (T,) + shape array into a shape one."""
  jaxpr = jax.make_jaxpr(step)(params, state, *batch).jaxpr
  stacked = (T,) + tuple(shape)
  for eqn in _eqns(jaxpr):
    ins = {tuple(getattr(v.aval, "shape", ())) for v in eqn.invars
           if not isinstance(v, jcore.Literal)}
    outs = {tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars}
    if stacked in ins and tuple(shape) in outs:
      return True
  return False


def test_fallback_gradients_are_discarded_after_their_gram_block():
  # The CNN's convolution kernels fall back: the Gram engine forms their
  # (T,) + kernel gradients for the Gram block only; their update comes
  # from the second pullback, so nothing sums them over the tasks.
  model = CNN()
  rng = np.random.default_rng(3)
  x = normal(4, 8, 8, 2, rng=rng)
  params = model.init(jax.random.key(0), x)
  batch = (x, normal(4, T, rng=rng))
  kernel = params["params"]["Conv_0"]["kernel"].shape
  agg = po.upgrad()
  gram = po.value_and_aggregate(linen_losses(model), agg, engine="gram",
                                shared=head_mask)
  stacked = po.value_and_aggregate(linen_losses(model), agg,
                                   engine="stacked", shared=head_mask)
  assert not _sums_over_tasks(gram, params, agg.init(params), batch, kernel)
  assert _sums_over_tasks(stacked, params, agg.init(params), batch, kernel)


# --- XLA:CPU: the Gram blocks on the cotangents' own layout -------------------

def wide_losses(p, x, y):
  h = jax.nn.relu(x @ p["w1"])
  h = jax.nn.relu(h @ p["w2"])
  return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)


def _wide_case():
  rng = np.random.default_rng(7)
  params = {"w1": normal(16, 512, scale=0.25, rng=rng),
            "w2": normal(512, 400, scale=0.05, rng=rng),
            "heads": normal(400, T, scale=0.05, rng=rng)}
  batch = (normal(64, 16, rng=rng), normal(64, T, rng=rng))
  return params, {"w1": True, "w2": True, "heads": False}, batch


def _cotangent_sized(hlo: str, n: int, widths) -> list[str]:
  """Instructions whose f32 output holds T N F numbers (F in ``widths``)
  in any other form than the stacked cotangent's own row-major ``(T, N,
  F)`` (axes merged or not): its transposed copies."""
  own = {dims for f in widths for dims in
         [(T, n, f), (T, 1, n, f), (T * n, f), (T, n * f), (T * n * f,)]}
  sizes = {T * n * f for f in widths}
  bad = []
  for m in re.finditer(r"= f32\[([0-9,]*)\]\{([0-9,]*)\} ", hlo):
    dims = tuple(int(d) for d in m.group(1).split(",") if d)
    layout = tuple(int(d) for d in m.group(2).split(",") if d)
    # Row major: the non-unit axes, major to minor, in order.
    order = [a for a in reversed(layout) if dims[a] != 1]
    if math.prod(dims) in sizes and not (dims in own
                                         and order == sorted(order)):
      bad.append(m.group(0))
  return bad


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")
def test_cpu_gram_engine_keeps_the_cotangents_layout(monkeypatch):
  # The structural guard of the CPU Gram engine: the tasks are pulled back
  # in a loop (each D_t in its own (N, F) layout, no (T N, F) matmuls),
  # (X X^T) D_t is a batched matmul on the stacked (T, N, F) layout, and F
  # is walked in chunks of E (so E = (X X^T) D never exists whole and no
  # T N F array is copied transposed); the update equals the stacked path.
  monkeypatch.setattr(taps, "_E_CHUNK_BYTES", 64 * 1024)  # 128 columns
  params, mask, batch = _wide_case()
  agg = po.upgrad()
  gram = po.value_and_aggregate(wide_losses, agg, engine="gram", shared=mask)
  stacked = po.value_and_aggregate(wide_losses, agg, engine="stacked",
                                   shared=mask)
  state = agg.init(params)
  got, want = jax.jit(gram)(params, state, *batch), jax.jit(stacked)(
      params, state, *batch)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
  sizes = {T * 64 * 512, T * 64 * 400}
  jaxpr = jax.make_jaxpr(gram)(params, state, *batch).jaxpr
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name == "dot_general":
      assert math.prod(eqn.outvars[0].aval.shape) not in sizes, eqn
  hlo = jax.jit(gram).lower(params, state, *batch).compile().as_text()
  assert " while(" in hlo
  assert not _cotangent_sized(hlo, 64, (512, 400))
  # Not vacuous: with the tasks vmapped and K shared, both checks fire.
  monkeypatch.setattr(cpu, "loop_over_tasks", lambda _: False)
  monkeypatch.setattr(cpu, "broadcast_over_tasks", lambda k, d: False)
  hlo = jax.jit(po.value_and_aggregate(
      wide_losses, agg, engine="gram", shared=mask)).lower(
          params, state, *batch).compile().as_text()
  assert _cotangent_sized(hlo, 64, (512, 400))


@pytest.mark.parametrize("f", [100, 128, 400, 515])
def test_x_gram_on_cpu_matches_numpy(f, monkeypatch):
  # <D_s, K D_t> in F chunks (whole steps and a remainder) against float64.
  monkeypatch.setattr(taps, "_E_CHUNK_BYTES", 16 * 1024)
  rng = np.random.default_rng(f)
  x = rng.standard_normal((2, 9, 5))
  d = rng.standard_normal((3, 2, 9, f))
  k = np.einsum("bnc,bmc->bnm", x, x)
  want = np.einsum("sbnf,bnm,tbmf->st", d, k, d)
  got = jax.jit(taps._x_gram_on_cpu)(jnp.asarray(k, jnp.float32),
                                     jnp.asarray(d, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


# --- apply_if_finite around the method -----------------------------------------

@pytest.mark.parametrize("engine", ["stacked", "gram"])
def test_apply_if_finite_reaches_the_method_on_both_engines(engine):
  # value_and_aggregate(loss, apply_if_finite(pcgrad())): a step with NaN
  # losses is skipped (zero update, PCGrad's key and count kept) and the
  # second NaN step in a row is applied anyway (max_consecutive_errors=1),
  # exactly as the two-call path with apply_if_finite does.
  ref = po.apply_if_finite(po.pcgrad(key=3, shared=MLP_MASK), 1)
  agg = po.apply_if_finite(po.pcgrad(key=3), 1)
  step = jax.jit(po.value_and_aggregate(mlp_losses, agg, engine=engine,
                                        shared=MLP_MASK))

  @jax.jit
  def ref_step(params, state, x, y):
    losses, grads = po.task_value_and_grad(mlp_losses)(params, x, y)
    update, state = ref.update(grads, state, params, losses=losses)
    return losses, update, state

  x, y = MLP_BATCH
  bad = x.at[0, 0].set(jnp.nan)
  state, ref_state = agg.init(MLP_PARAMS), ref.init(MLP_PARAMS)
  for i, xb in enumerate([x, bad, x, bad, bad, x]):
    got = step(MLP_PARAMS, state, xb, y)
    want = ref_step(MLP_PARAMS, ref_state, xb, y)
    assert_same_run([(got[0], got[1], [])], [(want[0], want[1], [])])
    for a, b in zip(state_leaves(got[2]), state_leaves(want[2])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    state, ref_state = got[2], want[2]
    if i == 1:   # skipped: zero update
      assert all(not np.any(u) for u in jax.tree.leaves(got[1]))
  assert int(state.total_notfinite) == 3


def test_apply_if_finite_keeps_the_module_state_on_a_skipped_step():
  # On an NNX module, a step apply_if_finite skips leaves BatchNorm's
  # running statistics and the RNG counts as they were: a NaN batch does
  # not enter them.
  model = BNDropModel(nnx.Rngs(0, dropout=1))
  agg = po.apply_if_finite(po.pcgrad(key=2), 3)
  step = po.value_and_aggregate(_nnx_task_losses, agg, shared=NNX_MASK)

  @nnx.jit
  def train(model, state, x, y):
    _, update, state = step(model, state, x, y)
    return update, state

  x, y = MLP_BATCH
  rest = lambda: [np.array(v) for v in jax.tree.leaves(
      state_leaves(nnx.state(model, nnx.Not(nnx.Param))))]
  _, state = train(model, agg.init(nnx.state(model, nnx.Param)), x, y)
  before = rest()
  update, state = train(model, state, x.at[0, 0].set(jnp.nan), y)
  assert int(state.total_notfinite) == 1
  assert all(not np.any(u) for u in jax.tree.leaves(update))
  for a, b in zip(rest(), before):
    np.testing.assert_array_equal(a, b)
  _, state = train(model, state, x, y)
  assert all(np.all(np.isfinite(a)) for a in rest())
  assert any(np.any(a != b) for a, b in zip(rest(), before))


def test_apply_if_finite_dropping_tasks_takes_the_stacked_engine():
  # Dropping tasks needs their stacked gradients: "auto" stacks (the
  # method's own shared= then), "gram" refuses.
  agg = po.apply_if_finite(po.pcgrad(key=3, shared=MLP_MASK), 1,
                           drop_nonfinite_tasks=True, num_tasks=T)
  step = jax.jit(po.value_and_aggregate(mlp_losses, agg))
  _, update, state = step(MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)
  assert int(state.total_notfinite) == 0
  with pytest.raises(ValueError, match="Gram-based"):
    po.value_and_aggregate(mlp_losses, agg, engine="gram")(
        MLP_PARAMS, agg.init(MLP_PARAMS), *MLP_BATCH)
