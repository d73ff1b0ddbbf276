"""Skipping (or repairing) steps with non-finite stacked gradients or losses."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# A module import: apply_if_finite has an argument named num_tasks.
from pcgrad_optax._core import stacked
from pcgrad_optax._core.checks import check_num_tasks, static_int
from pcgrad_optax._core.transform import (Aggregator, GramProbe, GramResult,
                                          gram_step_of)

# The extra arguments of ``update`` that hold one loss per task: checked for
# finiteness with the gradients and, when tasks are dropped, repaired.
LOSS_ARGS = ("losses", "prev_batch_losses")

# The wrappers whose inner transformation exists only inside update: a probe
# is passed on to them (value_and_aggregate probes them too).
_INJECTED = (optax.InjectHyperparamsState,
             optax.InjectStatefulHyperparamsState)


class DroppedTasksState(NamedTuple):
  """Per-task record of :func:`apply_if_finite` with ``drop_nonfinite_tasks``.

  Attributes:
    dropped_count: ``(T,)`` int32, the number of applied steps on which each
      task was dropped.
    last_losses: ``(T,)`` float32, each task's last finite ``losses`` entry
      (what a dropped task's losses are replaced with; 0 before the first).
    has_loss: ``(T,)`` bool, whether the task has had a finite ``losses``
      entry yet.
  """
  dropped_count: jax.Array
  last_losses: jax.Array
  has_loss: jax.Array


class ApplyIfFiniteState(NamedTuple):
  """State of :func:`apply_if_finite` (``optax.ApplyIfFiniteState``'s fields).

  Attributes:
    notfinite_count: number of consecutive skipped steps (int32), reset to 0
      by every applied step.
    last_finite: whether every input of the last step (each stacked gradient
      leaf, the losses) was finite (bool).
    total_notfinite: total number of skipped steps since ``init`` (int32),
      never reset.
    inner_state: state of the wrapped transformation.
    tasks: a :class:`DroppedTasksState` with ``drop_nonfinite_tasks=True``,
      else ``optax.EmptyState()``.
  """
  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  inner_state: Any
  tasks: DroppedTasksState | optax.EmptyState


def _task_finite(leaf: jax.Array) -> jax.Array:
  """``(T,)`` bool: whether each task's slice of a stacked leaf is finite."""
  return jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))


def _zeros_like_output(inner, updates, inner_state, params, extra_args):
  """Zeros shaped (and sharded) like ``inner.update``'s updates."""
  out_shape = jax.eval_shape(
      lambda: inner.update(updates, inner_state, params, **extra_args)[0])
  return jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding),
      out_shape)


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int, *,
                    drop_nonfinite_tasks: bool = False,
                    num_tasks: int | None = None
                    ) -> Aggregator:
  r"""Skips steps whose stacked gradients or losses are not finite.

  The stacked-gradient counterpart of ``optax.apply_if_finite``, with its
  state fields and semantics. ``inner`` takes stacked per-task gradients
  (an aggregator, or the chain that starts with one, e.g.
  ``optax.chain(pcgrad_optax.famo(num_tasks=T), optax.adam(1e-3))``).
  A step is *not finite* when any stacked gradient leaf, or the ``losses``
  (or ``prev_batch_losses``) extra argument, holds a NaN or an inf. Such a
  step is skipped: ``inner`` is not applied, the update is zero
  (params-shaped) and the whole inner state is kept bit for bit (FAMO's
  logits, GradVac's targets, the log-variances, PRNG counters, the
  optimiser's moments). After ``max_consecutive_errors`` consecutive skipped
  steps the next one is applied anyway, non-finite inputs included, as
  optax does. Under ``jit`` the choice is a ``lax.cond`` (eagerly, where
  the values are known, a Python branch, so that nothing compiles on every
  call); the finiteness check is one pass over the gradients,
  paid only by the wrapped transformation.

  Dropping tasks (``drop_nonfinite_tasks=True``, for data where a task's
  batch is sometimes empty and its loss a NaN mean): a task is *offending*
  on a step when its slice of any gradient leaf or its entry of ``losses``
  or ``prev_batch_losses`` is not finite. Offending tasks are dropped for
  that step and the others are applied: ``inner`` sees

  * the stacked gradients with every offending task's slice set to zero
    (an empty batch's gradient), the other tasks' slices unchanged;
  * ``losses`` and ``prev_batch_losses`` with each offending task's entry
    replaced by its last finite ``losses`` entry (kept in
    :class:`DroppedTasksState`), as if its loss had not changed: FAMO's
    log-loss decrease for that task is 0, uncertainty weighting and DWA
    see its last loss again;
  * every other extra argument unchanged.

  What zero does to the task weights is the method's own zero-gradient rule:
  PCGrad, GradVac, GradDrop and the sum combine the remaining tasks as if
  the dropped one were absent (PCGrad and GradVac skip pairs with a zero
  gradient, GradVac's targets for them included); UPGrad and the mean keep
  dividing by ``T``; the loss-based weightings still give the dropped task
  its weight (on a zero gradient), so the others keep theirs; MGDA's
  min-norm point is zero when any task's gradient is, so its shared update
  is zero on such a step (the heads still move). A step is skipped
  as a whole (and counted) only when every task is offending, or when an
  offending task has no finite loss to carry forward yet; there
  ``notfinite_count`` and ``max_consecutive_errors`` act as above.

  A NaN made in the shared forward pass reaches *every* task's gradient
  (the backward pass multiplies it by the other tasks' zero cotangents), and
  then every task offends. Give an empty batch's loss a ``where`` on both
  sides, ``jnp.where(n > 0, s / jnp.maximum(n, 1), jnp.nan)``: only that
  task's loss is NaN, its gradient zero, the others' gradients untouched.

  With :func:`pcgrad_optax.value_and_aggregate` (a Gram-based ``inner``,
  either engine): the step is computed, then kept or not; it is not finite
  when the losses or the update are not (the Gram engine holds no stacked
  gradients), and on an ``nnx.Module`` a skipped step leaves the module's
  other state (BatchNorm statistics) as it was. Dropping tasks needs the
  stacked gradients: that mode takes the stacked engine.

  .. warning::
    Like the aggregators, ``apply_if_finite`` consumes stacked gradients:
    it goes first in an ``optax.chain`` (wrap the whole chain to protect the
    optimiser's moments too). ``optax.apply_if_finite`` is the one for
    params-shaped gradients, after the aggregator.

  Args:
    inner: transformation taking stacked gradients.
    max_consecutive_errors: number of consecutive non-finite steps that are
      skipped; the next one is applied (an int, or an integer array, also a
      traced one under ``optax.inject_hyperparams``).
    drop_nonfinite_tasks: drop only the offending tasks (see above) instead
      of skipping the step.
    num_tasks: T; needed with ``drop_nonfinite_tasks=True`` (the per-task
      record is allocated at ``init``, where only the params are seen).

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``, like the transformations it wraps)
    with an :class:`ApplyIfFiniteState`. ``update(grads, state,
    params=None, **extra_args)`` passes the extra arguments on to ``inner``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.apply_if_finite(
    ...     optax.chain(pcgrad_optax.famo(num_tasks=2), optax.adam(0.1)),
    ...     max_consecutive_errors=3)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> step = jax.jit(tx.update)
    >>> u, state = step(g, state, params, losses=jnp.array([1., 2.]))
    >>> u, state = step(g, state, params, losses=jnp.array([1., jnp.nan]))
    >>> u["w"], int(state.total_notfinite)  # skipped, the state kept
    (Array([0., 0.], dtype=float32), 1)
    >>> drop = pcgrad_optax.apply_if_finite(
    ...     pcgrad_optax.pcgrad(), 3, drop_nonfinite_tasks=True, num_tasks=2)
    >>> bad = {"w": jnp.array([[1., 0.], [jnp.nan, 1.]])}
    >>> u, s = drop.update(bad, drop.init(params), params)
    >>> u["w"], s.tasks.dropped_count  # task 1 dropped, task 0 applied
    (Array([1., 0.], dtype=float32), Array([0, 1], dtype=int32))
  """
  # An int, or an array (also a traced one: optax.inject_hyperparams),
  # validated when concrete.
  static_int(max_consecutive_errors, "max_consecutive_errors", minimum=0)
  if drop_nonfinite_tasks:
    if num_tasks is None:
      raise ValueError("apply_if_finite(drop_nonfinite_tasks=True) needs "
                       "num_tasks (the per-task record is allocated at init).")
    check_num_tasks(num_tasks)
  # Whether a value_and_aggregate probe can reach a Gram-based method inside
  # (a chain around one hides it, as it does from value_and_aggregate).
  method_inside = gram_step_of(inner) is not None
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if drop_nonfinite_tasks:
      tasks = DroppedTasksState(
          dropped_count=jnp.zeros((num_tasks,), jnp.int32),
          last_losses=jnp.zeros((num_tasks,), jnp.float32),
          has_loss=jnp.zeros((num_tasks,), jnp.bool_))
    else:
      tasks = optax.EmptyState()
    return ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params), tasks=tasks)

  def loss_args(extra_args, t):
    found = {}
    for name in LOSS_ARGS:
      value = extra_args.get(name)
      if value is None:
        continue
      value = jnp.asarray(value)
      if drop_nonfinite_tasks and value.shape != (t,):
        raise ValueError(
            f"apply_if_finite: `{name}` must have shape (T,) = ({t},) to "
            f"match the stacked gradients, got {value.shape}.")
      found[name] = value
    return found

  def drop_tasks(leaves, treedef, losses, extra_args, tasks, t):
    """(isfinite, usable, task_ok, inputs, args) of the dropping mode."""
    if t != num_tasks:
      raise ValueError(
          f"apply_if_finite: the stacked gradients have T={t} tasks, "
          f"expected num_tasks={num_tasks}.")
    task_ok = jnp.ones((t,), jnp.bool_)
    for x in leaves + list(losses.values()):
      task_ok &= _task_finite(x)
    usable = jnp.any(task_ok)
    if losses:   # a dropped task needs a finite loss to carry forward
      usable &= jnp.all(task_ok | tasks.has_loss)
    keep = task_ok | ~usable     # a step given up on sees its raw inputs
    inputs = jax.tree.unflatten(treedef, [
        jnp.where(keep.reshape((t,) + (1,) * (x.ndim - 1)), x,
                  jnp.zeros_like(x)) for x in leaves])
    args = dict(extra_args)
    for name, value in losses.items():
      args[name] = jnp.where(keep, value,
                             tasks.last_losses.astype(value.dtype))
    return jnp.all(task_ok), usable, task_ok, inputs, args

  def probe_update(probe, state, params):
    """value_and_aggregate's engines, the method inside reached."""
    if drop_nonfinite_tasks:
      raise stacked.NotGramBased(
          "apply_if_finite(drop_nonfinite_tasks=True) zeroes the offending "
          "tasks' stacked gradients, which the Gram engine never holds.")
    if not (method_inside or isinstance(state.inner_state, _INJECTED)):
      raise stacked.NotGramBased(
          "apply_if_finite: the transformation inside is not a Gram-based "
          "method of the package (an optax.chain hides one).")
    result, inner_state = inner.update(probe, state.inner_state, params)
    if not isinstance(result, GramResult):    # asked for the method only
      return result, state._replace(inner_state=inner_state)
    # The step is already computed: keep it or not (no lax.cond to skip).
    isfinite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in
                                  result.update + [result.losses]]))
    notfinite_count = jnp.where(
        isfinite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))
    apply = isfinite | (notfinite_count > max_consecutive_errors)
    keep = lambda new, old: jnp.where(apply, new, old)
    update = [keep(u, jnp.zeros_like(u)) for u in result.update]
    return result._replace(update=update), ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=isfinite,
        total_notfinite=jnp.where(
            isfinite, state.total_notfinite,
            optax.safe_increment(state.total_notfinite)),
        inner_state=jax.tree.map(keep, inner_state, state.inner_state),
        tasks=state.tasks)

  def update_fn(updates, state, params=None, **extra_args):
    if isinstance(updates, GramProbe):
      return probe_update(updates, state, params)
    t = stacked.num_tasks(updates, None)
    leaves, treedef = jax.tree.flatten(updates)
    losses = loss_args(extra_args, t)
    if drop_nonfinite_tasks:
      isfinite, usable, task_ok, inputs, args = drop_tasks(
          leaves, treedef, losses, extra_args, state.tasks, t)
    else:   # one reduction per leaf, as optax.apply_if_finite does
      isfinite = jnp.all(jnp.stack(
          [jnp.all(jnp.isfinite(x)) for x in leaves + list(losses.values())]))
      usable, inputs, args = isfinite, updates, extra_args
    notfinite_count = jnp.where(
        usable, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))

    def do_update(_):
      return inner.update(inputs, state.inner_state, params, **args)

    def reject_update(_):
      return (_zeros_like_output(inner, inputs, state.inner_state, params,
                                 args), state.inner_state)

    apply = usable | (notfinite_count > max_consecutive_errors)
    if isinstance(apply, jax.core.Tracer):
      out, inner_state = jax.lax.cond(apply, do_update, reject_update, None)
    else:   # eagerly, a Python branch: a cond would compile on every call
      out, inner_state = (do_update if bool(apply) else reject_update)(None)

    tasks = state.tasks
    if drop_nonfinite_tasks:   # recorded on the steps applied as usable
      seen = usable & task_ok
      if "losses" in losses:
        tasks = tasks._replace(
            last_losses=jnp.where(seen, losses["losses"].astype(jnp.float32),
                                  tasks.last_losses),
            has_loss=tasks.has_loss | seen)
      tasks = tasks._replace(dropped_count=tasks.dropped_count + (
          usable & ~task_ok).astype(jnp.int32))
    return out, ApplyIfFiniteState(
        notfinite_count=notfinite_count,
        last_finite=isfinite,
        total_notfinite=jnp.where(
            usable, state.total_notfinite,
            optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state, tasks=tasks)

  return Aggregator(init_fn, update_fn)
