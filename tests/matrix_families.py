"""torchjd's matrix families for the aggregator property tests, in NumPy.

The families of torchjd's aggregator tests (``tests/unit/aggregation/
_matrix_samplers.py`` and ``_inputs.py`` there), rewritten here in float64
NumPy from their definitions, for any method's tests to use. A matrix ``J``
is ``(T, P)``: one row per task gradient.

* ``normal``: ``U[:, :r] S V[:r]`` with Haar-random orthonormal ``U``, ``V``
  and ``|N(0, 1)|`` singular values: rank ``r``.
* ``strong`` (strongly stationary): some ``v > 0`` has ``v^T J = 0`` (the
  rows are orthogonal to a positive vector), i.e. ``0`` is in the relative
  interior of the convex hull of the rows.
* ``strictly_weak``: some ``v >= 0, v != 0`` has ``v^T J = 0`` but no
  ``v > 0`` does (two orthonormal non-negative vectors ``v``, ``v'`` with
  disjoint supports covering every task; ``J`` orthogonal to ``v`` with
  ``v'`` a left singular vector).
* ``non_weak``: no ``v >= 0, v != 0`` has ``v^T J = 0`` (a positive left
  singular vector with a positive singular value).
* ``zero``: all-zero matrices.

``typical()`` is torchjd's ``typical_matrices`` (zero, normal, strong,
strictly weak, non-weak, with its shapes and ranks), ``scaled()`` its
``scaled_matrices`` (the normal ones times 0, 1e-10, 1e3, 1e5, 1e10, 1e15),
each entry a ``(name, J)`` pair with a readable id. Every matrix is rounded
to float32 (so the library's float32 path sees exactly the same numbers) and
returned as float64. Seeded, so the families are the same on every run.
"""

from __future__ import annotations

import numpy as np

NORMAL_DIMS = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5),
               (9, 11, 9)]
ZERO_DIMS = [(1, 1), (4, 3), (9, 11)]
STATIONARITY_DIMS = [(20, 10, 10), (20, 10, 5), (20, 10, 1), (20, 100, 1),
                     (20, 100, 19)]
SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]


def orthonormal_complement(q: np.ndarray, rng) -> np.ndarray:
  """A random ``(m, m - k)`` orthonormal basis of the complement of ``q``."""
  m, k = q.shape
  a = rng.standard_normal((m, m - k))
  a -= q @ (q.T @ a)
  return np.linalg.qr(a)[0]


def orthonormal(dim: int, rng) -> np.ndarray:
  return orthonormal_complement(np.zeros((dim, 0)), rng)


def _singular_values(rank: int, rng) -> np.ndarray:
  return np.diag(np.abs(rng.standard_normal(rank)))


def normal(t: int, p: int, rank: int, rng) -> np.ndarray:
  u, vt = orthonormal(t, rng), orthonormal(p, rng)
  return u[:, :rank] @ _singular_values(rank, rng) @ vt[:rank]


def strong(t: int, p: int, rank: int, rng) -> np.ndarray:
  assert t > 1 and 0 < rank <= min(t - 1, p)
  v = np.abs(rng.standard_normal(t))
  u2 = orthonormal_complement((v / np.linalg.norm(v))[:, None], rng)
  vt = orthonormal(p, rng)
  return u2[:, :rank] @ _singular_values(rank, rng) @ vt[:rank]


def strictly_weak(t: int, p: int, rank: int, rng) -> np.ndarray:
  assert t > 1 and 0 < rank <= min(t - 1, p)
  u = np.abs(rng.standard_normal(t))
  split = int(rng.integers(1, t))
  order = rng.permutation(t)
  v, v_prime = np.zeros(t), np.zeros(t)
  v[order[:split]] = u[order[:split]] / np.linalg.norm(u[order[:split]])
  v_prime[order[split:]] = (u[order[split:]]
                            / np.linalg.norm(u[order[split:]]))
  u1 = np.stack([v, v_prime], axis=1)
  basis = np.hstack([u1, orthonormal_complement(u1, rng)])
  vt = orthonormal(p, rng)
  # Columns 1..rank: v' (non-negative, singular value > 0) and the rest,
  # all orthogonal to v.
  return basis[:, 1:rank + 1] @ _singular_values(rank, rng) @ vt[:rank]


def non_weak(t: int, p: int, rank: int, rng) -> np.ndarray:
  assert rank > 0
  u = np.abs(rng.standard_normal(t))
  u1 = (u / np.linalg.norm(u))[:, None]
  basis = np.hstack([u1, orthonormal_complement(u1, rng)])
  vt = orthonormal(p, rng)
  return basis[:, :rank] @ _singular_values(rank, rng) @ vt[:rank]


def _f32(j: np.ndarray) -> np.ndarray:
  return np.asarray(j, np.float32).astype(np.float64)


def _families(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = {"zero": [(f"zero{t}x{p}", np.zeros((t, p))) for t, p in ZERO_DIMS]}
  out["normal"] = [(f"normal{t}x{p}r{r}", _f32(normal(t, p, r, rng)))
                   for t, p, r in NORMAL_DIMS]
  for name, sampler in (("strong", strong), ("strictly_weak", strictly_weak),
                        ("non_weak", non_weak)):
    out[name] = [(f"{name}{t}x{p}r{r}", _f32(sampler(t, p, r, rng)))
                 for t, p, r in STATIONARITY_DIMS]
  return out


FAMILIES = _families()


def typical(min_tasks: int = 1) -> list[tuple[str, np.ndarray]]:
  """torchjd's typical matrices: zero, normal, strong, strictly weak,
  non-weak (those with at least ``min_tasks`` rows)."""
  out = []
  for name in ("zero", "normal", "strong", "strictly_weak", "non_weak"):
    out += FAMILIES[name]
  return [(n, j) for n, j in out if j.shape[0] >= min_tasks]


def non_strong(min_tasks: int = 1) -> list[tuple[str, np.ndarray]]:
  """Matrices that are not strongly stationary (strictly weak, non-weak)."""
  return [(n, j) for n, j in FAMILIES["strictly_weak"] + FAMILIES["non_weak"]
          if j.shape[0] >= min_tasks]


def scaled(min_tasks: int = 1) -> list[tuple[str, np.ndarray]]:
  """torchjd's scaled matrices: every normal matrix times each scale."""
  return [(f"{n}*{s:g}", _f32(s * j)) for s in SCALES
          for n, j in FAMILIES["normal"] if j.shape[0] >= min_tasks]


def ids(pairs) -> list[str]:
  return [n for n, _ in pairs]
