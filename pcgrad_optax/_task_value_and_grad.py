"""Stacked per-task gradients in one reverse-mode call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pcgrad_optax._core.mesh import vary_like


def losses_and_vjp(loss_fn: Callable[..., Any],
                   argnums: int | Sequence[int], has_aux: bool,
                   args: tuple, kwargs: dict, caller: str):
  """Evaluates ``loss_fn(*args, **kwargs)`` once, with its VJP.

  Returns:
    ``(losses, vjp_fn, aux)``: the validated ``(T,)`` floating losses, the VJP
    w.r.t. the ``argnums`` arguments (a tuple of cotangents, one per argnum)
    and the aux output (None without ``has_aux``).
  """
  argnums_t = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for a in argnums_t:
    if a >= len(args):
      raise ValueError(
          f"{caller}: argnums={argnums} but only {len(args)} positional "
          "arguments were given.")
  primals = tuple(args[a] for a in argnums_t)

  def partial_fn(*diff_args):
    full = list(args)
    for a, v in zip(argnums_t, diff_args):
      full[a] = v
    return loss_fn(*full, **kwargs)

  aux = None
  if has_aux:
    losses, vjp_fn, aux = jax.vjp(partial_fn, *primals, has_aux=True)
  else:
    losses, vjp_fn = jax.vjp(partial_fn, *primals)
  check_task_losses(losses, caller)
  return losses, vjp_fn, aux


def check_task_losses(losses, caller: str) -> None:
  """ValueError unless ``losses`` is a floating ``(T,)`` vector."""
  if jnp.ndim(losses) != 1:
    raise ValueError(
        f"{caller}: loss_fn must return a (T,) vector of task losses, got "
        f"shape {jnp.shape(losses)}.")
  if not jnp.issubdtype(jnp.result_type(losses), jnp.inexact):
    raise ValueError(
        f"{caller}: the task losses must be floating point, got "
        f"{jnp.result_type(losses)}.")


def task_value_and_grad(loss_fn: Callable[..., Any], *,
                        argnums: int | Sequence[int] = 0,
                        has_aux: bool = False,
                        batched: bool = True) -> Callable[..., Any]:
  r"""Like ``jax.value_and_grad`` for a vector of task losses.

  ``loss_fn`` returns a ``(T,)`` vector :math:`L(\theta)` of task losses. The
  returned function evaluates it once and pulls the ``T`` cotangents
  :math:`e_1, \dots, e_T` back through one shared VJP (``jax.vmap`` over the
  basis), giving the stacked Jacobian
  :math:`\partial L_t / \partial \theta` as a pytree whose leaves have a
  leading task axis of size ``T``: exactly what :func:`pcgrad_optax.pcgrad`
  and the other aggregators take.

  Memory: the stacked gradients hold ``T`` times the differentiated params.

  Args:
    loss_fn: function returning a ``(T,)`` array (or ``((T,), aux)`` with
      ``has_aux``).
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batched: ``True`` (default): one ``jax.vmap``-ed VJP, so the traced
      program and its compile time do not grow with T. ``False``: T separate
      calls of the same VJP (one forward pass still), stacked; the program
      grows linearly with T. Same numbers either way. ``False`` is for a few
      tasks on XLA:CPU, where a batched pullback through convolutions and
      pooling can be slower than separate ones (1.04-1.13x on the small CNN
      of ``benchmarks/results/e2e.md``); on GPU/TPU keep the default.

  Returns:
    A function with ``loss_fn``'s signature returning ``(losses, grads)`` or
    ``((losses, aux), grads)``; ``grads`` mirrors the differentiated
    argument(s) with a leading task axis on every leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> f = lambda w: jnp.stack([jnp.sum(w ** 2), jnp.sum(w)])
    >>> losses, grads = pcgrad_optax.task_value_and_grad(f)(jnp.array([1., 2.]))
    >>> grads
    Array([[2., 4.],
           [1., 1.]], dtype=float32)
  """
  single = isinstance(argnums, int)

  def wrapped(*args, **kwargs):
    losses, vjp_fn, aux = losses_and_vjp(
        loss_fn, argnums, has_aux, args, kwargs, "task_value_and_grad")
    basis = vary_like(jnp.eye(losses.shape[0], dtype=losses.dtype), losses)
    if batched:
      grads = jax.vmap(vjp_fn)(basis)
    else:
      rows = [vjp_fn(basis[t]) for t in range(losses.shape[0])]
      grads = jax.tree.map(lambda *r: jnp.stack(r), *rows)
    grads = grads[0] if single else grads
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return wrapped
