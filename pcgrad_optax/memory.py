r"""Memory-lean paths for many tasks and big models.

The stacked per-task gradients cost ``T x P`` numbers (``P`` = number of
differentiated params): 1 GiB in float32 for ``T = 256`` tasks of a
1M-parameter model, and ``T`` times the model for any model. On top of that,
``jax.vmap`` of the backward pass over all ``T`` tasks at once holds ``T``
copies of every activation cotangent. Two ways out:

* :func:`task_value_and_grad` with ``tasks_per_chunk`` and ``dtype``: the
  same stacked gradients, but the backward passes run ``tasks_per_chunk``
  tasks at a time (``lax.map``), and each chunk is stored in ``dtype`` (e.g.
  bfloat16, halving the ``T x P`` buffer). The aggregators still form the Gram
  matrix in float32 from bfloat16 gradients. Drop-in: its output goes to any
  transformation.

* :func:`streaming_aggregate`: never holds the stacked gradients at all. It
  uses two identities. The Gram matrix is :math:`K = J J^\top`, with
  :math:`J` the ``T x P`` Jacobian of the task losses, and its column
  :math:`t` is a Jacobian-vector product of task :math:`t`'s own gradient:

  .. math::
    K_{:, t} = J\,(J^\top e_t) = \mathrm{jvp}\big(L, \theta,
    \mathrm{vjp}(L, \theta, e_t)\big),

  so ``K`` is built ``tasks_per_chunk`` columns at a time, holding
  ``tasks_per_chunk x P`` gradient numbers, never ``T x P``. And the combined
  update is the gradient of the weighted loss,

  .. math::
    \sum_t w_t\, g_t = J^\top w = \nabla_\theta \textstyle\sum_t w_t
    L_t(\theta),

  one more backward pass. The cost is compute: ``T`` backward passes plus
  ``T`` forward-mode passes (vs ``T`` backward passes and a ``T^2 P`` Gram
  contraction for the stacked path), plus one backward pass for the update.
  The forward pass is linearised once (``jax.linearize``) and both the JVPs
  and the VJPs reuse its residuals. Works with any weighting of
  :mod:`pcgrad_optax.weighting` (a pure function of the Gram matrix).

Both run under ``jax.jit`` over sharded meshes like everything else (see
:mod:`pcgrad_optax.sharding`; the update keeps the params' sharding).
Inside ``jax.shard_map`` use the stacked route instead
(:func:`pcgrad_optax.sharding.task_value_and_grad` and
:func:`pcgrad_optax.sharding.aggregate`): there each device's JVPs only see
its own batch slice. ``benchmarks/results/scale.md`` has the measured peak
memory and time of each path as a function of ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.mesh import vary_like
from pcgrad_optax._core.stacked import accumulation_dtype, check_reduction
from pcgrad_optax._task_value_and_grad import check_task_losses
from pcgrad_optax._task_value_and_grad import losses_and_vjp
from pcgrad_optax._task_value_and_grad import single_argnum

PyTree = Any

__all__ = [
    "streaming_aggregate",
    "task_value_and_grad",
]


def _check_chunk(tasks_per_chunk) -> None:
  if tasks_per_chunk is not None and (
      not isinstance(tasks_per_chunk, int) or isinstance(tasks_per_chunk, bool)
      or tasks_per_chunk < 1):
    raise ValueError(
        "tasks_per_chunk must be a positive int (or None for all tasks at "
        f"once), got {tasks_per_chunk!r}.")


def _map_tasks(fn: Callable[[jax.Array], Any], basis: jax.Array,
               tasks_per_chunk: int | None) -> Any:
  """``fn`` on every row of ``basis``, ``tasks_per_chunk`` rows at a time."""
  if tasks_per_chunk is None or tasks_per_chunk >= basis.shape[0]:
    return jax.vmap(fn)(basis)
  return lax.map(fn, basis, batch_size=tasks_per_chunk)


def task_value_and_grad(loss_fn: Callable[..., Any], *,
                        tasks_per_chunk: int | None = None,
                        dtype: Any = None,
                        argnums: int | Sequence[int] = 0,
                        has_aux: bool = False) -> Callable[..., Any]:
  r"""Stacked per-task gradients, a chunk of tasks at a time.

  Same result as :func:`pcgrad_optax.task_value_and_grad` (one forward pass,
  the stacked Jacobian :math:`\partial L_t / \partial\theta`), but the ``T``
  backward passes run ``tasks_per_chunk`` at a time under ``lax.map`` instead
  of all at once under ``jax.vmap``, so the backward pass's intermediates
  are held for one chunk only, and each chunk is cast to ``dtype`` before it
  is stored: ``dtype=jnp.bfloat16`` halves the ``T x P`` stacked buffer.
  The aggregators accumulate the Gram matrix in float32 whatever the
  gradients' dtype.

  Args:
    loss_fn: function returning the ``(T,)`` task losses (or ``((T,), aux)``
      with ``has_aux``).
    tasks_per_chunk: tasks per backward chunk; None runs all at once. A ``T``
      that is not a multiple is fine (the last chunk is smaller).
    dtype: storage dtype of the stacked gradients (None keeps the params').
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    A function with ``loss_fn``'s signature returning ``(losses, grads)`` or
    ``((losses, aux), grads)``, ``grads`` with a leading task axis of size T.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> f = lambda w: jnp.stack([jnp.sum(w ** 2), jnp.sum(w), jnp.sum(-w)])
    >>> grad_fn = pcgrad_optax.memory.task_value_and_grad(
    ...     f, tasks_per_chunk=2, dtype=jnp.bfloat16)
    >>> losses, grads = grad_fn(jnp.array([1., 2.]))
    >>> grads
    Array([[2, 4],
           [1, 1],
           [-1, -1]], dtype=bfloat16)
  """
  _check_chunk(tasks_per_chunk)
  single = single_argnum(argnums)

  def wrapped(*args, **kwargs):
    losses, vjp_fn, aux = losses_and_vjp(
        loss_fn, argnums, has_aux, args, kwargs, "memory.task_value_and_grad")

    # XLA:CPU updates a 16-bit float buffer inside a loop by converting the
    # whole buffer to f32 and back on every chunk; carrying the bits as
    # uint16 keeps the stacked buffer 16-bit (a free bitcast elsewhere).
    as_bits = (dtype is not None and tasks_per_chunk is not None
               and jnp.dtype(dtype).itemsize == 2
               and jnp.issubdtype(dtype, jnp.floating))

    def one_task(cotangent):
      grads = vjp_fn(cotangent)
      if dtype is not None:
        grads = jax.tree.map(lambda g: g.astype(dtype), grads)
      if as_bits:
        grads = jax.tree.map(
            lambda g: lax.bitcast_convert_type(g, jnp.uint16), grads)
      return grads

    basis = vary_like(jnp.eye(losses.shape[0], dtype=losses.dtype), losses)
    grads = _map_tasks(one_task, basis, tasks_per_chunk)
    if as_bits:
      grads = jax.tree.map(lambda g: lax.bitcast_convert_type(g, dtype), grads)
    grads = grads[0] if single else grads
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return wrapped


def streaming_aggregate(loss_fn: Callable[..., Any],
                        weighting: Callable[[jax.Array], jax.Array], *,
                        tasks_per_chunk: int | None = None,
                        shared: SharedMask = None,
                        reduction: str = "sum",
                        argnums: int = 0,
                        has_aux: bool = False) -> Callable[..., Any]:
  r"""Gram-based aggregation without ever stacking the task gradients.

  Computes the update of a Gram-matrix aggregator straight from the task
  losses, holding at most ``tasks_per_chunk`` per-task gradients at a time:

  1. linearise :math:`L(\theta)` once (``jax.linearize``);
  2. for each chunk of tasks, their gradients :math:`g_t = J^\top e_t`
     (VJPs), restricted to the ``shared`` leaves, and the Gram columns
     :math:`K_{:,t} = J\, g_t^{\text{shared}}` (JVPs), giving
     :math:`K_{ij} = \langle g_i^{\text{shared}}, g_j^{\text{shared}}\rangle`;
  3. the weights :math:`w = \mathrm{weighting}(K)`;
  4. the update :math:`J^\top w = \nabla_\theta \sum_t w_t L_t` on shared
     leaves and :math:`J^\top \mathbf{1}` (each head's own task gradient) on
     the others, as one batched VJP.

  It equals ``aggregate`` on :func:`pcgrad_optax.task_value_and_grad`'s
  stacked gradients up to float rounding (the Gram matrix comes out of the
  model's own arithmetic, in its dtype), for the price of ``T`` extra
  forward-mode passes and one extra backward pass; memory is
  ``tasks_per_chunk x P`` instead of ``T x P``.

  Args:
    loss_fn: function returning the ``(T,)`` task losses (or ``((T,), aux)``
      with ``has_aux``).
    weighting: ``(T, T) -> (T,)`` function of the Gram matrix, e.g.
      ``lambda K: pcgrad_optax.weighting.pcgrad(K, key=key)`` (fold the step
      count into the key, as :func:`pcgrad_optax.pcgrad` does). Methods with
      state across steps keep it in your training loop.
    tasks_per_chunk: tasks whose gradients are held at once; None: all.
    shared: optional mask of shared leaves of the differentiated argument
      (see :func:`pcgrad_optax.pcgrad`); the others get the plain sum.
    reduction: ``"sum"`` or ``"mean"`` (divides the update by T).
    argnums: the positional argument to differentiate (the params).
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    A function with ``loss_fn``'s signature returning
    ``(losses, update, gram, weights)`` (``losses`` replaced by
    ``(losses, aux)`` with ``has_aux``). ``update`` is params-shaped, ready
    for ``optax.adam(...).update`` or ``optax.apply_updates`` after scaling.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> def task_losses(w):  # two conflicting tasks
    ...   return jnp.stack([jnp.sum((w - 2.0) ** 2),
    ...                     jnp.sum((w + jnp.array([2., 0., 0.])) ** 2)])
    >>> order = jnp.array([[0, 1], [1, 0]])
    >>> step = pcgrad_optax.memory.streaming_aggregate(
    ...     task_losses, lambda K: pcgrad_optax.weighting.pcgrad(K, order=order),
    ...     tasks_per_chunk=1)
    >>> losses, update, gram, weights = jax.jit(step)(jnp.ones(3))
    >>> print(jnp.round(update, 3))  # = pcgrad() on the stacked gradients
    [ 3.394 -2.424 -2.424]

  References:
    The Jacobian-Gram identity :math:`J J^\top v` = JVP of a VJP is the one
    used for empirical neural tangent kernels: Novak et al., `Fast Finite
    Width Neural Tangent Kernel <https://arxiv.org/abs/2206.08720>`_, ICML
    2022.
  """
  _check_chunk(tasks_per_chunk)
  check_reduction(reduction)
  if not isinstance(argnums, int):
    raise ValueError(
        f"streaming_aggregate differentiates one argument (the params); got "
        f"argnums={argnums!r}.")

  def wrapped(*args, **kwargs):
    if argnums >= len(args):
      raise ValueError(
          f"argnums={argnums} but only {len(args)} positional arguments "
          "were given.")
    params = args[argnums]

    def partial_fn(p):
      full = list(args)
      full[argnums] = p
      return loss_fn(*full, **kwargs)

    if has_aux:
      losses, jvp_fn, aux = jax.linearize(partial_fn, params, has_aux=True)
    else:
      losses, jvp_fn = jax.linearize(partial_fn, params)
    check_task_losses(losses, "memory.streaming_aggregate")
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    t = losses.shape[0]
    treedef = jax.tree.structure(params)
    shape_view = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct((t,) + jnp.shape(p), jnp.result_type(p)),
        params)
    mask = shared_leaves(shared, shape_view, params)

    def gram_column(cotangent):
      (grad,) = vjp_fn(cotangent)
      grad_leaves = jax.tree.leaves(grad)
      tangent = jax.tree.unflatten(
          treedef, [g if m else jnp.zeros_like(g)
                    for g, m in zip(grad_leaves, mask)])
      return jvp_fn(tangent)

    basis = vary_like(jnp.eye(t, dtype=losses.dtype), losses)
    # Row t holds J g_t^shared = K[:, t]; K is symmetric up to rounding.
    gram = _map_tasks(gram_column, basis, tasks_per_chunk)
    acc = accumulation_dtype(gram.dtype)
    gram = gram.astype(acc)
    gram = 0.5 * (gram + gram.T)

    weights = jnp.asarray(weighting(gram))
    if weights.shape != (t,):
      raise ValueError(
          f"The weighting returned shape {weights.shape}, expected ({t},).")
    scale = 1.0 / t if reduction == "mean" else 1.0
    shared_w = (weights.astype(acc) * scale).astype(losses.dtype)
    shared_w = vary_like(shared_w, losses)
    if all(mask):
      (update,) = vjp_fn(shared_w)
    else:
      plain_w = vary_like(jnp.full((t,), scale, losses.dtype), losses)
      (both,) = jax.vmap(vjp_fn)(jnp.stack([shared_w, plain_w]))
      update = jax.tree.unflatten(
          treedef, [b[0] if m else b[1]
                    for b, m in zip(jax.tree.leaves(both), mask)])
    head = (losses, aux) if has_aux else losses
    return head, update, gram, weights

  return wrapped
