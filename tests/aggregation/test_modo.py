"""MoDo (weighting and transform) against an independent float64 reference.

The reference is the paper's update written in float64 NumPy on flattened
(T, P) gradients of two (or three) batches: the cross matrix ``J1 @ J2.T``,
one projected step of the weights, the update on the mean of the two
batches (or on the third), heads given their plain sums. Its simplex
projection bisects on the threshold (not the library's sort-based one).
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
from simplex_reference import project_simplex_ref




def shared_columns(masked):
  return (np.concatenate(LEAF_SLICES[1:]) if masked
          else np.concatenate(LEAF_SLICES))


def reference_modo(batches, lam, gamma, rho, masked, third=None,
                   reduction="sum"):
  """One MoDo step; returns (update as a flat vector, new weights)."""
  j1, j2 = (np.asarray(b, np.float64) for b in batches)
  cols = shared_columns(masked)
  cross = j1[:, cols] @ j2[:, cols].T
  lam = project_simplex_ref(lam - gamma * (cross @ lam + rho * lam))
  source = (j1 + j2) / 2 if third is None else np.asarray(third, np.float64)
  update = source.sum(axis=0)                       # heads: plain sums
  update[cols] = lam @ source[:, cols]
  if reduction == "mean":
    update = update / j1.shape[0]
  return update, lam


@pytest.mark.parametrize("t", [1, 2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_third", [False, True])
def test_sequence_matches_reference(t, masked, with_third):
  rng = np.random.default_rng(t + 10 * masked + 100 * with_third)
  gamma, rho = 0.05, 0.1
  tx = po.modo(num_tasks=t, step_size=gamma, rho=rho,
               shared=HEADS_MASK if masked else None)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  lam = np.full(t, 1.0 / t)
  n = sum(len(s) for s in LEAF_SLICES)
  for _ in range(6):
    common = rng.standard_normal(n)
    j1, j2, j3 = (common + rng.standard_normal((t, n)) for _ in range(3))
    j1, j2, j3 = (np.asarray(j, np.float32) for j in (j1, j2, j3))
    kwargs = {"second_grads": to_tree(j2)}
    if with_third:
      kwargs["third_grads"] = to_tree(j3)
    out, state = step(to_tree(j1), state, PARAMS, **kwargs)
    ref, lam = reference_modo((j1, j2), lam, gamma, rho, masked,
                              j3 if with_third else None)
    np.testing.assert_allclose(flat(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.lambdas, lam, rtol=1e-5, atol=1e-6)


def test_mean_reduction_and_default_hyperparameters():
  rng = np.random.default_rng(0)
  j1, j2 = (np.asarray(rng.standard_normal((3, 24)), np.float32)
            for _ in range(2))
  tx = po.modo(num_tasks=3, reduction="mean")
  out, state = tx.update(to_tree(j1), tx.init(PARAMS), PARAMS,
                         second_grads=to_tree(j2))
  ref, lam = reference_modo((j1, j2), np.full(3, 1 / 3), 1e-3, 0.1, False,
                            reduction="mean")
  np.testing.assert_allclose(flat(out), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.lambdas, lam, rtol=1e-6)


@HYP
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6),
                  log_gamma=st.floats(-4, 1), rho=st.floats(0, 2),
                  log_scale=st.floats(-10, 10))
def test_weighting_on_the_simplex_and_matches(seed, t, log_gamma, rho,
                                              log_scale):
  rng = np.random.default_rng(seed)
  j1 = rng.standard_normal((t, 7)) * 10.0 ** log_scale
  j2 = j1 + rng.standard_normal((t, 7)) * 10.0 ** log_scale
  lam = rng.dirichlet(np.ones(t))
  gamma = 10.0 ** log_gamma / 10.0 ** (2 * log_scale)
  cross = j1 @ j2.T
  w = np.asarray(po.weighting.modo(jnp.asarray(cross, jnp.float32),
                                   jnp.asarray(lam, jnp.float32),
                                   step_size=gamma, rho=rho), np.float64)
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  ref = project_simplex_ref(lam - gamma * (cross @ lam + rho * lam))
  np.testing.assert_allclose(w, ref, atol=2e-5)


def test_cross_matrix_is_j1_j2t_and_gram_for_one_batch():
  rng = np.random.default_rng(1)
  j1, j2 = rng.standard_normal((2, 3, 24))
  tx = po.modo(num_tasks=3, step_size=0.3, rho=0.0)
  # Same batch twice: the Gram matrix; the step follows it.
  _, s = tx.update(to_tree(j1), tx.init(PARAMS), PARAMS,
                   second_grads=to_tree(j1))
  np.testing.assert_allclose(
      s.lambdas, project_simplex_ref(np.full(3, 1 / 3) - 0.3 * (
          j1 @ j1.T) @ np.full(3, 1 / 3)), rtol=1e-5, atol=1e-6)
  # Two batches: the step follows J1 J2^T (grads first), not J2 J1^T.
  _, s12 = tx.update(to_tree(j1), tx.init(PARAMS), PARAMS,
                     second_grads=to_tree(j2))
  lam = np.full(3, 1 / 3)
  np.testing.assert_allclose(
      s12.lambdas, project_simplex_ref(lam - 0.3 * (j1 @ j2.T) @ lam),
      rtol=1e-5, atol=1e-6)


def test_zero_second_batch_keeps_the_weights():
  # A zero cross matrix: only the regulariser moves lambda, along 1/T.
  g = to_tree(np.ones((3, 24), np.float32))
  tx = po.modo(num_tasks=3)
  _, s = tx.update(g, tx.init(PARAMS), PARAMS,
                   second_grads=jax.tree.map(jnp.zeros_like, g))
  np.testing.assert_allclose(s.lambdas, np.full(3, 1 / 3), rtol=1e-6)


def test_bad_second_batch_errors_name_it():
  g = to_tree(np.ones((3, 24), np.float32))
  tx = po.modo(num_tasks=3)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="second_grads"):
    tx.update(g, state, PARAMS)
  short = dict(g, head=g["head"][:2])
  with pytest.raises(ValueError, match=r"head.*second_grads.*\(2, 4, 2\)"):
    jax.jit(lambda a, b: tx.update(a, state, PARAMS, second_grads=b))(
        g, short)
  with pytest.raises(ValueError, match="second_grads.*structure"):
    tx.update(g, state, PARAMS, second_grads={"head": g["head"]})
  with pytest.raises(ValueError, match="third_grads"):
    tx.update(g, state, PARAMS, second_grads=g, third_grads=short)


@pytest.mark.parametrize("kwargs", [{"step_size": 0.0}, {"rho": -1.0}])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError, match=list(kwargs)[0]):
    po.modo(num_tasks=2, **kwargs)
  with pytest.raises(ValueError, match=list(kwargs)[0]):
    po.weighting.modo(jnp.eye(2), jnp.full(2, 0.5), **kwargs)


def test_bad_cross_and_weights_shapes():
  with pytest.raises(ValueError, match="square"):
    po.weighting.modo(jnp.ones((2, 3)), jnp.full(2, 0.5))
  with pytest.raises(ValueError, match="weights"):
    po.weighting.modo(jnp.eye(2), jnp.full(3, 0.5))


def test_traced_step_size():
  # inject_hyperparams hands the factory traced values.
  tx = jax.jit(lambda s: po.weighting.modo(jnp.eye(2) * 4, jnp.array(
      [0.5, 0.5]), step_size=s))
  np.testing.assert_allclose(tx(0.1), [0.5, 0.5], atol=1e-6)
