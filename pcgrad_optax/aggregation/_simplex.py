"""Euclidean projection onto the probability simplex (MoCo, SDMGrad, MoDo)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project_to_simplex(v: jax.Array) -> jax.Array:
  r"""The point of :math:`\{w \ge 0, \sum_t w_t = 1\}` closest to ``v``.

  The sort-based algorithm (Held et al. 1974; Duchi et al. 2008):
  :math:`w = \max(v - \theta, 0)` with the threshold :math:`\theta` from the
  sorted entries, in ``O(T log T)``, no loop.
  """
  v = jnp.asarray(v)
  t = v.shape[-1]
  # The projection commutes with shifts along (1, ..., 1): shifting the
  # largest entry to 0 keeps the sums below free of cancellation when v is
  # far from the simplex (a large step).
  v = v - jnp.max(v)
  u = jnp.sort(v)[::-1]
  cumulative = jnp.cumsum(u) - 1
  index = jnp.arange(1, t + 1, dtype=v.dtype)
  support = u - cumulative / index > 0
  rho = jnp.max(jnp.where(support, jnp.arange(t), 0))
  theta = cumulative[rho] / (rho + 1).astype(v.dtype)
  return jnp.maximum(v - theta, 0)
