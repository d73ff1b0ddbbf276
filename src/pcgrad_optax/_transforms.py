"""Optax transformations on stacked per-task gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax import _core
from pcgrad_optax import weighting as weighting_lib

PyTree = Any


def canonicalize_key(key_or_seed: jax.Array | int) -> jax.Array:
  """A typed PRNG key from an int seed, a typed key or a legacy uint32 key."""
  if isinstance(key_or_seed, (jax.Array, jax.core.Tracer)) and jnp.issubdtype(
      key_or_seed.dtype, jax.dtypes.prng_key):
    return key_or_seed
  if hasattr(key_or_seed, "dtype") and jnp.ndim(key_or_seed) == 1:
    return jax.random.wrap_key_data(jnp.asarray(key_or_seed, jnp.uint32))
  return jax.random.key(key_or_seed)


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: typed PRNG key; step ``n`` draws its orders from
      ``jax.random.fold_in(key, n)``.
    count: number of updates done so far (int32).
  """
  key: jax.Array
  count: jax.Array


_FIRST_IN_CHAIN = """
  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.
"""


def pcgrad(key: jax.Array | int = 0, *, reduction: str = "sum",
           shared: _core.SharedMask = None
           ) -> optax.GradientTransformationExtraArgs:
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

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    key: int seed or PRNG key (typed or legacy) for the random orders. The same
      key gives the same sequence of orders.
    reduction: ``"sum"`` (the paper) or ``"mean"`` (divides the update by T).
    shared: which leaves are shared parameters: None (all), a pytree of bools
      with the params' structure (or a prefix of it) or a callable
      ``params -> pytree of bools``, like ``optax.masked``'s mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update(updates, state,
    params=None)`` takes stacked gradients (every leaf of shape
    ``(T,) + param.shape``) and returns params-shaped updates.

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
  _core.check_reduction(reduction)

  def init_fn(params):
    del params
    return PCGradState(key=canonicalize_key(key),
                       count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    step_key = jax.random.fold_in(state.key, state.count)
    combined, _, _ = _core.aggregate(
        updates, lambda gram: weighting_lib.pcgrad(gram, key=step_key),
        params=params, shared=shared, reduction=reduction)
    return combined, PCGradState(state.key,
                                 optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: micro-batches accumulated since the last real step.
    acc_grads: running mean of the stacked gradients of those micro-batches.
    inner_state: state of the wrapped transformation.
  """
  mini_step: jax.Array
  acc_grads: PyTree
  inner_state: Any


def multi_steps(inner: optax.GradientTransformation, every_k: int, *,
                num_tasks: int) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates stacked per-task gradients over micro-batches.

  The stacked-gradient counterpart of ``optax.MultiSteps``: for ``k - 1``
  calls the per-task gradients of a micro-batch are averaged into the state
  and zero updates are returned; on every ``k``-th call ``inner`` (e.g.
  ``optax.chain(pcgrad(), optax.adam(1e-3))``) runs once on the mean

  .. math::
    \bar g_t = \frac1k \sum_{m=1}^{k} g_t^{(m)} .

  Surgery is nonlinear, so the per-task gradients must be averaged *before*
  it, which is what this does; averaging surgery outputs is a different (and
  wrong) algorithm.

  Args:
    inner: transformation taking stacked gradients (starting with
      :func:`pcgrad` or another aggregator).
    every_k: number of micro-batches per real step (>= 1).
    num_tasks: T, the size of the stacked gradients' task axis (the
      accumulator is allocated at ``init``, where only params are seen).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`MultiStepsState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.multi_steps(
    ...     optax.chain(pcgrad_optax.pcgrad(), optax.sgd(0.1)), every_k=2,
    ...     num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params)   # accumulated, no step
    >>> u["w"]
    Array([0., 0.], dtype=float32)
    >>> u, state = tx.update(g, state, params)   # one PCGrad + SGD step
    >>> u["w"]
    Array([-0.1, -0.1], dtype=float32)
  """
  if not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f"every_k must be a positive int, got {every_k!r}.")
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # broadcast_to keeps the params' sharding on the stacked accumulator.
    acc = jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.zeros_like(p),
                                   (num_tasks,) + jnp.shape(p)),
        params)
    return MultiStepsState(mini_step=jnp.zeros([], jnp.int32), acc_grads=acc,
                           inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _core.num_tasks(updates, None)
    # Check shapes before accumulating: `a + (g - a) / n` would broadcast a
    # (1, ...) accumulator against (T, ...) gradients without complaint.
    acc_leaves, acc_def = jax.tree_util.tree_flatten_with_path(
        state.acc_grads)
    grad_def = jax.tree.structure(updates)
    if acc_def != grad_def:
      raise ValueError(
          "multi_steps: the stacked gradients do not match the accumulator "
          f"allocated at init for num_tasks={num_tasks}: {grad_def} vs "
          f"{acc_def}.")
    for (path, a), g in zip(acc_leaves, jax.tree.leaves(updates)):
      if a.shape != g.shape:
        raise ValueError(
            f"multi_steps: stacked gradient leaf '{_core.leaf_name(path)}' has "
            f"shape {g.shape}, expected the accumulator shape {a.shape} "
            f"(num_tasks={num_tasks}).")
    acc = jax.tree.map(
        lambda a, g: a + (g.astype(a.dtype) - a) / (state.mini_step + 1),
        state.acc_grads, updates)
    is_last = state.mini_step == every_k - 1

    def real_step(_):
      out, inner_state = inner.update(acc, state.inner_state, params,
                                      **extra_args)
      return (out, inner_state, jax.tree.map(jnp.zeros_like, acc),
              jnp.zeros([], jnp.int32))

    def mini_step(_):
      out_shape = jax.eval_shape(
          lambda: inner.update(acc, state.inner_state, params,
                               **extra_args)[0])
      zeros = jax.tree.map(   # sharded like real_step's output (explicit mesh)
          lambda s: jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding),
          out_shape)
      return zeros, state.inner_state, acc, state.mini_step + 1

    out, inner_state, acc, mini = jax.lax.cond(is_last, real_step, mini_step,
                                               None)
    return out, MultiStepsState(mini, acc, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
