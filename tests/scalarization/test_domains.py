"""Loss-based methods' domains: FAMO's L > L*, uncertainty's and DWA's L >= 0.

Concrete losses outside the domain (or not finite) raise a ValueError that
names the method, the argument and the task. Under ``jit`` a step with such
losses keeps the whole state as it was (bit for bit), so one NaN loss never
poisons FAMO's logits, the log-variances or DWA's history; the update of that
step is documented per method and checked here against NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po

PARAMS = {"w": jnp.zeros(2)}
EYE = {"w": jnp.eye(2)}          # task t's gradient is e_t
NAN = float("nan")


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


MAKERS = {
    "famo": lambda: po.famo(num_tasks=2, learning_rate=0.5),
    "uncertainty": lambda: po.uncertainty(num_tasks=2, learning_rate=0.5),
    "dwa": lambda: po.dwa(num_tasks=2),
}


@pytest.mark.parametrize("bad", [[1.0, NAN], [float("inf"), 1.0], [-1.0, 1.0]],
                         ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_concrete_losses_outside_domain_raise(name, bad):
  tx = MAKERS[name]()
  state = tx.init(PARAMS)
  task = 1 if np.isnan(bad[1]) else 0
  with pytest.raises(ValueError, match=rf"{name}: `losses` must be finite.*"
                                       rf"task\(s\) \[{task}\]"):
    tx.update(EYE, state, PARAMS, losses=jnp.array(bad))


def test_famo_concrete_losses_at_or_below_min_losses_raise():
  tx = po.famo(num_tasks=2, min_losses=jnp.array([1.0, 0.0]))
  state = tx.init(PARAMS)
  for losses in ([0.5, 2.0], [1.0, 2.0]):
    with pytest.raises(ValueError, match=r"famo: `losses` must be finite and "
                                         r"> min_losses; .*task\(s\) \[0\] "
                                         r"\(min_losses: \[1\.0\]\)"):
      tx.update(EYE, state, PARAMS, losses=jnp.array(losses))
  _, state = tx.update(EYE, state, PARAMS, losses=jnp.array([2.0, 2.0]))
  with pytest.raises(ValueError, match="prev_batch_losses"):
    tx.update(EYE, state, PARAMS, losses=jnp.array([2.0, 2.0]),
              prev_batch_losses=jnp.array([2.0, NAN]))
  with pytest.raises(ValueError, match=r"weighting.famo.*task\(s\) \[1\]"):
    po.weighting.famo(jnp.zeros(2), jnp.array([1.0, -0.5]))


def _run(tx, losses_seq):
  update = jax.jit(lambda s, losses: tx.update(EYE, s, PARAMS, losses=losses))
  state, states, outs = tx.init(PARAMS), [], []
  for losses in losses_seq:
    out, state = update(state, jnp.asarray(losses, jnp.float32))
    outs.append(np.asarray(out["w"]))
    states.append(state)
  return outs, states


GOOD = [[2.0, 1.0], [1.5, 0.9], [1.2, 0.85], [1.1, 0.8]]


@pytest.mark.parametrize("bad", [[1.0, NAN], [float("inf"), 1.0], [-1.0, 1.0]],
                         ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_jit_bad_step_keeps_state_bit_identical(name, bad):
  # The bad step at position 2: the state after it is the state before it,
  # and every later step is exactly the run without the bad step.
  tx = MAKERS[name]()
  outs, states = _run(tx, GOOD[:2] + [bad] + GOOD[2:])
  ref_outs, ref_states = _run(tx, GOOD)
  assert_trees_identical(states[2], states[1])
  for n in (3, 4):
    assert_trees_identical(states[n], ref_states[n - 1])
    np.testing.assert_array_equal(outs[n], ref_outs[n - 1])
  for leaf in jax.tree.leaves(states):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


def test_jit_bad_step_updates():
  # FAMO: tasks outside the domain get weight 0, the others their FAMO
  # weights renormalised; uncertainty and DWA: the usual weights.
  for name, expected in (("famo", [1.0, 0.0]), ("uncertainty", None),
                         ("dwa", None)):
    tx = MAKERS[name]()
    outs, states = _run(tx, GOOD[:2] + [[1.0, NAN]])
    if name == "uncertainty":   # weights exp(-s) of the state before the step
      expected = np.exp(-np.asarray(states[1].log_vars, np.float64))
    if name == "dwa":           # steps 0 and 1 complete; step 2 uses L1/L0
      ratio = np.array(GOOD[1]) / np.array(GOOD[0])
      expected = 2 * np.exp(ratio / 2) / np.exp(ratio / 2).sum()
    np.testing.assert_allclose(outs[2], expected, rtol=1e-6, atol=1e-7)


def test_famo_below_min_losses_under_jit_is_never_uphill():
  # Today's main: weights [2, -1], an update that increases task 1's loss.
  tx = po.famo(num_tasks=2, min_losses=1.0)
  state = tx.init(PARAMS)
  out, new_state = jax.jit(tx.update)(EYE, state, PARAMS,
                                      losses=jnp.array([0.5, 2.0]))
  np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, 1.0])
  assert_trees_identical(new_state, state)
  # every task outside the domain: no task to weight, a zero update
  out, new_state = jax.jit(tx.update)(EYE, state, PARAMS,
                                      losses=jnp.array([0.5, NAN]))
  np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, 0.0])
  assert_trees_identical(new_state, state)


def test_famo_prev_batch_losses_nan_under_jit_keeps_state():
  tx = po.famo(num_tasks=2, learning_rate=0.5)
  update = jax.jit(tx.update)
  _, state = update(EYE, tx.init(PARAMS), PARAMS, losses=jnp.array([2.0, 1.0]))
  out, new_state = update(EYE, state, PARAMS, losses=jnp.array([1.5, 0.9]),
                          prev_batch_losses=jnp.array([NAN, 0.9]))
  assert_trees_identical(new_state, state)
  assert np.all(np.isfinite(np.asarray(out["w"])))


@pytest.mark.parametrize("name", ["famo", "uncertainty"])
def test_nan_loss_does_not_freeze_optax_apply_if_finite_after_it(name):
  # The reproducer: one NaN loss made FAMO's logits (and the
  # log-variances) NaN for good, so optax.apply_if_finite after the
  # aggregator skipped every later step and training froze silently.
  make = {"famo": lambda: po.famo(num_tasks=2),
          "uncertainty": lambda: po.uncertainty(num_tasks=2)}[name]
  tx = optax.chain(make(), optax.apply_if_finite(optax.sgd(0.1), 10))
  update = jax.jit(lambda s, losses: tx.update(EYE, s, PARAMS, losses=losses))
  state = tx.init(PARAMS)
  for losses in ([2.0, 1.0], [NAN, 1.0], [1.5, 0.9], [1.2, 0.8], [1.1, 0.7]):
    out, state = update(state, jnp.array(losses))
  assert np.all(np.isfinite(np.asarray(out["w"])))
  assert np.any(np.asarray(out["w"]) != 0)
  guard = state[1]
  assert int(guard.notfinite_count) == 0
  for leaf in jax.tree.leaves(state[0]):
    assert np.all(np.isfinite(np.asarray(leaf)))


# The one-backward-pass path checks the same domain in the same shared code:
# the same errors for concrete losses, the same kept state and the same
# weights under jit as the transformation (shared=None) on EYE.
LOSS_MAKERS = {
    "famo": lambda: po.scalarization.famo_loss(num_tasks=2,
                                               learning_rate=0.5),
    "uncertainty": lambda: po.scalarization.uncertainty_loss(
        num_tasks=2, learning_rate=0.5),
    "dwa": lambda: po.scalarization.dwa_loss(num_tasks=2),
    "imtl_l": lambda: po.scalarization.imtl_l_loss(num_tasks=2,
                                                   learning_rate=0.5),
    "stch": lambda: po.scalarization.stch_loss(num_tasks=2, warmup_steps=1),
}
TX_MAKERS = dict(MAKERS, imtl_l=lambda: po.imtl_l(num_tasks=2,
                                                  learning_rate=0.5),
                 stch=lambda: po.stch(num_tasks=2, warmup_steps=1))


@pytest.mark.parametrize("bad", [[1.0, NAN], [float("inf"), 1.0], [-1.0, 1.0]],
                         ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("name", sorted(LOSS_MAKERS))
def test_one_pass_same_domain_as_the_transformation(name, bad):
  scal = LOSS_MAKERS[name]()
  task = 1 if np.isnan(bad[1]) else 0
  with pytest.raises(ValueError, match=rf"{name}_loss: `losses` must be "
                                       rf"finite.*task\(s\) \[{task}\]"):
    scal.weights(jnp.array(bad), scal.init())
  step = jax.jit(scal.weights)
  state, states, weights = scal.init(), [], []
  for losses in GOOD[:2] + [bad] + GOOD[2:]:
    w, state = step(jnp.asarray(losses, jnp.float32), state)
    states.append(state)
    weights.append(np.asarray(w))
  assert_trees_identical(states[2], states[1])
  outs, tx_states = _run(TX_MAKERS[name](), GOOD[:2] + [bad] + GOOD[2:])
  for n in range(5):
    np.testing.assert_allclose(weights[n], outs[n], rtol=1e-6, atol=1e-7)
    assert_trees_identical(states[n], tx_states[n])
