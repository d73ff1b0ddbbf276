"""FAMO against a step-by-step float64 reference.

The reference (``reference_famo``) is Algorithm 1 of Liu et al. (2023) in
float64 NumPy, one step at a time, with a plain gradient step on the logits
``xi`` (and, for the ``optimizer=`` option, the authors' Adam on
``J^T delta + gamma xi`` written out by hand); it never calls the library.

The loss sequence and the step loop are in tests/loss_sequence.py, the test
data (a params-like tree with a module of two leaves and a head) in
tests/stacked_trees.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po
from loss_sequence import LOSS_SEQUENCE, run_transform
from stacked_trees import assert_close, random_grads


def reference_famo(losses_seq, grads_seq, lr, gamma, min_losses, eps,
                   after_seq=None):
  """Liu et al. (2023), Algorithm 1, with a plain gradient step on xi.

  ``after_seq[n]`` is the "after" loss of the step before step n (the
  previous batch at the current params); by default the current losses.
  """
  t = len(losses_seq[0])
  xi = np.zeros(t)
  prev = None
  updates, logits = [], []
  for n, (losses, g) in enumerate(zip(losses_seq, grads_seq)):
    if prev is not None:
      after = losses if after_seq is None else after_seq[n]
      delta = np.log(prev - min_losses + eps) - np.log(after - min_losses + eps)
      z = np.exp(xi) / np.exp(xi).sum()
      jacobian = np.diag(z) - np.outer(z, z)     # d softmax / d xi
      xi = xi - lr * (jacobian.T @ delta + gamma * xi)
    z = np.exp(xi) / np.exp(xi).sum()
    shifted = losses - min_losses + eps
    c = 1.0 / np.sum(z / shifted)
    weights = c * z / shifted
    updates.append(weights @ g)
    logits.append(xi.copy())
    prev = losses
  return updates, logits


@pytest.mark.parametrize("exact", [False, True])
def test_famo_matches_reference(exact):
  t, lr, gamma = 3, 0.5, 0.01     # a large lr so the logits move visibly
  min_losses = np.array([0.0, 0.1, 0.0])
  grads_seq = [random_grads(t, 60 + n) for n in range(len(LOSS_SEQUENCE))]
  after_seq = None
  extra_seq = None
  if exact:
    after_seq = [None] + [LOSS_SEQUENCE[n - 1] * np.array([0.7, 0.95, 0.8])
                          for n in range(1, len(LOSS_SEQUENCE))]
    extra_seq = [{}] + [{"prev_batch_losses": jnp.asarray(a, jnp.float32)}
                        for a in after_seq[1:]]
  tx = po.famo(num_tasks=t, learning_rate=lr, weight_decay=gamma,
               min_losses=min_losses)
  outs, states = run_transform(tx, grads_seq, LOSS_SEQUENCE, extra_seq)
  ref_updates, ref_logits = reference_famo(
      LOSS_SEQUENCE, grads_seq, lr, gamma, min_losses, 1e-8, after_seq)
  for out, state, ref_u, ref_xi in zip(outs, states, ref_updates, ref_logits):
    assert_close(out, ref_u, rtol=1e-5)
    np.testing.assert_allclose(state.logits, ref_xi, rtol=1e-5, atol=1e-6)
  assert np.abs(ref_logits[-1]).max() > 0.05   # the logits did move


def test_famo_adam_option_and_balanced_weights():
  # The authors' code: Adam on J^T delta + gamma xi.
  t = 3
  grads_seq = [random_grads(t, 70 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.famo(num_tasks=t, optimizer=optax.adam(0.025), weight_decay=0.01)
  _, states = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  xi, m, v = np.zeros(t), np.zeros(t), np.zeros(t)
  for n in range(1, len(LOSS_SEQUENCE)):
    delta = (np.log(LOSS_SEQUENCE[n - 1] + 1e-8)
             - np.log(LOSS_SEQUENCE[n] + 1e-8))
    z = np.exp(xi) / np.exp(xi).sum()
    grad = z * (delta - z @ delta) + 0.01 * xi
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad**2
    m_hat, v_hat = m / (1 - 0.9**n), v / (1 - 0.999**n)
    xi = xi - 0.025 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(states[n].logits, xi, rtol=1e-4, atol=1e-6)
  # pure weighting: z_t / l_t normalised
  w = po.weighting.famo(jnp.array([0.0, 1.0, -1.0]), jnp.array([1.0, 2.0, 4.0]))
  z = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
  ref = z / np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-5)
