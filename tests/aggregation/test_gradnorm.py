"""GradNorm (weighting and transform) against an independent float64 reference.

The reference is Algorithm 1 of Chen et al. (2018) in float64 NumPy on
flattened (T, P) gradients: ``G_t = w_t |g_t|``, targets
``mean(G) r_t^alpha`` held constant, the gradient of ``L_grad`` written out
by hand (``|g_t| sign(G_t - target_t)``), an SGD (or Adam) step, clipping and
renormalisation to sum T; LibMTL's ``T softmax(xi)`` variant with the chain
rule through the softmax. The update uses the weights from before the step.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import HEADS_MASK, LEAF_SLICES, PARAMS, flat, to_tree


class ReferenceGradNorm:

  def __init__(self, t, cols, alpha, lr, softmax=False, adam=False):
    self.param = np.zeros(t) if softmax else np.ones(t)
    self.cols, self.alpha, self.lr = cols, alpha, lr
    self.softmax, self.adam = softmax, adam
    self.l0 = None
    self.m = np.zeros(t)
    self.v = np.zeros(t)
    self.k = 0

  def weights(self):
    if self.softmax:
      e = np.exp(self.param - self.param.max())
      return len(self.param) * e / e.sum()
    return self.param

  def step(self, grads, losses):
    grads = np.asarray(grads, np.float64)
    losses = np.asarray(losses, np.float64)
    if self.l0 is None:
      self.l0 = losses
    t = len(losses)
    w = self.weights()
    norms = np.linalg.norm(grads[:, self.cols], axis=1)
    big_g = w * norms
    ratio = losses / self.l0
    r = ratio / ratio.mean()
    target = big_g.mean() * r**self.alpha
    grad_w = norms * np.sign(big_g - target)
    if self.softmax:
      s = w / t
      grad = t * (s * grad_w - s * (s @ grad_w))
    else:
      grad = grad_w
    if self.adam:
      self.k += 1
      self.m = 0.9 * self.m + 0.1 * grad
      self.v = 0.999 * self.v + 0.001 * grad**2
      m_hat = self.m / (1 - 0.9**self.k)
      v_hat = self.v / (1 - 0.999**self.k)
      new = self.param - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    else:
      new = self.param - self.lr * grad
    if not self.softmax:
      new = np.maximum(new, 0)
      new = t * new / new.sum() if new.sum() > 0 else np.ones(t)
    self.param = new
    update = grads.sum(axis=0)
    update[self.cols] = w @ grads[:, self.cols]
    return update


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("variant", ["paper", "softmax", "adam"])
def test_sequence_matches_reference(t, masked, variant):
  rng = np.random.default_rng(t + 10 * masked)
  lr = 0.01 if variant == "adam" else 0.05
  tx = po.gradnorm(
      1.5, num_tasks=t, learning_rate=lr,
      optimizer=optax.adam(lr) if variant == "adam" else None,
      parametrization="softmax" if variant == "softmax" else "weights",
      shared=HEADS_MASK if masked else None)
  cols = (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))
  ref = ReferenceGradNorm(t, cols, 1.5, lr, softmax=variant == "softmax",
                          adam=variant == "adam")
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  losses = rng.uniform(1.0, 3.0, t)
  rates = rng.uniform(0.6, 0.95, t)
  for _ in range(8):
    grads = np.asarray(10.0 ** rng.uniform(-1, 1, (t, 1))
                       * rng.standard_normal((t, 24)), np.float32)
    losses = np.asarray(losses * rates, np.float32)
    out, state = step(to_tree(grads), state, PARAMS, losses=losses)
    expected = ref.step(grads, losses)
    np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.param, ref.param, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.initial_losses, ref.l0, rtol=1e-6)


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6),
                  log_lr=st.floats(-4, 1))
def test_weighting_stays_nonnegative_and_sums_to_t(seed, t, log_lr):
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, 5)) * 10.0 ** rng.uniform(-2, 2, (t, 1))
  w0 = rng.dirichlet(np.ones(t)) * t
  ratios = rng.uniform(0.1, 1.0, t)
  w = np.asarray(po.weighting.gradnorm(g @ g.T, w0, ratios,
                                       learning_rate=10.0 ** log_lr),
                 np.float64)
  assert np.all(w >= 0) and abs(w.sum() - t) < 1e-4 * t


def test_balanced_tasks_keep_their_weights():
  # Equal gradient norms and equal training rates: every G_t is on target.
  g = np.eye(3) * 2.0
  w = po.weighting.gradnorm(g @ g.T, np.ones(3), np.full(3, 0.5))
  np.testing.assert_allclose(w, np.ones(3))


def test_slow_task_gains_weight():
  # Equal norms; task 0's loss falls more slowly (larger ratio): its target
  # norm is larger, so its weight grows.
  g = np.eye(2)
  w = po.weighting.gradnorm(g @ g.T, np.ones(2), np.array([0.9, 0.3]),
                            learning_rate=0.1)
  assert w[0] > 1 > w[1]


def test_needs_losses_and_checks_hyperparameters():
  g = to_tree(np.ones((2, 24), np.float32))
  tx = po.gradnorm(num_tasks=2)
  with pytest.raises(ValueError, match="losses"):
    tx.update(g, tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="alpha"):
    po.gradnorm(-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="learning_rate"):
    po.gradnorm(num_tasks=2, learning_rate=0.0)
  with pytest.raises(ValueError, match="parametrization"):
    po.gradnorm(num_tasks=2, parametrization="exp")
  with pytest.raises(ValueError, match="loss_ratios"):
    po.weighting.gradnorm(jnp.eye(2), jnp.ones(2), jnp.ones(3))


def test_zero_initial_losses_and_gradients_stay_finite():
  tx = po.gradnorm(num_tasks=2)
  g = to_tree(np.zeros((2, 24), np.float32))
  state = tx.init(PARAMS)
  for _ in range(2):
    out, state = tx.update(g, state, PARAMS, losses=np.zeros(2, np.float32))
  assert np.all(np.isfinite(flat(out)))
  np.testing.assert_allclose(state.param, np.ones(2))
