"""Recon's retraining: losses and per-task gradients of a branched model.

Step 4 of the procedure: :func:`task_losses` vmaps one task's loss over the
tasks with the branched leaves mapped; :func:`value_and_grad` gives the lean
(diagonal) gradient layout and :func:`with_branches` wraps any aggregator to
take it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core import stacked
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax.recon._branching import (branched_flags, check_num_tasks,
                                           task_axis)
from pcgrad_optax.recon._layers import Grouping, param_name


def _split_branched(params, layers, grouping, num_tasks):
  paths, leaves, flags = branched_flags(params, layers, grouping,
                                        "branched params")
  task_axis(paths, leaves, flags, num_tasks)
  treedef = jax.tree.structure(params)
  shared = [x for x, f in zip(leaves, flags) if not f]
  branched = [x for x, f in zip(leaves, flags) if f]

  def merge(shared_leaves, branched_leaves):
    s, b = iter(shared_leaves), iter(branched_leaves)
    return jax.tree.unflatten(treedef, [next(b) if f else next(s)
                                        for f in flags])

  return shared, branched, merge


def _stack(rows):
  """Stacks a list of per-task pytrees along a new leading task axis."""
  return jax.tree.map(lambda *r: jnp.stack(r), *rows)


def _check_scalar(loss, has_aux):
  value = loss[0] if has_aux else loss
  if jnp.ndim(value) != 0:
    raise ValueError(
        "task_loss must return one task's scalar loss"
        f"{' (as (loss, aux))' if has_aux else ''}, got shape "
        f"{jnp.shape(value)}.")


def task_losses(task_loss: Callable[..., Any], layers: Sequence[str],
                num_tasks: int, *, grouping: Grouping = None,
                has_aux: bool = False,
                batched: bool = True) -> Callable[..., Any]:
  r"""The ``(T,)`` task losses of a branched model, from one task's loss.

  ``task_loss(params, t, *args, **kwargs)`` is task ``t``'s scalar loss on
  ordinary (unbranched) params. The returned function evaluates
  :math:`L_t = \text{task\_loss}(\text{task\_params}(\theta, t), t)` for all
  ``t`` with one ``jax.vmap`` (branched leaves ``in_axes=0``, shared leaves
  and ``args`` broadcast). Its output can go through
  :func:`pcgrad_optax.task_value_and_grad` (the simple, ``T x T`` layout for
  branched leaves) or be used for evaluation.

  Args:
    task_loss: ``(params, t, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)`` with ``has_aux``).
    layers: the branched layer names (``[]`` for an unbranched model).
    num_tasks: ``T``.
    grouping: the grouping of leaves into layers (as in :func:`branch`).
    has_aux: whether ``task_loss`` returns ``(loss, aux)``; aux gets a leading
      task axis.
    batched: ``True`` (default): one ``jax.vmap`` over the tasks. ``False``:
      ``T`` separate calls on task ``t``'s view, stacked (same numbers; see
      :func:`value_and_grad`).

  Returns:
    ``fn(branched_params, *args, **kwargs) -> (T,) losses`` (or
    ``(losses, aux)``).

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> b = {"a": {"w": jnp.array([1., 2.])},   # layer "a", branched: T = 2
    ...      "b": {"w": jnp.array(3.)}}         # layer "b", shared
    >>> loss = lambda p, t: p["a"]["w"] * p["b"]["w"]
    >>> recon.task_losses(loss, ["a"], 2)(b)
    Array([3., 6.], dtype=float32)
  """
  num_tasks = check_num_tasks(num_tasks)

  def losses_fn(params, *args, **kwargs):
    shared, branched, merge = _split_branched(params, layers, grouping,
                                              num_tasks)

    def one(t, branched_leaves):
      out = task_loss(merge(shared, branched_leaves), t, *args, **kwargs)
      _check_scalar(out, has_aux)
      return out

    if batched:
      return jax.vmap(one)(jnp.arange(num_tasks), branched)
    return _stack([one(t, [b[t] for b in branched])
                   for t in range(num_tasks)])

  return losses_fn


def value_and_grad(task_loss: Callable[..., Any], layers: Sequence[str],
                   num_tasks: int, *, grouping: Grouping = None,
                   has_aux: bool = False,
                   batched: bool = True) -> Callable[..., Any]:
  r"""Task losses and per-task gradients of a branched model, lean layout.

  Runs ``jax.vmap(jax.value_and_grad(task_loss))`` over the tasks, with the
  branched leaves mapped and the shared leaves broadcast. Returns

  * for a shared leaf, the stacked per-task gradients, shape
    ``(T,) + param.shape`` (as :func:`pcgrad_optax.task_value_and_grad`);
  * for a branched leaf (param shape ``(T, ...)``), the *diagonal layout*:
    the param's own shape, row ``t`` holding task ``t``'s gradient w.r.t. its
    copy ``t`` (task ``t``'s loss does not depend on the other copies, so the
    rest of the ``T x T`` block is zero and never built).

  Feed the result to an aggregator wrapped in :func:`with_branches`. With
  ``layers=[]`` this is a per-task ``value_and_grad`` of an ordinary model.

  Args:
    task_loss: ``(params, t, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)``), task ``t``'s loss on unbranched params.
    layers: the branched layer names.
    num_tasks: ``T``.
    grouping: the grouping of leaves into layers (as in :func:`branch`).
    has_aux: whether ``task_loss`` returns ``(loss, aux)``; aux gets a leading
      task axis (e.g. each task's new BatchNorm statistics, for
      :func:`merge_task_states`).
    batched: ``True`` (default): one ``jax.vmap`` over the tasks, so the
      program does not grow with T. ``False``: ``T`` separate
      ``jax.value_and_grad`` calls, each on task ``t``'s own (unbranched)
      view, stacked; same numbers, a program linear in T. ``False`` is for a
      few tasks on XLA:CPU with convolutions: there the vmapped pullback of a
      convolution whose input or kernel carries the task axis becomes a
      grouped or batched convolution, which can be several times slower than
      T plain ones (``benchmarks/results/recon_resnet.md``); on GPU/TPU keep
      the default.

  Returns:
    ``fn(branched_params, *args, **kwargs) -> (losses, grads)`` (or
    ``((losses, aux), grads)``) with ``(T,)`` losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> b = {"a": {"w": jnp.array([1., 2.])},   # layer "a", branched: T = 2
    ...      "b": {"w": jnp.array(3.)}}         # layer "b", shared
    >>> loss = lambda p, t: p["a"]["w"] * p["b"]["w"]
    >>> losses, grads = recon.value_and_grad(loss, ["a"], 2)(b)
    >>> grads["a"]["w"], grads["b"]["w"]   # own-copy grads; stacked grads
    (Array([3., 3.], dtype=float32), Array([1., 2.], dtype=float32))
  """
  num_tasks = check_num_tasks(num_tasks)

  def fn(params, *args, **kwargs):
    shared, branched, merge = _split_branched(params, layers, grouping,
                                              num_tasks)

    def one(t, shared_leaves, branched_leaves):
      out = task_loss(merge(shared_leaves, branched_leaves), t, *args,
                      **kwargs)
      _check_scalar(out, has_aux)
      return out

    vg = jax.value_and_grad(one, argnums=(1, 2), has_aux=has_aux)
    if batched:
      value, (g_shared, g_branched) = jax.vmap(vg, in_axes=(0, None, 0))(
          jnp.arange(num_tasks), shared, branched)
    else:
      value, (g_shared, g_branched) = _stack([
          vg(t, shared, [b[t] for b in branched]) for t in range(num_tasks)])
    # Cast back to the params' dtypes (a broadcast leaf's gradient can come
    # out weakly typed).
    g_shared = [g.astype(jnp.asarray(x).dtype) for g, x in zip(g_shared, shared)]
    g_branched = [g.astype(jnp.asarray(x).dtype)
                  for g, x in zip(g_branched, branched)]
    return value, merge(g_shared, g_branched)

  return fn


def with_branches(inner: optax.GradientTransformation, layers: Sequence[str],
                  *, grouping: Grouping = None,
                  reduction: str = "sum") -> optax.GradientTransformationExtraArgs:
  r"""Wraps an aggregator to take the lean layout of :func:`value_and_grad`.

  Branched leaves arrive in the diagonal layout (param shape ``(T, ...)``,
  row ``t`` = task ``t``'s gradient on copy ``t``), which already is the
  combined update every aggregator gives a task-specific leaf (the plain sum
  over the task axis, or the mean with ``reduction="mean"``), so they pass
  through. ``inner`` (e.g. ``pcgrad()``, with its own ``shared=`` mask for the
  heads) runs on the other leaves; it sees each branched leaf as an empty
  ``(T, 0)`` placeholder, so masks with the params' structure keep working.

  Args:
    inner: a transformation on stacked gradients (an aggregator, or a chain
      starting with :func:`track_conflicts`).
    layers: the branched layer names.
    grouping: the grouping of leaves into layers (as in :func:`branch`).
    reduction: ``inner``'s reduction: ``"sum"`` (branched leaves pass
      unchanged) or ``"mean"`` (divided by T).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking the lean layout and
    emitting params-shaped updates.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> from pcgrad_optax import recon
    >>> b = {"a": {"w": jnp.zeros(2)}, "b": {"w": jnp.zeros(())}}  # a: T=2
    >>> tx = recon.with_branches(pcgrad_optax.pcgrad(), ["a"])
    >>> g = {"a": {"w": jnp.array([3., 3.])},    # row t: task t on copy t
    ...      "b": {"w": jnp.array([1., 2.])}}    # stacked per-task grads
    >>> u, _ = tx.update(g, tx.init(b), b)
    >>> u
    {'a': {'w': Array([3., 3.], dtype=float32)},
     'b': {'w': Array(3., dtype=float32)}}
  """
  check_reduction(reduction)
  inner = optax.with_extra_args_support(inner)

  def placeholders(leaves, flags, lead):
    return [jnp.zeros(lead + (0,), jnp.asarray(x).dtype) if f else x
            for x, f in zip(leaves, flags)]

  def init_fn(params):
    _, leaves, flags = branched_flags(params, layers, grouping)
    return inner.init(jax.tree.unflatten(jax.tree.structure(params),
                                         placeholders(leaves, flags, ())))

  def update_fn(updates, state, params=None, **extra_args):
    paths, leaves, flags = branched_flags(updates, layers, grouping,
                                          "gradients")
    treedef = jax.tree.structure(updates)
    others = [(p, x) for p, x, f in zip(paths, leaves, flags) if not f]
    t = None
    if others:
      t = stacked.num_tasks({param_name(p): x for p, x in others})
    t = task_axis(paths, leaves, flags, t, "gradients")
    if params is not None:
      p_leaves = jax.tree.leaves(params)
      if len(p_leaves) != len(leaves):
        raise ValueError(
            "with_branches: the gradients and the params have different "
            f"structures: {treedef} vs {jax.tree.structure(params)}.")
      for path, x, p, f in zip(paths, leaves, p_leaves, flags):
        if f and tuple(np.shape(x)) != tuple(np.shape(p)):
          raise ValueError(
              f"with_branches: branched leaf '{param_name(path)}' has "
              f"gradient shape {tuple(np.shape(x))}, expected the param's "
              f"shape {tuple(np.shape(p))} (row t = task t's gradient on copy "
              "t, as recon.value_and_grad returns). For the stacked (T, T, "
              "...) layout use the aggregator with shared=recon.shared_mask("
              "...) instead.")
      inner_params = jax.tree.unflatten(
          jax.tree.structure(params), placeholders(p_leaves, flags, ()))
    else:
      inner_params = None
    inner_updates = jax.tree.unflatten(treedef,
                                       placeholders(leaves, flags, (t,)))
    out, state = inner.update(inner_updates, state, inner_params,
                              **extra_args)
    scale = 1.0 / t if reduction == "mean" else None
    merged = [(x if scale is None else (x * scale).astype(x.dtype)) if f
              else o for x, o, f in zip(leaves, jax.tree.leaves(out), flags)]
    return jax.tree.unflatten(treedef, merged), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
