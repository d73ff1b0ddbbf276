"""Stacked per-task gradients in one reverse-mode call."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core import cpu
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
  if nnx is not None:
    is_node = nnx.graphlib.is_graph_node
    has_node = [any(map(is_node, jax.tree.leaves(a, is_leaf=is_node)))
                for a in args]
    for a, filt in entries:
      if filt is not None and not has_node[a]:
        raise ValueError(
            f"{caller}: argnums has nnx.DiffState({a}, ...) but argument {a} "
            f"({type(args[a]).__name__}) holds no NNX graph node.")
    if any(has_node) or any(map(is_node, jax.tree.leaves(
        kwargs, is_leaf=is_node))):
      return _nnx_losses_and_vjp(nnx, loss_fn, entries, has_aux, args,
                                 kwargs, caller)
  return _plain_losses_and_vjp(loss_fn, tuple(a for a, _ in entries),
                               has_aux, args, kwargs, caller)


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


def _nnx_losses_and_vjp(nnx, loss_fn, entries, has_aux, args, kwargs,
                        caller):
  """``losses_and_vjp`` with NNX graph nodes among the arguments.

  Every graph node in the arguments (top level or inside containers) is
  split out, all together (shared Variables stay shared): the Variables the
  filters select in the differentiated arguments are the VJP's primals with
  the other leaves of those arguments, the rest is closed over. The forward
  pass returns the nodes' state after the call as VJP aux, so it is computed
  once, and it is written back with ``nnx.update``.
  """
  is_node = nnx.graphlib.is_graph_node
  filters = {}
  for a, filt in entries:
    if a in filters:
      raise ValueError(f"{caller}: argnum {a} is repeated in argnums.")
    filters[a] = nnx.Param if filt is None else filt
  argnums_t = tuple(filters)
  flat_args = [jax.tree.flatten(a, is_leaf=is_node) for a in args]
  flat_kwargs, kwargs_def = jax.tree.flatten(kwargs, is_leaf=is_node)
  nodes, owners, node_ids = [], [], []   # node_ids[i]: arg i's nodes' places
  for i, (leaves, _) in enumerate(flat_args):
    node_ids.append([])
    for leaf in filter(is_node, leaves):
      node_ids[i].append(len(nodes))
      nodes.append(leaf)
      owners.append(i)
  nodes += filter(is_node, flat_kwargs)
  owners += [None] * (len(nodes) - len(owners))       # keyword arguments
  nodes = tuple(nodes)
  nothing = lambda path, value: False
  predicates = [nnx.filterlib.to_predicate(filters[o]) if o in filters
                else nothing for o in owners]

  def differentiated(path, value):     # path[0]: the node's place in `nodes`
    return predicates[path[0]](path[1:], value)

  graphdef, diff_state, rest_state = nnx.split(nodes, differentiated, ...)
  plain_primals = tuple(
      [leaf for leaf in flat_args[a][0] if not is_node(leaf)]
      for a in argnums_t)

  def partial_fn(diff, *plain_values):
    merged = nnx.merge(graphdef, diff, rest_state, copy=True)
    inner = iter(merged)
    plain = dict(zip(argnums_t, map(iter, plain_values)))
    full = [treedef.unflatten([
        next(inner) if is_node(leaf) else next(plain[i]) if i in plain
        else leaf for leaf in leaves])
            for i, (leaves, treedef) in enumerate(flat_args)]
    full_kwargs = kwargs_def.unflatten([
        next(inner) if is_node(leaf) else leaf for leaf in flat_kwargs])
    out = loss_fn(*full, **full_kwargs)
    losses, aux = out if has_aux else (out, None)
    return losses, (aux, nnx.state(merged))

  losses, pullback, (aux, new_state) = jax.vjp(
      partial_fn, diff_state, *plain_primals, has_aux=True)
  check_task_losses(losses, caller)
  nnx.update(nodes, new_state)

  def node_grads(diff_ct, n):
    grads = diff_ct.raw_mapping.get(n, {})
    # A module's gradients are an nnx.State, a bare Variable's a Variable.
    return nnx.State(grads) if isinstance(grads, dict) else grads

  def vjp_fn(cotangent):
    diff_ct, *plain_cts = pullback(cotangent)
    out = []
    for a, plain_ct in zip(argnums_t, plain_cts):
      leaves, treedef = flat_args[a]
      ids, plain_ct = iter(node_ids[a]), iter(plain_ct)
      out.append(treedef.unflatten([
          node_grads(diff_ct, next(ids)) if is_node(leaf)
          else next(plain_ct) for leaf in leaves]))
    return tuple(out)

  return losses, vjp_fn, aux


def pull_back_tasks(vjp_fn: Callable[[jax.Array], Any],
                    basis: jax.Array) -> Any:
  """``vjp_fn(basis[t])`` for every task t, stacked on a leading axis.

  One pullback program for all T rows, whose size does not grow with T: a
  ``lax.map`` (a loop writing row t of each stacked leaf in place) where
  :func:`pcgrad_optax._core.cpu.loop_over_tasks` says so (XLA:CPU, where
  the ``vmap``-ed weight gradients of dense layers come out with the task
  axis inside and are transposed), else a ``jax.vmap``. Same numbers
  either way.
  """
  if cpu.loop_over_tasks(lambda: jax.make_jaxpr(vjp_fn)(basis[0]).jaxpr):
    return lax.map(vjp_fn, basis)
  return jax.vmap(vjp_fn)(basis)


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
  :math:`e_1, \dots, e_T` back through one shared VJP (a ``jax.vmap`` over
  the basis on GPU/TPU, a ``lax.map`` on CPU unless there are
  convolutions), giving the stacked Jacobian
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
  written back to the modules once, not once per task. Graph nodes inside
  containers (a dict or tuple of modules) are handled the same way, and a
  differentiated container's gradients mirror it, with an ``nnx.State`` in
  place of each module.

  Args:
    loss_fn: function returning a ``(T,)`` array (or ``((T,), aux)`` with
      ``has_aux``).
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``; for an NNX module also an ``nnx.DiffState``, as in
      ``nnx.grad``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batched: ``True`` (default): one pullback program for all T tasks, so
      the traced program and its compile time do not grow with T: a
      ``jax.vmap``-ed VJP on GPU/TPU; on XLA:CPU a ``lax.map`` over the
      tasks (a loop), because XLA:CPU transposes the ``vmap``-ed weight
      gradients of dense layers into the stacked layout at a cost above
      the matmuls' (``benchmarks/results/step_profile.md``), except for a
      loss with convolutions, which keeps the ``vmap`` (XLA:CPU runs a
      convolution's kernel gradient inside a loop tens of times slower).
      ``False``: T separate calls of the same VJP (one forward pass
      still), stacked; the program grows linearly with T. Same numbers
      every way. ``False`` is for a few tasks through convolutions on
      XLA:CPU, where it can beat the ``vmap`` (the small CNN of
      ``benchmarks/results/e2e.md``); on GPU/TPU keep the default.

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
      grads = pull_back_tasks(vjp_fn, basis)
    else:
      rows = [vjp_fn(basis[t]) for t in range(losses.shape[0])]
      grads = jax.tree.map(lambda *r: jnp.stack(r), *rows)
    grads = grads[0] if single else grads
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return wrapped
