"""DWA (dynamic weight average) against a step-by-step float64 reference.

The reference (``reference_dwa_weights``) is Liu et al. (2019)'s
``T * softmax(L(k-1) / L(k-2) / temperature)`` in float64 NumPy, on the
per-period mean losses, one step at a time; it never calls the library.

The loss sequence and the step loop are in tests/loss_sequence.py, the test
data (a params-like tree with a module of two leaves and a head) in
tests/stacked_trees.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import pcgrad_optax as po
from loss_sequence import LOSS_SEQUENCE, run_transform
from stacked_trees import HEADS_MASK, LEAF_SLICES, assert_close, random_grads


def reference_dwa_weights(history, temperature):
  """Liu et al. (2019): T * softmax(L(k-1) / L(k-2) / temperature)."""
  if len(history) < 2:
    return np.ones(history[0].shape if history else 3)
  ratio = history[-1] / history[-2]
  e = np.exp(ratio / temperature)
  return len(ratio) * e / e.sum()


@pytest.mark.parametrize("period", [1, 2])
def test_dwa_matches_reference(period):
  t, temperature = 3, 2.0
  grads_seq = [random_grads(t, 50 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.dwa(num_tasks=t, temperature=temperature, period=period,
              shared=HEADS_MASK)
  outs, _ = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  period_means, current = [], []
  for g, losses, out in zip(grads_seq, LOSS_SEQUENCE, outs):
    weights = reference_dwa_weights(period_means, temperature)
    expected = weights @ g
    head = LEAF_SLICES[0]
    expected[head] = g[:, head].sum(0)
    assert_close(out, expected, rtol=1e-5)
    current.append(losses)
    if len(current) == period:
      period_means.append(np.mean(current, axis=0))
      current = []


def test_dwa_first_two_steps_are_equal_weights_and_pure_function():
  tx = po.dwa(num_tasks=3)
  g = [random_grads(3, 1)] * 3
  outs, _ = run_transform(tx, g, LOSS_SEQUENCE[:3])
  assert_close(outs[0], g[0].sum(0))
  assert_close(outs[1], g[0].sum(0))
  assert not np.allclose(outs[2], g[0].sum(0))
  w = po.weighting.dwa(LOSS_SEQUENCE[1], LOSS_SEQUENCE[0], temperature=0.5)
  ratio = LOSS_SEQUENCE[1] / LOSS_SEQUENCE[0]
  np.testing.assert_allclose(w, 3 * np.exp(ratio / 0.5)
                             / np.exp(ratio / 0.5).sum(), rtol=1e-5)
