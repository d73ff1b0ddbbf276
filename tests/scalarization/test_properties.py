"""Tests that check several loss-based weightings at once.

The methods are uncertainty, DWA and FAMO. A hypothesis property test:
permuting the tasks (their gradients and their losses) leaves each method's
update after three steps unchanged. Then the arguments every loss-based
transform shares: ``losses=`` must be given, with one entry per task, at
trace time (also through ``optax.chain``), and bad constructor arguments are
rejected.

The test data (a params-like tree with a module of two leaves and a head) and
its converters are in tests/stacked_trees.py.
"""

from __future__ import annotations

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import NUM_PARAMS, PARAMS, flat, random_grads, to_tree


@HYP
@hypothesis.given(
    hnp.arrays(np.float64, (3, NUM_PARAMS), elements=st.floats(-5, 5)),
    hnp.arrays(np.float64, (3, 3), elements=st.floats(0.1, 10)),
    st.permutations(range(3)),
    st.sampled_from(["uncertainty", "dwa", "famo", "imtl_l", "stch",
                     "geometric_mean"]))
def test_loss_weightings_permutation_equivariant(g, losses, perm, method):
  perm = np.asarray(perm)
  update = LOSS_UPDATES[method]
  out = update(to_tree(g), jnp.asarray(losses, jnp.float32))
  out_p = update(to_tree(g[perm]), jnp.asarray(losses[:, perm], jnp.float32))
  np.testing.assert_allclose(flat(out), flat(out_p), rtol=1e-4,
                             atol=1e-4 * (np.abs(g).max() + 1))


def _three_steps(make):
  tx = make()

  @jax.jit
  def run(grads, losses):
    state = tx.init(PARAMS)
    for n in range(2):
      _, state = tx.update(grads, state, PARAMS, losses=losses[n])
    return tx.update(grads, state, PARAMS, losses=losses[2])[0]

  return run


LOSS_UPDATES = {
    "uncertainty": _three_steps(lambda: po.uncertainty(num_tasks=3,
                                                     learning_rate=0.3)),
    "dwa": _three_steps(lambda: po.dwa(num_tasks=3, period=1)),
    "famo": _three_steps(lambda: po.famo(num_tasks=3, learning_rate=0.5)),
    # Issue 13 (loss level); COSMOS and PBI: test_cosmos_and_pbi.py.
    "imtl_l": _three_steps(lambda: po.imtl_l(num_tasks=3,
                                             learning_rate=0.3)),
    "stch": _three_steps(lambda: po.stch(num_tasks=3, warmup_steps=1,
                                         mu=0.5)),
    "geometric_mean": _three_steps(po.geometric_mean),
}


@pytest.mark.parametrize("make", [
    lambda: po.uncertainty(num_tasks=3), lambda: po.dwa(num_tasks=3),
    lambda: po.famo(num_tasks=3), lambda: po.imtl_l(num_tasks=3),
    lambda: po.stch(num_tasks=3, warmup_steps=1)],
    ids=["uncertainty", "dwa", "famo", "imtl_l", "stch"])
def test_loss_based_need_losses_at_trace_time(make):
  tx = make()
  grads, state = to_tree(random_grads(3, 0)), tx.init(PARAMS)
  update = jax.jit(tx.update)
  with pytest.raises(ValueError, match="losses"):
    update(grads, state, PARAMS)
  with pytest.raises(ValueError, match=r"losses.*\(3,\).*\(2,\)"):
    update(grads, state, PARAMS, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="num_tasks=3"):
    update(to_tree(random_grads(2, 0)), state, PARAMS, losses=jnp.ones(2))
  # chained with an optimiser, the losses pass through optax.chain
  chained = optax.chain(make(), optax.sgd(0.1))
  out, _ = jax.jit(chained.update)(grads, chained.init(PARAMS), PARAMS,
                                   losses=jnp.ones(3))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_loss_based_bad_arguments():
  with pytest.raises(ValueError, match="task_types"):
    po.uncertainty(num_tasks=3, task_types=("regression",))
  with pytest.raises(ValueError, match="task type"):
    po.uncertainty(num_tasks=1, task_types="ranking")
  with pytest.raises(ValueError, match="init_log_vars"):
    po.uncertainty(num_tasks=3, init_log_vars=jnp.zeros(2))
  with pytest.raises(ValueError, match="temperature"):
    po.dwa(num_tasks=3, temperature=0.0)
  with pytest.raises(ValueError, match="period"):
    po.dwa(num_tasks=3, period=0)
  with pytest.raises(ValueError, match="min_losses"):
    po.famo(num_tasks=3, min_losses=jnp.zeros(2))
  with pytest.raises(ValueError, match="prev_prev_losses"):
    po.weighting.dwa(jnp.ones(3), jnp.ones(2))
