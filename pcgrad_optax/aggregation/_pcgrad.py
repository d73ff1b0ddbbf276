"""PCGrad: projecting conflicting gradients (Algorithm 1), on the Gram matrix.

Yu et al., `Gradient Surgery for Multi-Task Learning
<https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from pcgrad_optax._core.checks import check_num_tasks
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.mesh import vary_like
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, check_record,
                                          check_record_args, documented,
                                          gram_aggregator, init_record,
                                          key_data, key_impl, record,
                                          state_key)


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


def task_orders(key: jax.Array | None, order: jax.Array | None, t: int,
                caller: str) -> jax.Array:
  """The checked ``(T, T)`` per-task orders: ``order``, or drawn from ``key``.

  Shared by PCGrad and GradVac, whose Algorithm 1 visits the other tasks in a
  random order drawn afresh for every task.
  """
  if order is None:
    if key is None:
      raise ValueError(f"{caller} needs a PRNG `key` or an `order`.")
    order = random_orders(key, t)
  order = jnp.asarray(order)
  if order.shape != (t, t) or not jnp.issubdtype(order.dtype, jnp.integer):
    raise ValueError(
        f"`order` must be an integer array of shape (T, T) = ({t}, {t}), got "
        f"{order.dtype} {order.shape}.")
  return order


def pcgrad_weighting(gram: jax.Array, *, key: jax.Array | None = None,
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
  order = task_orders(key, order, t, "weighting.pcgrad")
  return _pcgrad(gram, order)


# Jitted once at module level: called eagerly (a transformation outside jit),
# a fresh fori_loop body would compile again at every step.
@jax.jit
def _pcgrad(gram, order):
  t = gram.shape[0]
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
                        vary_like(jnp.eye(t, dtype=gram.dtype), gram))
  return coefs.sum(axis=0)


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: uint32 raw data of the typed PRNG key (``jax.random.key_data``,
      which every checkpointer can store); step ``n`` draws its orders from
      ``jax.random.fold_in(jax.random.wrap_key_data(key), n)``.
    count: number of updates done so far (int32).
    weights: with ``num_tasks``, the ``(T,)`` weights applied to the shared
      leaves at the last step (see :class:`pcgrad_optax.GramState`); else
      None.
    gram: with ``keep_gram``, the last step's ``(T, T)`` Gram matrix; else
      None.
  """
  key: jax.Array
  count: jax.Array
  weights: jax.Array | None = None
  gram: jax.Array | None = None


@documented
def pcgrad(key: jax.Array | int = 0, *, reduction: str = "sum",
           shared: SharedMask = None, num_tasks: int | None = None,
           keep_gram: bool = False) -> Aggregator:
  r"""PCGrad gradient surgery on stacked per-task gradients.

  Each step applies Algorithm 1 of Yu et al. (2020) to the shared
  parameters: every task gradient :math:`g_i` is projected, in a random order
  drawn afresh for :math:`i`, onto the normal plane of every other original
  task gradient :math:`g_j` it conflicts with (:math:`g_i^{pc}\cdot g_j<0`),

  .. math::
    g_i^{pc} \leftarrow g_i^{pc} - \frac{g_i^{pc}\cdot g_j}{\|g_j\|^2}\, g_j,
    \qquad u = \sum_i g_i^{pc} \;\; (\text{or } \tfrac1T \sum_i g_i^{pc}).

  The surgery runs on the ``T x T`` Gram matrix of the shared leaves (see
  :func:`pcgrad_optax.weighting.pcgrad`), so it costs two passes over the
  gradients plus ``O(T^3)`` scalar work, with no Python loop over tasks.
  Non-shared leaves (task heads) get the plain sum (or mean) over their task
  axis, i.e. each head receives its own task's gradient untouched.

  @FIRST_IN_CHAIN@

  Args:
    key: int seed or PRNG key (typed or legacy) for the random orders. The same
      key gives the same sequence of orders.
    reduction: ``"sum"`` (the paper) or ``"mean"`` (divides the update by T).
    shared: which leaves are shared parameters: None (all), a pytree of bools
      with the params' structure (or a prefix of it) or a callable
      ``params -> pytree of bools``, like ``optax.masked``'s mask.
    num_tasks: optional T. Given, the state's ``weights`` hold the last
      step's ``(T,)`` task weights for logging (no extra pass over the
      gradients); None (default) leaves ``weights`` None (``init`` only sees
      the params, so the shape must be known up front).
    keep_gram: also keep the last step's ``(T, T)`` Gram matrix in the
      state's ``gram``; needs ``num_tasks``.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`PCGradState`.
    ``update(updates, state, params=None)`` takes stacked gradients (every
    leaf of shape ``(T,) + param.shape``) and returns params-shaped updates.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> params = {"w": jnp.ones(3)}
    >>> def task_losses(p):  # two tasks pulling w in conflicting directions
    ...   return jnp.stack([jnp.sum((p["w"] - 2.0) ** 2),
    ...                     jnp.sum((p["w"] + jnp.array([2., 0., 0.])) ** 2)])
    >>> tx = optax.chain(pcgrad_optax.pcgrad(), optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> losses, grads = pcgrad_optax.task_value_and_grad(task_losses)(params)
    >>> grads["w"].shape  # stacked: (T,) + param shape
    (2, 3)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  check_reduction(reduction)
  records = check_record_args(num_tasks, keep_gram, "pcgrad")
  expected = check_num_tasks(num_tasks) if records else None
  impl = key_impl(key)

  def init_fn(params):
    weights, gram = (init_record(params, num_tasks, keep_gram, "pcgrad")
                     if records else (None, None))
    return PCGradState(key=key_data(key),
                       count=jnp.zeros([], jnp.int32), weights=weights,
                       gram=gram)

  def step(gram, state):
    step_key = jax.random.fold_in(state_key(state.key, impl), state.count)
    t = gram.shape[0]
    weights = pcgrad_weighting(gram, key=step_key)
    if records:
      check_record(state.weights, t, "pcgrad")
      rec_weights, rec_gram = record(weights, gram, state.weights,
                                     state.gram, t, reduction)
    else:
      rec_weights = rec_gram = None
    return weights, PCGradState(state.key, optax.safe_increment(state.count),
                                rec_weights, rec_gram)

  return gram_aggregator(init_fn, step, shared=shared, reduction=reduction,
                         method="pcgrad", expected_tasks=expected)
