"""Krum / Multi-Krum against an independent float64 reference.

The reference (``ref_krum``) follows Blanchard et al. (2017) on the (T, P)
task gradients in NumPy: pairwise (squared) distances of the gradients
themselves, each score the sum over the ``T - f - 2`` nearest others, the
``m`` lowest scores averaged. Also: the outlier it exists for, torchjd's
argument constraints, permutation invariance over torchjd's matrix families
and the edge cases.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import matrix_families as mf
import pcgrad_optax as po
from gram_cases import gram32, make_case, update

W = po.weighting


def ref_krum(g: np.ndarray, f: int, m: int = 1, squared: bool = True):
  t = g.shape[0]
  scores = []
  for i in range(t):
    d = [np.sum((g[i] - g[j]) ** 2) for j in range(t) if j != i]
    d = np.sort(d if squared else np.sqrt(d))
    scores.append(np.sum(d[:t - f - 2]))
  chosen = np.argsort(scores, kind="stable")[:m]
  return g[chosen].mean(axis=0)


@pytest.mark.parametrize("squared", (True, False))
def test_matches_reference(squared):
  for t, f, m, seed in itertools.product((3, 5, 8), (0, 1, 2), (1, 2), (0,
                                                                        1)):
    if t < f + 3 or t < m:
      continue
    g = make_case("scales", t, seed)
    u = update(lambda k: W.krum(k, num_byzantine=f, num_selected=m,
                                squared=squared), g)
    np.testing.assert_allclose(u, ref_krum(g, f, m, squared), rtol=1e-6,
                               atol=1e-6 * np.abs(g).max())


def test_outlier_never_selected():
  rng = np.random.default_rng(0)
  honest = rng.standard_normal((7, 10)) * 0.1 + 1.0
  outlier = -50 * np.ones((1, 10))
  g = np.concatenate([outlier, honest])
  for m in (1, 3, 5):
    w = np.asarray(W.krum(gram32(g), num_byzantine=1, num_selected=m))
    assert w[0] == 0 and np.isclose(w.sum(), 1.0)
    assert np.count_nonzero(w) == m


@pytest.mark.parametrize("name,g", mf.typical(min_tasks=3) + mf.scaled(3),
                         ids=mf.ids(mf.typical(min_tasks=3) + mf.scaled(3)))
def test_families(name, g):
  # Finite, the mean of selected gradients, and permutation invariant up
  # to ties (compare the scores' multiset through the update's score).
  w = np.asarray(W.krum(gram32(g), num_byzantine=1), np.float64)
  assert np.all(np.isfinite(w)) and np.isclose(w.sum(), 1.0)
  perm = np.random.default_rng(1).permutation(g.shape[0])
  u, u_perm = update(lambda k: W.krum(k, num_byzantine=1), g), update(
      lambda k: W.krum(k, num_byzantine=1), g[perm])
  scale = max(np.abs(g).max(), 1e-30)
  if not np.allclose(u, u_perm, atol=1e-6 * scale):
    # A tie: the two selected gradients must have the same reference score.
    def score(x):
      d = np.sort(np.sum((g - x) ** 2, axis=1))[1:g.shape[0] - 1 - 1]
      return np.sum(d)
    np.testing.assert_allclose(score(u), score(u_perm), rtol=1e-4)


def test_argument_checks():
  k = jnp.eye(4)
  for f, m, t, ok in ((1, 1, 3, False), (1, 1, 4, True), (1, 4, 4, True),
                      (12, 4, 14, False), (12, 4, 15, True),
                      (12, 15, 15, True), (12, 16, 15, False)):
    gram = jnp.eye(t)
    if ok:
      W.krum(gram, num_byzantine=f, num_selected=m)
    else:
      with pytest.raises(ValueError, match="Krum"):
        W.krum(gram, num_byzantine=f, num_selected=m)
  for f, m in ((-1, 1), (0, 0), (1.5, 1), (True, 1)):
    with pytest.raises(ValueError, match="num_"):
      W.krum(k, num_byzantine=f, num_selected=m)
    with pytest.raises(ValueError, match="num_"):
      po.krum(f, m)
  # Checked when the update is traced.
  tx = po.krum(2)
  grads = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match="T >= num_byzantine"):
    jax.jit(lambda g: tx.update(g, tx.init({"w": jnp.zeros(3)}))[0])(grads)


def test_edge_cases():
  np.testing.assert_array_equal(W.krum(jnp.zeros((4, 4)), num_byzantine=1),
                                [1, 0, 0, 0])
  g = make_case("random", 4, 0)
  k16 = jnp.asarray(g @ g.T, jnp.bfloat16)
  w = W.krum(k16, num_byzantine=0, num_selected=2)
  assert w.dtype == jnp.float32 and np.isclose(float(w.sum()), 1.0)


def test_traced_counts_and_recorded_weights():
  # Issue 12's API: counts may be traced (inject_hyperparams under jit) and
  # num_tasks= records the applied weights (and keep_gram the Gram matrix).
  g = make_case("random", 5, 1)
  k = jnp.asarray(g @ g.T, jnp.float32)
  for f, m in ((0, 1), (1, 2), (2, 3)):
    ref = W.krum(k, num_byzantine=f, num_selected=m)
    traced = jax.jit(lambda kk, ff, mm: W.krum(kk, num_byzantine=ff,
                                                num_selected=mm))(k, f, m)
    np.testing.assert_array_equal(traced, ref)
  params = {"w": jnp.zeros(g.shape[1])}
  grads = {"w": jnp.asarray(g, jnp.float32)}
  tx = po.krum(1, num_selected=2, num_tasks=5, keep_gram=True,
               reduction="mean")
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(
      state.weights, W.krum(k, num_byzantine=1, num_selected=2) / 5)
  np.testing.assert_allclose(state.gram, k, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_selected"):
    po.krum(0, num_selected=jnp.array(0))
