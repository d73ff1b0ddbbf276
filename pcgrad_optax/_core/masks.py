"""``shared`` masks: which leaves of the params are shared parameters.

Only shared leaves enter the Gram matrix and get a method's task weights;
every other leaf (a task head) gets the plain sum (or mean) over its task
axis. A mask works like ``optax.masked``'s: a pytree of static bools with the
params' structure (or a prefix of it), or a callable ``params -> pytree of
bools``; for containers of another node type with the same keys (a plain dict
for a Flax ``nnx.State``) it is matched by key paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import difflib

import jax
import numpy as np

from pcgrad_optax._core.stacked import PyTree, leaf_name, unstacked_view

SharedMask = PyTree | Callable[[PyTree], PyTree] | None


def shared_leaves(shared: SharedMask, stacked: PyTree,
                  params: PyTree | None = None) -> list[bool]:
  """Resolves a ``shared`` mask into one static bool per stacked leaf.

  Args:
    shared: None (every leaf shared), a pytree of bools with the structure of
      the params (or a prefix of it, like ``optax.masked``), or a callable
      ``params -> pytree of bools``. A mask of other container types with
      the same keys (a nested dict for a Flax ``nnx.State``) is matched by
      key paths, every entry covering the leaves below it.
    stacked: the stacked gradients.
    params: the params, handed to a callable mask; when None the callable
      gets a shape-only view of the params.

  Returns:
    A list of Python bools in the leaf order of ``stacked``.
  """
  num_leaves = len(jax.tree.leaves(stacked))
  if shared is None:
    return [True] * num_leaves
  mask = shared(params if params is not None else unstacked_view(stacked)) \
      if callable(shared) else shared
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if isinstance(m, jax.core.Tracer) or not isinstance(
        m, (bool, np.bool_)) and not (
            isinstance(m, np.ndarray) and m.dtype == bool and m.ndim == 0):
      raise ValueError(
          f"`shared` mask leaf '{leaf_name(path)}' is {m!r}; mask leaves must "
          "be static Python bools (True for shared parameters).")
  try:
    broadcast = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, stacked)
  except (ValueError, TypeError):
    by_path = _mask_by_key_path(mask, stacked)
    if by_path is None:
      raise ValueError(
          "The `shared` mask's structure does not match the gradients: "
          f"{_mismatch(mask, stacked)}.") from None
    return by_path
  return jax.tree.leaves(broadcast)


def _key_name(key) -> Any:
  for attr in ("key", "name", "idx"):   # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _mask_by_key_path(mask: PyTree, stacked: PyTree) -> list[bool] | None:
  """A mask matched to the gradients by key names, or None.

  For containers of other node types than the gradients' with the same keys,
  e.g. a plain nested dict against a Flax ``nnx.State``: each gradient leaf
  takes the mask entry whose key path is the longest prefix of its own. None
  unless every leaf finds an entry and every entry is used.
  """
  entries = {tuple(map(_key_name, path)): bool(m)
             for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  out, used = [], set()
  for path, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]:
    keys = tuple(map(_key_name, path))
    prefix = next((keys[:n] for n in range(len(keys), -1, -1)
                   if keys[:n] in entries), None)
    if prefix is None:
      return None
    used.add(prefix)
    out.append(entries[prefix])
  return out if used == set(entries) else None


def _paths(tree: PyTree) -> list[tuple]:
  return [tuple(map(_key_name, path))
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _name(keys: tuple) -> str:
  return "/".join(map(str, keys)) or "<root>"


def _mismatch(mask: PyTree, stacked: PyTree) -> str:
  """Which mask keys match no gradient and which gradients have no entry.

  Compares key paths (so a plain dict mask and an ``nnx.State`` of gradients
  are compared by their keys): a mask entry whose path leads to no gradient
  leaf is named with the keys available at the level where it went wrong
  (and the closest one, for a typo); a gradient leaf that no mask entry
  covers is named by its shortest path below the mask.
  """
  mask_paths, grad_paths = _paths(mask), _paths(stacked)
  problems = []
  for m in mask_paths:
    if any(g[:len(m)] == m for g in grad_paths):
      continue
    k = max((n for n in range(len(m))
             if any(g[:n] == m[:n] for g in grad_paths)), default=0)
    if m[:k] in grad_paths:
      problems.append(f"mask key '{_name(m)}' goes below the gradient leaf "
                      f"'{_name(m[:k])}'")
      continue
    there = sorted({str(g[k]) for g in grad_paths
                    if g[:k] == m[:k] and len(g) > k})
    close = difflib.get_close_matches(str(m[k]), there, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    problems.append(
        f"mask key '{_name(m[:k + 1])}' matches no gradient (keys at "
        f"'{_name(m[:k])}': {', '.join(there)}{hint})")
  missing = []
  for g in grad_paths:
    if any(g[:len(m)] == m for m in mask_paths):
      continue
    k = max((n for n in range(len(g))
             if any(m[:n] == g[:n] for m in mask_paths)), default=0)
    if _name(g[:k + 1]) not in missing:
      missing.append(_name(g[:k + 1]))
  if missing:
    problems.append("no mask entry for the gradients at "
                    + ", ".join(f"'{n}'" for n in missing))
  if not problems:       # same key paths, containers that cannot be matched
    problems.append(f"mask {jax.tree.structure(mask)} vs gradients "
                    f"{jax.tree.structure(stacked)}")
  return "; ".join(problems)
