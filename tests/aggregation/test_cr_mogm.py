"""CR-MOGM: the EMA of a Gram weighting's weights, stepped by hand.

The reference recurrence (Zhou et al., 2022) in float64 NumPy on the
weights of the wrapped weighting: ``lambda_1 = lambda_hat_1`` without
initial weights (else ``beta lambda_0 + (1 - beta) lambda_hat_1``), then
``lambda_k = beta lambda_{k-1} + (1 - beta) lambda_hat_k``, and the update
``lambda_k^T G_k``. Also beta = 0 (the weighting itself) and 1 (frozen),
a traced beta under ``optax.inject_hyperparams``, the matrix families and
bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import matrix_families as mf
import pcgrad_optax as po
from gram_cases import gram32, make_case

W = po.weighting


def run_steps(tx, gs):
  params = {"w": jnp.zeros(gs[0].shape[1])}
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs = []
  for g in gs:
    out, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    outs.append(np.asarray(out["w"], np.float64))
  return outs, state


@pytest.mark.parametrize("weighting", [
    W.mgda, functools.partial(W.cagrad, c=0.5), W.upgrad])
@pytest.mark.parametrize("initial", [None, [0.2, 0.3, 0.5]])
def test_recurrence(weighting, initial):
  beta = 0.7
  gs = [make_case("conflicting", 3, seed) for seed in range(4)]
  tx = po.cr_mogm(weighting, beta, num_tasks=3, initial_weights=initial)
  outs, state = run_steps(tx, gs)
  lam = None if initial is None else np.asarray(initial, np.float64)
  for g, out in zip(gs, outs):
    fresh = np.asarray(weighting(gram32(g)), np.float64)
    lam = fresh if lam is None and initial is None else (
        beta * lam + (1 - beta) * fresh)
    np.testing.assert_allclose(out, lam @ g, rtol=2e-5,
                               atol=2e-5 * np.abs(g).max())
  np.testing.assert_allclose(state.weights, lam, rtol=2e-5, atol=1e-6)
  assert int(state.count) == len(gs)


def test_beta_zero_and_one():
  gs = [make_case("random", 3, seed) for seed in range(3)]
  outs, _ = run_steps(po.cr_mogm(W.mgda, 0.0, num_tasks=3), gs)
  for g, out in zip(gs, outs):
    np.testing.assert_allclose(
        out, np.asarray(W.mgda(gram32(g)), np.float64) @ g, rtol=1e-5,
        atol=1e-6)
  _, state = run_steps(po.cr_mogm(W.mgda, 1.0, num_tasks=3), gs)
  np.testing.assert_allclose(state.weights, W.mgda(gram32(gs[0])),
                             rtol=1e-6)


def test_inject_hyperparams_beta():
  gs = [make_case("random", 2, seed) for seed in range(3)]
  tx = optax.inject_hyperparams(
      lambda beta: po.cr_mogm(W.mgda, beta, num_tasks=2))(beta=0.5)
  ref = po.cr_mogm(W.mgda, 0.5, num_tasks=2)
  outs, _ = run_steps(tx, gs)
  ref_outs, _ = run_steps(ref, gs)
  for a, b in zip(outs, ref_outs):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name,g", mf.typical(min_tasks=2) + mf.scaled(2),
                         ids=mf.ids(mf.typical(min_tasks=2) + mf.scaled(2)))
def test_families_finite(name, g):
  t = g.shape[0]
  outs, state = run_steps(po.cr_mogm(W.mgda, 0.9, num_tasks=t), [g, g])
  assert all(np.all(np.isfinite(o)) for o in outs)
  # The same Gram twice: the EMA of two equal weights is those weights.
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5,
                             atol=1e-6 * np.abs(g).max())


def test_bad_input():
  with pytest.raises(ValueError, match="beta"):
    po.cr_mogm(W.mgda, 1.5, num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks"):
    po.cr_mogm(W.mgda, 0.5, num_tasks=0)
  with pytest.raises(ValueError, match="callable"):
    po.cr_mogm("mgda", 0.5, num_tasks=2)
  with pytest.raises(ValueError, match="initial_weights"):
    po.cr_mogm(W.mgda, 0.5, num_tasks=2, initial_weights=[1.0, 0, 0])
  tx = po.cr_mogm(W.mgda, 0.5, num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks=2"):
    tx.update({"w": jnp.ones((3, 4))}, tx.init({"w": jnp.zeros(4)}))
  with pytest.raises(ValueError, match="previous"):
    W.cr_mogm(jnp.eye(2), jnp.ones(3), weighting=W.mgda)
  with pytest.raises(ValueError, match="returned shape"):
    W.cr_mogm(jnp.eye(2), jnp.ones(2), weighting=lambda k: jnp.ones(3))


def test_keep_gram_and_traced_num_tasks():
  g = jnp.array([[1., 0.], [0., 3.]])
  params = {"w": jnp.zeros(2)}
  tx = po.cr_mogm(po.weighting.mgda, 0.5, num_tasks=2, keep_gram=True)
  state = tx.init(params)
  np.testing.assert_array_equal(state.gram, jnp.zeros((2, 2)))
  _, state = tx.update({"w": g}, state, params)
  np.testing.assert_allclose(state.gram, g @ g.T)
  # num_tasks injected (init outside jit, update traced): the same step.
  inj = optax.inject_hyperparams(po.cr_mogm, static_args="weighting")(
      po.weighting.mgda, 0.5, num_tasks=2)
  _, s = jax.jit(inj.update)({"w": g}, inj.init(params), params)
  np.testing.assert_allclose(s.inner_state.weights, [0.9, 0.1], rtol=1e-5)
  with pytest.raises(ValueError, match="beta"):
    po.cr_mogm(po.weighting.mgda, jnp.array(2.0), num_tasks=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_step_keeps_the_state(bad):
  # The EMA never takes in the weights of a step with a NaN/inf gradient:
  # the whole state (count, weights, Gram record) stays as it was.
  gs = [make_case("random", 3, seed) for seed in range(3)]
  tx = po.cr_mogm(W.mgda, 0.5, num_tasks=3, keep_gram=True)
  params = {"w": jnp.zeros(gs[0].shape[1])}
  step = jax.jit(tx.update)
  _, state = step({"w": jnp.asarray(gs[0], jnp.float32)}, tx.init(params))
  g_bad = np.array(gs[1], np.float32)
  g_bad[2, 0] = bad
  out, after = step({"w": jnp.asarray(g_bad)}, state)
  assert not np.all(np.isfinite(np.asarray(out["w"])))
  for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
  _, clean = step({"w": jnp.asarray(gs[2], jnp.float32)}, state)
  _, skipped = step({"w": jnp.asarray(gs[2], jnp.float32)}, after)
  np.testing.assert_array_equal(clean.weights, skipped.weights)


def test_corollary_schedule_reference():
  # The schedule torchjd reads from the paper's Corollary 1, beta_k =
  # 1 - lr_k / lr_0 on the previous weights (0 at the first step, towards 1
  # as the learning rate decays), through inject_hyperparams, against the
  # recurrence in float64.
  gs = [make_case("random", 3, seed) for seed in range(4)]
  lr = [1.0, 0.5, 0.25, 0.1]
  tx = optax.inject_hyperparams(po.cr_mogm,
                                static_args=("weighting", "num_tasks"))(
                                    weighting=W.mgda,
                                    beta=lambda k: 1.0 - jnp.asarray(lr)[k],
                                    num_tasks=3)
  outs, state = run_steps(tx, gs)
  lam = None
  for g, out, lr_k in zip(gs, outs, lr):
    fresh = np.asarray(W.mgda(gram32(g)), np.float64)
    beta = 1.0 - lr_k / lr[0]
    lam = fresh if lam is None else beta * lam + (1 - beta) * fresh
    np.testing.assert_allclose(out, lam @ g, rtol=2e-5,
                               atol=2e-5 * np.abs(g).max())
