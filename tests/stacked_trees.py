"""A params-like tree, and stacked task gradients shaped like it.

``PARAMS`` has a module of two leaves (``trunk``: ``kernel`` and ``bias``)
and a ``head``; ``HEADS_MASK`` marks the trunk shared and the head not.
``to_tree`` turns a (T, P) array into a stacked gradient tree shaped like
``PARAMS`` (leaf order of ``jax.tree.leaves(PARAMS)``: head, trunk/bias,
trunk/kernel; ``LEAF_SLICES`` are their columns); ``flat`` and ``flat_tasks``
go back to flat float64 arrays (``flat64`` optionally keeps only some leaves).
``stacked`` and ``random_grads`` draw seeded random gradients (as a tree and
as a (T, P) array), and ``assert_close`` compares relative to the expected
values' largest entry. Used by the core's tests and by the PCGrad, GradVac,
GradDrop and loss-based weighting tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


SHAPES = {"trunk": {"kernel": (3, 4), "bias": (4,)}, "head": (4, 2)}
PARAMS = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))
LEAF_SIZES = [int(np.prod(p.shape)) for p in jax.tree.leaves(PARAMS)]
NUM_PARAMS = sum(LEAF_SIZES)

# Leaf order of jax.tree.leaves(PARAMS): head, trunk/bias, trunk/kernel.
assert [jax.tree_util.keystr(p) for p, _ in
        jax.tree_util.tree_flatten_with_path(PARAMS)[0]] == [
            "['head']", "['trunk']['bias']", "['trunk']['kernel']"]
LEAF_SLICES = np.split(np.arange(NUM_PARAMS), np.cumsum(LEAF_SIZES)[:-1])
HEADS_MASK = {"trunk": True, "head": False}


def to_tree(mat: np.ndarray, dtype=jnp.float32):
  """(T, P) array -> stacked gradient tree shaped like PARAMS."""
  t = mat.shape[0]
  leaves, treedef = jax.tree.flatten(PARAMS)
  out, start = [], 0
  for leaf, size in zip(leaves, LEAF_SIZES):
    # Cast in NumPy: a device-side cast would compile one op per shape.
    out.append(jnp.asarray(np.asarray(
        mat[:, start:start + size].reshape((t,) + leaf.shape), dtype)))
    start += size
  return jax.tree.unflatten(treedef, out)


def flat(tree) -> np.ndarray:
  """Params-shaped (or stacked) tree -> flat float64 (leaf order)."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                         for x in leaves])


def flat64(tree, leaves_filter=None) -> np.ndarray:
  """Stacked tree -> (T, P) float64 (leaf order), the leaves_filter[i] ones."""
  leaves = jax.tree.leaves(tree)
  t = leaves[0].shape[0]
  return np.concatenate(
      [np.asarray(x, np.float64).reshape(t, -1)
       for i, x in enumerate(leaves)
       if leaves_filter is None or leaves_filter[i]], axis=1)


def flat_tasks(tree) -> np.ndarray:
  """Stacked tree -> (T, P) float64 (leaf order of PARAMS)."""
  return flat64(tree)


def stacked(t, seed=0, dtype=jnp.float32, scale=1.0):
  """Seeded standard-normal stacked gradients shaped like PARAMS."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(np.asarray(
          scale * rng.standard_normal((t,) + p.shape), dtype)), PARAMS)


def random_grads(t: int, seed: int, scales=None) -> np.ndarray:
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, NUM_PARAMS))
  if scales is not None:
    g = g * np.asarray(scales, np.float64)[:, None]
  return g


def assert_close(actual, expected, rtol=2e-5, atol=1e-5):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)
