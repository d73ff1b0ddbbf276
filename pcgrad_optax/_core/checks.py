"""Argument checks shared by the weightings and the transformations.

Each raises a ``ValueError`` that names the argument and says what was
expected, when a factory or weighting is called (or traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x) -> float | jax.Array:
  """A Python float if ``x`` is concrete (validated by callers), else x."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return x


def check_task_vector(x, t: int, name: str, dtype) -> jax.Array:
  """``x`` as a ``(T,)`` array of ``dtype``; ValueError on another shape."""
  x = jnp.asarray(x)
  if x.shape != (t,):
    raise ValueError(f"`{name}` must have shape (T,) = ({t},), got {x.shape}.")
  return x.astype(dtype)


def as_vector(x, num_tasks: int | None, name: str,
              dtype=jnp.float32) -> jax.Array:
  """A float vector of task quantities, validated at trace time."""
  x = jnp.asarray(x)
  if x.ndim != 1 or (num_tasks is not None and x.shape[0] != num_tasks):
    expected = "(T,)" if num_tasks is None else f"(T,) = ({num_tasks},)"
    raise ValueError(f"`{name}` must have shape {expected}, got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(dtype)
  return x.astype(jnp.promote_types(x.dtype, dtype))


def check_choice(value, choices, what: str) -> None:
  """ValueError unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; expected one of {choices}.")


def check_nonnegative(value, what: str) -> None:
  """ValueError unless ``value`` is a finite Python number ``>= 0``."""
  if not (isinstance(value, (int, float)) and value >= 0
          and value != float("inf")):
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")


def per_task(value, num_tasks: int, name: str) -> jax.Array:
  """A scalar or ``(T,)`` hyperparameter as a float32 ``(T,)`` array."""
  x = jnp.asarray(value, jnp.float32)
  if x.ndim > 1 or (x.ndim == 1 and x.shape != (num_tasks,)):
    raise ValueError(f"`{name}` must be a scalar or shape (T,) = "
                     f"({num_tasks},), got {x.shape}.")
  return jnp.broadcast_to(x, (num_tasks,))


def check_num_tasks(num_tasks) -> None:
  """ValueError unless ``num_tasks`` is a positive Python int."""
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or \
      num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")


def check_losses(losses, t: int, method: str, arg: str = "losses"
                 ) -> jax.Array:
  """The task losses as a float32 (or wider) ``(T,)`` array; raises early."""
  if losses is None:
    raise ValueError(
        f"{method} needs the per-task losses: call "
        f"tx.update(grads, state, params, losses=losses) with losses of shape "
        f"(T,) = ({t},).")
  losses = jnp.asarray(losses)
  if losses.shape != (t,):
    raise ValueError(
        f"{method}: `{arg}` must have shape (T,) = ({t},) to match the "
        f"stacked gradients, got {losses.shape}.")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    losses = losses.astype(jnp.float32)
  losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
  return jax.lax.stop_gradient(losses)



def losses_in_domain(losses: jax.Array, lower, *, strict: bool, method: str,
                     arg: str = "losses", bound: str = "0") -> jax.Array:
  """Which losses are finite and above ``lower``: a ``(T,)`` bool array.

  Concrete losses outside the domain raise a ``ValueError`` that names the
  method, the argument and the offending tasks; traced ones (under ``jit``)
  give the flags, with which the method keeps its state for the step.
  ``bound`` is how the message names ``lower``.
  """
  lower = jnp.asarray(lower, losses.dtype)
  above = losses > lower if strict else losses >= lower
  ok = jnp.isfinite(losses) & above
  if not isinstance(ok, jax.core.Tracer):
    bad = np.flatnonzero(~np.asarray(ok))
    if bad.size:
      values = np.asarray(losses)[bad].tolist()
      limits = np.broadcast_to(np.asarray(lower), losses.shape)[bad].tolist()
      raise ValueError(
          f"{method}: `{arg}` must be finite and {'>' if strict else '>='} "
          f"{bound}; task(s) {bad.tolist()} have {values} ({bound}: "
          f"{limits}).")
  return ok
