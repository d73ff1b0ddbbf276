"""DB-MTL: dual balancing of loss scales (log losses) and gradient magnitudes.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, `Dual-Balancing for Multi-Task
Learning <https://arxiv.org/abs/2308.12029>`_, 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.checks import (check_losses, check_num_tasks,
                                       init_num_tasks)
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.task_state import (check_range, init_task_tree,
                                           replace_task_tree,
                                           task_tree_leaves)
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)


def db_mtl_weighting(gram: jax.Array) -> jax.Array:
  r"""DB-MTL's gradient-magnitude balancing: every gradient to the largest norm.

  .. math::
    w_t = \frac{\max_s \|\hat g_s\|}{\|\hat g_t\|},

  so that every :math:`w_t \hat g_t` has the largest norm among the
  (buffered, log-loss) task gradients :math:`\hat g`; only the diagonal of
  the Gram matrix is used. A zero gradient gets weight 0 (LibMTL divides by
  :math:`\|\hat g_t\| + 10^{-8}`, which differs for norms near 1e-8).

  Args:
    gram: ``(T, T)`` Gram matrix of the gradients :math:`\hat g_t` (in
      :func:`pcgrad_optax.db_mtl`, of the EMA buffers of
      :math:`\nabla \log L_t`).

  Returns:
    ``(T,)`` weights, ``>= 1`` for the non-zero gradients.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[3., 4.], [0., 1.]])
    >>> print(pcgrad_optax.weighting.db_mtl(g @ g.T))
    [1. 5.]

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, `Dual-Balancing for
    Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_, 2023.
  """
  gram = check_gram(gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
  positive = norms > 0
  return jnp.where(positive,
                   jnp.max(norms) / jnp.where(positive, norms, 1), 0)


class DBMTLState(NamedTuple):
  """State of :func:`db_mtl`.

  Attributes:
    count: number of updates done so far (int32).
    buffers: the EMA buffers :math:`\\hat g` of the log-loss gradients: the
      params' structure, a ``(T,) + param.shape`` f32 (f64 for f64 params)
      array per shared leaf, ``optax.MaskedNode()`` for the other leaves;
      zeros at first.
    weights: ``(T,)`` float32 weights applied at the last step (zeros
      before the first update), as in every state of the package: the
      shared part of the update is ``sum_t weights[t] buffers_t`` (on the
      buffered log-loss gradients), divided by T with ``reduction="mean"``.
  """
  count: jax.Array
  buffers: optax.Params
  weights: jax.Array


@documented
def db_mtl(*, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0,
           eps: float = 1e-8, reduction: str = "sum",
           shared: SharedMask = None) -> Aggregator:
  r"""DB-MTL: log-loss gradients, EMA-buffered, balanced to the largest norm.

  Loss-scale balancing: each task is trained on :math:`\log L_t`, whose
  gradient is :math:`g_t / L_t` (here :math:`g_t / (L_t + \epsilon)`, the
  gradient of :math:`\log(L_t + \epsilon)`, :math:`\epsilon = 10^{-8}` as in
  LibMTL). Gradient-magnitude balancing: with the buffers (state, zeros at
  first) at step :math:`k = 1, 2, \dots`

  .. math::
    \hat g_t \leftarrow \beta_k \hat g_t + (1 - \beta_k)\,
      \frac{g_t}{L_t + \epsilon}, \qquad
    \beta_k = \beta / k^{\sigma},

  the update is

  .. math::
    u = \sum_t \frac{\max_s \|\hat g_s\|}{\|\hat g_t\|}\, \hat g_t ,

  every task's buffered gradient scaled to the largest norm
  (:func:`pcgrad_optax.weighting.db_mtl`), then summed. The buffers are not
  bias-corrected (the first update is :math:`1 - \beta` times the balanced
  gradients), as in LibMTL. :math:`\beta = 0.9, \sigma = 0` are LibMTL's
  defaults (the authors' library). Per step: one pass to move the buffers
  and take their norms, one for the weighted sum.

  Heads: the shared leaves get the balanced update; every other leaf (task
  heads) the plain sum of the task gradients :math:`\sum_t g_t`, as in
  every method here. LibMTL backpropagates :math:`\log L_t` into the heads
  too, so its head gradients are :math:`g_t / (L_t + \epsilon)`; with
  ``shared=None`` (the default) every leaf is balanced.

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T (the buffers are allocated at ``init``).
    beta: :math:`\beta \in [0, 1)`, the EMA rate.
    beta_sigma: :math:`\sigma \ge 0`, its decay exponent.
    eps: :math:`\epsilon \ge 0` added to the losses.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`DBMTLState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    (positive) task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.db_mtl(num_tasks=2, beta=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[4., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params, losses=jnp.array([2., 0.1]))
    >>> print(jnp.round(u["w"], 4))  # buffers 0.5 g / L = [1, 0], [0, 5]
    [5. 5.]

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, `Dual-Balancing for
    Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_, 2023.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(beta, "beta", high=1.0, high_open=True)
  check_range(beta_sigma, "beta_sigma")
  check_range(eps, "eps")

  def init_fn(params):
    t = init_num_tasks(expected, "db_mtl")
    return DBMTLState(count=jnp.zeros([], jnp.int32),
                      buffers=init_task_tree(params, shared, t),
                      weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "db_mtl")
    check_record(state.weights, t, "db_mtl")
    losses = check_losses(losses, t, "db_mtl")
    buffers = task_tree_leaves(state.buffers, leaves, mask, "db_mtl",
                               "buffers")
    acc = leaves_accumulation_dtype(leaves)
    k = (state.count + 1).astype(jnp.float32)
    beta_k = (beta / k ** jnp.asarray(beta_sigma, jnp.float32)).astype(acc)
    inv = 1.0 / (losses.astype(acc) + jnp.asarray(eps, acc))
    new_buffers, sq_norms = [], jnp.zeros((t,), acc)
    for b, x in zip(buffers, (x for x, m in zip(leaves, mask) if m)):
      scaled = x.astype(b.dtype) * inv.astype(b.dtype).reshape(
          (t,) + (1,) * (x.ndim - 1))
      nb = beta_k.astype(b.dtype) * b + (1 - beta_k.astype(b.dtype)) * scaled
      new_buffers.append(nb)
      sq_norms = sq_norms + jnp.sum(jnp.square(nb), axis=tuple(
          range(1, nb.ndim))).astype(acc)
    weights = db_mtl_weighting(jnp.diag(sq_norms))
    bs = iter(new_buffers)
    sources = [next(bs) if m else x for x, m in zip(leaves, mask)]
    out = [o.astype(x.dtype) for o, x in zip(
        combine_leaves(sources, mask, weights, reduction), leaves)]
    new_state = DBMTLState(count=optax.safe_increment(state.count),
                           buffers=replace_task_tree(state.buffers,
                                                     new_buffers),
                           weights=record(weights, None, state.weights, None,
                                          t, reduction)[0])
    return jax.tree.unflatten(treedef, out), cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
