"""Recon's branching: turn the chosen shared layers into one copy per task.

Step 3 of the procedure: every leaf of a branched layer gets a leading task
axis of size ``T`` (:func:`branch`); :func:`task_params` is the per-task view
and :func:`shared_mask` the ``shared=`` mask of the branched model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import PyTree
from pcgrad_optax._core.transform import canonicalize_key
from pcgrad_optax.recon._layers import (Grouping, leaf_layers, ordered_unique,
                                        param_name, paths_and_leaves)


def check_layer_list(layers: Sequence[str]) -> list[str]:
  """The layer names as a list (a single str is one name)."""
  if isinstance(layers, str):
    layers = [layers]
  try:
    selected = list(layers)
  except TypeError:
    raise ValueError(
        f"`layers` must be a sequence of layer names, got {layers!r}.") \
        from None
  for name in selected:
    if not isinstance(name, str):
      raise ValueError(f"Layer names must be str, got {name!r}.")
  return selected


def branched_flags(tree: PyTree, layers: Sequence[str], grouping: Grouping,
                   what: str = "params") -> tuple[list, list, list[bool]]:
  """(paths, leaves, is_branched) of a params-like tree."""
  selected = check_layer_list(layers)
  paths, leaves = paths_and_leaves(tree)
  names = leaf_layers(paths, grouping, what="grouping")
  known = ordered_unique(names)
  unknown = [n for n in selected if n not in known]
  if unknown:
    raise ValueError(
        f"Unknown layer name(s) {unknown} in the {what}; its layers are "
        f"{known}.")
  chosen = set(selected)
  return paths, leaves, [n in chosen for n in names]


def task_axis(paths, leaves, flags, num_tasks: int | None = None,
              what: str = "branched params") -> int | None:
  """Checks the branched leaves share one leading task axis; returns it."""
  t, first = num_tasks, None
  for path, x, f in zip(paths, leaves, flags):
    if not f:
      continue
    shape = tuple(np.shape(x))
    if not shape:
      raise ValueError(
          f"Branched leaf '{param_name(path)}' of the {what} has shape (): it "
          "has no leading task axis. Make branched params with recon.branch.")
    if t is None:
      t, first = shape[0], (param_name(path), shape)
    elif shape[0] != t:
      source = (f"num_tasks={num_tasks}" if first is None else
                f"leaf '{first[0]}' of shape {first[1]}")
      raise ValueError(
          f"Branched leaf '{param_name(path)}' of the {what} has shape "
          f"{shape}, whose leading task axis disagrees with {source}.")
  return t


def check_num_tasks(num_tasks) -> int:
  if isinstance(num_tasks, (bool, np.bool_)) or not isinstance(
      num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
  return int(num_tasks)


def branch(params: PyTree, layers: Sequence[str], num_tasks: int, *,
           key: jax.Array | int | None = None,
           init: Callable[[jax.Array], PyTree] | None = None,
           grouping: Grouping = None) -> PyTree:
  r"""Turns the selected layers into task-specific layers.

  Every leaf of the selected layers gets a leading task axis with one copy
  per task; the other leaves are returned as they are (still shared). By
  default each copy starts from the shared weights (the setting of Recon's
  analysis). With ``init`` and ``key``, copy ``t`` is instead a fresh
  initialisation, ``init(split(key, T)[t])`` (what the official code does when
  it rebuilds the network).

  Args:
    params: params pytree (Linen param dict, NNX ``nnx.split`` state of
      params, or any pytree of arrays).
    layers: names of the layers to branch (e.g. from :func:`select_layers`).
    num_tasks: ``T``, the number of copies.
    key: PRNG key or int seed for ``init``.
    init: optional ``key -> params`` function returning a freshly initialised
      pytree with the structure of ``params``, e.g.
      ``lambda k: model.init(k, x)["params"]`` or
      ``lambda k: nnx.state(Model(rngs=nnx.Rngs(k)), nnx.Param)``; it is
      ``jax.vmap``-ed over ``T`` keys and jitted.
    grouping: the grouping of leaves into layers that named ``layers`` (the
      ``layers=`` argument given to :func:`track_conflicts`); default: module.

  Returns:
    Params with the same structure; each leaf of a selected layer has shape
    ``(T,) + leaf.shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> p = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    ...      "Dense_1": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}
    >>> b = recon.branch(p, ["Dense_1"], 2)
    >>> b["Dense_0"]["kernel"].shape, b["Dense_1"]["kernel"].shape
    ((2, 3), (2, 3, 1))
  """
  num_tasks = check_num_tasks(num_tasks)
  paths, leaves, flags = branched_flags(params, layers, grouping)
  treedef = jax.tree.structure(params)
  if init is None:
    if key is not None:
      raise ValueError(
          "branch: `key` was given without `init`. Pass init=(key -> params), "
          "e.g. lambda k: model.init(k, x)['params'], for independently "
          "initialised copies, or neither to copy the shared weights.")
    out = [jnp.broadcast_to(x, (num_tasks,) + np.shape(x)).copy() if f
           else x for x, f in zip(leaves, flags)]
    return jax.tree.unflatten(treedef, out)
  if key is None:
    raise ValueError("branch: `init` needs a PRNG `key` (or an int seed).")
  keys = jax.random.split(canonicalize_key(key), num_tasks)
  # One compiled call (an eager vmap would dispatch every op of the init).
  fresh = jax.jit(jax.vmap(init))(keys)
  fresh_def = jax.tree.structure(fresh)
  if fresh_def != treedef:
    raise ValueError(
        "branch: `init` returned a pytree whose structure differs from the "
        f"params: {fresh_def} vs {treedef}.")
  out = []
  for path, x, f, y in zip(paths, leaves, flags, jax.tree.leaves(fresh)):
    if f:
      want = (num_tasks,) + tuple(np.shape(x))
      if tuple(y.shape) != want:
        raise ValueError(
            f"branch: `init` gave leaf '{param_name(path)}' shape "
            f"{tuple(y.shape[1:])}, but the param has shape {np.shape(x)}.")
      out.append(y.astype(jnp.asarray(x).dtype))
    else:
      out.append(x)
  return jax.tree.unflatten(treedef, out)


def task_params(branched_params: PyTree, layers: Sequence[str],
                t: int | jax.Array, *, grouping: Grouping = None) -> PyTree:
  """Task ``t``'s view of branched params: ordinary, unbranched params.

  Every branched leaf is replaced by its copy ``t`` (``leaf[t]``); shared
  leaves are returned as they are. ``t`` may be traced (inside ``jax.vmap``
  over tasks, see :func:`task_losses`).

  Args:
    branched_params: params made by :func:`branch`.
    layers: the branched layer names.
    t: task index.
    grouping: the grouping of leaves into layers (as in :func:`branch`).

  Returns:
    Params with the structure and shapes of the unbranched model.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> b = {"a": {"w": jnp.array([[1., 2.], [3., 4.]])}, "b": {"w": jnp.ones(2)}}
    >>> recon.task_params(b, ["a"], 1)["a"]["w"]
    Array([3., 4.], dtype=float32)
  """
  paths, leaves, flags = branched_flags(branched_params, layers, grouping,
                                        "branched params")
  return take_task(branched_params, paths, leaves, flags, t,
                   "branched params")


def take_task(tree: PyTree, paths, leaves, flags, t, what: str) -> PyTree:
  """``tree`` with every flagged leaf replaced by its task-``t`` slice.

  The flagged leaves must share one leading task axis (:func:`task_axis`);
  a concrete ``t`` outside it is a ValueError, a traced one is clamped by
  ``lax.dynamic_index_in_dim``.
  """
  num = task_axis(paths, leaves, flags, what=what)
  if num is not None and isinstance(t, (int, np.integer)) and \
      not 0 <= t < num:
    raise ValueError(f"Task index t={t} is out of range for T={num} tasks.")
  out = [lax.dynamic_index_in_dim(jnp.asarray(x), t, 0, keepdims=False)
         if f else x for x, f in zip(leaves, flags)]
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def shared_mask(branched_params: PyTree, layers: Sequence[str], *,
                grouping: Grouping = None,
                shared: SharedMask = None) -> PyTree:
  """A ``shared=`` mask that treats the branched layers as task-specific.

  For :func:`pcgrad_optax.pcgrad` and the other aggregators (and
  :func:`track_conflicts`): False on every leaf of a branched layer, and on
  every leaf ``shared`` marks False (e.g. the task heads); True elsewhere. A
  non-shared leaf's update is the plain sum over the task axis: for a branched
  leaf, exactly each task's own gradient on its own copy.

  Args:
    branched_params: params made by :func:`branch`.
    layers: the branched layer names.
    grouping: the grouping of leaves into layers (as in :func:`branch`).
    shared: an optional base mask (pytree of bools, prefix or callable
      ``params -> pytree of bools``) to combine with. For a Flax NNX state
      it may be an ``nnx.State`` prefix or a plain nested dict with the same
      keys (matched by key paths, e.g. ``{"trunk": True, "head": False}``).

  Returns:
    A pytree of Python bools with the structure of ``branched_params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> b = {"a": {"w": jnp.ones((2, 3))}, "b": {"w": jnp.ones(3)},
    ...      "head": {"w": jnp.ones(3)}}
    >>> recon.shared_mask(b, ["a"], shared={"a": True, "b": True, "head": False})
    {'a': {'w': False}, 'b': {'w': True}, 'head': {'w': False}}
  """
  _, _, flags = branched_flags(branched_params, layers, grouping,
                               "branched params")
  base = shared_leaves(shared, branched_params, branched_params)
  return jax.tree.unflatten(jax.tree.structure(branched_params),
                            [bool(b and not f) for b, f in zip(base, flags)])
