"""``shared`` masks: pytree, prefix and callable masks, nnx.State key paths.

The masks of ``pcgrad_optax._core.masks`` against float64 NumPy Gram
matrices of the leaves they select, and their errors (structure mismatches,
non-bool or traced mask leaves).

Every bad input must be a ValueError raised while tracing (checked with
``jax.eval_shape`` or ``jax.jit``, where nothing runs) that names the
offending leaf or argument and its shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from stacked_trees import PARAMS, flat64, stacked
from trace_errors import has_all, pcgrad_update, traced


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


def _nnx_grads():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.trunk = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

  _, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  return jax.tree.map(lambda p: jnp.stack([p, -2 * p, p + 1]), params)


def _dict_grads():
  return {"trunk": {"kernel": jnp.ones((3, 3, 4)), "bias": jnp.ones((3, 4))},
          "head": {"kernel": jnp.ones((3, 4, 2)), "bias": jnp.ones((3, 2))}}


@pytest.mark.parametrize("grads", [_nnx_grads, _dict_grads],
                         ids=["nnx_state", "dict"])
@pytest.mark.parametrize("mask,parts", [
    ({"trunk": True, "haed": False},
     ["mask key 'haed' matches no gradient", "did you mean 'head'",
      "no mask entry for the gradients at 'head'"]),
    ({"trunk": {"kernal": True, "bias": True}, "head": False},
     ["mask key 'trunk/kernal' matches no gradient", "did you mean 'kernel'",
      "'trunk/kernel'"]),
    ({"trunk": True},
     ["no mask entry for the gradients at 'head'"]),
    ({"trunk": {"kernel": True}, "head": False},
     ["no mask entry for the gradients at 'trunk/bias'"]),
    ({"trunk": True, "head": False, "extra": True},
     ["mask key 'extra' matches no gradient", "head, trunk"]),
    ({}, ["no mask entry for the gradients at 'head', 'trunk'"]),
    ({"trunk": True, "head": {"kernel": {"x": True}, "bias": False}},
     ["mask key 'head/kernel/x'"]),
], ids=["typo", "inner_typo", "missing", "inner_missing", "extra", "empty",
        "too_deep"])
def test_mask_error_names_the_key(grads, mask, parts):
  # The error names the key path that matched nothing (and the keys there)
  # or the gradients left without an entry, for an nnx.State as for a dict,
  # at trace time, without dumping the trees' PyTreeDefs.
  grads = grads()
  tx = po.pcgrad(shared=mask)
  state = tx.init(jax.tree.map(lambda g: g[0], grads))
  for fn in (lambda g: po.gram_matrix(g, shared=mask),
             lambda g: po.gram_matrix(g, shared=lambda p: mask),
             lambda g: tx.update(g, state)):
    with pytest.raises(ValueError,
                       match=has_all("mask", "structure", *parts)) as info:
      traced(fn, grads)
    assert "PyTreeDef" not in str(info.value)
