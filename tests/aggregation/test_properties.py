"""Tests that check several Gram-based aggregators at once.

1. Against the float64 references (tests/gram_references.py): the dual-cone
   projections (UPGrad, DualProj) to float32 round-off on well-conditioned
   cases, and MGDA and UPGrad to float64 round-off when run in float64.
2. Properties, by hypothesis over random task gradients: MGDA, UPGrad and
   DualProj never conflict; ConFIG and IMTL-G have equal cosines; every
   method in ``ALL`` permutes its weights with the tasks and scales with the
   gradients (``DEGREE``); Nash-MTL, IMTL-G, ConFIG and MGDA "l2" are
   invariant to per-task scales; without conflicts UPGrad and DualProj give
   the mean.
3. Edge cases: one task, zero and opposite gradients, huge scale
   differences, duplicated tasks, a bfloat16 Gram, the transforms applying
   the weightings under a shared mask, and bad arguments.

Every reference is written from the paper's own formulation on the (T, P)
matrix of task gradients in float64 NumPy/SciPy, never on the library's
Gram-matrix reformulations (how each one is written is in
tests/gram_references.py). Errors are measured on the library's float32 update
``w^T G``, relative to the largest task gradient norm (the cases and the
library path are in tests/gram_cases.py).
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
from gram_cases import (P, as64, gram32, make_case, rel_err, task_arrays,
                        update, worst_error)
from gram_references import (ref_config, ref_dualproj, ref_mgda, ref_nash_mtl,
                             ref_upgrad)
from hypothesis_settings import HYP, finite

W = po.weighting


# ---------------------------------------------------------------------------
# 1. Against the references.


def test_dual_cone_projections_well_conditioned_to_round_off():
  kinds = ("random", "conflicting", "scales", "rank_deficient")
  assert worst_error(W.upgrad, ref_upgrad, kinds=kinds) < 1e-5
  assert worst_error(W.dualproj, ref_dualproj, kinds=kinds) < 1e-5


def test_float64_solves_to_float64_round_off():
  with jax.enable_x64(True):
    for kind in ("near_degenerate", "scales", "conflicting"):
      t = 6
      g = make_case(kind, t, t)
      k = jnp.asarray(g @ g.T)
      for weighting, reference in ((W.mgda, ref_mgda),
                                   (W.upgrad, ref_upgrad)):
        w = weighting(k)
        assert w.dtype == jnp.float64
        assert rel_err(np.asarray(w) @ g, reference(g), g) < 1e-8


# ---------------------------------------------------------------------------
# 2. Properties.


def never_conflicts(u, g, rel=1e-5):
  norms = np.linalg.norm(g, axis=1)
  return np.all(g @ u >= -rel * norms * max(np.max(norms), 1e-30) * g.shape[0])


@HYP
@hypothesis.given(task_arrays(3))
def test_mgda_upgrad_dualproj_never_conflict(g):
  g = as64(g)
  for weighting in (W.mgda, W.upgrad, W.dualproj):
    assert never_conflicts(update(weighting, g), g), weighting
  u = update(W.mgda, g)
  # MGDA: g_t . u >= |u|^2 for every t (the min-norm point's optimality).
  norms = np.linalg.norm(g, axis=1)
  assert np.all(g @ u >= u @ u - 1e-5 * np.max(norms) ** 2)


@HYP
@hypothesis.given(task_arrays(3))
def test_config_and_imtl_g_equal_cosines(g):
  g = as64(g)
  norms = np.linalg.norm(g, axis=1)
  hypothesis.assume(np.min(norms) > 1e-2 and np.linalg.matrix_rank(
      g / norms[:, None], tol=1e-2) == 3)
  for weighting in (W.config, W.imtl_g):
    u = update(weighting, g)
    cos = (g @ u) / norms / np.linalg.norm(u)
    np.testing.assert_allclose(cos, cos[0], atol=1e-3)
    assert cos[0] > 0
  # IMTL-G's weights sum to one.
  np.testing.assert_allclose(np.sum(W.imtl_g(gram32(g))), 1.0, rtol=1e-4)


ALL = {
    "mean": W.mean, "sum": W.sum, "mgda": W.mgda, "upgrad": W.upgrad,
    "dualproj": W.dualproj, "cagrad": W.cagrad, "imtl_g": W.imtl_g,
    "aligned_mtl": W.aligned_mtl, "config": W.config,
    "nash_mtl": W.nash_mtl,
    "fairgrad": W.fairgrad,   # alpha = 1: scale-free like Nash-MTL
}


@HYP
@hypothesis.given(task_arrays(3), st.permutations([0, 1, 2]))
def test_permuting_tasks_permutes_weights(g, perm):
  g = as64(g)
  hypothesis.assume(np.linalg.matrix_rank(g, tol=1e-2) == 3)
  perm = np.asarray(perm)
  for name, weighting in ALL.items():
    w = np.asarray(weighting(gram32(g)), np.float64)
    w_perm = np.asarray(weighting(gram32(g[perm])), np.float64)
    u = w @ g
    np.testing.assert_allclose(w_perm @ g[perm], u, rtol=0, atol=2e-4 * (
        np.abs(u).max() + np.abs(g).max()), err_msg=name)
    np.testing.assert_allclose(w_perm, w[perm], rtol=2e-3,
                               atol=2e-3 * np.abs(w).max(), err_msg=name)


# What multiplying every gradient by s > 0 does to the update: scales it by s
# (homogeneous of degree 1) for every method except Nash-MTL's paper form,
# which is scale-free (degree 0).
DEGREE = dict.fromkeys(ALL, 1)
DEGREE["nash_mtl"] = 0
DEGREE["fairgrad"] = 0   # (1 - alpha) / (1 + alpha) at alpha = 1


@HYP
@hypothesis.given(task_arrays(3), st.floats(1e-2, 1e2))
def test_positive_scaling(g, s):
  g = as64(g)
  hypothesis.assume(np.min(np.linalg.norm(g, axis=1)) > 1e-2)
  gs = (g * np.float32(s)).astype(np.float32).astype(np.float64)
  for name, weighting in ALL.items():
    u, us = update(weighting, g), update(weighting, gs)
    expected = u * s ** DEGREE[name]
    np.testing.assert_allclose(us, expected, rtol=0, atol=1e-3 * (
        np.abs(expected).max() + s ** DEGREE[name] * np.abs(g).max() * 1e-2),
                               err_msg=name)
  u = update(lambda k: W.nash_mtl(k, normalization="frobenius"), g)
  us = update(lambda k: W.nash_mtl(k, normalization="frobenius"), gs)
  np.testing.assert_allclose(us, s * u, rtol=2e-3, atol=1e-4 * s * np.abs(
      g).max())


@HYP
@hypothesis.given(task_arrays(3), hnp.arrays(np.float64, (3,), elements=
                                              st.floats(1e-2, 1e2)))
def test_per_task_scaling(g, scales):
  # Nash-MTL's update is invariant to every task's gradient scale; IMTL-G's
  # and ConFIG's directions are; MGDA "l2"'s weights are.
  g = as64(g)
  norms = np.linalg.norm(g, axis=1)
  hypothesis.assume(np.min(norms) > 1e-1 and np.linalg.matrix_rank(
      g / norms[:, None], tol=1e-2) == 3)
  gs = (g * scales[:, None]).astype(np.float32).astype(np.float64)
  u, us = update(W.nash_mtl, g), update(W.nash_mtl, gs)
  np.testing.assert_allclose(us, u, rtol=0, atol=1e-3 * np.abs(u).max())
  # ConFIG's direction is invariant. IMTL-G's is up to its sign: the update
  # c v has v fixed by the equal-projection condition, but c = 1 / sum(alpha)
  # comes from the affine constraint on the raw-scale weights, whose sign
  # scaling can flip.
  u, us = update(W.config, g), update(W.config, gs)
  np.testing.assert_allclose(us / np.linalg.norm(us), u / np.linalg.norm(u),
                             atol=1e-3)
  u, us = update(W.imtl_g, g), update(W.imtl_g, gs)
  cosine = np.dot(u, us) / (np.linalg.norm(u) * np.linalg.norm(us))
  np.testing.assert_allclose(abs(cosine), 1.0, atol=1e-3)
  np.testing.assert_allclose(W.mgda(gram32(gs), normalization="l2"),
                             W.mgda(gram32(g), normalization="l2"), atol=1e-4)


@HYP
@hypothesis.given(hnp.arrays(np.float32, (3, 5), elements=st.floats(
    0, 10, **finite)))
def test_no_conflict_gives_the_mean(g):
  # Non-negative entries: no pair conflicts, so UPGrad and DualProj are the
  # mean gradient.
  g = as64(g)
  for weighting in (W.upgrad, W.dualproj):
    np.testing.assert_allclose(update(weighting, g), g.mean(0), rtol=0,
                               atol=1e-5 * np.abs(g).max())


# ---------------------------------------------------------------------------
# 3. Edge cases.


@pytest.mark.parametrize("name", sorted(ALL))
def test_single_task(name):
  g = np.array([[3.0, -4.0, 0.0, 1.0]])
  u = update(ALL[name], g)
  expected = {"cagrad": 1.5 * g[0], "nash_mtl": g[0] / np.linalg.norm(g[0]),
              "fairgrad": g[0] / np.linalg.norm(g[0])}.get(name, g[0])
  np.testing.assert_allclose(u, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_and_opposite_gradients(name):
  weighting = ALL[name]
  zeros = np.zeros((3, 4))
  assert np.all(update(weighting, zeros) == 0)
  g = make_case("random", 3, 0)
  g[1] = 0.0
  u = update(weighting, g)
  assert np.all(np.isfinite(u))
  if name in ("mgda", "dualproj", "upgrad"):
    assert never_conflicts(u, g)
  if name == "mgda":
    np.testing.assert_array_equal(u, 0.0)   # a zero gradient is in the hull
  opposite = np.stack([g[0], -g[0]])
  u = update(weighting, opposite)
  assert np.all(np.isfinite(u))
  if name not in ("mean", "sum", "aligned_mtl"):
    # Pareto-stationary: every conflict-averse method stops.
    np.testing.assert_allclose(u, 0.0, atol=1e-3 * np.abs(g[0]).max())


def test_huge_scale_differences():
  # Norms 1e-4 and 1e4 (K entries span 1e16): directions still resolved.
  rng = np.random.default_rng(0)
  g = rng.standard_normal((3, P))
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  g *= np.array([[1e4], [1.0], [1e-4]])
  g = g.astype(np.float32).astype(np.float64)
  assert rel_err(update(W.mgda, g), ref_mgda(g), g) < 1e-6
  np.testing.assert_allclose(update(W.mgda, g), ref_mgda(g), rtol=1e-3,
                             atol=1e-7)   # the tiny min-norm point itself
  for weighting, reference in ((W.upgrad, ref_upgrad),
                               (W.dualproj, ref_dualproj),
                               (W.config, ref_config),
                               (W.nash_mtl, ref_nash_mtl)):
    ref = reference(g)
    np.testing.assert_allclose(update(weighting, g), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())
  # IMTL-G's closed form (D U^T)^-1 loses ~1e-4 even in float64 here, so
  # check its defining property instead: weights summing to one and equal
  # cosines with every task gradient.
  w = np.asarray(W.imtl_g(gram32(g)), np.float64)
  u = w @ g
  cos = g @ u / np.linalg.norm(g, axis=1) / np.linalg.norm(u)
  np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cos, cos[0], rtol=1e-5)


def test_duplicated_tasks_rank_deficient():
  # A duplicated task: MGDA and IMTL-G give the same update as with the
  # duplicate merged, ConFIG the same direction (its length sums the
  # projections of all T gradients, so it counts the duplicate twice).
  g = make_case("random", 2, 3)
  dup = np.concatenate([g, g[:1]])
  for weighting in (W.mgda, W.imtl_g):
    np.testing.assert_allclose(update(weighting, dup), update(weighting, g),
                               atol=1e-4 * np.abs(g).max())
  u, u_dup = update(W.config, g), update(W.config, dup)
  np.testing.assert_allclose(u_dup / np.linalg.norm(u_dup),
                             u / np.linalg.norm(u), atol=1e-4)
  assert rel_err(u_dup, ref_config(dup), dup) < 1e-4
  for weighting, reference in ((W.upgrad, ref_upgrad),
                               (W.dualproj, ref_dualproj)):
    assert rel_err(update(weighting, dup), reference(dup), dup) < 1e-5


def test_low_precision_gram():
  g = make_case("conflicting", 3, 0)
  k16 = jnp.asarray(g @ g.T, jnp.bfloat16)
  for name, weighting in ALL.items():
    w = weighting(k16)
    assert w.dtype == jnp.float32, name   # check_gram widens to f32
    assert np.all(np.isfinite(np.asarray(w))), name


def test_transforms_apply_the_weightings():
  # Shared leaves get w^T G, heads the sum (or mean) over tasks.
  g = make_case("conflicting", 3, 7)
  heads = make_case("random", 3, 8)[:, :6]
  grads = {"trunk": jnp.asarray(g, jnp.float32),
           "head": jnp.asarray(heads.reshape(3, 2, 3), jnp.float32)}
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
  mask = {"trunk": True, "head": False}
  for name, weighting in ALL.items():
    for reduction, divisor in (("sum", 1), ("mean", 3)):
      tx = getattr(po, name)(shared=mask, reduction=reduction)
      out, state = tx.update(grads, tx.init(params), params)
      w = np.asarray(weighting(gram32(g)), np.float64)
      expected = w @ g / divisor
      # float32 round-off of the weighted sum itself (weights reach 1e3 in
      # this nearly Pareto-stationary case).
      atol = 1e-6 * np.max(np.abs(w) @ np.abs(g))
      np.testing.assert_allclose(out["trunk"], expected, rtol=1e-5,
                                 atol=atol, err_msg=name)
      np.testing.assert_allclose(out["head"].reshape(-1),
                                 heads.sum(0) / divisor, rtol=1e-6)


def test_bad_inputs():
  k = jnp.eye(3)
  with pytest.raises(ValueError, match="square"):
    W.mgda(jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="normalization"):
    W.mgda(k, normalization="loss")
  with pytest.raises(ValueError, match="c must be"):
    W.cagrad(k, -0.1)
  with pytest.raises(ValueError, match="rescale"):
    W.cagrad(k, rescale=3)
  with pytest.raises(ValueError, match=r"task_weights.*\(3,\)"):
    W.upgrad(k, task_weights=jnp.ones(2))
  with pytest.raises(ValueError, match="reg_eps"):
    W.dualproj(k, reg_eps=-1.0)
  with pytest.raises(ValueError, match="scale_mode"):
    W.aligned_mtl(k, scale_mode="max")
  with pytest.raises(ValueError, match="ridge"):
    W.nash_mtl(k, ridge=-1.0)
  with pytest.raises(ValueError, match="normalization"):
    po.nash_mtl(normalization="l2")
  with pytest.raises(ValueError, match="c must be"):
    po.cagrad(c=-1.0)
  with pytest.raises(ValueError, match="scale_mode"):
    po.aligned_mtl(scale_mode="max")
  with pytest.raises(ValueError, match="reduction"):
    po.mean(reduction="median")
