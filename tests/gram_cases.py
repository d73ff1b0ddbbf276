"""Reference cases and the library path for the Gram-based aggregator tests.

``make_case`` builds (T, P) float64 task gradients of the ``KINDS`` below
(random, conflicting, wide scales, ill-conditioned, nearly degenerate, rank
deficient), exactly representable in float32. ``update`` runs a weighting the
way the library does, on the library's own float32 Gram matrix
(``gram32``, i.e. ``pcgrad_optax.gram_matrix``), and returns the update
``w^T G`` in float64. ``rel_err`` measures an update against a float64
reference relative to the largest task gradient norm; ``worst_error`` takes
the worst of it over kinds, task counts ``TS`` and seeds. ``task_arrays`` and
``as64`` are the property tests' inputs.
"""

from __future__ import annotations

import itertools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import pcgrad_optax as po
from hypothesis_settings import finite


P = 24   # parameters per task in the reference cases


def make_case(kind: str, t: int, seed: int) -> np.ndarray:
  """(T, P) float64 gradients (exactly representable in float32)."""
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((t, P))
  if kind == "conflicting" and t >= 2:
    basis = np.linalg.qr(rng.standard_normal((P, t)))[0]
    g = (np.eye(t) - 1.0 / t) @ basis.T + 1e-3 * rng.standard_normal((t, P))
    g *= 10.0 ** rng.uniform(-1, 1, (t, 1))
  elif kind == "scales":
    g *= 10.0 ** rng.uniform(-2, 2, (t, 1))
  elif kind == "ill_conditioned":   # a narrow cone, norms 1e-2..1e2
    g = rng.standard_normal((1, P)) + 0.02 * g
    g *= 10.0 ** rng.uniform(-2, 2, (t, 1))
  elif kind == "near_degenerate":   # almost rank 2, a little noise
    g = rng.standard_normal((t, 2)) @ rng.standard_normal((2, P))
    g += 1e-4 * rng.standard_normal((t, P))
  elif kind == "rank_deficient":    # exactly rank 2 (for T >= 3)
    g = rng.standard_normal((t, 2)) @ rng.standard_normal((2, P))
  return g.astype(np.float32).astype(np.float64)


KINDS = ("random", "conflicting", "scales", "ill_conditioned",
         "near_degenerate", "rank_deficient")
TS = (2, 3, 6)


def gram32(g: np.ndarray) -> jax.Array:
  return po.gram_matrix({"g": jnp.asarray(g, jnp.float32)})


def update(weighting, g: np.ndarray, **kwargs) -> np.ndarray:
  """The library's update (float32 Gram and weights) as float64."""
  w = np.asarray(weighting(gram32(g), **kwargs), np.float64)
  assert np.all(np.isfinite(w))
  return w @ g


def rel_err(u, ref, g) -> float:
  return float(np.linalg.norm(u - ref) / np.max(np.linalg.norm(g, axis=1)))


def worst_error(weighting, reference, kinds=KINDS, ts=TS, seeds=(0, 1, 2),
                **kwargs):
  worst = 0.0
  for t, kind, seed in itertools.product(ts, kinds, seeds):
    g = make_case(kind, t, 1000 * t + 10 * seed + KINDS.index(kind))
    err = rel_err(update(weighting, g, **kwargs), reference(g), g)
    assert err < 1.0, (kind, t, seed, err)
    worst = max(worst, err)
  return worst


def task_arrays(t, p=5):
  return hnp.arrays(np.float32, (t, p), elements=st.floats(
      -10, 10, **finite).map(lambda x: 0.0 if abs(x) < 1e-3 else x))


def as64(g):
  return np.asarray(g, np.float64)
