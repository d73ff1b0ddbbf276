"""Uncertainty weighting against a step-by-step float64 reference.

The reference is written from the paper's formulas in float64 NumPy, one step
at a time, and never calls the library: the weights ``a_t exp(-s_t)`` of the
log-variances ``s``, and a plain gradient step on
``sum_t a_t exp(-s_t) L_t + b_t s_t`` (``a = b = 1``, or Kendall et al.'s
``1/(2 sigma^2) L + log sigma`` / ``1/sigma^2 L + log sigma`` per task
type). Also checked: the fixed point ``s = log(a L / b)`` and a user
optimizer in place of SGD.

The loss sequence and the step loop are in tests/loss_sequence.py, the test
data (a params-like tree with a module of two leaves and a head) in
tests/stacked_trees.py.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest

import pcgrad_optax as po
from loss_sequence import LOSS_SEQUENCE, run_transform
from stacked_trees import assert_close, random_grads


@pytest.mark.parametrize("task_types", [None, ("regression", "classification",
                                               "regression")])
def test_uncertainty_matches_reference(task_types):
  t, lr = 3, 0.1
  grads_seq = [random_grads(t, 40 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.uncertainty(num_tasks=t, learning_rate=lr, task_types=task_types,
                      init_log_vars=np.array([0.0, 0.5, -0.5]))
  outs, states = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  if task_types is None:
    a, b = np.ones(t), np.ones(t)
  else:  # Kendall et al.: 1/(2 sigma^2) L + log sigma, 1/sigma^2 L + log sigma
    a = np.array([0.5, 1.0, 0.5])
    b = np.full(t, 0.5)
  s = np.array([0.0, 0.5, -0.5])
  for g, losses, out, state in zip(grads_seq, LOSS_SEQUENCE, outs, states):
    weights = a * np.exp(-s)
    assert_close(out, weights @ g, rtol=1e-5)
    # d/ds_t of sum a_t exp(-s_t) L_t + b_t s_t
    s = s - lr * (b - a * np.exp(-s) * losses)
    np.testing.assert_allclose(state.log_vars, s, rtol=1e-5, atol=1e-6)


def test_uncertainty_optimizer_and_fixed_point():
  # With enough plain GD steps on constant losses, s -> log(a L / b).
  tx = po.uncertainty(num_tasks=3, learning_rate=0.5)
  losses = np.array([0.5, 2.0, 8.0])
  g = [random_grads(3, 1)] * 60
  _, states = run_transform(tx, g, [losses] * 60)
  np.testing.assert_allclose(states[-1].log_vars, np.log(losses), atol=1e-3)
  # A user optimizer is used in place of SGD.
  tx_sgd = po.uncertainty(num_tasks=3, optimizer=optax.sgd(0.5))
  _, states_sgd = run_transform(tx_sgd, g[:3], [losses] * 3)
  np.testing.assert_allclose(states_sgd[-1].log_vars, states[2].log_vars,
                             rtol=1e-6)
