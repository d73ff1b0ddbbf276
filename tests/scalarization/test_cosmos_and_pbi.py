"""COSMOS and PBI against float64 references written from their definitions.

Each objective is written in float64 NumPy from the paper (COSMOS: Ruchte &
Grabocka 2021, ``r.L - lambda cos(r, L)``; PBI: Zhang & Li 2007,
``d1 + theta d2`` of ``L - z*`` w.r.t. the unit ray), and its gradient
weights are taken by central finite differences, never calling the library.
Also: the limits (``lambda = 0`` and ``theta = 0`` are linear), the
undefined points (``L = 0`` for the cosine, the ray itself for ``d2``),
the per-step ``preference=`` of ``update``, permutation equivariance, and
bad preferences.
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


def cosmos_objective(losses, r, lam):
  return r @ losses - lam * (r @ losses) / (np.linalg.norm(r)
                                            * np.linalg.norm(losses))


def pbi_objective(losses, w, theta, z):
  u = w / np.linalg.norm(w)
  f = losses - z
  d1 = f @ u
  return d1 + theta * np.linalg.norm(f - d1 * u)


def gradient(f, x, h=1e-6):
  return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h)
                   for e in np.eye(len(x))])


losses_3 = hnp.arrays(np.float64, (3,), elements=st.floats(0.1, 10))
rays_3 = hnp.arrays(np.float64, (3,), elements=st.floats(0.05, 1.0))


@HYP
@hypothesis.given(losses_3, rays_3, st.sampled_from([0.0, 0.5, 4.0]))
def test_cosmos_matches_finite_differences(losses, r, lam):
  w = po.weighting.cosmos(jnp.asarray(losses, jnp.float32), lambda_=lam,
                          preference=jnp.asarray(r, jnp.float32))
  ref = gradient(lambda l: cosmos_objective(l, r, lam), losses)
  np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)


@HYP
@hypothesis.given(losses_3, rays_3, st.sampled_from([0.0, 1.0, 5.0]))
def test_pbi_matches_finite_differences(losses, w_ray, theta):
  z = np.array([0.05, 0.0, -0.1])
  f = losses - z
  u = w_ray / np.linalg.norm(w_ray)
  hypothesis.assume(np.linalg.norm(f - (f @ u) * u) > 1e-3)   # off the ray
  w = po.weighting.pbi(jnp.asarray(losses, jnp.float32), theta=theta,
                       preference=jnp.asarray(w_ray, jnp.float32),
                       reference=jnp.asarray(z, jnp.float32))
  ref = gradient(lambda l: pbi_objective(l, w_ray, theta, z), losses)
  np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-4)


def test_limits_and_undefined_points():
  losses = jnp.array([1.0, 2.0, 3.0])
  r = jnp.array([0.2, 0.3, 0.5])
  # lambda = 0: the linear scalarisation r.L; theta = 0: the unit ray.
  np.testing.assert_allclose(
      po.weighting.cosmos(losses, lambda_=0.0, preference=r), r)
  np.testing.assert_allclose(
      po.weighting.pbi(losses, theta=0.0, preference=r),
      r / jnp.linalg.norm(r), rtol=1e-6)
  # L = 0: the cosine is undefined; its part of the gradient is 0.
  np.testing.assert_allclose(
      po.weighting.cosmos(jnp.zeros(3), lambda_=2.0, preference=r), r)
  # On the ray (up to round-off): d2's subgradient 0, the unit ray.
  np.testing.assert_allclose(
      po.weighting.pbi(3.0 * r, theta=5.0, preference=r),
      r / jnp.linalg.norm(r), rtol=1e-5)
  # On the preference ray the cosine is at its maximum: COSMOS = r.
  np.testing.assert_allclose(
      po.weighting.cosmos(7.0 * r, lambda_=3.0, preference=r), r,
      rtol=1e-5, atol=1e-6)


TRANSFORMS = {
    "cosmos": (lambda: po.cosmos(lambda_=1.0),
               lambda l, r: cosmos_objective(l, r, 1.0)),
    "pbi": (lambda: po.pbi(theta=2.0),
            lambda l, r: pbi_objective(l, r, 2.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transformations_and_per_step_preference(name):
  make, objective = TRANSFORMS[name]
  t = 3
  losses = np.array([0.5, 1.5, 1.0])
  g = random_grads(t, 7)
  tx = make()
  update = jax.jit(tx.update)
  # A ray given to update (drawn per step, as in COSMOS), then the default
  # uniform ray.
  for ray in (np.array([0.6, 0.1, 0.3]), None):
    extra = {} if ray is None else {"preference": jnp.asarray(ray,
                                                             jnp.float32)}
    out, _ = update(to_tree(g), tx.init(PARAMS), PARAMS,
                    losses=jnp.asarray(losses, jnp.float32), **extra)
    r = np.full(t, 1.0 / t) if ray is None else ray
    w = gradient(lambda l, r=r: objective(l, r), losses)
    assert_close(flat(out), w @ g, rtol=1e-4, atol=1e-4)


@HYP
@hypothesis.given(losses_3, rays_3, st.permutations(range(3)),
                  st.sampled_from(["cosmos", "pbi"]))
def test_permutation_equivariant(losses, ray, perm, name):
  perm = np.asarray(perm)
  fn = (lambda l, r: po.weighting.cosmos(l, lambda_=2.0, preference=r)) \
      if name == "cosmos" else (
          lambda l, r: po.weighting.pbi(l, theta=3.0, preference=r))
  w = fn(jnp.asarray(losses, jnp.float32), jnp.asarray(ray, jnp.float32))
  wp = fn(jnp.asarray(losses[perm], jnp.float32),
          jnp.asarray(ray[perm], jnp.float32))
  np.testing.assert_allclose(np.asarray(w)[perm], wp, rtol=1e-4, atol=1e-4)


def test_bad_preferences_and_hyperparameters():
  losses = jnp.array([1.0, 2.0])
  for fn in (lambda p: po.weighting.cosmos(losses, lambda_=1.0, preference=p),
             lambda p: po.weighting.pbi(losses, preference=p)):
    with pytest.raises(ValueError, match="preference.*>= 0"):
      fn(jnp.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="preference.*not all 0"):
      fn(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"preference.*\(2,\).*\(3,\)"):
      fn(jnp.ones(3))
  with pytest.raises(ValueError, match="lambda_"):
    po.cosmos(lambda_=-1.0)
  with pytest.raises(ValueError, match="theta"):
    po.pbi(theta=-1.0)
  with pytest.raises(ValueError, match=r"cosmos.*finite.*nan"):
    po.weighting.cosmos(jnp.array([1.0, jnp.nan]), lambda_=1.0)
  tx = po.pbi()
  with pytest.raises(ValueError, match="losses"):
    jax.jit(tx.update)(to_tree(random_grads(2, 0)), tx.init(PARAMS), PARAMS)
