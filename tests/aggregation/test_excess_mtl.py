"""ExcessMTL (weighting and transform) against an independent float64 reference.

The reference is Algorithm 1 of He et al. (2024) in float64 NumPy on
flattened (T, P) gradients: per-task AdaGrad accumulators of the squared
gradients, the excess risks ``sum g^2 / sqrt(acc + eps)``, a baseline from
the warm-up steps (uniform weights meanwhile), then multiplicative updates
``alpha * exp(eta * E / E0)`` renormalised to the simplex; the update is
``sum alpha_t g_t`` on the shared columns, the plain sum on the heads.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import HEADS_MASK, LEAF_SLICES, PARAMS, flat, to_tree


class ReferenceExcessMTL:

  def __init__(self, t, cols, step_size, warmup, eps=1e-7):
    self.acc = np.zeros((t, len(cols)))
    self.alpha = np.full(t, 1.0 / t)
    self.warm = []
    self.base = None
    self.cols, self.eta, self.warmup, self.eps = cols, step_size, warmup, eps

  def step(self, grads):
    grads = np.asarray(grads, np.float64)
    g = grads[:, self.cols]
    self.acc += g**2
    excess = np.sum(g**2 / np.sqrt(self.acc + self.eps), axis=1)
    if self.base is None:
      self.warm.append(excess)
      if len(self.warm) == self.warmup:
        self.base = np.mean(self.warm, axis=0)
    else:
      ratio = np.where(self.base > 0, excess / np.where(self.base > 0,
                                                        self.base, 1), 0)
      a = self.alpha * np.exp(self.eta * ratio)
      self.alpha = a / a.sum()
    update = grads.sum(axis=0)
    update[self.cols] = self.alpha @ g
    return update


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("warmup", [1, 3])
def test_sequence_matches_reference(t, masked, warmup):
  rng = np.random.default_rng(t + 10 * masked + 100 * warmup)
  tx = po.excess_mtl(num_tasks=t, step_size=0.5, warmup_steps=warmup,
                     shared=HEADS_MASK if masked else None)
  cols = (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))
  ref = ReferenceExcessMTL(t, cols, 0.5, warmup)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  decay = 10.0 ** rng.uniform(-0.5, 0, (t, 1))   # tasks converge at rates
  for k in range(8):
    grads = np.asarray(decay**k * rng.standard_normal((t, 24)), np.float32)
    out, state = step(to_tree(grads), state, PARAMS)
    expected = ref.step(grads)
    np.testing.assert_allclose(state.alpha, ref.alpha, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-5)
  assert len(jax.tree.leaves(state.sq_sum)) == (2 if masked else 3)


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5),
                  log_c=st.floats(-4, 4))
def test_weights_invariant_to_a_task_gradient_scale(seed, t, log_c):
  # Scale processing: scaling one task's gradients at every step by c
  # scales its excess risks and its baseline alike (eps = 0).
  rng = np.random.default_rng(seed)
  seq = rng.standard_normal((4, t, 24))
  c = np.ones((t, 1))
  c[0] = 10.0 ** log_c
  weights = []
  for scale in (np.ones((t, 1)), c):
    tx = po.excess_mtl(num_tasks=t, step_size=1.0, eps=0.0)
    state = tx.init(PARAMS)
    for g in seq:
      _, state = tx.update(to_tree(g * scale), state, PARAMS)
    weights.append(np.asarray(state.alpha))
  np.testing.assert_allclose(weights[1], weights[0], rtol=1e-4, atol=1e-6)


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6),
                  log_ratio=st.floats(-3, 6))
def test_weighting_on_the_simplex_without_overflow(seed, t, log_ratio):
  rng = np.random.default_rng(seed)
  w0 = rng.dirichlet(np.ones(t))
  excess = rng.uniform(0, 1, t) * 10.0 ** log_ratio
  base = rng.uniform(0.5, 1, t)
  w = np.asarray(po.weighting.excess_mtl(w0, excess, base, step_size=1.0),
                 np.float64)
  assert np.all(np.isfinite(w)) and np.all(w >= 0)
  assert abs(w.sum() - 1) < 1e-5
  logits = np.log(w0) + excess / base
  ref = np.exp(logits - logits.max())
  np.testing.assert_allclose(w, ref / ref.sum(), atol=1e-5)


def test_zero_baseline_task_gets_ratio_zero():
  w = po.weighting.excess_mtl(jnp.full(2, 0.5), jnp.array([1.0, 1.0]),
                              jnp.array([0.0, 1.0]), step_size=1.0)
  np.testing.assert_allclose(w, [1 / (1 + np.e), np.e / (1 + np.e)],
                             rtol=1e-6)


def test_bad_inputs():
  for kwargs in ({"step_size": 0.0}, {"eps": -1.0}, {"warmup_steps": 0},
                 {"warmup_steps": 1.5}):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      po.excess_mtl(num_tasks=2, **kwargs)
  with pytest.raises(ValueError, match="excess_risks"):
    po.weighting.excess_mtl(jnp.full(2, 0.5), jnp.ones(3), jnp.ones(2))
  tx = po.excess_mtl(num_tasks=2)
  other = po.excess_mtl(num_tasks=2, shared=HEADS_MASK)
  g = to_tree(np.ones((2, 24), np.float32))
  with pytest.raises(ValueError, match="sq_sum"):
    jax.jit(lambda s: other.update(g, s, PARAMS))(tx.init(PARAMS))
