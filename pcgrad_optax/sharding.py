r"""Running the aggregators on many devices with JAX's own SPMD.

There are three layouts, and each has one right way to handle the stacked
per-task gradients; all three work unchanged across several processes
(multi-host, section 4).

**1. ``jax.jit`` over a ``Mesh`` (the recommended route).** Shard the params
as usual (FSDP: every param split on a feature axis; tensor parallel: the
Megatron column/row split; data parallel: params replicated and the batch
split) and call the transformations unchanged, with explicit axes
(``jax.make_mesh``'s default), under ``jax.set_mesh`` or without it (arrays
placed with ``jax.device_put(x, NamedSharding(mesh, spec))``), or with auto
axes::

  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, param_specs)   # e.g. P(None, "model")
    batch = jax.device_put(batch, P("data"))
    state = tx.init(params)        # tx = optax.chain(pcgrad(), adam(...))

    @jax.jit
    def train_step(params, state, batch):   # the single-device code
      _, grads = pcgrad_optax.task_value_and_grad(task_losses)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

The stacked gradients that
:func:`pcgrad_optax.task_value_and_grad` returns carry the params' sharding
behind an unsharded task axis (:func:`stacked_sharding`), each leaf's Gram
contraction names a replicated ``(T, T)`` output, so the only cross-device
traffic of a transformation is an all-reduce of ``T x T`` numbers, and the
combined update comes back with the params' sharding. No leaf is ever
gathered onto one device. Data parallelism needs nothing more under ``jit``:
a loss that averages over a batch split across devices already gives the
full-batch per-task gradients.

**2. ``jax.shard_map`` with model-parallel shards.** Inside ``shard_map``
every device sees only its shard of each stacked leaf, so the Gram matrix of
its local shards is a partial sum. :func:`gram_matrix` adds the partial Gram
matrices with one ``psum`` of ``T x T`` numbers over the sharded axis (leaves
that are replicated over that axis count once, not once per device), after
which every device holds the same Gram matrix and so computes the same task
weights; each device then combines its own shards. :func:`aggregate` does
all of it for any weighting of :mod:`pcgrad_optax.weighting`.

**3. Data parallelism inside ``shard_map``.** PCGrad and the rest of the
family are nonlinear in the gradients: the surgery of an average is not the
average of the surgeries. Average the per-task gradients over the data axis
*before* the surgery (:func:`task_value_and_grad` with ``axis_name``), never
the updates after it. Data and model parallelism together::

  def local_step(params, x, y, key):     # inside jax.shard_map
    _, grads = pcgrad_optax.sharding.task_value_and_grad(
        task_losses, "data")(params, x, y)          # average first
    update, gram, weights = pcgrad_optax.sharding.aggregate(
        grads, lambda K: pcgrad_optax.weighting.pcgrad(K, key=key),
        "model")                                    # one psum of T x T
    return update                                   # this device's shards

(``key`` replicated: the same on every device, so the same weights.)

.. warning::
  ``lax.pmean(update, "data")`` after running an aggregator on each device's
  local batch is a different algorithm: every device projects its own noisy
  per-task gradients, and the mean of those projections is neither PCGrad on
  the full batch nor PCGrad on any batch. Average first; this module's
  helpers do.

**4. Several processes (multi-host: TPU pods, multi-node GPU).** JAX's
multi-controller runtime runs the same program in every process, each
driving its own devices; a mesh over all processes' devices makes the
layouts above span hosts, and nothing in this package changes (the Gram
all-reduce of ``T x T`` numbers then crosses hosts like any collective).
The recipe, run identically in every process::

  import jax, optax, pcgrad_optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  jax.distributed.initialize()   # TPU pods, SLURM, ...: found by itself;
  # elsewhere jax.distributed.initialize(coordinator_address="host0:1234",
  #     num_processes=N, process_id=i); CPU processes first need
  # jax.config.update("jax_cpu_collectives_implementation", "gloo").

  mesh = jax.make_mesh((jax.device_count(),), ("data",))  # ALL devices
  specs = {"w1": P("data", None), "b1": P("data"), ...}   # FSDP, say
  params = jax.tree.map(        # every process holds the same init values
      lambda a, s: jax.make_array_from_callback(
          a.shape, NamedSharding(mesh, s), lambda idx: a[idx]),
      init_params, specs)
  tx = optax.chain(pcgrad_optax.pcgrad(0), optax.adam(1e-3))  # same seed
  state = tx.init(params)     # everywhere, so the same task orders

  rows = NamedSharding(mesh, P("data"))     # the batch split over "data"
  for x_mine, y_mine in my_loader:  # this process's rows: global batch / N
    x = jax.make_array_from_process_local_data(rows, x_mine)
    y = jax.make_array_from_process_local_data(rows, y_mine)
    params, state = train_step(params, state, x, y)   # the jit of section 1

Each process loads only its own rows (its part of the global batch);
``jax.make_array_from_process_local_data`` makes the parts one global
array, so ``train_step``'s loss averages over the global batch and the
per-task gradients are the full-batch ones, as on one device. (With
explicit axes an FSDP model gathers each weight where it uses it,
``jax.sharding.reshard(w, NamedSharding(mesh, P()))``; the transpose
reduce-scatters its gradient back.)
For section 3 use ``jax.shard_map`` over the same mesh with
:func:`task_value_and_grad` as shown there. Enter ``jax.set_mesh(mesh)``
around init and the steps when in doubt: the transformations do not need it,
but some JAX operations on fully replicated explicit-axis arrays do (in jax
0.10 a ``jit`` of ``jnp.zeros_like`` of them, as in ``optax.adam``'s init).

Checkpoint with `orbax <https://orbax.readthedocs.io>`_ from **every
process**: each writes the shards it holds and the processes synchronise
inside ``save``, so never guard it with ``if jax.process_index() == 0:``
(the single-host habit)::

  import orbax.checkpoint as ocp

  tree = {"params": params, "opt_state": state}
  with ocp.StandardCheckpointer() as checkpointer:  # in every process
    checkpointer.save(path, tree)     # path: storage all processes share
    checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  with ocp.StandardCheckpointer() as checkpointer:  # every process, too:
    tree = checkpointer.restore(path, abstract)     # back in its shards

The optimizer state (PRNG keys, EMA targets of ``gradvac``, ...) is saved
and restored like the params. ``tests/multiprocess/worker.py`` is this
recipe as tested: two CPU processes on one machine, FSDP and data-parallel
training, each equal to one process to 1e-7.

Memory: the stacked gradients hold ``T`` copies of the differentiated params
(sharded like them), so a device holds ``T x`` its share of the params. See
:mod:`pcgrad_optax.memory` for the paths that avoid it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from pcgrad_optax import _task_value_and_grad
from pcgrad_optax._core.gram import leaf_gram
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.stacked import (check_reduction, leaf_name,
                                        leaves_accumulation_dtype, num_tasks)
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum

PyTree = Any
AxisName = str | Sequence[str]

__all__ = [
    "aggregate",
    "gram_matrix",
    "stacked_sharding",
    "task_value_and_grad",
]


def stacked_sharding(tree: PyTree) -> PyTree:
  """The sharding of stacked gradients: the params' behind a task axis.

  Args:
    tree: a pytree of ``PartitionSpec``, ``NamedSharding`` or sharded arrays
      (for instance the params).

  Returns:
    The same structure with every spec ``P(*s)`` turned into ``P(None, *s)``
    (``NamedSharding`` in, ``NamedSharding`` out on the same mesh; an array
    gives the ``NamedSharding`` of its stacked gradient). Use it for
    ``jax.device_put``, ``jax.lax.with_sharding_constraint`` or ``jit``'s
    ``in_shardings``/``out_shardings`` of stacked gradients.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> import pcgrad_optax
    >>> pcgrad_optax.sharding.stacked_sharding({"w": P("data", "model")})
    {'w': P(None, 'data', 'model')}
  """

  def one(s):
    if isinstance(s, PartitionSpec):
      return PartitionSpec(None, *s)
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
    sharding = getattr(s, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return one(sharding)
    raise ValueError(
        f"stacked_sharding: expected a PartitionSpec, a NamedSharding or an "
        f"array with a NamedSharding, got {type(s).__name__} with sharding "
        f"{sharding!r}.")

  return jax.tree.map(one, tree,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not axes or not all(isinstance(a, str) for a in axes):
    raise ValueError(
        f"axis_name must be a mesh axis name or a sequence of them, got "
        f"{axis_name!r}.")
  return axes


def _check_manual_axes(axes: tuple[str, ...], caller: str) -> None:
  """Raises unless every axis is a manual axis of the enclosing shard_map."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = set(getattr(mesh, "manual_axes", ()))
  missing = [a for a in axes if a not in manual]
  if missing:
    raise ValueError(
        f"{caller}: axis_name {missing} is not a manual axis here (manual "
        f"axes: {sorted(manual)}, mesh axes: {tuple(mesh.axis_names)}). Call "
        "it inside jax.shard_map over that axis; under plain jax.jit the "
        "transformations handle sharded params by themselves.")


def _varying_axes(x) -> frozenset[str]:
  """The manual mesh axes along which a value differs between devices."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return frozenset(axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def gram_matrix(stacked: PyTree, axis_name: AxisName, *,
                shared: SharedMask = None) -> jax.Array:
  r"""Gram matrix of stacked gradients sharded inside ``jax.shard_map``.

  Each device holds a shard :math:`g_i^{(\ell, d)}` of every stacked leaf.
  The full Gram matrix is the sum of the devices' local ones,

  .. math::
    K_{ij} = \sum_d \sum_{\ell} \langle g_i^{(\ell,d)}, g_j^{(\ell,d)} \rangle,

  computed here with a single ``psum`` of the ``(T, T)`` local Gram matrix
  over ``axis_name``. A leaf that is replicated over some of those axes (a
  bias kept whole on every model shard, say) would be counted once per
  replica; its local Gram matrix is divided by the number of replicas first,
  so every leaf counts once and the one ``psum`` stays exact. Which leaves
  vary over which axes is read from ``shard_map``'s type checking
  (``check_vma=True``, the default).

  The result is identical on every device, so any weighting of it gives the
  same task weights everywhere.

  Args:
    stacked: the local shards of the stacked per-task gradients (leading task
      axis of size T on every leaf), already averaged over any data axis.
    axis_name: the ``shard_map`` axis (or axes) the leaves are sharded over.
    shared: optional mask of shared leaves, as in
      :func:`pcgrad_optax.gram_matrix`.

  Returns:
    The ``(T, T)`` Gram matrix of the full (unsharded) gradients, float32 (or
    float64 for float64 gradients), replicated over ``axis_name``.

  Raises:
    ValueError: outside ``shard_map`` over ``axis_name``, with
      ``check_vma=False`` (the replicated leaves cannot be told apart: compute
      ``lax.psum(pcgrad_optax.gram_matrix(local), axis)`` yourself if every
      leaf is sharded), or when a leaf differs between devices along a manual
      axis that is not in ``axis_name`` (typically per-device gradients of a
      data-parallel axis that were not averaged first).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import pcgrad_optax
    >>> mesh = jax.make_mesh((1,), ("model",))  # e.g. (8,) on 8 devices
    >>> with jax.set_mesh(mesh):
    ...   g = jax.device_put({"w": jnp.array([[1., 0.], [1., 1.]])},
    ...                      P(None, "model"))   # (T, P) split over "model"
    ...   gram = jax.shard_map(
    ...       lambda g: pcgrad_optax.sharding.gram_matrix(g, "model"),
    ...       in_specs=P(None, "model"), out_specs=P())(g)
    >>> gram
    Array([[1., 1.],
           [1., 2.]], dtype=float32)
  """
  axes = _axis_tuple(axis_name)
  _check_manual_axes(axes, "sharding.gram_matrix")
  if not _type_checked(axes[0]):
    raise ValueError(
        "sharding.gram_matrix needs shard_map's type checking "
        "(check_vma=True, the default) to tell sharded leaves from "
        "replicated ones. With check_vma=False and every leaf sharded over "
        f"{axes}, use lax.psum(pcgrad_optax.gram_matrix(local), {axes!r}).")
  t = num_tasks(stacked)
  mask = shared_leaves(shared, stacked)
  leaves_with_path = jax.tree_util.tree_flatten_with_path(stacked)[0]
  acc = leaves_accumulation_dtype([x for _, x in leaves_with_path])
  local = jnp.zeros((t, t), acc)
  for (path, x), m in zip(leaves_with_path, mask):
    if not m:
      continue
    varying = _varying_axes(x)
    stray = sorted(varying - set(axes))
    if stray:
      raise ValueError(
          f"sharding.gram_matrix: leaf '{leaf_name(path)}' (local shape "
          f"{tuple(x.shape)}) differs between devices along manual axis "
          f"{stray}, which is not in axis_name={axes}. If those are "
          "per-device gradients of a data-parallel axis, average them first "
          "(sharding.task_value_and_grad(..., axis_name=...) or lax.pmean): "
          "surgery on each device's own batch followed by an average is a "
          "different algorithm. If the leaf is sharded over that axis, add "
          "it to axis_name.")
    replicas = math.prod(lax.axis_size(a) for a in axes if a not in varying)
    local_gram = leaf_gram(x).astype(acc)
    if replicas > 1:
      local_gram = local_gram / replicas
    local = local + local_gram
  return lax.psum(local, axes)


def aggregate(stacked: PyTree,
              weighting: Callable[[jax.Array], jax.Array],
              axis_name: AxisName,
              *,
              params: PyTree | None = None,
              shared: SharedMask = None,
              reduction: str = "sum") -> tuple[PyTree, jax.Array, jax.Array]:
  r"""Gram-based aggregation of sharded stacked gradients in ``shard_map``.

  The ``shard_map`` counterpart of the transformations: the Gram matrix of
  the full gradients from :func:`gram_matrix` (one ``psum`` of ``T x T``
  numbers), the task weights ``w = weighting(K)`` (the same on every device),
  then each device's own shard of the update,
  :math:`u^{(d)} = \sum_t w_t\, g_t^{(d)}`, with no further communication.
  Non-shared leaves (task heads) get the plain sum (or mean) over tasks.

  Args:
    stacked: local shards of the stacked per-task gradients, already averaged
      over any data-parallel axis.
    weighting: ``(T, T) -> (T,)`` function, e.g.
      ``lambda K: pcgrad_optax.weighting.pcgrad(K, key=key)`` (pass the same
      key on every device: it is replicated in ``in_specs``).
    axis_name: the ``shard_map`` axis (or axes) the leaves are sharded over.
    params: optional local param shards, to validate the shapes.
    shared: optional mask of shared leaves (see :func:`pcgrad_optax.pcgrad`).
    reduction: ``"sum"`` or ``"mean"`` (divides the update by T).

  Returns:
    ``(local update shards, gram, weights)``; ``gram`` and ``weights`` are
    replicated, and ``weights`` are for the "sum" reduction.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import pcgrad_optax
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> order = jnp.array([[0, 1], [1, 0]])
    >>> def step(g):
    ...   update, _, _ = pcgrad_optax.sharding.aggregate(
    ...       g, lambda K: pcgrad_optax.weighting.pcgrad(K, order=order),
    ...       "model")
    ...   return update
    >>> with jax.set_mesh(mesh):
    ...   g = jax.device_put({"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])},
    ...                      P(None, "model"))
    ...   update = jax.shard_map(step, in_specs=P(None, "model"),
    ...                          out_specs=P("model"))(g)
    >>> jnp.round(update["w"], 4)
    Array([0.5848, 3.8012, 3.8012], dtype=float32)
  """
  check_reduction(reduction)
  t = num_tasks(stacked, params)
  mask = shared_leaves(shared, stacked, params)
  gram = gram_matrix(stacked, axis_name, shared=shared)
  weights = jnp.asarray(weighting(gram))
  if weights.shape != (t,):
    raise ValueError(
        f"The weighting returned shape {weights.shape}, expected ({t},).")
  scale = 1.0 / t if reduction == "mean" else 1.0
  shared_w = weights.astype(gram.dtype) * scale
  plain_w = jnp.full((t,), scale, gram.dtype)
  leaves, treedef = jax.tree.flatten(stacked)
  out = [leaf_weighted_sum(x, shared_w if m else plain_w)
         for x, m in zip(leaves, mask)]
  return jax.tree.unflatten(treedef, out), gram, weights


def _type_checked(axis: str) -> bool:
  """Whether shard_map tracks varying axes here (check_vma=True)."""
  return bool(_varying_axes(lax.axis_index(axis)))


def _average_over(x, axes: tuple[str, ...], loss_varying: frozenset[str],
                  checked: bool):
  """The mean over ``axes`` of per-device values derived from the losses.

  With shard_map's type checking, the VJP already *sums* over an axis the
  gradient of anything that is replicated over it (the transpose of the
  implicit broadcast is a psum), so that sum is divided by the axis size;
  values that still vary are averaged with one ``pmean``. Axes along which the
  losses do not vary need nothing. Without type checking every gradient is
  local and gets a plain ``pmean``.
  """
  if not checked:
    return lax.pmean(x, axes)
  varying = _varying_axes(x)
  to_average = tuple(a for a in axes if a in loss_varying and a in varying)
  already_summed = math.prod(
      lax.axis_size(a) for a in axes
      if a in loss_varying and a not in varying)
  if to_average:
    x = lax.pmean(x, to_average)
  if already_summed > 1:
    x = x / already_summed
  return x


def task_value_and_grad(loss_fn: Callable[..., Any], axis_name: AxisName, *,
                        argnums: int | Sequence[int] = 0,
                        has_aux: bool = False) -> Callable[..., Any]:
  r"""Data-parallel :func:`pcgrad_optax.task_value_and_grad` in ``shard_map``.

  Each device evaluates ``loss_fn`` on its own slice of the batch; the losses
  and the stacked per-task gradients are averaged over ``axis_name``:

  .. math::
    \bar g_t = \frac1D \sum_{d=1}^{D} \nabla L_t^{(d)}(\theta),

  which is the full-batch per-task gradient when ``loss_fn`` averages over
  equally sized batch slices. Feed :math:`\bar g` to the aggregator: the
  surgery then sees exactly what it would see on one device with the whole
  batch. Averaging the aggregator's *outputs* instead is a different
  algorithm (see the module docstring).

  With ``shard_map``'s type checking on (``check_vma=True``, the default),
  JAX's VJP already sums over the data axis the gradient of every param that
  is replicated over it; this function divides that sum by the number of
  devices (no second collective) and ``pmean``-s only what still differs
  between devices. With ``check_vma=False`` the gradients are per-device and
  it ``pmean``-s them all. Either way the result is the average.

  Args:
    loss_fn: function returning the ``(T,)`` per-task losses of the local
      batch slice (or ``((T,), aux)`` with ``has_aux``; ``aux`` is returned
      as computed locally).
    axis_name: the data-parallel ``shard_map`` axis (or axes).
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    A function with ``loss_fn``'s signature returning ``(losses, grads)`` (or
    ``((losses, aux), grads)``), losses and stacked grads averaged over
    ``axis_name`` and so identical on every device of that axis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import pcgrad_optax
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> def task_losses(w, x):  # two tasks, one batch
    ...   return jnp.stack([jnp.mean((x @ w) ** 2), jnp.mean(x @ w)])
    >>> grad_fn = pcgrad_optax.sharding.task_value_and_grad(task_losses, "data")
    >>> with jax.set_mesh(mesh):
    ...   x = jax.device_put(jnp.array([[1., 0.], [0., 2.]]), P("data"))
    ...   losses, grads = jax.shard_map(grad_fn, in_specs=(P(), P("data")),
    ...                                 out_specs=P())(jnp.ones(2), x)
    >>> grads
    Array([[1. , 4. ],
           [0.5, 1. ]], dtype=float32)
  """
  axes = _axis_tuple(axis_name)
  local_fn = _task_value_and_grad.task_value_and_grad(
      loss_fn, argnums=argnums, has_aux=has_aux)

  def wrapped(*args, **kwargs):
    _check_manual_axes(axes, "sharding.task_value_and_grad")
    checked = _type_checked(axes[0])
    if has_aux:
      (losses, aux), grads = local_fn(*args, **kwargs)
    else:
      losses, grads = local_fn(*args, **kwargs)
    loss_varying = _varying_axes(losses)
    losses, grads = jax.tree.map(
        lambda x: _average_over(x, axes, loss_varying, checked),
        (losses, grads))
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return wrapped
