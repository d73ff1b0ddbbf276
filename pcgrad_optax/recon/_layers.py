"""Recon's layers: how leaves of a params pytree are grouped and named.

By default a layer is the pytree node that directly holds parameter leaves
(``Dense_0/kernel`` and ``Dense_0/bias`` form layer ``"Dense_0"``), named by
its '/'-joined path; the ``.value`` attribute of Flax NNX variables is not
part of a name. See :mod:`pcgrad_optax.recon` for the other groupings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import numpy as np

from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import PyTree, leaf_name

Grouping = str | Callable[[str], str | None] | Mapping[str, str | None] | None


def _strip_value(path) -> tuple:
  # Flax NNX Variables are pytree nodes holding their array in `.value`; that
  # attribute is a wrapper, not part of the parameter's name.
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and \
      path[-1].name in ("value", "raw_value"):
    path = path[:-1]
  return path


def param_name(path) -> str:
  return leaf_name(_strip_value(path))


def _module_name(path) -> str:
  return leaf_name(_strip_value(path)[:-1])


def check_grouping(layers: Grouping, what: str = "layers") -> None:
  if layers is None or layers in ("module", "leaf"):
    return
  if isinstance(layers, str) or not (isinstance(layers, Mapping) or
                                     callable(layers)):
    raise ValueError(
        f"`{what}` must be 'module', 'leaf', a callable leaf_name -> "
        f"layer_name or a mapping {{leaf_name: layer_name}}; got {layers!r}.")


def leaf_layers(paths: list, layers: Grouping, what: str = "layers"
                ) -> list[str | None]:
  """The layer name of every leaf (None: the leaf is in no layer)."""
  check_grouping(layers, what)
  if layers is None or layers == "module":
    return [_module_name(p) for p in paths]
  if layers == "leaf":
    return [param_name(p) for p in paths]
  names = [param_name(p) for p in paths]
  if isinstance(layers, Mapping):
    unknown = sorted(set(layers) - set(names))
    if unknown:
      raise ValueError(
          f"`{what}` maps unknown leaf name(s) {unknown}; the leaves are "
          f"{names}.")
    out = [layers[n] if n in layers else _module_name(p)
           for n, p in zip(names, paths)]
  else:
    out = [layers(n) for n in names]
  for n, layer in zip(names, out):
    if layer is not None and not isinstance(layer, str):
      raise ValueError(
          f"`{what}` gave leaf '{n}' the layer name {layer!r}; layer names "
          "must be str (or None to leave the leaf out).")
  return out


def paths_and_leaves(tree: PyTree) -> tuple[list, list]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [p for p, _ in flat], [x for _, x in flat]


def param_size(x) -> int:
  return math.prod(getattr(x, "shape", None) or np.shape(x))


def ordered_unique(names) -> list[str]:
  return list(dict.fromkeys(n for n in names if n is not None))


def layer_names(params: PyTree, *, layers: Grouping = None,
                shared: SharedMask = None) -> list[str]:
  """The layer names of a params pytree, in network (flatten) order.

  Args:
    params: a params pytree (Linen param dict, NNX state, plain pytree).
    layers: the grouping of leaves into layers (see the module docstring).
    shared: optional mask (pytree of bools, prefix or callable, as in
      :func:`pcgrad_optax.pcgrad`); only layers with a shared leaf are listed.

  Returns:
    A list of '/'-joined layer names.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> p = {"enc": {"Dense_0": {"kernel": jnp.ones((2, 3)),
    ...                          "bias": jnp.ones(3)}},
    ...      "head": {"kernel": jnp.ones((3, 1))}}
    >>> recon.layer_names(p)
    ['enc/Dense_0', 'head']
    >>> recon.layer_names(p, layers="leaf")
    ['enc/Dense_0/bias', 'enc/Dense_0/kernel', 'head/kernel']
  """
  paths, leaves = paths_and_leaves(params)
  mask = shared_leaves(shared, params, params)
  names = leaf_layers(paths, layers)
  return ordered_unique(
      n if m and param_size(x) > 0 else None
      for n, m, x in zip(names, mask, leaves))
