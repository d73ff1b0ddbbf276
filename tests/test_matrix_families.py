"""The matrix families of tests/matrix_families.py are what they claim.

Shapes and ranks, and the stationarity classes checked by a linear program
in float64 (``v^T J = 0`` up to the float32 rounding of ``J``, ``v`` on the
simplex): strong matrices have such a ``v`` bounded away from 0, strictly
weak ones only ``v`` with a zero entry, non-weak ones none.
"""

import numpy as np
import pytest
import scipy.optimize

import matrix_families as mf


def _max_min_weight(j, tol=1e-6):
  """max m s.t. v >= m, sum v = 1, |J^T v| <= tol (J scaled to max 1).

  None if infeasible even with m = 0 (float32 rounding of J leaves a
  residual of about 1e-7 at an exact v).
  """
  t = j.shape[0]
  jt = j.T / max(np.abs(j).max(), 1e-300)
  # Variables (v, m): minimise -m.
  a_ub = np.block([[jt, np.zeros((j.shape[1], 1))],
                   [-jt, np.zeros((j.shape[1], 1))],
                   [-np.eye(t), np.ones((t, 1))]])
  b_ub = np.concatenate([np.full(2 * j.shape[1], tol), np.zeros(t)])
  a_eq = np.concatenate([np.ones(t), [0.0]])[None]
  res = scipy.optimize.linprog(np.concatenate([np.zeros(t), [-1.0]]),
                               A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0],
                               bounds=[(0, None)] * t + [(0, None)],
                               method="highs")
  return -res.fun if res.status == 0 else None


@pytest.mark.parametrize("name,j", mf.typical(), ids=mf.ids(mf.typical()))
def test_families(name, j):
  rank = np.linalg.matrix_rank(j, tol=1e-5 * max(np.abs(j).max(), 1e-30))
  if name.startswith("zero"):
    assert rank == 0
    return
  assert rank == int(name.rsplit("r", 1)[1])
  m = _max_min_weight(j)
  if name.startswith("strong"):
    assert m is not None and m > 1e-3 / j.shape[0], m
  elif name.startswith("strictly_weak"):
    assert m is not None and m < 1e-4 / j.shape[0], m
  elif name.startswith("non_weak"):
    assert m is None


def test_scaled_and_seeded():
  assert len(mf.scaled()) == len(mf.SCALES) * len(mf.FAMILIES["normal"])
  again = mf._families()  # pylint: disable=protected-access
  for (n1, a), (n2, b) in zip(mf.typical(), [p for k in (
      "zero", "normal", "strong", "strictly_weak", "non_weak")
                                             for p in again[k]]):
    assert n1 == n2 and np.array_equal(a, b)
