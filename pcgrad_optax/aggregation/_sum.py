"""Sum: linear scalarisation with unit weights (the summed loss's gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)


def sum_weighting(gram: jax.Array) -> jax.Array:
  r"""Unit weights: the sum of the task gradients.

  .. math:: w_t = 1, \qquad u = \sum_t g_t .

  Linear scalarisation of the summed loss (the gradient of
  :math:`\sum_t L_t`).

  Args:
    gram: ``(T, T)`` Gram matrix (only its shape is used).

  Returns:
    ``(T,)`` weights, all 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.sum(jnp.eye(3))
    Array([1., 1., 1.], dtype=float32)
  """
  gram = check_gram(gram)
  return jnp.ones((gram.shape[0],), gram.dtype)


@documented
def sum(*, reduction: str = "sum", shared: SharedMask = None,  # noqa: A001
        num_tasks: int | None = None, keep_gram: bool = False
        ) -> Aggregator:
  r"""Linear scalarisation with unit weights: the summed task gradient.

  Every leaf gets :math:`\sum_t g_t` (:func:`pcgrad_optax.weighting.sum`),
  the gradient of :math:`\sum_t L_t`; with ``reduction="mean"`` every leaf
  gets :math:`\frac1T \sum_t g_t`, the gradient of the mean loss.

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.sum(reduction="mean")
    >>> grads = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([2., 3.], dtype=float32)
  """
  return gram_transform(sum_weighting, reduction=reduction, shared=shared,
                        num_tasks=num_tasks, keep_gram=keep_gram,
                        method="sum")
