"""MoCo (weighting and transform) against an independent float64 reference.

The reference is Algorithm 1 of Fernando et al. (2023) in float64 NumPy on
flattened (T, P) gradients: the tracked gradients ``Y`` moved towards the
new gradients with ``beta / k^sigma``, one projected (or, LibMTL, softmax)
step of the weights on ``Y Y^T + rho I``, the update ``Y^T lambda`` on the
shared columns and the plain sums on the heads. LibMTL's normalisation
(``L_t g_t / (|g_t| + 1e-8)``) is an option of the reference too.
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




class ReferenceMoCo:
  """The paper's MoCo on (T, P) float64 gradients."""

  def __init__(self, t, p, cols, beta, beta_sigma, gamma, gamma_sigma, rho,
               softmax=False, normalize=False):
    self.y = np.zeros((t, len(cols)))
    self.lam = np.full(t, 1.0 / t)
    self.k = 0
    self.cols, self.p = cols, p
    self.hyper = beta, beta_sigma, gamma, gamma_sigma, rho
    self.softmax, self.normalize = softmax, normalize

  def step(self, grads, losses=None):
    beta, beta_sigma, gamma, gamma_sigma, rho = self.hyper
    grads = np.asarray(grads, np.float64)
    self.k += 1
    h = grads[:, self.cols]
    if self.normalize:
      h = h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-8) * np.asarray(
          losses, np.float64)[:, None]
    self.y = self.y - beta / self.k**beta_sigma * (self.y - h)
    t = len(self.lam)
    moved = self.lam - gamma / self.k**gamma_sigma * (
        self.y @ self.y.T + rho * np.eye(t)) @ self.lam
    if self.softmax:
      e = np.exp(moved - moved.max())
      self.lam = e / e.sum()
    else:
      self.lam = project_simplex_ref(moved)
    update = grads.sum(axis=0)
    update[self.cols] = self.lam @ self.y
    return update


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("variant", ["paper", "libmtl"])
def test_sequence_matches_reference(t, masked, variant):
  rng = np.random.default_rng(t + 10 * masked)
  libmtl = variant == "libmtl"
  hyper = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.2)
  tx = po.moco(num_tasks=t, **hyper,
               weight_update="softmax" if libmtl else "projection",
               normalize=libmtl, shared=HEADS_MASK if masked else None)
  cols = (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))
  ref = ReferenceMoCo(t, 24, cols, *hyper.values(), softmax=libmtl,
                      normalize=libmtl)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for _ in range(6):
    grads = np.asarray(rng.standard_normal(24) + rng.standard_normal((t, 24)),
                       np.float32)
    losses = np.asarray(rng.uniform(0.5, 2.0, t), np.float32)
    out, state = step(to_tree(grads), state, PARAMS, losses=losses)
    expected = ref.step(grads, losses)
    np.testing.assert_allclose(state.lambdas, ref.lam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-5)
    tracked = np.concatenate([np.asarray(x).reshape(t, -1) for x in
                              jax.tree.leaves(state.tracked)], axis=1)
    np.testing.assert_allclose(tracked, ref.y, rtol=1e-5, atol=1e-6)
  # Non-shared leaves hold no tracked state.
  assert len(jax.tree.leaves(state.tracked)) == (2 if masked else 3)


def mgda_ref(gram):
  t = gram.shape[0]
  res = scipy.optimize.minimize(
      lambda w: w @ gram @ w, np.full(t, 1.0 / t), jac=lambda w: 2 * gram @ w,
      bounds=[(0, 1)] * t, constraints=[{"type": "eq",
                                         "fun": lambda w: w.sum() - 1}],
      method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
  return res.x


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 5))
def test_deterministic_gradients_reach_mgda(seed, t):
  # Fixed gradients, beta = 1 (Y = G), constant gamma: the weights' steps are
  # projected gradient descent on |G^T lambda|^2 / 2, whose minimiser over
  # the simplex is MGDA's min-norm point.
  rng = np.random.default_rng(seed)
  g = np.asarray(rng.standard_normal((t, 24)), np.float32)
  gram = g.astype(np.float64) @ g.T
  gamma = 1.0 / np.linalg.eigvalsh(gram).max()
  tx = po.moco(num_tasks=t, beta=1.0, beta_sigma=0.0, gamma=gamma,
               gamma_sigma=0.0)
  grads = to_tree(g)

  def body(state, _):
    return tx.update(grads, state, PARAMS)[1], None

  state, _ = jax.lax.scan(body, tx.init(PARAMS), None, length=3000)
  d = np.asarray(state.lambdas, np.float64) @ g
  d_ref = mgda_ref(gram) @ g
  assert np.linalg.norm(d - d_ref) <= 2e-3 * np.linalg.norm(g, axis=1).max()


def test_weighting_matches_formula():
  rng = np.random.default_rng(0)
  y = rng.standard_normal((4, 9))
  lam = rng.dirichlet(np.ones(4))
  for update in ("projection", "softmax"):
    w = po.weighting.moco(y @ y.T, lam, step_size=0.05, rho=0.3,
                          weight_update=update)
    moved = lam - 0.05 * (y @ y.T + 0.3 * np.eye(4)) @ lam
    ref = (project_simplex_ref(moved) if update == "projection"
           else np.exp(moved) / np.exp(moved).sum())
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


def test_normalize_needs_losses_and_bad_inputs():
  g = to_tree(np.ones((2, 24), np.float32))
  tx = po.moco(num_tasks=2, normalize=True)
  with pytest.raises(ValueError, match="losses"):
    tx.update(g, tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="weight_update"):
    po.moco(num_tasks=2, weight_update="exp")
  for kwargs in ({"beta": 0.0}, {"beta": 1.5}, {"gamma": 0.0},
                 {"rho": -1.0}, {"beta_sigma": -1.0}):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      po.moco(num_tasks=2, **kwargs)
  # State built for other params (or another mask) is refused by name.
  tx = po.moco(num_tasks=2)
  state = tx.init(PARAMS)
  masked = po.moco(num_tasks=2, shared=HEADS_MASK)
  with pytest.raises(ValueError, match="tracked"):
    masked.update(g, state, PARAMS)


def test_zero_gradients_and_bf16_state_dtype():
  tx = po.moco(num_tasks=3)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  state = tx.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.tracked))
  zeros = jax.tree.map(lambda p: jnp.zeros((3,) + p.shape, p.dtype), params)
  out, state = jax.jit(tx.update)(zeros, state, params)
  assert all(np.all(np.asarray(o, np.float32) == 0)
             for o in jax.tree.leaves(out))
  assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves(out))
  np.testing.assert_allclose(state.lambdas, np.full(3, 1 / 3), atol=1e-7)
