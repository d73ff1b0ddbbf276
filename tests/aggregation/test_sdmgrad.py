"""SDMGrad (weighting and transform) against an independent float64 reference.

The reference is the paper's inner problem solved as its authors' code
does, written in float64 NumPy: the cross matrix of two batches, normalised
by the squared mean of the square roots of its diagonal, heavy-ball SGD with
a projection onto the simplex after every step (the projection bisects on
the threshold), then the update ``(w + lambda w~) / (1 + lambda)`` on the
mean of the two batches (or on a third), heads given their plain sums.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import HEADS_MASK, LEAF_SLICES, PARAMS, flat, to_tree
from simplex_reference import project_simplex_ref




def reference_weights(cross, w, lam, lr, momentum, steps, pref=None):
  cross = np.asarray(cross, np.float64)
  t = cross.shape[0]
  pref = np.full(t, 1.0 / t) if pref is None else np.asarray(pref, float)
  s = np.mean(np.sqrt(np.maximum(np.diag(cross), 0)))
  a = cross / s**2 if s > 0 else cross
  velocity = None
  w = np.asarray(w, np.float64)
  for _ in range(steps):
    grad = a @ w + lam * (a @ pref)
    velocity = grad if velocity is None else momentum * velocity + grad
    w = project_simplex_ref(w - lr * velocity)
  return (w + lam * pref) / (1 + lam), w


def reference_sdmgrad(j1, j2, j3, w, masked, **kw):
  cols = (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))
  j1, j2 = np.asarray(j1, np.float64), np.asarray(j2, np.float64)
  upd_w, w = reference_weights(j1[:, cols] @ j2[:, cols].T, w, **kw)
  source = (j1 + j2) / 2 if j3 is None else np.asarray(j3, np.float64)
  update = source.sum(axis=0)
  update[cols] = upd_w @ source[:, cols]
  return update, w


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_third", [False, True])
def test_sequence_matches_reference(t, masked, with_third):
  rng = np.random.default_rng(t + 10 * masked + 100 * with_third)
  hyper = dict(lam=0.3, lr=0.5, momentum=0.5, steps=7)
  tx = po.sdmgrad(num_tasks=t, lambda_=0.3, learning_rate=0.5,
                  momentum=0.5, num_steps=7,
                  shared=HEADS_MASK if masked else None)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  w = np.full(t, 1.0 / t)
  for _ in range(5):
    common = rng.standard_normal(24)
    j1, j2, j3 = (np.asarray(common + rng.standard_normal((t, 24)),
                             np.float32) for _ in range(3))
    kwargs = {"second_grads": to_tree(j2)}
    if with_third:
      kwargs["third_grads"] = to_tree(j3)
    out, state = step(to_tree(j1), state, PARAMS, **kwargs)
    ref, w = reference_sdmgrad(j1, j2, j3 if with_third else None, w,
                               masked, **hyper)
    np.testing.assert_allclose(state.inner_weights, w, atol=2e-5)
    np.testing.assert_allclose(flat(out), ref, rtol=1e-4, atol=1e-4)


def test_default_hyperparameters_match_reference():
  # The authors' lr = 10, momentum 0.5, 20 steps, lambda = 0.3.
  rng = np.random.default_rng(3)
  j1, j2 = (np.asarray(rng.standard_normal((4, 24)), np.float32)
            for _ in range(2))
  tx = po.sdmgrad(num_tasks=4)
  out, state = tx.update(to_tree(j1), tx.init(PARAMS), PARAMS,
                         second_grads=to_tree(j2))
  ref, w = reference_sdmgrad(j1, j2, None, np.full(4, 0.25), False, lam=0.3,
                             lr=10.0, momentum=0.5, steps=20)
  np.testing.assert_allclose(state.inner_weights, w, atol=1e-4)
  np.testing.assert_allclose(flat(out), ref, rtol=1e-3, atol=1e-3)


def mgda_ref(gram):
  t = gram.shape[0]
  res = scipy.optimize.minimize(
      lambda w: w @ gram @ w, np.full(t, 1.0 / t), jac=lambda w: 2 * gram @ w,
      bounds=[(0, 1)] * t, constraints=[{"type": "eq",
                                         "fun": lambda w: w.sum() - 1}],
      method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
  return res.x


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5),
                  log_scale=st.floats(-8, 8))
def test_lambda_zero_one_batch_is_mgda(seed, t, log_scale):
  # With one batch's Gram matrix and lambda = 0 the inner problem is MGDA's
  # min-norm problem; enough small steps solve it (scale-free: normalised).
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, 6)) * 10.0 ** log_scale
  gram = g @ g.T
  _, w = po.weighting.sdmgrad(jnp.asarray(gram, jnp.float32),
                              jnp.full(t, 1.0 / t), lambda_=0.0,
                              learning_rate=0.2, momentum=0.5,
                              num_steps=3000)
  w = np.asarray(w, np.float64)
  ref = mgda_ref(gram / 10.0 ** (2 * log_scale))
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  d, d_ref = w @ g, ref @ g
  assert np.linalg.norm(d - d_ref) <= 1e-3 * np.abs(g).max() * np.sqrt(6)


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5),
                  lam=st.floats(0, 100))
def test_update_weights_mix_simplex_and_preference(seed, t, lam):
  rng = np.random.default_rng(seed)
  j1, j2 = rng.standard_normal((2, t, 6))
  pref = rng.dirichlet(np.ones(t))
  upd, w = po.weighting.sdmgrad(j1 @ j2.T, rng.dirichlet(np.ones(t)),
                                lambda_=lam, preference=pref)
  upd, w = np.asarray(upd, np.float64), np.asarray(w, np.float64)
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  np.testing.assert_allclose(upd, (w + lam * pref) / (1 + lam), atol=1e-6)
  assert abs(upd.sum() - 1) < 1e-5


def test_zero_gradients_keep_weights_finite():
  upd, w = po.weighting.sdmgrad(jnp.zeros((3, 3)), jnp.full(3, 1 / 3))
  np.testing.assert_allclose(w, np.full(3, 1 / 3), atol=1e-7)
  np.testing.assert_allclose(upd, np.full(3, 1 / 3), atol=1e-7)


def test_bad_inputs():
  g = to_tree(np.ones((3, 24), np.float32))
  tx = po.sdmgrad(num_tasks=3)
  with pytest.raises(ValueError, match="second_grads"):
    tx.update(g, tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="head.*second_grads"):
    tx.update(g, tx.init(PARAMS), PARAMS,
              second_grads=dict(g, head=g["head"][:, :2]))
  for kwargs in ({"lambda_": -1.0}, {"learning_rate": 0.0},
                 {"momentum": 1.0}, {"num_steps": 0}):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      po.sdmgrad(num_tasks=3, **kwargs)
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      po.weighting.sdmgrad(jnp.eye(3), jnp.full(3, 1 / 3), **kwargs)
  with pytest.raises(ValueError, match="preference"):
    po.sdmgrad(num_tasks=3, preference=jnp.ones(2))
  with pytest.raises(ValueError, match="square"):
    po.weighting.sdmgrad(jnp.ones((3, 2)), jnp.full(3, 1 / 3))
