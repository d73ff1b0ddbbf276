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

Both keep the float leaves of the state unchanged on a step with a
non-finite loss (or a non-finite new state), so a bad batch never writes NaN
into the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import as_vector, check_losses
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import cast_like

# (losses, state, num_tasks, extra) -> (weights, value or None, new_state)
Step = Callable[[jax.Array | None, Any, int, dict],
                tuple[jax.Array, jax.Array | None, Any]]


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


def is_concrete(x) -> bool:
  """Whether ``x`` has values now (not a tracer inside jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def check_loss_domain(losses, method: str, *, positive: bool = False,
                      nonnegative: bool = False) -> None:
  """ValueError on concrete losses outside the method's domain.

  Traced losses are not checked (their values are unknown); the methods
  then give a non-finite update for them and keep their state.
  """
  if not is_concrete(losses):
    return
  values = np.asarray(losses, np.float64)
  bad = ~np.isfinite(values)
  what = "finite"
  if positive:
    bad |= values <= 0
    what = "finite and > 0"
  elif nonnegative:
    bad |= values < 0
    what = "finite and >= 0"
  if bad.any():
    raise ValueError(
        f"{method}: every loss must be {what}; `losses` (shape "
        f"{values.shape}) has {values[bad].tolist()} at task(s) "
        f"{np.flatnonzero(bad).tolist()}.")


def check_number(value, name: str, *, strict: bool = True) -> None:
  """ValueError on a concrete hyperparameter ``<= 0`` (``< 0``); traced: ok."""
  if not is_concrete(value):
    return
  x = np.asarray(value, np.float64)
  if x.ndim or not np.isfinite(x) or (x <= 0 if strict else x < 0):
    sign = "> 0" if strict else ">= 0"
    raise ValueError(f"`{name}` must be a finite number {sign}, got "
                     f"{value!r}.")


def preference_vector(preference, t: int, default: float,
                      name: str = "preference") -> jax.Array:
  """A ``(T,)`` preference (``default`` everywhere if None), >= 0, not 0.

  Validated when concrete (ValueError naming ``name`` and the shape).
  """
  if preference is None:
    return jnp.full((t,), default, jnp.float32)
  shape = jnp.shape(preference)
  if shape != (t,):
    raise ValueError(f"`{name}` must have the shape of `losses`, (T,) = "
                     f"({t},), got {shape}.")
  p = as_vector(preference, t, name)
  if is_concrete(p):
    values = np.asarray(p, np.float64)
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


def _keep_finite(new_state, old_state, losses):
  """``new_state`` unless a loss or a new float leaf is non-finite."""
  def numeric(x):
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) or \
        jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)

  # Same dtypes as before (a stable state under jit and lax.scan); keys and
  # other leaves are left as they are.
  new_state = jax.tree.map(
      lambda n, o: cast_like(n, o) if numeric(o) else n, new_state,
      old_state)
  floats = [x for x in jax.tree.leaves(new_state)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  if not floats and losses is None:
    return new_state
  ok = jnp.asarray(True)
  if losses is not None:
    ok = jnp.all(jnp.isfinite(losses))
  for x in floats:
    ok &= jnp.all(jnp.isfinite(x))

  def pick(n, o):
    if jnp.issubdtype(jnp.asarray(n).dtype, jnp.floating):
      return jnp.where(ok, n, o)
    return n

  return jax.tree.map(pick, new_state, old_state)


def loss_transformation(init: Callable[[], Any], step: Step, *, method: str,
                        num_tasks: int | None, reduction: str,
                        shared: SharedMask, needs_losses: bool = True
                        ) -> optax.GradientTransformationExtraArgs:
  """The stacked-gradient transformation of a loss-level method."""
  check_reduction(reduction)

  def init_fn(params):
    del params
    return init()

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    leaves, treedef, mask, t = resolve(updates, params, shared, num_tasks,
                                       method)
    # A method that needs no losses ignores any (optax.chain passes every
    # extra argument to every transformation).
    losses = check_losses(losses, t, method) if needs_losses else None
    weights, _, new_state = step(losses, state, t, extra_args)
    new_state = _keep_finite(new_state, state, losses)
    return combine(leaves, treedef, mask, weights, reduction), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scalarized(init: Callable[[], Any], step: Step, *, method: str,
               num_tasks: int | None, reduction: str) -> LossScalarization:
  """The one-backward-pass path (:class:`LossScalarization`) of a method."""
  check_reduction(reduction)

  def init_fn(params=None):
    del params
    return init()

  def weights_fn(losses, state, **extra):
    losses = jax.lax.stop_gradient(_loss_vector(losses, num_tasks, method))
    t = losses.shape[0]
    weights, value, new_state = step(losses, state, t, extra)
    scale = 1.0 / t if reduction == "mean" else 1.0
    weights = weights.astype(losses.dtype) * scale
    if value is None:
      value = jnp.sum(weights * losses)
    else:
      value = jnp.asarray(value, losses.dtype) * scale
    return weights, value, _keep_finite(new_state, state, losses)

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
