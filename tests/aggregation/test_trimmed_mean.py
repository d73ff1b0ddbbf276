"""The coordinate-wise trimmed mean against a float64 NumPy reference.

The reference sorts every coordinate's T task values and averages the middle
``T - 2 trim`` (Yin et al., 2018). Also: permutation invariance over
torchjd's matrix families (torchjd's property for it), trim = 0 is the mean,
the shared mask, and the argument checks at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import matrix_families as mf
import pcgrad_optax as po


def ref_trimmed_mean(g: np.ndarray, trim: int) -> np.ndarray:
  s = np.sort(g, axis=0)
  return s[trim:g.shape[0] - trim].mean(axis=0)


def run(g, trim, **kwargs):
  tx = po.trimmed_mean(trim, **kwargs)
  grads = {"w": jnp.asarray(g, jnp.float32)}
  out, _ = jax.jit(lambda x: tx.update(x, tx.init({"w": x["w"][0]})))(grads)
  return np.asarray(out["w"], np.float64)


@pytest.mark.parametrize("trim", (0, 1, 2, 5))
def test_matches_reference(trim):
  rng = np.random.default_rng(trim)
  for t in (5, 6, 9, 11):
    if 2 * trim >= t:
      continue
    g = rng.standard_normal((t, 4, 3)).astype(np.float32).astype(np.float64)
    g[0, 0, 0] = 1e6       # an outlier coordinate
    g[:, 1, 1] = 2.0       # ties
    g[1:3, 2, 0] = -7.0
    np.testing.assert_allclose(run(g, trim), ref_trimmed_mean(g, trim),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,g", mf.typical(min_tasks=3) + mf.scaled(3),
                         ids=mf.ids(mf.typical(min_tasks=3) + mf.scaled(3)))
def test_families(name, g):
  u = run(g, 1)
  assert np.all(np.isfinite(u))
  ref = ref_trimmed_mean(g, 1)
  np.testing.assert_allclose(u, ref, rtol=1e-5,
                             atol=1e-6 * max(np.abs(g).max(), 1e-30))
  perm = np.random.default_rng(0).permutation(g.shape[0])
  # The kept values are summed in task order: equal up to f32 round-off.
  np.testing.assert_allclose(run(g[perm], 1), u, rtol=1e-6,
                             atol=1e-7 * max(np.abs(g).max(), 1e-30))


def test_trim_zero_is_the_mean_and_heads_get_sums():
  rng = np.random.default_rng(3)
  grads = {"trunk": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
           "head": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}
  params = jax.tree.map(lambda x: x[0], grads)
  tx = po.trimmed_mean(0)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["trunk"], grads["trunk"].mean(0), rtol=1e-6)
  tx = po.trimmed_mean(1, shared={"trunk": True, "head": False},
                       reduction="mean")
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["head"], grads["head"].mean(0), rtol=1e-6)
  np.testing.assert_allclose(
      out["trunk"], ref_trimmed_mean(np.asarray(grads["trunk"]), 1) / 4,
      rtol=1e-6)


def test_bf16():
  g = np.random.default_rng(0).standard_normal((5, 8))
  tx = po.trimmed_mean(1)
  out, _ = tx.update({"w": jnp.asarray(g, jnp.bfloat16)},
                     tx.init({"w": jnp.zeros(8, jnp.bfloat16)}))
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["w"], np.float32),
                             ref_trimmed_mean(g, 1), atol=2e-2)


def test_argument_checks():
  for trim in (-1, 1.5, True):
    with pytest.raises(ValueError, match="trim"):
      po.trimmed_mean(trim)
  tx = po.trimmed_mean(2)
  grads = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=r"2 \* trim < T"):
    jax.jit(lambda g: tx.update(g, tx.init({"w": jnp.zeros(3)}))[0])(grads)
  out, _ = po.trimmed_mean(2).update({"w": jnp.ones((5, 3))}, optax_empty())
  np.testing.assert_array_equal(out["w"], 1.0)


def optax_empty():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.EmptyState()


def test_single_task_and_zero_or_opposite():
  g = np.random.default_rng(4).standard_normal((1, 6))
  np.testing.assert_allclose(run(g, 0), g[0], rtol=1e-6)
  opposite = np.concatenate([g, -g, np.zeros_like(g)])
  np.testing.assert_array_equal(run(opposite, 1), 0.0)
  np.testing.assert_array_equal(run(np.zeros((3, 6)), 1), 0.0)


def test_traced_trim_matches_static():
  # Issue 12's API: under inject_hyperparams and jit, trim is traced and
  # sorts + masks; eager (concrete) it takes the static path.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((7, 5, 3)), jnp.float32)
  params = {"w": jnp.zeros((5, 3))}
  for trim in (0, 1, 3):
    tx = po.trimmed_mean(trim, reduction="mean")
    ref, _ = tx.update({"w": x}, tx.init(params), params)
    inj = optax.inject_hyperparams(po.trimmed_mean)(trim=trim,
                                                     reduction="mean")
    out, state = jax.jit(inj.update)({"w": x}, inj.init(params), params)
    np.testing.assert_allclose(out["w"], ref["w"], rtol=1e-5, atol=1e-6)
    assert isinstance(state.inner_state, optax.EmptyState)
  with pytest.raises(ValueError, match="trim"):
    po.trimmed_mean(jnp.array(-1))
