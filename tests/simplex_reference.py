"""A float64 Euclidean projection onto the probability simplex, by bisection.

Written independently of the package's sort-based projection (MoCo, SDMGrad
and MoDo's tests compare against it).
"""

import numpy as np


def project_simplex_ref(v):
  """argmin_{w >= 0, sum w = 1} ||w - v||, by bisection on the threshold."""
  # Shifted so that the largest entry is 0: the answer is O(1) while v may
  # be huge, and v - mid would lose its digits.
  v = np.asarray(v, np.float64)
  v = v - v.max()
  lo, hi = v.min() - 1.0, 0.0
  for _ in range(200):
    mid = (lo + hi) / 2
    if np.maximum(v - mid, 0).sum() > 1:
      lo = mid
    else:
      hi = mid
  return np.maximum(v - (lo + hi) / 2, 0)
