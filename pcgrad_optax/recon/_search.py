"""Recon's search: layer-wise task cosines, S-conflict scores, the top layers.

Steps 1 and 2 of the procedure: record every step the cosine of every pair
of task gradients w.r.t. every shared layer (:func:`pairwise_cosines`,
accumulated by :func:`track_conflicts`), score each layer by the number of
(step, task pair) entries strictly below ``S``, and pick the top-K
(:func:`select_layers`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core.checks import concrete
from pcgrad_optax._core.gram import leaf_gram
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import PyTree, num_tasks
from pcgrad_optax.recon._layers import (Grouping, check_grouping, layer_names,
                                        leaf_layers, paths_and_leaves)


def _register_ordered_dict_with_flax() -> None:
  """Lets ``flax.serialization`` save and restore :class:`ConflictState`.

  Flax handles ``dict`` but not ``collections.OrderedDict`` (the scores'
  type, whose order JAX keeps); this registers the same handling for it,
  order kept, unless Flax already has one. Only when Flax is installed.
  """
  try:
    from flax import serialization  # pylint: disable=g-import-not-at-top
  except ImportError:
    return

  def to_state(xs):
    return {str(k): serialization.to_state_dict(v) for k, v in xs.items()}

  def from_state(target, state):
    missing = set(map(str, target)) ^ set(state)
    if missing:
      raise ValueError(
          "The restored layer scores name other layers than the target's: "
          f"{sorted(missing)}.")
    return collections.OrderedDict(
        (k, serialization.from_state_dict(v, state[str(k)]))
        for k, v in target.items())

  try:
    serialization.register_serialization_state(collections.OrderedDict,
                                                to_state, from_state)
  except ValueError:   # already registered (by Flax itself, or a user)
    pass


_register_ordered_dict_with_flax()


def _layer_grams(stacked: PyTree, layers: Grouping, shared: SharedMask,
                 params: PyTree | None = None
                 ) -> tuple[int, collections.OrderedDict]:
  """Per-layer ``(T, T)`` Gram matrices, from one pass over the leaves."""
  t = num_tasks(stacked, params)
  paths, leaves = paths_and_leaves(stacked)
  mask = shared_leaves(shared, stacked, params)
  names = leaf_layers(paths, layers)
  grams = collections.OrderedDict()
  for x, m, name in zip(leaves, mask, names):
    if not m or name is None or math.prod(x.shape[1:]) == 0:
      continue
    g = leaf_gram(x)
    grams[name] = grams[name] + g if name in grams else g
  return t, grams


def _cosines_from_gram(gram: jax.Array) -> jax.Array:
  sq = jnp.maximum(jnp.diagonal(gram), 0)
  norms = jnp.sqrt(sq)
  nonzero = sq > 0
  both = nonzero[:, None] & nonzero[None, :]
  denom = jnp.where(both, norms[:, None] * norms[None, :], 1)
  cos = jnp.clip(jnp.where(both, gram / denom, 0), -1, 1)
  eye = jnp.eye(gram.shape[0], dtype=bool)
  return jnp.where(eye, nonzero.astype(cos.dtype), cos)


def layer_grams(stacked: PyTree, *, layers: Grouping = None,
                shared: SharedMask = None
                ) -> collections.OrderedDict[str, jax.Array]:
  r"""Per-layer Gram matrices of the task gradients.

  .. math::
    K^{(\ell)}_{ij} = \langle g_i^{(\ell)}, g_j^{(\ell)} \rangle
                    = \sum_{\text{leaves } p \in \ell}
                      \langle g_i^{(p)}, g_j^{(p)} \rangle ,

  one contraction per leaf (f32 accumulation, f64 for f64 gradients). Sums
  of them give the Gram matrix of any union of layers (e.g. the layers that
  stay shared after branching); :func:`pcgrad_optax.diagnostics` reads
  cosines, norms and conflict fractions off a Gram matrix.

  Args:
    stacked: stacked per-task gradients (every leaf ``(T,) + param.shape``).
    layers: grouping of leaves into layers, as in :func:`pairwise_cosines`.
    shared: optional mask selecting the leaves that count.

  Returns:
    An ``OrderedDict`` layer name -> ``(T, T)`` Gram matrix, in network
    order.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> g = {"Dense_0": {"kernel": jnp.array([[[1., 0.]], [[-1., 1.]]]),
    ...                  "bias": jnp.array([[2.], [0.]])}}
    >>> recon.layer_grams(g)["Dense_0"]
    Array([[ 5., -1.],
           [-1.,  2.]], dtype=float32)
  """
  _, grams = _layer_grams(stacked, layers, shared)
  return grams


def pairwise_cosines(stacked: PyTree, *, layers: Grouping = None,
                     shared: SharedMask = None
                     ) -> collections.OrderedDict[str, jax.Array]:
  r"""Per-layer cosine similarity of every pair of task gradients.

  For layer :math:`\ell` with task gradients :math:`g_i^{(\ell)}` (its
  leaves' gradients concatenated),

  .. math::
    C^{(\ell)}_{ij} = \frac{\langle g_i^{(\ell)}, g_j^{(\ell)} \rangle}
                           {\|g_i^{(\ell)}\| \, \|g_j^{(\ell)}\|} ,

  read off the layer's Gram matrix (the sum of its leaves' Gram matrices), so
  the cost is one pass over the gradients. A pair involving a zero gradient
  has cosine 0 (it conflicts with nothing); the diagonal is 1, or 0 for a
  zero gradient.

  Args:
    stacked: stacked per-task gradients (every leaf ``(T,) + param.shape``).
    layers: how leaves group into layers: None / ``"module"`` (the node that
      holds the leaves, the default), ``"leaf"``, a callable
      ``leaf_name -> layer_name | None`` or a mapping
      ``{leaf_name: layer_name | None}`` (unlisted leaves keep the default).
    shared: optional mask selecting the leaves that count (e.g. leave out the
      task heads), as in :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``OrderedDict`` layer name -> ``(T, T)`` cosine matrix (f32, or f64
    for f64 gradients), in network (flatten) order.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> g = {"Dense_0": {"kernel": jnp.array([[[1., 0.]], [[-1., 1.]]]),
    ...                  "bias": jnp.array([[0.], [0.]])}}
    >>> c = recon.pairwise_cosines(g)
    >>> jnp.round(c["Dense_0"], 4)
    Array([[ 1.    , -0.7071],
           [-0.7071,  1.    ]], dtype=float32)
  """
  _, grams = _layer_grams(stacked, layers, shared)
  return collections.OrderedDict(
      (name, _cosines_from_gram(g)) for name, g in grams.items())


class ConflictState(NamedTuple):
  """State of :func:`track_conflicts`.

  Attributes:
    scores: ``OrderedDict`` layer name -> int32 S-conflict score (the number
      of (step, task pair i<j) entries with cosine strictly below the
      threshold), in network order. The fraction of conflicting pairs is
      ``score / (count * T * (T - 1) / 2)``.
    count: number of steps seen (int32).

  A pytree (``jax.tree`` keeps the layers' order) that ``flax.serialization``
  saves and restores: importing the package registers ``OrderedDict`` with
  it, as ``dict`` is, when Flax has no handler of its own.
  """
  scores: collections.OrderedDict
  count: jax.Array


def track_conflicts(threshold: float = 0.0, *, layers: Grouping = None,
                    shared: SharedMask = None
                    ) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates Recon's per-layer S-conflict scores; updates pass through.

  Every step, for every layer :math:`\ell` (see :func:`pairwise_cosines`),

  .. math::
    \text{score}_\ell \mathrel{+}= \#\{(i, j) : i < j,\;
      C^{(\ell)}_{ij} < S\}

  with a strict comparison. A pair involving a zero gradient never counts.
  The stacked gradients are returned unchanged, so this goes first in an
  ``optax.chain``, before :func:`pcgrad_optax.pcgrad` or any aggregator.

  Args:
    threshold: ``S``; Recon's configs use 0.0, -0.02 or -0.1.
    layers: grouping of leaves into layers, as in :func:`pairwise_cosines`.
    shared: which leaves count (Recon scores the shared layers only; pass the
      same mask as to the aggregator to leave out the heads).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ConflictState` with one score per layer, named at ``init`` from
    the params' structure.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import recon
    >>> params = {"a": {"kernel": jnp.zeros(2)}, "b": {"kernel": jnp.zeros(2)}}
    >>> tx = recon.track_conflicts(0.0)
    >>> state = tx.init(params)
    >>> g = {"a": {"kernel": jnp.array([[1., 0.], [-1., 0.]])},   # conflict
    ...      "b": {"kernel": jnp.array([[1., 0.], [1., 1.]])}}    # agree
    >>> g_out, state = tx.update(g, state, params)
    >>> g_out is g
    True
    >>> {k: int(v) for k, v in state.scores.items()}, int(state.count)
    ({'a': 1, 'b': 0}, 1)
  """
  # A traced threshold (optax.inject_hyperparams under jit) is used as an
  # array; a concrete one must be a real number.
  if concrete(threshold) is not None:
    try:
      threshold = float(threshold)
    except (TypeError, ValueError):
      raise ValueError(
          f"`threshold` must be a real number, got {threshold!r}.") from None
    if math.isnan(threshold):
      raise ValueError("`threshold` must be a real number, got nan.")
  check_grouping(layers)

  def init_fn(params):
    names = layer_names(params, layers=layers, shared=shared)
    return ConflictState(
        scores=collections.OrderedDict(
            (n, jnp.zeros([], jnp.int32)) for n in names),
        count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    t, grams = _layer_grams(updates, layers, shared, params)
    if list(grams) != list(state.scores):
      raise ValueError(
          "track_conflicts: the gradients' layers "
          f"{list(grams)} differ from the layers named at init "
          f"{list(state.scores)}.")
    scores = state.scores
    if grams and t > 1:
      cos = jnp.stack([_cosines_from_gram(g) for g in grams.values()])
      rows, cols = np.triu_indices(t, 1)
      nonzero = jnp.diagonal(cos, axis1=1, axis2=2) > 0     # (L, T)
      valid = nonzero[:, rows] & nonzero[:, cols]
      hits = jnp.sum((cos[:, rows, cols] < threshold) & valid, axis=1,
                     dtype=jnp.int32)
      scores = collections.OrderedDict(
          (name, state.scores[name] + hits[i])
          for i, name in enumerate(grams))
    return updates, ConflictState(scores,
                                  optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def select_layers(scores: Mapping[str, Any] | ConflictState,
                  k: int | float) -> list[str]:
  """The ``k`` highest-scoring layers, highest first.

  Ties are broken by the order of ``scores`` (for the scores of
  :func:`track_conflicts`, network order: the params' flatten order).

  Args:
    scores: mapping layer name -> score (concrete numbers), or a
      :class:`ConflictState`.
    k: the number of layers (an int, ``0 <= k <= len(scores)``) or a fraction
      of them (a float in ``(0, 1]``; ``ceil(k * len(scores))`` layers).

  Returns:
    A list of layer names.

  Example:
    >>> from pcgrad_optax import recon
    >>> recon.select_layers({"a": 3, "b": 7, "c": 3, "d": 0}, 2)
    ['b', 'a']
    >>> recon.select_layers({"a": 3, "b": 7, "c": 3, "d": 0}, 0.75)
    ['b', 'a', 'c']
  """
  if isinstance(scores, ConflictState):
    scores = scores.scores
  if not isinstance(scores, Mapping) or not scores:
    raise ValueError(
        "`scores` must be a non-empty mapping layer name -> score (e.g. "
        f"ConflictState.scores), got {scores!r}.")
  n = len(scores)
  if isinstance(k, (bool, np.bool_)):
    raise ValueError(f"`k` must be an int or a float fraction, got {k!r}.")
  if isinstance(k, (int, np.integer)):
    if not 0 <= k <= n:
      raise ValueError(
          f"k={int(k)} is larger than the number of layers ({n})"
          if k > n else f"k={int(k)} must be >= 0.")
    count = int(k)
  elif isinstance(k, (float, np.floating)):
    if not 0.0 < k <= 1.0:
      raise ValueError(
          f"The fraction of layers k={k} must lie in (0, 1].")
    count = math.ceil(round(k * n, 9))
  else:
    raise ValueError(f"`k` must be an int or a float fraction, got {k!r}.")
  values = []
  for name, v in scores.items():
    if isinstance(v, jax.core.Tracer):
      raise ValueError(
          f"The score of layer '{name}' is traced; call select_layers "
          "outside jit on concrete scores.")
    values.append(float(np.asarray(v)))
  order = sorted(range(n), key=lambda i: (-values[i], i))
  names = list(scores)
  return [names[i] for i in order[:count]]
