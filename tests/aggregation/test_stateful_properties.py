"""Properties of the weightings of ExcessMTL, MoCo, DB-MTL, GradNorm, SDMGrad
and MoDo: permutation equivariance (relabelling the tasks relabels the
weights) and, where the method is scale-free, invariance to the scale of
the gradients; the transformations' updates are in the gradients' dtype
for a third batch of another dtype.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import pcgrad_optax as po
from hypothesis_settings import HYP
from stacked_trees import PARAMS, to_tree


def _problem(seed, t):
  rng = np.random.default_rng(seed)
  g1 = rng.standard_normal((t, 6))
  g2 = g1 + 0.5 * rng.standard_normal((t, 6))
  w = rng.dirichlet(np.ones(t))
  return rng, g1, g2, w


def _weightings(cross, gram, w, ratios):
  return {
      "moco": po.weighting.moco(gram, w, step_size=0.05, rho=0.1),
      "modo": po.weighting.modo(cross, w, step_size=0.05, rho=0.1),
      "sdmgrad": po.weighting.sdmgrad(cross, w, learning_rate=0.5)[0],
      "db_mtl": po.weighting.db_mtl(gram),
      "gradnorm": po.weighting.gradnorm(gram, w * len(w), ratios),
      "excess_mtl": po.weighting.excess_mtl(w, ratios, ratios[::-1] + 1),
  }


@hypothesis.settings(HYP, max_examples=10)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6))
def test_permutation_equivariant(seed, t):
  rng, g1, g2, w = _problem(seed, t)
  ratios = rng.uniform(0.2, 1.0, t)
  perm = rng.permutation(t)
  base = _weightings(g1 @ g2.T, g1 @ g1.T, w, ratios)
  g1p, g2p = g1[perm], g2[perm]
  permuted = _weightings(g1p @ g2p.T, g1p @ g1p.T, w[perm], ratios[perm])
  permuted["excess_mtl"] = po.weighting.excess_mtl(
      w[perm], ratios[perm], (ratios[::-1] + 1)[perm])
  for name, value in base.items():
    np.testing.assert_allclose(np.asarray(permuted[name]),
                               np.asarray(value)[perm], rtol=1e-5,
                               atol=1e-6, err_msg=name)


@hypothesis.settings(HYP, max_examples=10)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6),
                  log_scale=st.floats(-12, 12))
def test_scale_free_weightings(seed, t, log_scale):
  # DB-MTL normalises by norms and SDMGrad by the mean diagonal: the
  # weights do not depend on the gradients' scale (0 and 1e-12..1e12).
  _, g1, g2, w = _problem(seed, t)
  c = 10.0 ** log_scale
  for name, fn in (("db_mtl", lambda a, b: po.weighting.db_mtl(a @ a.T)),
                   ("sdmgrad", lambda a, b: po.weighting.sdmgrad(
                       a @ b.T, w, learning_rate=0.5)[0])):
    ref = np.asarray(fn(g1, g2))
    np.testing.assert_allclose(np.asarray(fn(c * g1, c * g2)), ref,
                               rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.all(np.asarray(po.weighting.db_mtl(np.zeros((t, t)))) == 0)


def test_update_in_the_gradients_dtype_for_another_third_batch():
  g = to_tree(np.ones((2, 24), np.float32), jnp.bfloat16)
  f32 = to_tree(np.ones((2, 24), np.float32))
  for tx in (po.modo(num_tasks=2), po.sdmgrad(num_tasks=2)):
    out, _ = tx.update(g, tx.init(PARAMS), None, second_grads=f32,
                       third_grads=f32)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
