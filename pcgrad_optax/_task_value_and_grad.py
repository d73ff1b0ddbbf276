"""Stacked per-task gradients in one reverse-mode call."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pcgrad_optax._core.mesh import vary_like


def single_argnum(argnums) -> bool:
  """Whether ``argnums`` is one argnum (an int or an ``nnx.DiffState``)."""
  return isinstance(argnums, int) or _is_diff_state(argnums)


def _is_diff_state(x) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.DiffState)


def _argnum_entries(argnums, caller: str) -> list[tuple[int, Any]]:
  """``[(argnum, nnx filter or None)]``, in the order given."""
  entries = (argnums,) if single_argnum(argnums) else tuple(argnums)
  out = []
  for entry in entries:
    if _is_diff_state(entry):
      out.append((entry.argnum, entry.filter))
    else:
      try:
        out.append((operator.index(entry), None))
      except TypeError:
        raise ValueError(f"{caller}: argnums must be ints or nnx.DiffState, "
                         f"got {entry!r}.") from None
  return out


def losses_and_vjp(loss_fn: Callable[..., Any],
                   argnums: int | Any | Sequence[int | Any], has_aux: bool,
                   args: tuple, kwargs: dict, caller: str):
  """Evaluates ``loss_fn(*args, **kwargs)`` once, with its VJP.

  Flax NNX graph nodes (an ``nnx.Module``, ``nnx.Rngs``, ...) among the
  arguments are handled as ``nnx.value_and_grad`` does: a differentiated one
  is split into the Variables its filter selects (``nnx.Param`` by default,
  or the filter of an ``nnx.DiffState(argnum, filter)`` in ``argnums``), the
  primals of the VJP, and the rest of its state; every state change of the
  single forward pass (batch statistics, RNG counts, any ``nnx.Variable``,
  of every graph-node argument) is written back to the nodes once.

  Returns:
    ``(losses, vjp_fn, aux)``: the validated ``(T,)`` floating losses, the VJP
    w.r.t. the ``argnums`` arguments (a tuple of cotangents, one per argnum;
    an ``nnx.State`` of the filtered Variables for a graph node) and the aux
    output (None without ``has_aux``).
  """
  entries = _argnum_entries(argnums, caller)
  for a, _ in entries:
    if a >= len(args):
      raise ValueError(
          f"{caller}: argnums={argnums} but only {len(args)} positional "
          "arguments were given.")
  nnx = sys.modules.get("flax.nnx")
  is_node = (lambda x: False) if nnx is None else nnx.graphlib.is_graph_node
  node_args = [i for i, a in enumerate(args) if is_node(a)]
  node_kwargs = [k for k, v in kwargs.items() if is_node(v)]
  for a, filt in entries:
    if filt is not None and a not in node_args:
      raise ValueError(
          f"{caller}: argnums has nnx.DiffState({a}, ...) but argument {a} "
          f"is a {type(args[a]).__name__}, not an NNX graph node.")
  if not node_args and not node_kwargs:
    return _plain_losses_and_vjp(loss_fn, tuple(a for a, _ in entries),
                                 has_aux, args, kwargs, caller)
  filters = {}
  for a, filt in entries:
    if a in filters and a in node_args:
      raise ValueError(f"{caller}: argnum {a} (an NNX graph node) is "
                       "repeated in argnums.")
    filters[a] = filt
  return _nnx_losses_and_vjp(nnx, loss_fn, [a for a, _ in entries], filters,
                             node_args, node_kwargs, has_aux, args, kwargs,
                             caller)


def _plain_losses_and_vjp(loss_fn, argnums_t, has_aux, args, kwargs, caller):
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


def _nnx_losses_and_vjp(nnx, loss_fn, argnums_t, filters, node_args,
                        node_kwargs, has_aux, args, kwargs, caller):
  """``losses_and_vjp`` with NNX graph nodes among the arguments.

  All graph nodes are split together (shared Variables stay shared); the
  differentiated Variables are the VJP's primals, the rest is closed over.
  The forward pass returns the nodes' state after the call as VJP aux, so
  it is computed once, and is written back with ``nnx.update``.
  """
  nodes = tuple(args[i] for i in node_args) + tuple(
      kwargs[k] for k in node_kwargs)
  position = {a: n for n, a in enumerate(node_args)}

  def predicate(a):
    if a not in filters:                 # a graph node not differentiated
      return lambda path, value: False
    return nnx.filterlib.to_predicate(
        nnx.Param if filters[a] is None else filters[a])

  predicates = [predicate(a) for a in node_args + [None] * len(node_kwargs)]

  def differentiated(path, value):     # path[0]: the node's place in `nodes`
    return predicates[path[0]](path[1:], value)

  graphdef, diff_state, rest_state = nnx.split(nodes, differentiated, ...)
  plain = tuple(a for a in argnums_t if a not in position)

  def partial_fn(diff, *plain_values):
    inner = nnx.merge(graphdef, diff, rest_state, copy=True)
    full, full_kwargs = list(args), dict(kwargs)
    for i, node in zip(node_args, inner):
      full[i] = node
    for k, node in zip(node_kwargs, inner[len(node_args):]):
      full_kwargs[k] = node
    for a, v in zip(plain, plain_values):
      full[a] = v
    out = loss_fn(*full, **full_kwargs)
    losses, aux = out if has_aux else (out, None)
    return losses, (aux, nnx.state(inner))

  losses, pullback, (aux, new_state) = jax.vjp(
      partial_fn, diff_state, *(args[a] for a in plain), has_aux=True)
  check_task_losses(losses, caller)
  nnx.update(nodes, new_state)

  def node_grads(diff_ct, n):
    grads = diff_ct.raw_mapping.get(n, {})
    # A module's gradients are an nnx.State, a bare Variable's a Variable.
    return nnx.State(grads) if isinstance(grads, dict) else grads

  def vjp_fn(cotangent):
    diff_ct, *plain_ct = pullback(cotangent)
    plain_ct = iter(plain_ct)
    return tuple(node_grads(diff_ct, position[a]) if a in position
                 else next(plain_ct) for a in argnums_t)

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
                        argnums: int | Any | Sequence[int | Any] = 0,
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

  Flax NNX: on an ``nnx.Module`` (any NNX graph node) it behaves like
  ``nnx.value_and_grad``. The gradients are an ``nnx.State`` of the
  ``nnx.Param`` Variables (or of the filter of an
  ``nnx.DiffState(argnum, filter)`` given in ``argnums``), each leaf with the
  task axis, ready for ``nnx.Optimizer(model, optax.chain(pcgrad(), ...),
  wrt=nnx.Param).update(model, grads)``. The forward pass runs once, so every
  other state change it makes (``BatchStat``, RNG counts, any
  ``nnx.Variable``, of every graph-node argument, positional or keyword) is
  written back to the modules once, not once per task. Graph nodes nested
  inside other containers are treated as plain pytrees (their state changes
  are not written back).

  Args:
    loss_fn: function returning a ``(T,)`` array (or ``((T,), aux)`` with
      ``has_aux``).
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``; for an NNX module also an ``nnx.DiffState``, as in
      ``nnx.grad``.
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
  single = single_argnum(argnums)

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
