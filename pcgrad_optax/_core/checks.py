"""Argument checks shared by the weightings and the transformations.

Each raises a ``ValueError`` that names the argument and says what was
expected, when a factory or weighting is called (or traced).
"""

from __future__ import annotations

import math

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


def concrete(x) -> np.ndarray | None:
  """``x`` as a NumPy array when its value is known, None when traced.

  Hyperparameters may be Python numbers, arrays, or tracers (under
  ``optax.inject_hyperparams`` and ``jax.jit``): only the first two can be
  validated, and nothing may branch in Python on the third.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def check_scalar(value, what: str, ok, expected: str) -> None:
  """ValueError unless a concrete ``value`` is a real scalar with ``ok(v)``.

  A traced ``value`` passes (it cannot be inspected); its validation is the
  caller's concrete value.
  """
  v = concrete(value)
  if v is None:
    return
  # jnp.issubdtype: NumPy does not count bfloat16 as a number.
  if (v.ndim != 0 or v.dtype == bool or not jnp.issubdtype(v.dtype, jnp.number)
      or jnp.issubdtype(v.dtype, jnp.complexfloating) or not ok(float(v))):
    shown = value if isinstance(value, (int, float)) else v.tolist()
    raise ValueError(f"{what} must be {expected}, got {shown!r}.")


def check_choice(value, choices, what: str) -> None:
  """ValueError unless ``value`` is one of ``choices`` (a traced one passes)."""
  if hasattr(value, "dtype") or isinstance(value, jax.core.Tracer):
    v = concrete(value)
    if v is None:
      return
    value = v.item() if v.ndim == 0 else v.tolist()
  if isinstance(value, list) or value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; expected one of {choices}.")


def check_nonnegative(value, what: str) -> None:
  """ValueError unless a concrete ``value`` is a finite number ``>= 0``."""
  check_scalar(value, what, lambda v: v >= 0 and math.isfinite(v),
               "a finite number >= 0")


def static_int(value, what: str, minimum: int = 1) -> int | None:
  """A structural integer (num_tasks, a period) as an int; None if traced.

  ``optax.inject_hyperparams`` turns every numeric argument into an array,
  and under ``jax.jit`` into a tracer; a concrete one is validated and
  converted, a traced one is None (its value lives in the state's shapes).
  """
  v = concrete(value)
  if v is None:
    return None
  if (v.ndim != 0 or v.dtype == bool
      or not jnp.issubdtype(v.dtype, jnp.integer) or int(v) < minimum):
    shown = value if isinstance(value, (int, float)) else v.tolist()
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{what} must be {kind}, got {shown!r}.")
  return int(v)


def per_task(value, num_tasks: int, name: str) -> jax.Array:
  """A scalar or ``(T,)`` hyperparameter as a float32 ``(T,)`` array."""
  x = jnp.asarray(value, jnp.float32)
  if x.ndim > 1 or (x.ndim == 1 and x.shape != (num_tasks,)):
    raise ValueError(f"`{name}` must be a scalar or shape (T,) = "
                     f"({num_tasks},), got {x.shape}.")
  return jnp.broadcast_to(x, (num_tasks,))


def check_num_tasks(num_tasks) -> int | None:
  """``num_tasks`` as a positive int (ValueError otherwise); None if traced."""
  return static_int(num_tasks, "num_tasks")


def init_num_tasks(num_tasks: int | None, method: str) -> int:
  """The T that ``init`` allocates per-task state for; it must be concrete."""
  if num_tasks is None:
    raise ValueError(
        f"{method}: num_tasks is traced when init runs, but init allocates "
        "per-task state of shape (T,). With optax.inject_hyperparams under "
        "jax.jit, pass static_args='num_tasks' (or call init outside jit).")
  return num_tasks


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
