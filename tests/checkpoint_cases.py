"""Every transformation in a training loop, for the checkpoint tests.

``CASES`` maps a name to a factory of the transformation under test: every
factory of ``aggregation.__all__`` and ``scalarization.__all__`` chained with
Adam (with ``num_tasks`` wherever the factory takes it, so the states keep
their weights record too), FAMO with Adam on its logits, ``multi_steps``
and ``apply_if_finite`` (both modes), and Recon's ``track_conflicts``
before PCGrad (its scores an ``OrderedDict``). The loss-level
``<method>_loss`` factories (one backward pass) are a :class:`OnePass`: the
``LossScalarization`` and Adam, whose state is the pair of theirs.
``step_fn(tx)`` is the jitted training
step on a small shared-trunk model whose batch is a function of the step
number only, and ``train(tx, params, state, start, stop)`` runs it, so a
run resumed from a restored state in another process sees the same data.
Imported by tests/test_checkpoint.py and by the fresh process it starts.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax as po
from factory_args import SECOND_BATCH, factory_kwargs

T = 3
STEPS = 4     # steps of the uninterrupted run
SAVE_AT = 2   # steps before the checkpoint

class OnePass(NamedTuple):
  """A ``<method>_loss`` trained by one backward pass, with an optimiser."""
  scal: po.scalarization.LossScalarization
  opt: optax.GradientTransformation

  def init(self, params):
    return self.scal.init(params), self.opt.init(params)


def _method(name):
  # Required arguments from tests/factory_args.py (STCH: one warm-up step,
  # so that both of its phases run before and after the checkpoint).
  return getattr(po, name)(**factory_kwargs(name, T))


class SecondBatchChain(NamedTuple):
  """``chain(inner, adam)`` whose training step also passes second_grads."""
  init: object
  update: object
  second_batch: bool = True


def _adam(inner, name=None):
  if isinstance(inner, po.scalarization.LossScalarization):
    return OnePass(inner, optax.adam(1e-2))
  chained = optax.chain(inner, optax.adam(1e-2))
  if name in SECOND_BATCH:
    return SecondBatchChain(chained.init, chained.update)
  return chained


METHODS = sorted(n for n in po.aggregation.__all__ + po.scalarization.__all__
                 if n[0].islower())

CASES = {name: (lambda name=name: _adam(_method(name), name))
         for name in METHODS}
CASES.update({
    "famo_adam_logits": lambda: _adam(po.famo(num_tasks=T,
                                              optimizer=optax.adam(0.025))),
    "multi_steps": lambda: po.multi_steps(_adam(po.pcgrad(7)), 2,
                                          num_tasks=T),
    "apply_if_finite": lambda: po.apply_if_finite(_adam(po.gradvac(
        num_tasks=T)), 3),
    "apply_if_finite_drop": lambda: po.apply_if_finite(
        _adam(po.famo(num_tasks=T)), 3, drop_nonfinite_tasks=True,
        num_tasks=T),
    "recon_track_conflicts": lambda: optax.chain(
        po.recon.track_conflicts(-0.1), _adam(po.pcgrad(5))),
})


def init_params():
  rng = np.random.default_rng(0)
  return {"trunk": jnp.asarray(rng.standard_normal((4, 8)) * 0.5,
                               jnp.float32),
          "heads": jnp.asarray(rng.standard_normal((T, 8)) * 0.5,
                               jnp.float32)}


def batch(n, with_nan=False):
  """The step's batch: a function of the step number only.

  ``with_nan`` (for apply_if_finite) makes task 1's batch of step 3 empty
  (all its targets NaN, i.e. missing): that step's task-1 loss is NaN.
  """
  rng = np.random.default_rng(100 + n)
  x = rng.standard_normal((16, 4)).astype(np.float32)
  y = rng.standard_normal((16, T)).astype(np.float32)
  if with_nan and n == 3:
    y[:, 1] = np.nan
  return x, y


def task_losses(params, x, y):
  """Each task's mean squared error over its present (finite) targets.

  A task with no target in the batch gets a NaN loss; the ``where`` on both
  sides keeps its gradient finite (zero) and the other tasks' gradients
  free of it (a plain mean would spread 0 * inf = NaN to every task).
  """
  h = jnp.tanh(x @ params["trunk"])
  present = jnp.isfinite(y)
  count = present.sum(axis=0)
  error = jnp.where(present, h @ params["heads"].T - jnp.where(present, y, 0),
                    0)
  total = jnp.sum(error ** 2, axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan) + 0.1


def step_fn(tx):
  if isinstance(tx, OnePass):
    @jax.jit
    def one_pass_step(params, state, x, y):
      scal_state, opt_state = state

      def objective(p):
        return tx.scal.loss(task_losses(p, x, y), scal_state)

      (_, scal_state), grads = jax.value_and_grad(objective, has_aux=True)(
          params)
      updates, opt_state = tx.opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), (scal_state, opt_state)

    return one_pass_step

  second_batch = getattr(tx, "second_batch", False)

  @jax.jit
  def step(params, state, x, y):
    losses, grads = po.task_value_and_grad(task_losses)(params, x, y)
    extra = {}
    if second_batch:   # the two halves of the batch as the two batches
      half = x.shape[0] // 2
      _, grads = po.task_value_and_grad(task_losses)(params, x[:half],
                                                     y[:half])
      _, extra["second_grads"] = po.task_value_and_grad(task_losses)(
          params, x[half:], y[half:])
    updates, state = tx.update(grads, state, params, losses=losses, **extra)
    return optax.apply_updates(params, updates), state

  return step


def train(tx, params, state, start, stop, step=None):
  step = step_fn(tx) if step is None else step
  with_nan = isinstance(state, po.ApplyIfFiniteState)
  for n in range(start, stop):
    params, state = step(params, state, *batch(n, with_nan))
  return params, state
