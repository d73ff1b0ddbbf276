"""Aligned-MTL: gradients aligned to condition number one, then summed.

Senushkin, Patakin, Kuznetsov & Konushin, `Independent Component Alignment
for Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pcgrad_optax._core.checks import check_choice, check_task_vector
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import mm, normalized

ALIGNED_MTL_SCALE_MODES = ("min", "median", "rmse")


@functools.partial(jax.jit, static_argnames=("scale_mode",))
def _aligned_mtl(gram, task_weights, scale_mode):
  k = normalized(gram)
  t = k.shape[0]
  lam, vec = jnp.linalg.eigh(k)               # ascending
  eps = jnp.finfo(k.dtype).eps
  keep = lam > lam[-1] * t * eps              # the official rank rule
  rank = jnp.sum(keep)
  kept_lam = jnp.where(keep, lam, 0)
  if scale_mode == "min":
    scale = lam[t - jnp.maximum(rank, 1)]
  elif scale_mode == "median":
    # torch.median: the lower median of the kept eigenvalues.
    scale = lam[t - rank + (jnp.maximum(rank, 1) - 1) // 2]
  else:  # "rmse"
    scale = jnp.sum(kept_lam) / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam, 1)), 0)
  balance = jnp.sqrt(jnp.maximum(scale, 0)) * mm(vec * inv_sqrt[None, :],
                                                   vec.T)
  balance = jnp.where(rank > 0, balance, jnp.eye(t, dtype=k.dtype))
  return mm(balance, task_weights.astype(k.dtype)).astype(gram.dtype)


def aligned_mtl_weighting(gram: jax.Array, *,
                          task_weights: jax.Array | None = None,
                          scale_mode: str = "min") -> jax.Array:
  r"""Aligned-MTL: align the gradients' principal components.

  Senushkin et al. (2023) make the task gradients orthogonal with equal
  norms (condition number 1) and rescale them to the smallest singular
  value. With the eigendecomposition :math:`K = V \Sigma^2 V^T` (the
  rank-:math:`r` part),

  .. math::
    \hat G = B G, \quad B = \sigma_{\min} V \Sigma^{-1} V^T, \qquad
    u = \hat G^T p = G^T (B p) ,

  so the weights are :math:`B p` for pre-defined task weights :math:`p`
  (ones: the sum of the aligned gradients, as in the paper's Algorithm 1
  and the official code). Eigenvalues at or below
  :math:`T \varepsilon \lambda_{\max}` are dropped (the official code's rank
  rule); with no positive eigenvalue :math:`B = I`. torchjd's default uses
  :math:`p = 1/T` (the mean): pass ``task_weights`` or use
  ``reduction="mean"`` in the transformation.

  Scaling: multiplying every gradient by :math:`s > 0` leaves :math:`B`
  unchanged and scales the update by :math:`s`. One task: the identity.

  Args:
    gram: ``(T, T)`` Gram matrix.
    task_weights: optional ``(T,)`` :math:`p`; default ones.
    scale_mode: the scale replacing :math:`\sigma_{\min}^2`: ``"min"`` (the
      paper: smallest kept eigenvalue), ``"median"`` (lower median of the
      kept eigenvalues) or ``"rmse"`` (their mean), as in the official code.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[2., 0.], [0., 1.]])
    >>> w = pcgrad_optax.weighting.aligned_mtl(g @ g.T)
    >>> jnp.round(w, 4), jnp.round(w @ g, 4)
    (Array([0.5, 1. ], dtype=float32), Array([1., 1.], dtype=float32))

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, `Independent Component
    Alignment for Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_,
    CVPR 2023.
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  if scale_mode not in ALIGNED_MTL_SCALE_MODES:
    raise ValueError(f"Unknown Aligned-MTL scale_mode {scale_mode!r}; "
                     f"expected one of {ALIGNED_MTL_SCALE_MODES}.")
  if task_weights is None:
    task_weights = jnp.ones((t,), gram.dtype)
  task_weights = check_task_vector(task_weights, t, "task_weights",
                                   gram.dtype)
  return _aligned_mtl(gram, task_weights, scale_mode)


@documented
def aligned_mtl(*, task_weights: jax.Array | None = None,
                scale_mode: str = "min", reduction: str = "sum",
                shared: SharedMask = None,
                num_tasks: int | None = None, keep_gram: bool = False
                ) -> Aggregator:
  r"""Aligned-MTL: gradients aligned to condition number one, then summed.

  Shared leaves get :math:`G^T B p` with
  :math:`B = \sigma_{\min} V \Sigma^{-1} V^T` from the eigendecomposition of
  the Gram matrix (Senushkin et al., 2023; see
  :func:`pcgrad_optax.weighting.aligned_mtl`). ``reduction="mean"`` gives
  torchjd's convention (task weights ``1/T``).

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` :math:`p` (default ones, the paper).
    scale_mode: ``"min"`` (paper), ``"median"`` or ``"rmse"``.
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.aligned_mtl()
    >>> grads = {"w": jnp.array([[2., 0.], [0., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([1., 1.], dtype=float32)

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task
    Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
  """
  check_choice(scale_mode, ALIGNED_MTL_SCALE_MODES,
               "Aligned-MTL scale_mode")
  return gram_transform(
      lambda gram: aligned_mtl_weighting(gram, task_weights=task_weights,
                                         scale_mode=scale_mode),
      reduction=reduction, shared=shared,
      num_tasks=num_tasks, keep_gram=keep_gram,
      method="aligned_mtl")
