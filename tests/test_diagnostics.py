"""pcgrad_optax.diagnostics against float64 references on the raw gradients.

The references compute norms, cosines and magnitude similarities directly
from the (T, P) task gradients in float64 NumPy (not from a Gram matrix),
pair by pair.
"""

from __future__ import annotations

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from pcgrad_optax import diagnostics

HYP = hypothesis.settings(deadline=None, max_examples=30, derandomize=True,
                          suppress_health_check=list(hypothesis.HealthCheck))

summary_jit = jax.jit(diagnostics.summary, static_argnames=("threshold",))


@jax.jit
def all_stats(gram):
  return (diagnostics.cosine_similarities(gram),
          diagnostics.magnitude_similarity(gram),
          diagnostics.conflict_fraction(gram),
          diagnostics.task_norms(gram))


fraction_jit = jax.jit(diagnostics.conflict_fraction, static_argnums=(1,))


def gram_of(g) -> jax.Array:
  g = np.asarray(g, np.float64)
  return jnp.asarray(g @ g.T, jnp.float32)


def reference(g, threshold):
  """Pairwise statistics straight from the gradients (float64)."""
  g = np.asarray(g, np.float64)
  t = g.shape[0]
  norms = np.array([np.sqrt(row @ row) for row in g])
  cos = np.zeros((t, t))
  mag = np.zeros((t, t))
  for i, j in itertools.product(range(t), repeat=2):
    if norms[i] > 0 and norms[j] > 0:
      cos[i, j] = g[i] @ g[j] / (norms[i] * norms[j])
    denom = norms[i]**2 + norms[j]**2
    mag[i, j] = 2 * norms[i] * norms[j] / denom if denom > 0 else 1.0
  pairs = list(itertools.combinations(range(t), 2))
  def fraction(s):
    if not pairs:
      return 0.0
    return sum(norms[i] > 0 and norms[j] > 0 and cos[i, j] < s
               for i, j in pairs) / len(pairs)
  return {
      "task_norms": norms,
      "cosines": cos,
      "magnitude_similarity": mag,
      "mean_cosine": np.mean([cos[p] for p in pairs]) if pairs else 1.0,
      "min_cosine": np.min([cos[p] for p in pairs]) if pairs else 1.0,
      "mean_magnitude_similarity":
          np.mean([mag[p] for p in pairs]) if pairs else 1.0,
      "conflict_fraction": fraction(0.0),
      "conflict_fraction_below_threshold": fraction(threshold),
  }


def check_against_reference(g, threshold=-0.01):
  stats = summary_jit(gram_of(g), threshold=threshold)
  ref = reference(g, threshold)
  assert set(stats) == set(ref)
  for name, expected in ref.items():
    np.testing.assert_allclose(np.asarray(stats[name], np.float64), expected,
                               rtol=1e-5, atol=1e-5, err_msg=name)


def test_summary_matches_reference_random():
  rng = np.random.default_rng(0)
  for t in (2, 3, 5):
    g = rng.standard_normal((t, 17))
    g[-1] = -g[0] + 0.01 * rng.standard_normal(17)     # a conflicting pair
    check_against_reference(g, threshold=-0.05)


def test_edge_cases_zero_opposite_single_task_huge_scale():
  check_against_reference(np.array([[1.0, 2.0, 3.0]]))              # T = 1
  check_against_reference(np.zeros((3, 4)))                         # all zero
  check_against_reference(np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]]))
  check_against_reference(np.array([[1.0, 2.0], [-1.0, -2.0]]))     # opposite
  check_against_reference(np.array([[1e3, 0.0, 1.0], [0.0, 1e-3, 1e-3]]))
  stats = summary_jit(gram_of(np.array([[1.0, 2.0], [-2.0, -4.0]])))
  assert float(stats["min_cosine"]) == -1.0
  assert float(stats["conflict_fraction"]) == 1.0
  np.testing.assert_allclose(stats["magnitude_similarity"][0, 1], 0.8)


def test_threshold_is_strict_and_counts_pairs_once():
  # cos(g0, g1) = 0 exactly: not below 0, but below any positive threshold.
  g = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  gram = gram_of(g)
  assert float(fraction_jit(gram, 0.0)) == pytest.approx(1 / 3)
  assert float(fraction_jit(gram, 0.5)) == pytest.approx(1.0)
  assert float(fraction_jit(gram, -1.0)) == 0.0
  # a zero gradient never conflicts, whatever the threshold
  gz = np.array([[1.0, 0.0], [0.0, 0.0]])
  assert float(fraction_jit(gram_of(gz), 0.5)) == 0.0


@HYP
@hypothesis.given(
    st.integers(1, 5).flatmap(
        lambda t: hnp.arrays(np.float64, (t, 4),
                             elements=st.floats(-1e3, 1e3))),
    st.randoms(use_true_random=False))
def test_properties(g, rng):
  gram = gram_of(g)
  t = g.shape[0]
  cos, mag, frac, norms = map(np.asarray, all_stats(gram))
  assert np.all(np.isfinite(cos)) and np.all(np.isfinite(mag))
  assert np.all(cos >= -1) and np.all(cos <= 1)
  np.testing.assert_array_equal(cos, cos.T)
  assert np.all(mag >= 0) and np.all(mag <= 1)
  np.testing.assert_allclose(mag, mag.T, rtol=1e-6)
  assert 0 <= float(frac) <= 1
  # permutation equivariance: relabelling tasks permutes every output
  perm = np.array(rng.sample(range(t), t))
  cos_p, mag_p, frac_p, norms_p = map(np.asarray, all_stats(gram_of(g[perm])))
  np.testing.assert_allclose(cos_p, cos[np.ix_(perm, perm)], atol=1e-6)
  np.testing.assert_allclose(mag_p, mag[np.ix_(perm, perm)], atol=1e-6)
  np.testing.assert_allclose(norms_p, norms[perm], rtol=1e-6)
  assert float(frac_p) == pytest.approx(float(frac))
  # cosines are scale invariant per task
  scales = np.array([rng.choice([0.5, 2.0, 10.0]) for _ in range(t)])
  cos_s = all_stats(gram_of(g * scales[:, None]))[0]
  np.testing.assert_allclose(cos_s, cos, atol=1e-5)


def test_summary_jit_scan_and_from_stacked_grads_with_mask():
  # The documented recipe: the Gram matrix of the stacked gradients with the
  # transformation's own shared mask, inside jit / scan.
  rng = np.random.default_rng(3)
  grads = {"trunk": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
           "head": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
  mask = {"trunk": True, "head": False}

  def body(carry, g):
    stats = diagnostics.summary(po.gram_matrix(g, shared=mask))
    return carry, stats

  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), grads)
  _, stats = jax.lax.scan(body, 0, stacked)
  ref = reference(np.asarray(grads["trunk"]), -0.01)
  for name, expected in ref.items():
    for step in range(2):
      value = np.asarray(stats[name][step], np.float64)
      if name == "task_norms":
        expected_step = expected * (step + 1)
      else:
        expected_step = expected
      np.testing.assert_allclose(value, expected_step, rtol=1e-5, atol=1e-5,
                                 err_msg=name)


def test_bad_gram_and_low_precision():
  with pytest.raises(ValueError, match="square"):
    diagnostics.summary(jnp.ones((2, 3)))
  g = np.array([[1.0, 2.0], [-1.0, 0.5]])
  stats = diagnostics.summary(jnp.asarray(g @ g.T, jnp.bfloat16))
  assert stats["cosines"].dtype == jnp.float32
  np.testing.assert_allclose(stats["cosines"], reference(g, 0)["cosines"],
                             atol=1e-2)
