"""IMTL-L against a step-by-step float64 reference.

The reference is the paper's loss-balance objective written in float64
NumPy, one step at a time, never calling the library: weights
``exp(s_t)`` of the learned scales ``s``, and a plain gradient step on
``sum_t exp(s_t) L_t - s_t`` (derivative ``exp(s_t) L_t - 1``). Also: the
fixed point ``s = -log L`` (every scaled loss 1), a user optimiser, the
equivalence with uncertainty weighting at ``-s``, and the loss domain.

The loss sequence and the step loop are in tests/loss_sequence.py, the test
data in tests/stacked_trees.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po
from loss_sequence import LOSS_SEQUENCE, run_transform
from stacked_trees import PARAMS, assert_close, random_grads, to_tree


def test_imtl_l_matches_reference():
  t, lr = 3, 0.2
  s0 = np.array([0.0, 0.5, -0.5])
  grads_seq = [random_grads(t, 80 + n) for n in range(len(LOSS_SEQUENCE))]
  tx = po.imtl_l(num_tasks=t, learning_rate=lr, init_log_scales=s0)
  outs, states = run_transform(tx, grads_seq, LOSS_SEQUENCE)
  s = s0.copy()
  for g, losses, out, state in zip(grads_seq, LOSS_SEQUENCE, outs, states):
    assert_close(out, np.exp(s) @ g, rtol=1e-5)
    s = s - lr * (np.exp(s) * losses - 1.0)
    np.testing.assert_allclose(state.log_scales, s, rtol=1e-5, atol=1e-6)


def test_imtl_l_fixed_point_optimizer_and_uncertainty_relation():
  losses = np.array([0.5, 2.0, 8.0])
  g = [random_grads(3, 1)] * 80
  tx = po.imtl_l(num_tasks=3, learning_rate=0.1)
  _, states = run_transform(tx, g, [losses] * 80)
  # s -> -log L: every scaled loss e^s L -> 1.
  np.testing.assert_allclose(states[-1].log_scales, -np.log(losses),
                             atol=2e-3)
  tx_adam = po.imtl_l(num_tasks=3, optimizer=optax.adam(0.1))
  _, states_adam = run_transform(tx_adam, g[:2], [losses] * 2)
  # Adam's first step moves every coordinate by lr against the sign.
  np.testing.assert_allclose(states_adam[0].log_scales,
                             -0.1 * np.sign(losses - 1.0), rtol=1e-4)
  # The weights are uncertainty weighting's at log-variances -s.
  s = jnp.array([0.3, -1.0, 2.0])
  np.testing.assert_allclose(po.weighting.imtl_l(s),
                             po.weighting.uncertainty(-s), rtol=1e-6)


def test_imtl_l_domain_and_shapes():
  tx = po.imtl_l(num_tasks=3)
  state = tx.init(PARAMS)
  grads = to_tree(random_grads(3, 0))
  with pytest.raises(ValueError, match=r"imtl_l.*>= 0.*-1\.0.*\[1\]"):
    tx.update(grads, state, PARAMS, losses=jnp.array([1.0, -1.0, 2.0]))
  with pytest.raises(ValueError, match=r"losses.*\(3,\).*\(2,\)"):
    jax.jit(tx.update)(grads, state, PARAMS, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="init_log_scales"):
    po.imtl_l(num_tasks=3, init_log_scales=jnp.zeros(2))
  with pytest.raises(ValueError, match="num_tasks"):
    po.imtl_l(num_tasks=0)
  # A zero loss is allowed: its scale grows by lr per step, never NaN.
  _, new = tx.update(grads, state, PARAMS, losses=jnp.array([0.0, 1.0, 2.0]))
  np.testing.assert_allclose(new.log_scales, [0.01, 0.0, -0.01], atol=1e-7)
