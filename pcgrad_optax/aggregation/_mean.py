"""Mean: linear scalarisation with equal weights, the baseline of the tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)


def mean_weighting(gram: jax.Array) -> jax.Array:
  r"""Equal weights :math:`1/T`: the mean of the task gradients.

  .. math:: w_t = \tfrac1T, \qquad u = \tfrac1T \sum_t g_t .

  Linear scalarisation of the mean loss, the baseline of every table. Note
  that the transformation :func:`pcgrad_optax.mean` with
  ``reduction="mean"`` divides by ``T`` once more; use
  :func:`pcgrad_optax.sum` with ``reduction="mean"`` for the plain mean of
  shared parameters *and* heads.

  Args:
    gram: ``(T, T)`` Gram matrix (only its shape is used).

  Returns:
    ``(T,)`` weights, all ``1/T``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.mean(jnp.eye(4))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  return jnp.full((t,), 1.0 / t, gram.dtype)


@documented
def mean(*, reduction: str = "sum", shared: SharedMask = None,
         num_tasks: int | None = None, keep_gram: bool = False
         ) -> Aggregator:
  r"""Linear scalarisation with equal weights: the mean task gradient.

  Shared leaves get :math:`\frac1T \sum_t g_t`
  (:func:`pcgrad_optax.weighting.mean`); heads get their plain sum, i.e. each
  head its own task's gradient. ``reduction="mean"`` divides both by T once
  more (so the shared part by :math:`T^2`); for the mean of everything use
  :func:`sum` with ``reduction="mean"``.

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.mean()
    >>> grads = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([2., 3.], dtype=float32)
  """
  return gram_transform(mean_weighting, reduction=reduction, shared=shared,
                        num_tasks=num_tasks, keep_gram=keep_gram,
                        method="mean")
