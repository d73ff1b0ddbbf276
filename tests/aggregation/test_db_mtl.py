"""DB-MTL (weighting and transform) against an independent float64 reference.

The reference follows the paper in float64 NumPy on flattened (T, P)
gradients: the log-loss gradients ``g_t / (L_t + eps)``, EMA buffers with
``beta / k^sigma``, every buffer scaled to the largest buffer norm, summed;
heads get the plain sums of the task gradients.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import HEADS_MASK, LEAF_SLICES, PARAMS, flat, to_tree


class ReferenceDBMTL:

  def __init__(self, t, cols, beta, beta_sigma, eps=1e-8):
    self.buf = np.zeros((t, len(cols)))
    self.cols, self.beta, self.sigma, self.eps, self.k = (
        cols, beta, beta_sigma, eps, 0)

  def step(self, grads, losses):
    grads = np.asarray(grads, np.float64)
    self.k += 1
    beta = self.beta / self.k**self.sigma
    logs = grads[:, self.cols] / (np.asarray(losses, np.float64)[:, None]
                                  + self.eps)
    self.buf = beta * self.buf + (1 - beta) * logs
    norms = np.linalg.norm(self.buf, axis=1)
    alpha = np.array([norms.max() / n if n > 0 else 0.0 for n in norms])
    update = grads.sum(axis=0)
    update[self.cols] = alpha @ self.buf
    return update


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_sequence_matches_reference(t, masked, beta, beta_sigma):
  rng = np.random.default_rng(t + 10 * masked)
  tx = po.db_mtl(num_tasks=t, beta=beta, beta_sigma=beta_sigma,
                 shared=HEADS_MASK if masked else None)
  cols = (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))
  ref = ReferenceDBMTL(t, cols, beta, beta_sigma)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for _ in range(6):
    scales = 10.0 ** rng.uniform(-2, 2, (t, 1))
    grads = np.asarray(scales * rng.standard_normal((t, 24)), np.float32)
    losses = np.asarray(rng.uniform(0.1, 5.0, t), np.float32)
    out, state = step(to_tree(grads), state, PARAMS, losses=losses)
    np.testing.assert_allclose(flat(out), ref.step(grads, losses),
                               rtol=2e-5, atol=1e-5 * np.abs(grads).max())


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6),
                  log_c=st.floats(-6, 6))
def test_invariant_to_the_scale_of_a_task_loss(seed, t, log_c):
  # Scaling task 0's loss (so its loss and its gradient) by c changes
  # nothing: DB-MTL works on gradients of log L.
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, 24))
  losses = rng.uniform(0.5, 2.0, t)
  c = np.ones((t, 1))
  c[0] = 10.0 ** log_c
  outs = []
  for scale in (np.ones((t, 1)), c):
    tx = po.db_mtl(num_tasks=t, eps=0.0)
    state = tx.init(PARAMS)
    for _ in range(2):
      out, state = tx.update(to_tree(g * scale), state, PARAMS,
                             losses=losses * scale[:, 0])
    outs.append(flat(out))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4,
                             atol=1e-5 * np.abs(outs[0]).max())


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6))
def test_weighting_scales_every_gradient_to_the_largest_norm(seed, t):
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, 5)) * 10.0 ** rng.uniform(-3, 3, (t, 1))
  if t > 1:
    g[rng.integers(t)] = 0.0
  w = np.asarray(po.weighting.db_mtl(g @ g.T), np.float64)
  norms = np.linalg.norm(g, axis=1)
  for wt, n in zip(w, norms):
    if n > 0:
      np.testing.assert_allclose(wt * n, norms.max(), rtol=1e-5)
    else:
      assert wt == 0


def test_needs_losses_and_checks_hyperparameters():
  g = to_tree(np.ones((2, 24), np.float32))
  tx = po.db_mtl(num_tasks=2)
  with pytest.raises(ValueError, match="losses"):
    tx.update(g, tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="losses"):
    tx.update(g, tx.init(PARAMS), PARAMS, losses=np.ones(3))
  for kwargs in ({"beta": 1.0}, {"beta": -0.1}, {"beta_sigma": -1.0},
                 {"eps": -1.0}):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      po.db_mtl(num_tasks=2, **kwargs)


def test_zero_gradient_task_gets_nothing():
  g = np.zeros((3, 24), np.float32)
  g[0] = 1.0
  tx = po.db_mtl(num_tasks=3, beta=0.0)
  out, _ = tx.update(to_tree(g), tx.init(PARAMS), PARAMS,
                     losses=np.ones(3, np.float32))
  np.testing.assert_allclose(flat(out), np.ones(24) / (1 + 1e-8), rtol=1e-6)
