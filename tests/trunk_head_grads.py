"""A small trunk/head parameter tree and stacked task gradients shaped like it.

Shared by the tests of the core (tests/core/): ``PARAMS`` (leaves head,
trunk/bias, trunk/kernel, in that flatten order, checked below), ``stacked``
(seeded random ``(t, ...)`` gradients for it) and ``flat64`` (a stacked tree's
leaves as one float64 ``(T, P)`` NumPy matrix, for references).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
