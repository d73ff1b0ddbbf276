"""What every loss-level method shares: its two paths from one step function.

A loss-level method is an ``init`` (its state) and a ``step``
``(losses, state, num_tasks, extra) -> (weights, value, new_state)``: the
``(T,)`` task weights :math:`w` of this step, the value of the method's
objective (None: :math:`\\sum_t w_t L_t`) and the next state, from the
stop-gradient losses alone. Because
:math:`\\sum_t w_t \\nabla L_t = \\nabla \\sum_t w_t L_t`, the method has two
paths built from that one step, so that they cannot drift apart:

* :func:`loss_transformation`: the optax transformation on stacked
  per-task gradients (``T`` backward passes, ``shared=`` masks);
* :func:`scalarized`: a :class:`LossScalarization`, whose ``loss`` is a
  scalar to differentiate directly (one backward pass) and whose
  ``weights`` are the cotangent of one VJP of the loss vector.

The shared code also does what every transformation of the package does
(issue 12): the transformation is an
:class:`optax.experimental.aggregating.Aggregator`; with ``num_tasks`` the
state keeps the last step's applied ``(T,)`` weights in its ``weights``
field (a stateless method's ``optax.EmptyState`` becomes a
:class:`pcgrad_optax.GramState`), on both paths alike; ``num_tasks`` and
every numeric hyperparameter may be an array, also a traced one
(``optax.inject_hyperparams``), concrete ones validated by
``pcgrad_optax._core.checks``.

Every method that reads the losses has a domain (:data:`Domain`: every
loss finite by default; FAMO's :math:`L > L^*`; uncertainty's, DWA's,
IMTL-L's and log-form STCH's :math:`L \\ge 0`; the geometric mean's
:math:`L > 0`), checked once here for both paths with
``_core.checks.losses_in_domain``: concrete losses outside it raise a
``ValueError`` naming the method and the tasks; under ``jit`` a step with
losses outside it (or with a non-finite new state) leaves the whole state,
counts and the weights record included, as it was, so a bad batch never
writes NaN into the state and a run with it is the run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_losses,
                                       check_num_tasks, concrete,
                                       init_num_tasks, losses_in_domain,
                                       per_task)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, GramState, cast_like,
                                          check_record, init_record, record)

# (T or None) -> state; T is the concrete num_tasks (None when the method was
# built without one). The state's ``weights`` field (if any) is left None:
# the shared code fills it in.
Init = Callable[[int | None], Any]
# (losses, state, num_tasks, extra) -> (weights, value or None, new_state)
Step = Callable[[jax.Array | None, Any, int, dict],
                tuple[jax.Array, jax.Array | None, Any]]
# (losses, num_tasks, extra, method) -> () bool: whether the step's losses
# are in the method's domain. Concrete ones outside it raise a ValueError
# (``_core.checks.losses_in_domain``); traced ones give False, and the step
# then leaves the whole state as it was.
Domain = Callable[[jax.Array, int, dict, str], jax.Array]


def finite(losses, t, extra, method):
  """The default :data:`Domain`: every loss finite."""
  del t, extra
  return jnp.all(losses_in_domain(losses, method=method))


def bounded_below(lower: float = 0.0, *, strict: bool = False) -> Domain:
  """The :data:`Domain` of finite losses ``> lower`` (``strict``) or ``>=``."""
  def domain(losses, t, extra, method):
    del t, extra
    return jnp.all(losses_in_domain(losses, lower, strict=strict,
                                    method=method))
  return domain


class LossScalarization(NamedTuple):
  """The one-backward-pass path of a loss-level method.

  Built by ``pcgrad_optax.scalarization.<method>_loss(...)`` with the same
  hyperparameters as the transformation ``<method>(...)``; ``init`` gives
  the same state, and each call steps it exactly as the transformation's
  ``update`` does.

  Where it differs from the stacked path, and why:

  * No ``shared`` mask: one backward pass has one cotangent, so the task
    heads get :math:`w_t g_t` too (as weighting the loss does in the
    papers); the stacked path's ``shared=None`` is the same update. Heads
    with their own unweighted gradients need the stacked path (or a model
    that rescales its heads' cotangents itself).
  * Learned weighting parameters (uncertainty's log-variances, IMTL-L's
    scales) have derivatives that need only the losses
    (:math:`b_t - a_t e^{-s_t}L_t`, :math:`e^{s_t}L_t - 1`), so both paths
    keep them in the state and step them with their own optimiser: no
    gradient of the model is needed for them, and the state sequence is the
    transformation's. The scalar's gradient with respect to the state is
    zero by construction.
  * FAMO's logit update and DWA's and STCH's histories use losses only:
    identical on both paths (FAMO's exact mode needs the extra forward pass
    ``prev_batch_losses`` on both).
  * The scalar's value is the method's objective but its gradient is built
    from the weights held constant: only first derivatives are meaningful.

  Attributes:
    init: ``init(params=None) -> state``.
    loss: ``loss(losses, state, **extra) -> (scalar, new_state)``. The
      scalar's value is the method's objective; its gradient with respect
      to ``losses`` is the step's task weights :math:`w` (held constant), so
      ``jax.value_and_grad(..., has_aux=True)`` of a function returning it
      gives :math:`\\sum_t w_t \\nabla L_t` in one backward pass. Only first
      derivatives are meaningful (the weights are constants).
    weights: ``weights(losses, state, **extra) -> (w, new_state)``: the
      ``(T,)`` weights to pull back through one VJP of the loss vector,
      ``vjp_fn(w)`` (e.g. from ``jax.vjp``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.geometric_mean_loss()
    >>> def task_losses(w):
    ...   return jnp.stack([w[0] ** 2, 4 * w[1] ** 2])
    >>> w = jnp.array([1.0, 1.0])
    >>> # One backward pass of the scalar loss ...
    >>> g, _ = jax.grad(lambda w, s: scal.loss(task_losses(w), s),
    ...                 has_aux=True)(w, scal.init())
    >>> # ... or one VJP of the loss vector with the weights.
    >>> losses, vjp_fn = jax.vjp(task_losses, w)
    >>> weights, _ = scal.weights(losses, scal.init())
    >>> print(g, vjp_fn(weights)[0])  # G = 2: weights (1, 0.25)
    [2. 2.] [2. 2.]
  """
  init: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, Any]]
  weights: Callable[..., tuple[jax.Array, Any]]


def stateless(weights_and_value: Callable[[jax.Array, dict],
                                          tuple[jax.Array, jax.Array]]
              ) -> tuple[Init, Step]:
  """``(init, step)`` of a method without state of its own.

  ``weights_and_value(losses, extra)`` gives the step's ``(T,)`` weights
  and the objective's value; the state is ``optax.EmptyState()`` (the
  shared code adds the weights record with ``num_tasks``).
  """

  def init(t):
    del t
    return optax.EmptyState()

  def step(losses, state, t, extra):
    del t
    weights, value = weights_and_value(losses, extra)
    return weights, value, state

  return init, step


def learned_log_scales(state_type, *, num_tasks, learning_rate, init_value,
                       init_name: str, optimizer,
                       objective: Callable[[jax.Array, jax.Array, int],
                                           tuple[jax.Array, jax.Array,
                                                 jax.Array]]
                       ) -> tuple[Init, Step]:
  """``(init, step)`` of a method that learns per-task log-scales ``s``.

  Uncertainty weighting and IMTL-L keep ``s`` (``(T,)``, from
  ``init_value``) and its optimiser's state in ``state_type(s, opt_state)``
  (their first two fields) and descend their objective in ``s``, whose
  derivative needs only the losses: ``objective(losses, s, t)`` gives the
  step's weights (from the current ``s``), the objective's value and
  ``d/ds``. The optimiser is ``optimizer``, or ``optax.sgd(learning_rate)``.
  """
  expected = check_num_tasks(num_tasks)   # None when traced
  if expected is not None:
    per_task(init_value, expected, init_name)
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init(t):
    s = per_task(init_value, t, init_name)
    return state_type(s, opt.init(s))

  def step(losses, state, t, extra):
    del extra
    s = state[0]
    weights, value, grad_s = objective(losses, s, t)
    update, opt_state = opt.update(grad_s.astype(s.dtype), state[1], s)
    return weights, value, state_type(optax.apply_updates(s, update),
                                      opt_state)

  return init, step


def preference_vector(preference, t: int, default: float,
                      name: str = "preference") -> jax.Array:
  """A ``(T,)`` preference (``default`` everywhere if None), >= 0, not 0.

  Validated when concrete (ValueError naming ``name`` and the shape); a
  traced one (``optax.inject_hyperparams`` under ``jit``) passes.
  """
  if preference is None:
    return jnp.full((t,), default, jnp.float32)
  shape = jnp.shape(preference)
  if shape != (t,):
    raise ValueError(f"`{name}` must have the shape of `losses`, (T,) = "
                     f"({t},), got {shape}.")
  p = as_vector(preference, t, name)
  values = concrete(p)
  if values is not None:
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or not (
        values.sum() > 0):
      raise ValueError(f"`{name}` must be finite, >= 0 and not all 0, got "
                       f"{values.tolist()}.")
  return p


def _loss_vector(losses, num_tasks: int | None, method: str) -> jax.Array:
  """The losses as a float (f32 or wider) ``(T,)`` array, gradient kept."""
  losses = jnp.asarray(losses)
  if losses.ndim != 1 or (num_tasks is not None and
                          losses.shape != (num_tasks,)):
    expected = "(T,)" if num_tasks is None else f"(T,) = ({num_tasks},)"
    raise ValueError(f"{method}: `losses` must have shape {expected}, got "
                     f"{losses.shape}.")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    losses = losses.astype(jnp.float32)
  return losses.astype(jnp.promote_types(losses.dtype, jnp.float32))


def _keep_state(new_state, old_state, in_domain):
  """``new_state``, or all of ``old_state`` outside the domain.

  The whole state (counts, keys, the optimiser's state and the weights
  record included) stays as it was when the step's losses are outside the
  method's domain (``in_domain`` False: a non-finite loss, or one below the
  method's bound) or a new float leaf is not finite, so a bad batch never
  writes NaN into the state, and a run with such a step is the run without
  it. Leaves keep their dtypes (a stable state under ``jit`` and
  ``lax.scan``).
  """
  def numeric(x):
    dtype = jnp.asarray(x).dtype
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(
        dtype, jnp.integer) or dtype == jnp.bool_

  new_state = jax.tree.map(
      lambda n, o: cast_like(n, o) if numeric(o) else n, new_state,
      old_state)
  ok = jnp.asarray(True) if in_domain is None else in_domain
  for x in jax.tree.leaves(new_state):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      ok &= jnp.all(jnp.isfinite(x))
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o) if numeric(o) else n,
                      new_state, old_state)


def _init_state(init: Init, params, num_tasks, method: str):
  """``init``'s state, with zero ``(T,)`` weights when ``num_tasks`` is given.

  A stateless method's ``optax.EmptyState`` becomes a
  :class:`pcgrad_optax.GramState` holding only the weights (``gram`` None),
  as for the Gram-based methods built with ``num_tasks``.
  """
  if num_tasks is None:
    return init(None)
  t = init_num_tasks(check_num_tasks(num_tasks), method)
  state = init(t)
  weights, _ = init_record(params, t, False, method)
  if isinstance(state, optax.EmptyState):
    return GramState(weights)
  return state._replace(weights=weights)


def _recorded(state):
  """The state's ``(T,)`` weights record, or None if it keeps none."""
  return getattr(state, "weights", None)


def _record(new_state, old_state, weights, t: int, reduction: str):
  """``new_state`` holding this step's applied weights (if it records)."""
  old = _recorded(old_state)
  if old is None:
    return new_state
  new_weights, _ = record(weights, None, old, None, t, reduction)
  return new_state._replace(weights=new_weights)


def loss_transformation(init: Init, step: Step, *, method: str,
                        num_tasks: int | None, reduction: str,
                        shared: SharedMask, needs_losses: bool = True,
                        domain: Domain | None = finite) -> Aggregator:
  """The stacked-gradient transformation of a loss-level method.

  ``num_tasks`` may be None (the method has no per-task state: nothing is
  recorded), a Python int or an array, also a traced one
  (``optax.inject_hyperparams``): its value then lives in the state's
  shapes.
  """
  check_reduction(reduction)
  expected = None if num_tasks is None else check_num_tasks(num_tasks)

  def init_fn(params):
    return _init_state(init, params, num_tasks, method)

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       method)
    if _recorded(state) is not None:
      check_record(_recorded(state), t, method)
    # A method that needs no losses ignores any (optax.chain passes every
    # extra argument to every transformation).
    losses = check_losses(losses, t, method) if needs_losses else None
    in_domain = (None if losses is None or domain is None
                 else domain(losses, t, extra_args, method))
    weights, _, new_state = step(losses, state, t, extra_args)
    new_state = _record(new_state, state, weights, t, reduction)
    new_state = _keep_state(new_state, state, in_domain)
    return combine(leaves, treedef, mask, weights, reduction), new_state

  return Aggregator(init_fn, update_fn)


def scalarized(init: Init, step: Step, *, method: str,
               num_tasks: int | None, reduction: str,
               domain: Domain | None = finite) -> LossScalarization:
  """The one-backward-pass path (:class:`LossScalarization`) of a method.

  Hyperparameters (``num_tasks`` included) may be arrays, also traced ones,
  as for the transformation; ``init`` needs a concrete ``num_tasks``.
  """
  check_reduction(reduction)
  expected = None if num_tasks is None else check_num_tasks(num_tasks)

  def init_fn(params=None):
    return _init_state(init, params, num_tasks, method)

  def weights_fn(losses, state, **extra):
    losses = jax.lax.stop_gradient(_loss_vector(losses, expected, method))
    t = losses.shape[0]
    old = _recorded(state)
    if old is not None and old.shape[-1] != t:
      raise ValueError(f"{method}: `losses` must have shape (T,) = "
                       f"({old.shape[-1]},) to match the state, got "
                       f"{losses.shape}.")
    in_domain = None if domain is None else domain(losses, t, extra, method)
    weights, value, new_state = step(losses, state, t, extra)
    new_state = _record(new_state, state, weights.astype(losses.dtype), t,
                        reduction)
    scale = 1.0 / t if reduction == "mean" else 1.0
    weights = weights.astype(losses.dtype) * scale
    if value is None:
      value = jnp.sum(weights * losses)
    else:
      value = jnp.asarray(value, losses.dtype) * scale
    return weights, value, _keep_state(new_state, state, in_domain)

  def loss_fn(losses, state, **extra):
    live = _loss_vector(losses, num_tasks, method)
    fixed = jax.lax.stop_gradient(live)
    weights, value, new_state = weights_fn(fixed, state, **extra)
    # Value: the objective; gradient w.r.t. the losses: the weights.
    scalar = jax.lax.stop_gradient(value) + jnp.sum(
        jax.lax.stop_gradient(weights) * (live - fixed))
    return scalar, new_state

  def public_weights(losses, state, **extra):
    weights, _, new_state = weights_fn(losses, state, **extra)
    return weights, new_state

  return LossScalarization(init_fn, loss_fn, public_weights)
