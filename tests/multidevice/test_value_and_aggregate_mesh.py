"""value_and_aggregate on 8 simulated CPU devices.

Run by tests/test_sharding.py in a child process with JAX_NUM_CPU_DEVICES=8
(see conftest.py here). The Gram engine and the stacked engine, jitted over
a mesh with sharded params and a sharded batch, give the single-device
stacked result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pcgrad_optax as po
from mesh_mlp_case import MASK, T, mlp_params

RNG = np.random.default_rng(0)
PARAMS = mlp_params(RNG)
X = RNG.standard_normal((16, 8)).astype(np.float32)
Y = RNG.standard_normal((16, T)).astype(np.float32)


def losses_fn(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jnp.tanh(h @ p["w2"])
  return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)


# (mesh shape, axis names, param specs, batch spec)
LAYOUTS = {
    "fsdp": ((8,), ("fsdp",), {"w1": P(None, "fsdp"), "b1": P("fsdp"),
                               "w2": P("fsdp", None), "heads": P("fsdp")},
             P()),
    "dp": ((8,), ("data",), {"w1": P(), "b1": P(), "w2": P(), "heads": P()},
           P("data")),
    "tp": ((2, 4), ("data", "model"),
           {"w1": P(None, "model"), "b1": P("model"),
            "w2": P("model", None), "heads": P()}, P("data")),
}


@pytest.mark.parametrize("engine", ["gram", "stacked"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method", ["pcgrad", "upgrad"])
def test_mesh_equals_one_device(engine, layout, method):
  factory = {"pcgrad": lambda: po.pcgrad(key=1), "upgrad": po.upgrad}[method]
  agg = factory()
  reference = po.value_and_aggregate(losses_fn, agg, engine="stacked",
                                     shared=MASK)
  want_losses, want, want_state = jax.jit(reference)(
      PARAMS, agg.init(PARAMS), X, Y)
  step = po.value_and_aggregate(losses_fn, agg, engine=engine, shared=MASK)

  shape, names, specs, batch_spec = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in PARAMS.items()}
  x = jax.device_put(X, NamedSharding(mesh, batch_spec))
  y = jax.device_put(Y, NamedSharding(mesh, batch_spec))
  losses, update, state = jax.jit(step)(params, agg.init(params), x, y)
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5, atol=2e-6)
  for k in PARAMS:
    np.testing.assert_allclose(update[k], want[k], rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)
