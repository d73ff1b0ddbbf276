"""recon.layer_names: how leaves are named and grouped into layers.

Names come from the parameter tree's structure alone (flax linen, flax nnx,
plain dicts and arrays).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from pcgrad_optax import recon


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
