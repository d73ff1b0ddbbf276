"""The parameter tree the recon tests share.

``params_like()`` is a nested dict shaped like a small network (an encoder
conv, a Dense layer, a LayerNorm and a head), all zeros; tests/recon/ stacks
task gradients, and branches layers, on it.
"""

import jax.numpy as jnp


def params_like():
  return {
      "encoder": {"Conv_1": {"kernel": jnp.zeros((2, 2, 1, 3)),
                             "bias": jnp.zeros(3)}},
      "Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      "LayerNorm_0": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
      "head": jnp.zeros((4, 2)),
  }
