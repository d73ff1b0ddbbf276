"""apply_if_finite: skipped steps keep the whole inner state; dropped tasks.

Skipping: a NaN or inf in one task's gradient, or in the losses, gives a zero
update and leaves the inner state bit for bit as it was (every family, in a
chain with Adam), so the run equals the run without that step; the counters
follow ``optax.apply_if_finite``'s exactly (checked against it on the same
pattern of bad steps). Dropping: the inner transformation sees the offending
task's gradient zeroed and its losses carried forward (checked against the
inner transformation fed those inputs by hand), nothing non-finite reaches
its state, and the remaining tasks are combined as each method's zero-gradient
rule says (PCGrad and the sum as without the task, UPGrad (T-1)/T of it,
MGDA zero; float64 NumPy references). Also: position 1 of a chain, both
nestings with multi_steps, and the argument checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po
from gram_references import ref_upgrad
from loss_sequence import LOSS_SEQUENCE
from stacked_trees import PARAMS, flat, random_grads, to_tree

T = 3
NAN, INF = float("nan"), float("inf")

FAMILIES = {
    "pcgrad": lambda: po.pcgrad(1),
    "mgda": po.mgda,
    "upgrad": po.upgrad,
    "famo": lambda: po.famo(num_tasks=T, learning_rate=0.5),
    "uncertainty": lambda: po.uncertainty(num_tasks=T, learning_rate=0.5),
    "gradvac": lambda: po.gradvac(2, num_tasks=T, beta=0.5),
    "graddrop": lambda: po.graddrop(3),
    "dwa": lambda: po.dwa(num_tasks=T),
    "rlw": lambda: po.rlw(4),
    # Issue 13's loss-level methods (STCH through its warm-up step too).
    "imtl_l": lambda: po.imtl_l(num_tasks=T, learning_rate=0.5),
    "stch": lambda: po.stch(num_tasks=T, warmup_steps=1),
    "geometric_mean": lambda: po.geometric_mean(num_tasks=T),
    "cosmos": lambda: po.cosmos(lambda_=1.0, num_tasks=T),
    "pbi": lambda: po.pbi(num_tasks=T),
}


def chain(name):
  return optax.chain(FAMILIES[name](), optax.adam(0.1))


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def good_step(n):
  return random_grads(T, 10 + n), LOSS_SEQUENCE[n % len(LOSS_SEQUENCE)]


def with_nan_grad(g, task=1, value=NAN):
  g = g.copy()
  g[task, 5] = value
  return g


def run(tx, steps, update=None):
  """Runs tx over (grads, losses) steps; returns outputs, states, the step."""
  if update is None:
    update = jax.jit(
        lambda g, s, losses: tx.update(g, s, PARAMS, losses=losses))
  state, outs, states = tx.init(PARAMS), [], []
  for g, losses in steps:
    out, state = update(to_tree(g), state, jnp.asarray(losses, jnp.float32))
    outs.append(flat(out))
    states.append(state)
  return outs, states, update


BAD_STEPS = {
    "nan_grad": lambda g, losses: (with_nan_grad(g), losses),
    "inf_grad": lambda g, losses: (with_nan_grad(g, 0, -INF), losses),
    "nan_loss": lambda g, losses: (g, np.where(np.arange(T) == 2, NAN,
                                               losses)),
    "inf_loss": lambda g, losses: (g, np.where(np.arange(T) == 0, INF,
                                               losses)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_skipped_steps_keep_inner_state_bit_identical(name):
  # Each kind of bad step (NaN or inf in one task's gradient, in one loss)
  # is skipped: zero update, the inner state as before, and afterwards the
  # run without the bad steps, bit for bit.
  tx = po.apply_if_finite(chain(name), max_consecutive_errors=3)
  good = [good_step(n) for n in range(5)]
  bad = [BAD_STEPS[k](*good[n]) for k, n in
         (("nan_grad", 2), ("inf_loss", 3), ("inf_grad", 4), ("nan_loss", 4))]
  steps = good[:2] + bad[:1] + good[2:3] + bad[1:2] + good[3:4] + bad[2:] \
      + good[4:]
  is_bad = [False, False, True, False, True, False, True, True, False]
  outs, states, update = run(tx, steps)
  ref_outs, ref_states, _ = run(tx, good, update)
  good_index = np.cumsum(~np.asarray(is_bad)) - 1   # index into the ref run
  skipped = 0
  for n, bad_step in enumerate(is_bad):
    ref = good_index[n]
    assert_trees_identical(states[n].inner_state, ref_states[ref].inner_state)
    if bad_step:
      skipped += 1
      np.testing.assert_array_equal(outs[n], 0.0)
    else:
      np.testing.assert_array_equal(outs[n], ref_outs[ref])
    assert bool(states[n].last_finite) is not bad_step
    assert int(states[n].total_notfinite) == skipped
  assert int(states[7].notfinite_count) == 2
  assert int(states[8].notfinite_count) == 0


def test_counters_follow_optax_apply_if_finite():
  # The same pattern of bad steps through optax's wrapper (params-shaped
  # gradients) and ours: the same counters and the same applied steps.
  pattern = [True, False, False, False, True, False, False, False, False,
             True]
  ours = po.apply_if_finite(po.sum(), max_consecutive_errors=2)
  theirs = optax.apply_if_finite(optax.identity(), max_consecutive_errors=2)
  s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
  for n, ok in enumerate(pattern):
    g = random_grads(T, n) if ok else with_nan_grad(random_grads(T, n), 0)
    u_ours, s_ours = jax.jit(ours.update)(to_tree(g), s_ours, PARAMS)
    u_theirs, s_theirs = jax.jit(theirs.update)(
        to_tree(g[:1]), s_theirs, PARAMS)
    u_theirs = jax.tree.map(lambda x: x[0], u_theirs)
    for field in ("notfinite_count", "last_finite", "total_notfinite"):
      assert int(getattr(s_ours, field)) == int(getattr(s_theirs, field)), (
          n, field)
    applied_ours = np.any(flat(u_ours) != 0)
    applied_theirs = np.any(flat(u_theirs) != 0)
    assert applied_ours == applied_theirs, n


def test_gives_up_after_max_consecutive_errors():
  tx = po.apply_if_finite(chain("famo"), max_consecutive_errors=1)
  g, losses = good_step(0)
  bad = with_nan_grad(g)
  outs, states, _ = run(tx, [(g, losses), (bad, losses), (bad, losses)])
  np.testing.assert_array_equal(outs[1], 0.0)
  assert np.any(np.isnan(outs[2]))   # applied anyway, as optax does
  assert int(states[2].notfinite_count) == 2
  assert int(states[2].total_notfinite) == 2


def clean_step(g, losses, prev_losses, dropped):
  """What the inner transformation sees when `dropped` tasks are dropped."""
  g = np.where(np.isin(np.arange(T), dropped)[:, None], 0.0, g)
  losses = np.where(np.isin(np.arange(T), dropped), prev_losses, losses)
  return g, losses


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dropped_task_what_the_inner_transformation_sees(name):
  tx = po.apply_if_finite(chain(name), 3, drop_nonfinite_tasks=True,
                          num_tasks=T)
  good = [good_step(n) for n in range(5)]
  # Task 1 offends at steps 2 (a NaN gradient) and 3 (a NaN loss).
  steps = good[:2] + [(with_nan_grad(good[2][0]), good[2][1]),
                      (good[3][0], np.where(np.arange(T) == 1, NAN,
                                            good[3][1])), good[4]]
  outs, states, _ = run(tx, steps)
  # The inner chain fed by hand: task 1 zeroed, its losses the last finite
  # ones it had (step 1's: at step 2 it was dropped, its loss not kept).
  ref_steps = good[:2] + [clean_step(*good[n], good[1][1], [1])
                          for n in (2, 3)] + [good[4]]
  ref_outs, ref_states, _ = run(chain(name), ref_steps)
  for n in range(5):
    np.testing.assert_allclose(outs[n], ref_outs[n], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(states[n].inner_state),
                    jax.tree.leaves(ref_states[n])):
      np.testing.assert_allclose(np.asarray(a, np.float64),
                                 np.asarray(b, np.float64),
                                 rtol=1e-6, atol=1e-7)
    for leaf in jax.tree.leaves(states[n].inner_state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  assert np.asarray(states[4].tasks.dropped_count).tolist() == [0, 2, 0]
  np.testing.assert_array_equal(states[4].tasks.last_losses,
                                np.asarray(good[4][1], np.float32))
  assert [bool(s.last_finite) for s in states] == [True, True, False, False,
                                                   True]
  assert int(states[4].total_notfinite) == 0   # nothing was skipped


def ref_pcgrad(g, order):
  """PCGrad's Algorithm 1 on the rows of g (float64), with given orders."""
  out = np.zeros(g.shape[1])
  for i in range(g.shape[0]):
    gi = g[i].copy()
    for j in order[i]:
      if j != i and gi @ g[j] < 0 and g[j] @ g[j] > 0:
        gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
    out += gi
  return out


def test_dropped_task_pcgrad_is_pcgrad_on_the_others():
  key = 5
  tx = po.apply_if_finite(po.pcgrad(key), 0, drop_nonfinite_tasks=True,
                          num_tasks=T)
  g = random_grads(T, 3)
  out, _ = tx.update(to_tree(with_nan_grad(g)), tx.init(PARAMS), PARAMS)
  orders = np.asarray(po.weighting.random_orders(
      jax.random.fold_in(jax.random.key(key), 0), T))
  others = [0, 2]
  sub_orders = [[others.index(j) for j in orders[i] if j in others]
                for i in others]
  np.testing.assert_allclose(flat(out), ref_pcgrad(g[others], sub_orders),
                             rtol=1e-5, atol=1e-5)


def test_dropped_task_sum_upgrad_mgda():
  g = random_grads(T, 4)
  bad = to_tree(with_nan_grad(g))
  others = g[[0, 2]]

  def update(make):
    tx = po.apply_if_finite(make(), 0, drop_nonfinite_tasks=True,
                            num_tasks=T)
    return flat(tx.update(bad, tx.init(PARAMS), PARAMS)[0])

  np.testing.assert_allclose(update(po.sum), others.sum(0), rtol=1e-5,
                             atol=1e-6)
  # UPGrad averages over T: a zero gradient projects to zero.
  np.testing.assert_allclose(update(po.upgrad),
                             (T - 1) / T * ref_upgrad(others), rtol=1e-4,
                             atol=1e-5)
  # MGDA: 0 is in the convex hull once a gradient is zero.
  np.testing.assert_allclose(update(po.mgda), 0.0, atol=1e-6)


def test_dropping_skips_when_nothing_is_left_to_apply():
  tx = po.apply_if_finite(chain("famo"), 3, drop_nonfinite_tasks=True,
                          num_tasks=T)
  g, losses = good_step(0)
  # step 0: task 1's loss is NaN and it has no finite loss to carry forward
  first = (g, np.where(np.arange(T) == 1, NAN, losses))
  every = (np.full_like(g, NAN), losses)   # every task offending
  outs, states, _ = run(tx, [first, good_step(1), every])
  init = tx.init(PARAMS)
  np.testing.assert_array_equal(outs[0], 0.0)
  assert_trees_identical(states[0].inner_state, init.inner_state)
  assert int(states[0].total_notfinite) == 1
  np.testing.assert_array_equal(outs[2], 0.0)
  assert_trees_identical(states[2].inner_state, states[1].inner_state)
  assert int(states[2].total_notfinite) == 2
  assert np.asarray(states[2].tasks.dropped_count).tolist() == [0, 0, 0]
  # without losses, a partial first step is applied (nothing to carry)
  drop = po.apply_if_finite(po.pcgrad(), 3, drop_nonfinite_tasks=True,
                            num_tasks=T)
  out, state = drop.update(to_tree(with_nan_grad(g)), drop.init(PARAMS),
                           PARAMS)
  assert np.all(np.isfinite(flat(out))) and np.any(flat(out) != 0)
  assert int(state.total_notfinite) == 0


def test_first_in_a_chain_and_around_it():
  g = to_tree(with_nan_grad(random_grads(T, 0)))
  first = optax.chain(po.apply_if_finite(po.pcgrad(), 2), optax.adam(0.1))
  out, state = jax.jit(first.update)(g, first.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(flat(out), 0.0)
  assert int(state[0].total_notfinite) == 1


def test_with_multi_steps_both_ways():
  good = [to_tree(random_grads(T, n)) for n in range(4)]
  bad = to_tree(with_nan_grad(random_grads(T, 9)))

  def micro(tx, batches):
    update = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
    state, outs = tx.init(PARAMS), []
    for g in batches:
      out, state = update(g, state)
      outs.append(flat(out))
    return outs, state

  # Outside: a bad micro-batch is skipped, the accumulator keeps its value.
  outer = po.apply_if_finite(
      po.multi_steps(chain("pcgrad"), 2, num_tasks=T), 3)
  outs, state = micro(outer, [good[0], bad, good[1]])
  ref, _ = micro(outer, [good[0], good[1]])
  np.testing.assert_array_equal(outs[2], ref[1])
  assert np.any(outs[2] != 0)
  # Inside: the averaged real step is skipped, the inner state kept.
  inner = po.multi_steps(po.apply_if_finite(chain("pcgrad"), 3), 2,
                         num_tasks=T)
  outs, state = micro(inner, [good[0], bad, good[2], good[3]])
  np.testing.assert_array_equal(outs[1], 0.0)
  assert int(state.inner_state.total_notfinite) == 1
  assert np.any(outs[3] != 0) and np.all(np.isfinite(outs[3]))


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_tasks"):
    po.apply_if_finite(po.pcgrad(), 3, drop_nonfinite_tasks=True)
  with pytest.raises(ValueError, match="max_consecutive_errors"):
    po.apply_if_finite(po.pcgrad(), -1)
  tx = po.apply_if_finite(po.famo(num_tasks=T), 3,
                          drop_nonfinite_tasks=True, num_tasks=T)
  state = tx.init(PARAMS)
  grads = to_tree(random_grads(T, 0))
  with pytest.raises(ValueError, match=r"losses.*\(3,\).*\(2,\)"):
    tx.update(grads, state, PARAMS, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update(to_tree(random_grads(2, 0)), state, PARAMS, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="head"):
    tx.update(dict(grads, head=grads["head"][0]), state, PARAMS,
              losses=jnp.ones(T))
