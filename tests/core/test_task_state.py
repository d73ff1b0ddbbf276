"""Per-task parameter-size state, second-batch checks, the cross matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcgrad_optax._core import task_state
from pcgrad_optax._core.gram import masked_cross, masked_gram
from stacked_trees import HEADS_MASK, PARAMS, flat64, stacked


def test_init_task_tree_allocates_shared_leaves_only():
  tree = task_state.init_task_tree(PARAMS, HEADS_MASK, 3)
  assert isinstance(tree["head"], optax.MaskedNode)
  assert tree["trunk"]["kernel"].shape == (3, 3, 4)
  assert tree["trunk"]["kernel"].dtype == jnp.float32
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  full = task_state.init_task_tree(bf16, None, 2)
  assert [x.dtype for x in jax.tree.leaves(full)] == [jnp.float32] * 3


def test_task_tree_leaves_refuses_other_shapes():
  tree = task_state.init_task_tree(PARAMS, None, 3)
  grads = stacked(2)
  leaves = jax.tree.leaves(grads)
  with pytest.raises(ValueError, match="m_state.*init"):
    task_state.task_tree_leaves(tree, leaves, [True] * 3, "m", "m_state")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_cross_is_j1_j2t(dtype):
  a, b = stacked(4, seed=1, dtype=dtype), stacked(4, seed=2, dtype=dtype)
  mask = [False, True, True]
  cross = masked_cross(jax.tree.leaves(a), jax.tree.leaves(b), mask, 4)
  assert cross.dtype == jnp.float32
  ja, jb = flat64(a, mask), flat64(b, mask)
  np.testing.assert_allclose(cross, ja @ jb.T, rtol=1e-5, atol=1e-5)
  same = masked_cross(jax.tree.leaves(a), jax.tree.leaves(a), mask, 4)
  np.testing.assert_allclose(same, masked_gram(jax.tree.leaves(a), mask, 4),
                             rtol=1e-6, atol=1e-6)


def test_check_second_batch_names_argument_leaf_and_shapes():
  g = stacked(3)
  leaves, treedef = jax.tree.flatten(g)
  with pytest.raises(ValueError, match="needs.*extra"):
    task_state.check_second_batch(None, leaves, treedef, "m", "extra")
  bad = dict(g, head=jnp.zeros((3, 4, 3)))
  with pytest.raises(ValueError,
                     match=r"'head' of `extra` has shape \(3, 4, 3\), "
                     r"expected \(3, 4, 2\)"):
    task_state.check_second_batch(bad, leaves, treedef, "m", "extra")
  ints = jax.tree.map(lambda x: x.astype(jnp.int32), g)
  with pytest.raises(ValueError, match="floating"):
    task_state.check_second_batch(ints, leaves, treedef, "m", "extra")


def test_check_range_skips_traced_values():
  with pytest.raises(ValueError, match=r"`x` must be in \(0.0, 1.0\]"):
    task_state.check_range(0.0, "x", low_open=True, high=1.0)
  jax.jit(lambda v: task_state.check_range(v, "x", low_open=True))(-1.0)
