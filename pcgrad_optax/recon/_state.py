"""Recon with model state: BatchNorm statistics of branched layers.

A branched normalisation layer needs one set of running statistics per task,
next to its per-task scale and bias. Flax keeps those statistics outside the
params (the Linen ``"batch_stats"`` collection, the NNX ``nnx.BatchStat``
state), named by the same module paths as the params, so the layer names of
:func:`pcgrad_optax.recon.branch` select them too. :func:`branch_state` gives
the statistics of the branched layers a task axis, :func:`task_state` is task
``t``'s view inside a task's loss, and :func:`merge_task_states` folds the
per-task updates a training step returns back into one state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pcgrad_optax._core.stacked import PyTree
from pcgrad_optax.recon._branching import (check_layer_list, check_num_tasks,
                                           take_task)
from pcgrad_optax.recon._layers import (Grouping, leaf_layers, param_name,
                                        paths_and_leaves)


def _state_flags(state: PyTree, layers: Sequence[str], grouping: Grouping
                 ) -> tuple[list, list, list[bool]]:
  """(paths, leaves, is_branched); names that hold no state are skipped."""
  chosen = set(check_layer_list(layers))
  paths, leaves = paths_and_leaves(state)
  names = leaf_layers(paths, grouping, what="grouping")
  return paths, leaves, [n in chosen for n in names]


def branch_state(state: PyTree, layers: Sequence[str], num_tasks: int, *,
                 grouping: Grouping = None) -> PyTree:
  r"""Gives the state of the branched layers one copy per task.

  The counterpart of :func:`branch` for non-trainable state such as
  BatchNorm's running mean and variance: every leaf of a layer in ``layers``
  gets a leading task axis of ``T`` copies of its current value; the other
  leaves stay shared. Branch the params and the state with the same
  ``layers``; a branched layer that holds no state (a convolution, a Dense
  layer) is simply absent from the state and skipped.

  A shared normalisation layer *downstream* of a branched layer sees each
  task's own activations, so in training it normalises each task's batch with
  that task's statistics, as in the official code, where a shared module is
  applied to each task's activations in turn. Its running statistics stay one
  set (see :func:`merge_task_states`). To keep per-task running statistics
  in every normalisation layer instead (at no cost in parameters), branch the
  state with all layer names.

  Args:
    state: a state pytree whose layers are named like the params' (Linen
      ``variables["batch_stats"]``, an NNX ``nnx.BatchStat`` state).
    layers: the branched layer names (those given to :func:`branch`).
    num_tasks: ``T``.
    grouping: the grouping of leaves into layers (as in :func:`branch`).

  Returns:
    The state with the same structure; every leaf of a layer in ``layers``
    has shape ``(T,) + leaf.shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> stats = {"bn_0": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
    ...          "bn_1": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    >>> b = recon.branch_state(stats, ["conv_0", "bn_1"], 2)  # conv_0: none
    >>> b["bn_0"]["mean"].shape, b["bn_1"]["mean"].shape
    ((3,), (2, 3))

  References:
    Shi, Li, Zhang, Chen, Wu, `Recon: Reducing Conflicting Gradients from
    the Root for Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_,
    ICLR 2023.
  """
  num_tasks = check_num_tasks(num_tasks)
  _, leaves, flags = _state_flags(state, layers, grouping)
  out = [jnp.broadcast_to(x, (num_tasks,) + np.shape(x)).copy() if f else x
         for x, f in zip(leaves, flags)]
  return jax.tree.unflatten(jax.tree.structure(state), out)


def task_state(branched_state: PyTree, layers: Sequence[str],
               t: int | jax.Array, *, grouping: Grouping = None) -> PyTree:
  """Task ``t``'s view of a state made by :func:`branch_state`.

  Every leaf of a branched layer is replaced by its copy ``t``; shared leaves
  are returned as they are, so the view has the unbranched model's shapes.
  ``t`` may be traced: call this inside the ``task_loss`` given to
  :func:`value_and_grad` or :func:`task_losses`, which pass the state
  through unchanged (shared) and ``t`` as the task index.

  Args:
    branched_state: a state made by :func:`branch_state`.
    layers: the branched layer names.
    t: task index.
    grouping: the grouping of leaves into layers (as in :func:`branch`).

  Returns:
    The state with the structure and shapes of the unbranched model.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> b = {"bn_0": {"mean": jnp.zeros(2)},
    ...      "bn_1": {"mean": jnp.array([[1., 2.], [3., 4.]])}}
    >>> recon.task_state(b, ["bn_1"], 1)["bn_1"]["mean"]
    Array([3., 4.], dtype=float32)

  References:
    Shi, Li, Zhang, Chen, Wu, `Recon: Reducing Conflicting Gradients from
    the Root for Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_,
    ICLR 2023.
  """
  paths, leaves, flags = _state_flags(branched_state, layers, grouping)
  return take_task(branched_state, paths, leaves, flags, t, "branched state")


def merge_task_states(states: PyTree, layers: Sequence[str], *,
                      grouping: Grouping = None) -> PyTree:
  r"""Folds the tasks' updated states back into one branched state.

  ``states`` holds one updated state per task, stacked on a leading task axis
  (what :func:`value_and_grad` or :func:`task_losses` return as aux when
  ``task_loss`` returns ``(loss, new_state)`` computed on
  :func:`task_state`'s view). A leaf of a branched layer keeps all ``T``
  rows: row ``t`` is task ``t``'s own copy. A shared floating-point leaf
  becomes the mean of the tasks' updates,

  .. math::
    s \leftarrow \frac{1}{T} \sum_t s_t ,

  which for an exponential moving average with momentum :math:`m` is
  :math:`m\,s + (1 - m)\,\frac{1}{T}\sum_t b_t`: one update with the tasks'
  batch statistics averaged. (The official code applies a shared module to
  each task in turn and so updates it ``T`` times per step, weighting later
  tasks slightly more; the two agree to first order in :math:`1 - m`.)
  Upstream of every branched layer the tasks' updates are identical and the
  mean returns them unchanged. A shared integer leaf (a counter) takes task
  0's value.

  Args:
    states: the per-task states, every leaf ``(T,) + leaf.shape``.
    layers: the branched layer names.
    grouping: the grouping of leaves into layers (as in :func:`branch`).

  Returns:
    A state shaped like :func:`branch_state`'s output.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> per_task = {"bn_0": {"mean": jnp.array([[1., 1.], [3., 5.]])},
    ...             "bn_1": {"mean": jnp.array([[1., 1.], [3., 5.]])}}
    >>> m = recon.merge_task_states(per_task, ["bn_1"])
    >>> m["bn_0"]["mean"], m["bn_1"]["mean"].shape
    (Array([2., 3.], dtype=float32), (2, 2))

  References:
    Shi, Li, Zhang, Chen, Wu, `Recon: Reducing Conflicting Gradients from
    the Root for Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_,
    ICLR 2023.
  """
  paths, leaves, flags = _state_flags(states, layers, grouping)
  num = None
  for path, x in zip(paths, leaves):
    shape = tuple(np.shape(x))
    if not shape or (num is not None and shape[0] != num):
      raise ValueError(
          f"merge_task_states: leaf '{param_name(path)}' has shape {shape}; "
          "every leaf of the per-task states needs the same leading task "
          f"axis{'' if num is None else f' (T={num})'}. Return the new "
          "state of task_state's view from task_loss and use the aux that "
          "recon.value_and_grad(..., has_aux=True) stacks over the tasks.")
    num = shape[0]

  def fold(x, branched):
    x = jnp.asarray(x)
    if branched:
      return x
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x[0]
    return jnp.mean(x, axis=0, dtype=jnp.promote_types(x.dtype, jnp.float32)
                    ).astype(x.dtype)

  return jax.tree.unflatten(jax.tree.structure(states),
                            [fold(x, f) for x, f in zip(leaves, flags)])
