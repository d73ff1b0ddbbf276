"""STCH against float64 references written from the paper and the authors' code.

``official_stch`` follows the authors' multi-task code (and LibMTL's copy)
as a loop over epochs: ``warmup_epoch`` epochs minimising
``sum_t log(L_t + 1e-20)``, one more epoch doing the same while averaging the
losses into the nadir point ``n``, then ``T mu log sum_t exp(log(L_t / n_t +
1e-20) / mu)``. Its gradient weights are taken by central finite differences
of that objective in float64, so the test does not share our closed form.
``paper_stch`` is the paper's general definition (torchjd's ``STCH``):
``mu log sum_t exp(lambda_t (L_t - z_t) / mu)``. Also: a fixed nadir point,
preferences, traced ``mu``, domain errors, and that the warm-up state never
takes a NaN.
"""

from __future__ import annotations

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import PARAMS, assert_close, flat, random_grads, to_tree

EPS = 1e-20


def finite_difference(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for i in range(len(x)):
    e = np.zeros_like(x)
    e[i] = h * x[i]
    out[i] = (f(x + e) - f(x - e)) / (2 * h * x[i])
  return out


def official_stch(losses_seq, mu, steps_per_epoch, warmup_epoch, pref=None):
  """Gradient weights per step of the authors' epoch loop (float64)."""
  t = losses_seq.shape[1]
  pref = np.ones(t) if pref is None else np.asarray(pref, np.float64)
  nadir_sum, nadir_count, nadir = 0.0, 0, None
  weights = []
  for n, losses in enumerate(losses_seq):
    epoch = n // steps_per_epoch
    if epoch <= warmup_epoch:
      objective = lambda l: np.sum(np.log(l + EPS))
      if epoch == warmup_epoch:
        nadir_sum, nadir_count = nadir_sum + losses, nadir_count + 1
    else:
      if nadir is None:
        nadir = nadir_sum / nadir_count
      objective = lambda l, nad=nadir: t * mu * np.log(np.sum(np.exp(
          pref * np.log(l / nad + EPS) / mu)))
    weights.append(finite_difference(objective, losses))
  return weights


def paper_stch(losses, mu, pref, ideal):
  return mu * np.log(np.sum(np.exp(pref * (losses - ideal) / mu)))


def losses_sequence(steps, t=3, seed=0):
  rng = np.random.default_rng(seed)
  decay = np.exp(-np.outer(np.arange(steps), rng.uniform(0.05, 0.3, t)))
  return rng.uniform(0.5, 3.0, t) * decay * rng.uniform(0.9, 1.1, (steps, t))


@pytest.mark.parametrize("mu", [1.0, 0.1])
def test_stch_matches_the_authors_epoch_loop(mu):
  steps_per_epoch, warmup_epoch, t = 2, 2, 3
  seq = losses_sequence(10)
  tx = po.stch(num_tasks=t, mu=mu,
               warmup_steps=(warmup_epoch + 1) * steps_per_epoch,
               nadir_steps=steps_per_epoch)
  ref = official_stch(seq, mu, steps_per_epoch, warmup_epoch)
  grads_seq = [random_grads(t, 90 + n) for n in range(len(seq))]
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for n, (losses, g) in enumerate(zip(seq, grads_seq)):
    out, state = update(to_tree(g), state, PARAMS,
                        losses=jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(flat(out), ref[n] @ g, rtol=2e-5,
                               atol=2e-5 * np.abs(ref[n] @ g).max(),
                               err_msg=f"step {n}")
  # The nadir estimate is the mean of the third epoch's losses.
  np.testing.assert_allclose(state.loss_sum / steps_per_epoch,
                             seq[4:6].mean(axis=0), rtol=1e-6)


def test_stch_preference_and_fixed_nadir():
  t, seq = 3, losses_sequence(4, seed=1)
  pref = np.array([0.5, 1.0, 2.0])
  nadir = np.array([2.0, 1.0, 0.5])
  tx = po.stch(num_tasks=t, warmup_steps=1, mu=0.3, preference=pref,
               reference=nadir)
  state = tx.init(PARAMS)
  for n, losses in enumerate(seq):
    g = random_grads(t, n)
    out, state = tx.update(to_tree(g), state, PARAMS,
                           losses=jnp.asarray(losses, jnp.float32))
    if n == 0:
      w = 1.0 / losses
    else:
      w = finite_difference(lambda l: t * 0.3 * np.log(np.sum(np.exp(
          pref * np.log(l / nadir) / 0.3))), losses)
    assert_close(flat(out), w @ g, rtol=2e-5)
  # No warm-up, no reference: n = 1 (plain log-losses).
  losses = np.array([0.5, 1.0, 4.0])
  w = po.weighting.stch(jnp.asarray(losses, jnp.float32), mu=0.5)
  ref = finite_difference(lambda l: 3 * 0.5 * np.log(np.sum(np.exp(
      np.log(l) / 0.5))), losses)
  np.testing.assert_allclose(w, ref, rtol=1e-5)


@HYP
@hypothesis.given(
    hnp.arrays(np.float64, (3,), elements=st.floats(-5, 5)),
    hnp.arrays(np.float64, (3,), elements=st.floats(0.05, 1.0)),
    st.sampled_from([0.05, 0.5, 2.0]))
def test_stch_linear_form_is_the_papers_definition(losses, pref, mu):
  ideal = np.array([-1.0, 0.0, 0.5])
  w = po.weighting.stch(jnp.asarray(losses, jnp.float32), mu=mu,
                        preference=jnp.asarray(pref, jnp.float32),
                        reference=jnp.asarray(ideal, jnp.float32),
                        log_losses=False)
  h = 1e-6
  ref = np.array([(paper_stch(losses + h * e, mu, pref, ideal)
                   - paper_stch(losses - h * e, mu, pref, ideal)) / (2 * h)
                  for e in np.eye(3)])
  np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)
  # A convex combination of the preference: sum_t w_t / lambda_t = 1.
  np.testing.assert_allclose(np.sum(np.asarray(w, np.float64) / pref), 1.0,
                             rtol=1e-4)


def test_stch_small_mu_is_the_max_and_traced_mu():
  losses = jnp.array([1.0, 3.0, 2.0])
  w = po.weighting.stch(losses, mu=1e-3, log_losses=False,
                        preference=jnp.ones(3))
  np.testing.assert_allclose(w, [0.0, 1.0, 0.0], atol=1e-6)
  # mu as a traced value (e.g. optax.inject_hyperparams).
  f = jax.jit(lambda mu: po.weighting.stch(losses, mu=mu))
  np.testing.assert_allclose(f(0.5), po.weighting.stch(losses, mu=0.5),
                             rtol=1e-6)


def test_stch_bad_arguments():
  with pytest.raises(ValueError, match="mu"):
    po.stch(num_tasks=2, warmup_steps=0, mu=0.0)
  with pytest.raises(ValueError, match="warmup_steps"):
    po.stch(num_tasks=2, warmup_steps=-1)
  with pytest.raises(ValueError, match="nadir_steps"):
    po.stch(num_tasks=2, warmup_steps=2, nadir_steps=3)
  with pytest.raises(ValueError, match="preference"):
    po.stch(num_tasks=2, warmup_steps=0, preference=jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="preference.*losses.*\\(2,\\)"):
    po.stch(num_tasks=2, warmup_steps=0, preference=jnp.ones(3))
  tx = po.stch(num_tasks=2, warmup_steps=1)
  grads = to_tree(random_grads(2, 0))
  with pytest.raises(ValueError, match=r"stch.*>= 0.*-1\.0"):
    tx.update(grads, tx.init(PARAMS), PARAMS, losses=jnp.array([-1.0, 1.0]))
  # The linear form takes losses of any sign.
  lin = po.stch(num_tasks=2, warmup_steps=0, log_losses=False)
  out, _ = lin.update(grads, lin.init(PARAMS), PARAMS,
                      losses=jnp.array([-1.0, 1.0]))
  assert np.all(np.isfinite(flat(out)))


def test_stch_state_never_nan():
  tx = po.stch(num_tasks=2, warmup_steps=3)
  grads = to_tree(random_grads(2, 0))
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  _, state = update(grads, state, PARAMS, losses=jnp.array([1.0, 2.0]))
  _, state = update(grads, state, PARAMS, losses=jnp.array([jnp.nan, 2.0]))
  _, state = update(grads, state, PARAMS, losses=jnp.array([3.0, jnp.inf]))
  np.testing.assert_allclose(state.loss_sum, [1.0, 2.0])
  # A step outside the domain is not counted (the whole state is kept), so
  # the warm-up goes on and the nadir averages warmup_steps good steps.
  assert int(state.count) == 1
  _, state = update(grads, state, PARAMS, losses=jnp.array([3.0, 4.0]))
  assert int(state.count) == 2
  np.testing.assert_allclose(state.loss_sum, [4.0, 6.0])
  # A zero nadir (all warm-up losses 0) is replaced by 1, not divided by.
  tx = po.stch(num_tasks=2, warmup_steps=1)
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS, losses=jnp.zeros(2))
  out, _ = tx.update(grads, state, PARAMS, losses=jnp.array([1.0, 2.0]))
  assert np.all(np.isfinite(flat(out)))
