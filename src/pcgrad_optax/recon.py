r"""Recon: find the layers whose task gradients conflict, and branch them.

Shi et al. (ICLR 2023) observe that gradient surgery (PCGrad, CAGrad, MGDA,
...) changes the update but not how often the task gradients *conflict*
(cosine below zero): the conflicts come from the shared layers themselves.
Recon removes them at the root, in four steps:

1. **Search.** Train the original network with a base method and record,
   every step, the cosine of every pair of task gradients w.r.t. every shared
   *layer* (a module: its kernel and bias gradients concatenated):
   :func:`pairwise_cosines`, accumulated by :func:`track_conflicts`.
2. **Score.** The S-conflict score of a layer is the number of
   (step, task pair) entries whose cosine is strictly below ``S``.
3. **Branch.** Turn the top-K layers (:func:`select_layers`) into
   task-specific layers, one copy per task (:func:`branch`): every leaf of a
   branched layer gets a leading task axis of size ``T``. Downstream of the
   first branched layer the activations are per task; shared layers are
   applied to each task's activations; head ``t`` reads branch ``t``.
4. **Retrain** the branched network with any base method (:func:`pcgrad_optax.pcgrad`
   or another aggregator).

Training a branched model
-------------------------
Write the loss of ONE task on an ordinary (unbranched) params pytree,
``task_loss(params, t, *args) -> scalar`` (``t`` is a traced int: index with
it, e.g. ``jnp.stack(logits)[t]``, never ``list[t]``). :func:`task_losses`
vmaps it over the tasks with the branched leaves mapped (``in_axes=0``) and
the shared leaves broadcast (``in_axes=None``); operations that only touch
shared leaves before the first branched layer are not batched by ``vmap``, so
they run once. :func:`task_params` is the per-task view used inside.

The per-task gradient of a branched leaf ``w`` (shape ``(T, ...)``) is, for
task ``s``, nonzero only in row ``s``: the standard stacked layout is a
``(T, T, ...)`` array with only its diagonal nonzero, and the update every
aggregator in this package gives a non-shared leaf, the plain sum over the
task axis, is exactly that diagonal: copy ``t`` moves along task ``t``'s own
gradient. Two ways to train, with identical updates:

* simple: ``pcgrad_optax.task_value_and_grad(task_losses(...))`` gives the
  standard layout and ``pcgrad(shared=shared_mask(...))`` treats the branched
  leaves as task-specific. It stores and computes the ``T x T`` blocks.
* lean: :func:`value_and_grad` differentiates per task with
  ``vmap(value_and_grad)`` and returns every branched leaf's gradient in the
  *diagonal* layout (the param's own shape ``(T, ...)``, row ``t`` = task
  ``t``'s gradient on copy ``t``); :func:`with_branches` wraps any aggregator
  to take that layout. No ``T x T x P`` array is ever built.

Layers
------
By default a layer is the pytree node that directly holds parameter leaves
(``Dense_0/kernel`` and ``Dense_0/bias`` form layer ``"Dense_0"``; a
``LayerNorm``'s scale and bias form one layer), named by its '/'-joined path
(``"encoder/Conv_1"``); leaves at the top level of the params form the layer
``"<root>"`` (so the params of a single Dense module are one layer). The
``.value`` attribute of Flax NNX variables is not part of a name,
so ``nnx.split`` states and Linen param dicts name their layers alike.
``layers="leaf"`` makes every leaf its own layer; a callable
``leaf_name -> layer_name | None`` or a mapping ``{leaf_name: layer_name}``
groups differently (``None`` drops a leaf). Leaves with zero elements hold no
gradient and are not part of any layer.

Flax NNX: work on the ``nnx.Param`` state (``graphdef, state =
nnx.split(model, nnx.Param)``), write ``task_loss`` with
``nnx.merge(graphdef, state)``, and give ``shared=`` masks as ``nnx.State``
prefixes, plain nested dicts with the same keys, or callables returning
either.

Example (Flax Linen: search, branch, retrain):

  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
  >>> import pcgrad_optax
  >>> from pcgrad_optax import recon
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = nn.relu(nn.Dense(8)(x))
  ...     h = nn.relu(nn.Dense(8)(h))
  ...     return jnp.stack([nn.Dense(1, name="head_0")(h)[:, 0],
  ...                       nn.Dense(1, name="head_1")(h)[:, 0]])
  >>> x = jax.random.normal(jax.random.key(0), (16, 3))
  >>> y = jnp.stack([x[:, 0], -x[:, 0] + x[:, 1]])        # two targets
  >>> net = Net()
  >>> params = net.init(jax.random.key(1), x)["params"]
  >>> heads = lambda p: {k: not k.startswith("head") for k in p}
  >>> def task_loss(p, t, x, y):                           # ONE task's loss
  ...   return jnp.mean((net.apply({"params": p}, x)[t] - y[t]) ** 2)
  >>> def train(params, grad_fn, tx, steps=20):
  ...   @jax.jit
  ...   def step(params, state):
  ...     losses, grads = grad_fn(params, x, y)
  ...     updates, state = tx.update(grads, state, params)
  ...     return optax.apply_updates(params, updates), state, losses
  ...   state = tx.init(params)
  ...   for _ in range(steps):
  ...     params, state, losses = step(params, state)
  ...   return params, state, losses
  >>> # 1-2. search: joint training, S-conflict scores of the shared layers
  >>> tx = optax.chain(recon.track_conflicts(0.0, shared=heads),
  ...                  pcgrad_optax.pcgrad(shared=heads), optax.adam(1e-2))
  >>> grad_fn = recon.value_and_grad(task_loss, [], num_tasks=2)
  >>> params, state, _ = train(params, grad_fn, tx)
  >>> list(state[0].scores)                                # network order
  ['Dense_0', 'Dense_1']
  >>> # 3. branch the most conflicting layer (one copy per task)
  >>> chosen = recon.select_layers(state[0].scores, 1)
  >>> branched = recon.branch(params, chosen, 2)
  >>> branched[chosen[0]]["kernel"].shape[0]
  2
  >>> # 4. retrain: branched leaves take their own task's gradient
  >>> grad_fn = recon.value_and_grad(task_loss, chosen, num_tasks=2)
  >>> tx = optax.chain(recon.with_branches(pcgrad_optax.pcgrad(shared=heads),
  ...                                      chosen), optax.adam(1e-2))
  >>> branched, _, losses = train(branched, grad_fn, tx)
  >>> bool(jnp.all(jnp.isfinite(losses)))
  True

References:
  Shi, Li, Zhang, Chen, Wu, `Recon: Reducing Conflicting Gradients from the
  Root for Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_,
  ICLR 2023.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from pcgrad_optax import _core
from pcgrad_optax._transforms import canonicalize_key

PyTree = Any
Grouping = str | Callable[[str], str | None] | Mapping[str, str | None] | None

__all__ = (
    "ConflictState",
    "branch",
    "layer_grams",
    "layer_names",
    "pairwise_cosines",
    "select_layers",
    "shared_mask",
    "task_losses",
    "task_params",
    "track_conflicts",
    "value_and_grad",
    "with_branches",
)


# ----------------------------------------------------------------------------
# Layer names.


def _strip_value(path) -> tuple:
  # Flax NNX Variables are pytree nodes holding their array in `.value`; that
  # attribute is a wrapper, not part of the parameter's name.
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and \
      path[-1].name in ("value", "raw_value"):
    path = path[:-1]
  return path


def _param_name(path) -> str:
  return _core.leaf_name(_strip_value(path))


def _module_name(path) -> str:
  return _core.leaf_name(_strip_value(path)[:-1])


def _check_grouping(layers: Grouping, what: str = "layers") -> None:
  if layers is None or layers in ("module", "leaf"):
    return
  if isinstance(layers, str) or not (isinstance(layers, Mapping) or
                                     callable(layers)):
    raise ValueError(
        f"`{what}` must be 'module', 'leaf', a callable leaf_name -> "
        f"layer_name or a mapping {{leaf_name: layer_name}}; got {layers!r}.")


def _leaf_layers(paths: list, layers: Grouping, what: str = "layers"
                 ) -> list[str | None]:
  """The layer name of every leaf (None: the leaf is in no layer)."""
  _check_grouping(layers, what)
  if layers is None or layers == "module":
    return [_module_name(p) for p in paths]
  if layers == "leaf":
    return [_param_name(p) for p in paths]
  names = [_param_name(p) for p in paths]
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


def _paths_and_leaves(tree: PyTree) -> tuple[list, list]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [p for p, _ in flat], [x for _, x in flat]


def _param_size(x) -> int:
  return math.prod(getattr(x, "shape", None) or np.shape(x))


def _ordered_unique(names) -> list[str]:
  return list(dict.fromkeys(n for n in names if n is not None))


def layer_names(params: PyTree, *, layers: Grouping = None,
                shared: _core.SharedMask = None) -> list[str]:
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
  paths, leaves = _paths_and_leaves(params)
  mask = _core.shared_leaves(shared, params, params)
  names = _leaf_layers(paths, layers)
  return _ordered_unique(
      n if m and _param_size(x) > 0 else None
      for n, m, x in zip(names, mask, leaves))


# ----------------------------------------------------------------------------
# Layer-wise cosines and conflict tracking.


def _layer_grams(stacked: PyTree, layers: Grouping, shared: _core.SharedMask,
                 params: PyTree | None = None
                 ) -> tuple[int, collections.OrderedDict]:
  """Per-layer ``(T, T)`` Gram matrices, from one pass over the leaves."""
  t = _core.num_tasks(stacked, params)
  paths, leaves = _paths_and_leaves(stacked)
  mask = _core.shared_leaves(shared, stacked, params)
  names = _leaf_layers(paths, layers)
  grams = collections.OrderedDict()
  for x, m, name in zip(leaves, mask, names):
    if not m or name is None or math.prod(x.shape[1:]) == 0:
      continue
    g = _core.leaf_gram(x)
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
                shared: _core.SharedMask = None
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
                     shared: _core.SharedMask = None
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
  """
  scores: collections.OrderedDict
  count: jax.Array


def track_conflicts(threshold: float = 0.0, *, layers: Grouping = None,
                    shared: _core.SharedMask = None
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
  try:
    threshold = float(threshold)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise ValueError(
        f"`threshold` must be a real number, got {threshold!r}.") from None
  if math.isnan(threshold):
    raise ValueError("`threshold` must be a real number, got nan.")
  _check_grouping(layers)

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


# ----------------------------------------------------------------------------
# Branching.


def _branched_flags(tree: PyTree, layers: Sequence[str], grouping: Grouping,
                    what: str = "params") -> tuple[list, list, list[bool]]:
  """(paths, leaves, is_branched) of a params-like tree."""
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
  paths, leaves = _paths_and_leaves(tree)
  names = _leaf_layers(paths, grouping, what="grouping")
  known = _ordered_unique(names)
  unknown = [n for n in selected if n not in known]
  if unknown:
    raise ValueError(
        f"Unknown layer name(s) {unknown} in the {what}; its layers are "
        f"{known}.")
  chosen = set(selected)
  return paths, leaves, [n in chosen for n in names]


def _task_axis(paths, leaves, flags, num_tasks: int | None = None,
               what: str = "branched params") -> int | None:
  """Checks the branched leaves share one leading task axis; returns it."""
  t, first = num_tasks, None
  for path, x, f in zip(paths, leaves, flags):
    if not f:
      continue
    shape = tuple(np.shape(x))
    if not shape:
      raise ValueError(
          f"Branched leaf '{_param_name(path)}' of the {what} has shape (): it "
          "has no leading task axis. Make branched params with recon.branch.")
    if t is None:
      t, first = shape[0], (_param_name(path), shape)
    elif shape[0] != t:
      source = (f"num_tasks={num_tasks}" if first is None else
                f"leaf '{first[0]}' of shape {first[1]}")
      raise ValueError(
          f"Branched leaf '{_param_name(path)}' of the {what} has shape "
          f"{shape}, whose leading task axis disagrees with {source}.")
  return t


def _check_num_tasks(num_tasks) -> int:
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
  num_tasks = _check_num_tasks(num_tasks)
  paths, leaves, flags = _branched_flags(params, layers, grouping)
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
            f"branch: `init` gave leaf '{_param_name(path)}' shape "
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
  paths, leaves, flags = _branched_flags(branched_params, layers, grouping,
                                         "branched params")
  num = _task_axis(paths, leaves, flags)
  if num is not None and isinstance(t, (int, np.integer)) and \
      not 0 <= t < num:
    raise ValueError(f"Task index t={t} is out of range for T={num} tasks.")
  out = [lax.dynamic_index_in_dim(jnp.asarray(x), t, 0, keepdims=False)
         if f else x for x, f in zip(leaves, flags)]
  return jax.tree.unflatten(jax.tree.structure(branched_params), out)


def shared_mask(branched_params: PyTree, layers: Sequence[str], *,
                grouping: Grouping = None,
                shared: _core.SharedMask = None) -> PyTree:
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
  _, _, flags = _branched_flags(branched_params, layers, grouping,
                                "branched params")
  base = _core.shared_leaves(shared, branched_params, branched_params)
  return jax.tree.unflatten(jax.tree.structure(branched_params),
                            [bool(b and not f) for b, f in zip(base, flags)])


def _split_branched(params, layers, grouping, num_tasks):
  paths, leaves, flags = _branched_flags(params, layers, grouping,
                                         "branched params")
  _task_axis(paths, leaves, flags, num_tasks)
  treedef = jax.tree.structure(params)
  shared = [x for x, f in zip(leaves, flags) if not f]
  branched = [x for x, f in zip(leaves, flags) if f]

  def merge(shared_leaves, branched_leaves):
    s, b = iter(shared_leaves), iter(branched_leaves)
    return jax.tree.unflatten(treedef, [next(b) if f else next(s)
                                        for f in flags])

  return shared, branched, merge


def _check_scalar(loss, has_aux):
  value = loss[0] if has_aux else loss
  if jnp.ndim(value) != 0:
    raise ValueError(
        "task_loss must return one task's scalar loss"
        f"{' (as (loss, aux))' if has_aux else ''}, got shape "
        f"{jnp.shape(value)}.")


def task_losses(task_loss: Callable[..., Any], layers: Sequence[str],
                num_tasks: int, *, grouping: Grouping = None,
                has_aux: bool = False) -> Callable[..., Any]:
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
  num_tasks = _check_num_tasks(num_tasks)

  def losses_fn(params, *args, **kwargs):
    shared, branched, merge = _split_branched(params, layers, grouping,
                                              num_tasks)

    def one(t, branched_leaves):
      out = task_loss(merge(shared, branched_leaves), t, *args, **kwargs)
      _check_scalar(out, has_aux)
      return out

    return jax.vmap(one)(jnp.arange(num_tasks), branched)

  return losses_fn


def value_and_grad(task_loss: Callable[..., Any], layers: Sequence[str],
                   num_tasks: int, *, grouping: Grouping = None,
                   has_aux: bool = False) -> Callable[..., Any]:
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
    has_aux: whether ``task_loss`` returns ``(loss, aux)``.

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
  num_tasks = _check_num_tasks(num_tasks)

  def fn(params, *args, **kwargs):
    shared, branched, merge = _split_branched(params, layers, grouping,
                                              num_tasks)

    def one(t, shared_leaves, branched_leaves):
      out = task_loss(merge(shared_leaves, branched_leaves), t, *args,
                      **kwargs)
      _check_scalar(out, has_aux)
      return out

    value, (g_shared, g_branched) = jax.vmap(
        jax.value_and_grad(one, argnums=(1, 2), has_aux=has_aux),
        in_axes=(0, None, 0))(jnp.arange(num_tasks), shared, branched)
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
  _core.check_reduction(reduction)
  inner = optax.with_extra_args_support(inner)

  def placeholders(leaves, flags, lead):
    return [jnp.zeros(lead + (0,), jnp.asarray(x).dtype) if f else x
            for x, f in zip(leaves, flags)]

  def init_fn(params):
    _, leaves, flags = _branched_flags(params, layers, grouping)
    return inner.init(jax.tree.unflatten(jax.tree.structure(params),
                                         placeholders(leaves, flags, ())))

  def update_fn(updates, state, params=None, **extra_args):
    paths, leaves, flags = _branched_flags(updates, layers, grouping,
                                           "gradients")
    treedef = jax.tree.structure(updates)
    others = [(p, x) for p, x, f in zip(paths, leaves, flags) if not f]
    t = None
    if others:
      t = _core.num_tasks({_param_name(p): x for p, x in others})
    t = _task_axis(paths, leaves, flags, t, "gradients")
    if params is not None:
      p_leaves = jax.tree.leaves(params)
      if len(p_leaves) != len(leaves):
        raise ValueError(
            "with_branches: the gradients and the params have different "
            f"structures: {treedef} vs {jax.tree.structure(params)}.")
      for path, x, p, f in zip(paths, leaves, p_leaves, flags):
        if f and tuple(np.shape(x)) != tuple(np.shape(p)):
          raise ValueError(
              f"with_branches: branched leaf '{_param_name(path)}' has "
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
