"""The Gram engine of value_and_aggregate on 8 simulated CPU devices.

Run by tests/test_sharding.py in a child process with JAX_NUM_CPU_DEVICES=8
(see conftest.py here). In the three modes of test_multidevice.py (explicit
axes under jax.set_mesh, explicit axes without it, auto axes), with params
sharded FSDP-style, Megatron-style or replicated and the batch split, the
Gram engine gives the single-device stacked result, on both of its routes
(the X-Gram one and the per-task-weight-gradient one), and keeps the
params' sharding on the update; a Linen CNN and transformer block do too on
a data-parallel mesh (convolutions' fallback gradients are then pulled
back task by task: JAX's batching rule of a convolution's transpose fails
on explicit batch sharding).
"""

from __future__ import annotations

import contextlib
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pcgrad_optax as po
from mesh_mlp_case import MASK, T, mlp_params

PARAMS = mlp_params(np.random.default_rng(0))
# Rows of the batch: N^2 <= T C F for every dense leaf with 8 rows (the
# X-Gram route), N^2 > T C F with 64 (the per-task weight gradients).
BATCHES = {"x-gram": 8, "weight-grads": 64}

MODES = ("explicit", "explicit-nomesh", "auto")
LAYOUTS = {
    "fsdp": ((8,), ("fsdp",), {"w1": P(None, "fsdp"), "b1": P("fsdp"),
                               "w2": P("fsdp", None),
                               "heads": P("fsdp", None)}, P()),
    "dp": ((8,), ("data",), {"w1": P(), "b1": P(), "w2": P(), "heads": P()},
           P("data")),
    "tp": ((2, 4), ("data", "model"),
           {"w1": P(None, "model"), "b1": P("model"),
            "w2": P("model", None), "heads": P()}, P("data")),
}


def losses_fn(p, x, y, layout=None, mesh=None):
  """The MLP; on explicit axes it names its shardings as user code must."""
  w1, w2, heads = p["w1"], p["w2"], p["heads"]
  if mesh is not None and layout == "fsdp":   # gather each weight for use
    gather = lambda w: jax.sharding.reshard(w, NamedSharding(mesh, P()))
    w1, w2, heads = gather(w1), gather(w2), gather(heads)
  h = jnp.tanh(x @ w1 + p["b1"])
  out = None
  if mesh is not None and layout == "tp":     # row-parallel: name the output
    out = NamedSharding(mesh, P("data", None))
  h = jnp.tanh(jnp.einsum("bh,hk->bk", h, w2, out_sharding=out))
  return jnp.mean((h @ heads - y) ** 2, axis=0)


def make_mesh(shape, names, mode):
  types = AxisType.Explicit if mode.startswith("explicit") else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(types,) * len(names))


def scope(mesh, mode):
  return (contextlib.nullcontext() if mode.endswith("-nomesh")
          else jax.set_mesh(mesh))


def state_arrays(state):
  return [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x)
          for x in jax.tree.leaves(state)]


def data(n):
  rng = np.random.default_rng(n)
  return (rng.standard_normal((n, 8)).astype(np.float32),
          rng.standard_normal((n, T)).astype(np.float32))


@functools.cache
def reference(method, n):
  agg = {"pcgrad": lambda: po.pcgrad(key=1, num_tasks=T),
         "upgrad": po.upgrad}[method]()
  step = po.value_and_aggregate(losses_fn, agg, engine="stacked",
                                shared=MASK)
  return agg, jax.jit(step)(PARAMS, agg.init(PARAMS), *data(n))


@pytest.mark.parametrize("route", sorted(BATCHES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["pcgrad", "upgrad"])
def test_gram_engine_on_mesh(method, mode, layout, route):
  n = BATCHES[route]
  agg, (want_losses, want, want_state) = reference(method, n)
  shape, names, specs, batch_spec = LAYOUTS[layout]
  mesh = make_mesh(shape, names, mode)
  explicit = mode.startswith("explicit")
  loss = functools.partial(losses_fn, layout=layout,
                           mesh=mesh if explicit else None)
  step = po.value_and_aggregate(loss, agg, engine="gram", shared=MASK)
  x, y = data(n)
  with scope(mesh, mode):
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
              for k, v in PARAMS.items()}
    x = jax.device_put(x, NamedSharding(mesh, batch_spec))
    y = jax.device_put(y, NamedSharding(mesh, batch_spec))
    losses, update, state = jax.jit(step)(params, agg.init(params), x, y)
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5, atol=2e-6)
  for k in PARAMS:
    scale = max(1.0, float(np.max(np.abs(want[k]))))
    np.testing.assert_allclose(update[k], want[k], rtol=2e-5,
                               atol=2e-6 * scale)
    if explicit:   # explicit axes fix the update's sharding: the param's
      assert update[k].sharding.is_equivalent_to(
          NamedSharding(mesh, specs[k]), update[k].ndim), k
  for a, b in zip(state_arrays(state), state_arrays(want_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(10, name="trunk_dense")(x))
    return nn.Dense(T, name="head")(x)


class Block(nn.Module):
  """The transformer block of tests/test_value_and_aggregate.py on float
  features (Linen's nn.Embed gathers with an unnamed output sharding, which
  explicit axes reject in the forward pass itself)."""
  @nn.compact
  def __call__(self, features):
    x = nn.Dense(8, name="embed")(features)
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(h)))
    return nn.Dense(T, name="head")(jnp.mean(x, axis=1))


def head_mask(params):
  return {"params": {k: k != "head" for k in params["params"]}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["cnn", "block"])
def test_linen_models_data_parallel(model, mode):
  rng = np.random.default_rng(5)
  if model == "cnn":
    net, x = CNN(), rng.standard_normal((8, 6, 6, 2)).astype(np.float32)
  else:
    net, x = Block(), rng.standard_normal((8, 5, 4)).astype(np.float32)
  y = rng.standard_normal((8, T)).astype(np.float32)
  params = net.init(jax.random.key(0), x)

  def loss(p, x, y):
    return jnp.mean((net.apply(p, x) - y) ** 2, axis=0)

  agg = po.upgrad(num_tasks=T)
  want_losses, want, want_state = jax.jit(po.value_and_aggregate(
      loss, agg, engine="stacked", shared=head_mask))(
          params, agg.init(params), x, y)
  mesh = make_mesh((8,), ("data",), mode)
  step = po.value_and_aggregate(loss, agg, engine="gram", shared=head_mask)
  with scope(mesh, mode):
    rows = NamedSharding(mesh, P("data"))
    p = jax.device_put(params, NamedSharding(mesh, P()))
    losses, update, state = jax.jit(step)(
        p, agg.init(p), jax.device_put(x, rows), jax.device_put(y, rows))
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5, atol=2e-6)
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * scale)
  for a, b in zip(state_arrays(state), state_arrays(want_state)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
