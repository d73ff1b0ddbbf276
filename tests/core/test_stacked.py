"""Validation of stacked per-task gradients: task axes, structure, dtypes.

Covers the checks of ``pcgrad_optax._core.stacked``: the task axis every leaf
must share (and that params fix), the tree structure, integer leaves, empty
trees, the reduction name, and float64 kept end to end under x64.

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


def test_float64_under_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    grads = {"a": jnp.asarray(rng.standard_normal((3, 5, 2))),
             "b": jnp.asarray(rng.standard_normal((3, 4)))}
    assert grads["a"].dtype == jnp.float64
    g = flat64(grads)
    weights = jnp.asarray([0.3, -1.0, 2.0])
    tx = po.pcgrad(0)

    @jax.jit
    def everything(grads, weights, state):
      gram = po.gram_matrix(grads)
      w = po.weighting.pcgrad(
          gram, key=jax.random.fold_in(jax.random.key(0), 0))
      return (gram, po.weighted_sum(grads, weights),
              tx.update(grads, state)[0], w)

    gram, out, upd, w = everything(grads, weights, tx.init(None))
    assert gram.dtype == jnp.float64
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-13, atol=1e-13)
    assert out["a"].dtype == jnp.float64
    np.testing.assert_allclose(
        out["b"], np.asarray(weights) @ np.asarray(grads["b"]), rtol=1e-13)
    # The transform keeps float64 end to end.
    assert upd["a"].dtype == jnp.float64 and upd["b"].dtype == jnp.float64
    assert w.dtype == jnp.float64
    np.testing.assert_allclose(upd["b"], np.asarray(w) @ np.asarray(
        grads["b"]), rtol=1e-12)
  assert jnp.asarray(1.0).dtype == jnp.float32   # x64 did not leak out


# ---------------------------------------------------------------------------
# Bad inputs: ValueError at trace time, naming the leaf and the shapes.


def test_task_axes_disagree():
  grads = stacked(3)
  bad = dict(grads, head=grads["head"][:2])
  msg = has_all("head", "(2, 4, 2)", "(3, 4)")
  for params in (None, PARAMS):
    with pytest.raises(ValueError, match=has_all("head", "(2, 4, 2)")):
      traced(lambda g: pcgrad_update(g, params), bad)
  with pytest.raises(ValueError, match=msg):
    traced(po.gram_matrix, bad)
  with pytest.raises(ValueError, match=msg):
    traced(lambda g: po.weighted_sum(g, jnp.ones(3)), bad)
  with pytest.raises(ValueError, match=msg):    # also under jit
    jax.jit(po.gram_matrix)(bad)


def test_leaf_without_task_axis():
  grads = stacked(3)
  no_axis = dict(grads, head=jnp.zeros((4, 2)))
  # With params: the leaf's shape equals its param's.
  with pytest.raises(ValueError,
                     match=has_all("head", "(4, 2)", "param", "task axis")):
    traced(lambda g: pcgrad_update(g, PARAMS), no_axis)
  # Without params: its leading axis disagrees with the others'.
  with pytest.raises(ValueError, match=has_all("head", "(4, 2)", "(3, 4)")):
    traced(lambda g: pcgrad_update(g), no_axis)
  # A scalar leaf has no task axis at all.
  with pytest.raises(ValueError, match=has_all("bias", "()")):
    traced(po.gram_matrix, dict(grads, bias=jnp.zeros(())))
  # With params, a leaf whose trailing shape is not the param's.
  wrong = dict(grads, head=jnp.zeros((3, 2, 4)))
  with pytest.raises(ValueError, match=has_all("head", "(3, 2, 4)",
                                               "(3, 4, 2)")):
    traced(lambda g: pcgrad_update(g, PARAMS), wrong)


def test_structure_and_dtype_errors():
  grads = stacked(3)
  with pytest.raises(ValueError, match="structure"):
    traced(lambda g: pcgrad_update(g, {"trunk": PARAMS["trunk"]}), grads)
  with pytest.raises(ValueError, match=has_all("head", "int32")):
    traced(po.gram_matrix, dict(grads, head=jnp.zeros((3, 4, 2), jnp.int32)))
  with pytest.raises(ValueError, match="no leaves"):
    traced(po.gram_matrix, {})


def test_unknown_reduction():
  with pytest.raises(ValueError, match=has_all("median", "reduction")):
    po.pcgrad(reduction="median")
