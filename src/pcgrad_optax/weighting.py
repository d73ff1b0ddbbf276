"""Weightings: pure functions from a task Gram matrix to task weights.

A weighting maps the ``(T, T)`` Gram matrix ``K = G G^T`` of the task
gradients to ``(T,)`` weights ``w``; the aggregated update is
``pcgrad_optax.weighted_sum(stacked, w) = w^T G``. Weightings never touch the
gradients themselves, so they cost ``O(T^3)`` at most, whatever the model
size, and can be tested, composed and logged on their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._grad import vary_like as _vary_like


def check_gram(gram: jax.Array) -> jax.Array:
  """Validates a Gram matrix and returns it in f32 (or wider).

  Every weighting starts with this: ``ValueError`` unless ``gram`` is square
  ``(T, T)``; integer and half-precision inputs become float32.

  Example:
    >>> import pcgrad_optax
    >>> pcgrad_optax.weighting.check_gram([[4, 2], [2, 1]]).dtype
    dtype('float32')
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
        f"The Gram matrix must be square (T, T), got shape {gram.shape}.")
  if not jnp.issubdtype(gram.dtype, jnp.floating):
    gram = gram.astype(jnp.float32)
  return gram.astype(jnp.promote_types(gram.dtype, jnp.float32))


def random_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """Independent uniformly random permutations of ``range(num_tasks)``.

  Row ``i`` is the order in which task ``i``'s gradient is projected in
  PCGrad's Algorithm 1 (drawn afresh for every task, as the paper requires).
  ``pcgrad()`` draws its orders at step ``n`` with
  ``random_orders(jax.random.fold_in(key, n), T)``.

  Args:
    key: a PRNG key.
    num_tasks: ``T``.

  Returns:
    ``(num_tasks, num_tasks)`` int32 array, each row a permutation.

  Example:
    >>> import jax, numpy as np
    >>> import pcgrad_optax
    >>> orders = pcgrad_optax.weighting.random_orders(jax.random.key(0), 3)
    >>> np.sort(np.asarray(orders), axis=1).tolist()
    [[0, 1, 2], [0, 1, 2], [0, 1, 2]]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020, Algorithm 1.
  """
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def pcgrad(gram: jax.Array, *, key: jax.Array | None = None,
           order: jax.Array | None = None) -> jax.Array:
  r"""PCGrad (projecting conflicting gradients) as a weighting.

  Algorithm 1 of Yu et al. (2020): for every task :math:`i`, start from
  :math:`g_i^{pc} = g_i` and, for every other task :math:`j` in a random
  order drawn for :math:`i`, if :math:`g_i^{pc} \cdot g_j < 0` project
  :math:`g_i^{pc}` onto the normal plane of the *original* :math:`g_j`:

  .. math::
    g_i^{pc} \leftarrow g_i^{pc} - \frac{g_i^{pc} \cdot g_j}{\|g_j\|^2} g_j .

  The update is :math:`\sum_i g_i^{pc}`. Every projection subtracts a multiple
  of an original :math:`g_j`, so :math:`g_i^{pc} = \sum_k c_{ik} g_k` at all
  times and :math:`g_i^{pc} \cdot g_j = (C K)_{ij}`: the algorithm runs
  exactly on the Gram matrix :math:`K`, and the update is
  :math:`w^T G` with :math:`w = \sum_i c_i`. The ``T`` sequential projection
  steps of all tasks run together in one ``lax.fori_loop`` (compile time
  independent of ``T``). A task with a zero gradient is never projected
  against (no ``0/0``).

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients.
    key: PRNG key for the per-task random orders; ignored if ``order`` given.
    order: optional ``(T, T)`` int array; row ``i`` is the order in which
      task ``i``'s gradient is projected against the others (the entry equal
      to ``i`` is skipped). Each row should contain every task once.

  Returns:
    ``(T,)`` weights ``w`` with ``weighted_sum(stacked, w)`` equal to the
    PCGrad update with the sum reduction.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = pcgrad_optax.weighting.pcgrad(g @ g.T, order=jnp.array([[0, 1], [1, 0]]))
    >>> jnp.round(w @ g, 4)
    Array([0.5848, 3.8012, 3.8012], dtype=float32)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  if order is None:
    if key is None:
      raise ValueError("weighting.pcgrad needs a PRNG `key` or an `order`.")
    order = random_orders(key, t)
  order = jnp.asarray(order)
  if order.shape != (t, t) or not jnp.issubdtype(order.dtype, jnp.integer):
    raise ValueError(
        f"`order` must be an integer array of shape (T, T) = ({t}, {t}), got "
        f"{order.dtype} {order.shape}.")
  sq_norms = jnp.diagonal(gram)
  rows = jnp.arange(t)

  def project_step(k, coefs):
    j = order[:, k]                      # the task each row projects against
    dots = jnp.sum(coefs * gram[j], axis=1)   # g_i^pc . g_{j_i} (K symmetric)
    norm2 = sq_norms[j]
    conflict = (j != rows) & (dots < 0) & (norm2 > 0)
    step = jnp.where(conflict, dots / jnp.where(norm2 > 0, norm2, 1), 0)
    return coefs.at[rows, j].add(-step)

  # vary_like: inside shard_map the loop carry must vary like the Gram does.
  coefs = lax.fori_loop(0, t, project_step,
                        _vary_like(jnp.eye(t, dtype=gram.dtype), gram))
  return coefs.sum(axis=0)


# The rest of the family lives in its own modules; re-exported here so every
# weighting is `pcgrad_optax.weighting.<name>`.
from pcgrad_optax._gram_weightings import *  # noqa: E402,F401,F403
from pcgrad_optax._loss_weightings import *  # noqa: E402,F401,F403
