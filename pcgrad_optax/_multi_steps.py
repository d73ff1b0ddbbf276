"""Micro-batch accumulation of stacked per-task gradients before the surgery."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# A module import: multi_steps has an argument named num_tasks.
from pcgrad_optax._core import stacked
from pcgrad_optax._core.checks import (check_num_tasks, init_num_tasks,
                                       static_int)
from pcgrad_optax._core.stacked import PyTree
from pcgrad_optax._core.transform import Aggregator


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: micro-batches accumulated since the last real step.
    acc_grads: running mean of the stacked gradients of those micro-batches.
    inner_state: state of the wrapped transformation.
    ready: whether the last update was a real step (bool). It is the flag
      ``optax.experimental.aggregating.process`` reads, so an optimizer
      after this aggregator (and its state) only moves on real steps.
  """
  mini_step: jax.Array
  acc_grads: PyTree
  inner_state: Any
  ready: jax.Array


def multi_steps(inner: optax.GradientTransformation, every_k: int, *,
                num_tasks: int) -> Aggregator:
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

  Inside ``optax.experimental.aggregating.process(pre, multi_steps(agg,
  k, num_tasks=T), post)`` the state's ``ready`` flag keeps ``post`` (e.g.
  Adam) and its state still on the accumulation steps, as with optax's own
  accumulating aggregators.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`MultiStepsState`.

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
  static_int(every_k, "every_k")   # a traced every_k is used as an array
  expected = check_num_tasks(num_tasks)   # None when traced
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    t = init_num_tasks(expected, "multi_steps")
    # broadcast_to keeps the params' sharding on the stacked accumulator.
    acc = jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.zeros_like(p), (t,) + jnp.shape(p)),
        params)
    return MultiStepsState(mini_step=jnp.zeros([], jnp.int32), acc_grads=acc,
                           inner_state=inner.init(params),
                           ready=jnp.zeros([], bool))

  def update_fn(updates, state, params=None, **extra_args):
    stacked.num_tasks(updates, None)
    # Check shapes before accumulating: `a + (g - a) / n` would broadcast a
    # (1, ...) accumulator against (T, ...) gradients without complaint.
    acc_leaves, acc_def = jax.tree_util.tree_flatten_with_path(
        state.acc_grads)
    grad_def = jax.tree.structure(updates)
    if acc_def != grad_def:
      raise ValueError(
          "multi_steps: the stacked gradients do not match the accumulator "
          f"allocated at init: {grad_def} vs "
          f"{acc_def}.")
    for (path, a), g in zip(acc_leaves, jax.tree.leaves(updates)):
      if a.shape != g.shape:
        raise ValueError(
            "multi_steps: stacked gradient leaf "
            f"'{stacked.leaf_name(path)}' has shape {g.shape}, expected the "
            f"accumulator shape {a.shape} "
            f"(num_tasks={a.shape[0]}).")
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
    return out, MultiStepsState(mini, acc, inner_state,
                                jnp.asarray(is_last, bool))

  return Aggregator(init_fn, update_fn)
