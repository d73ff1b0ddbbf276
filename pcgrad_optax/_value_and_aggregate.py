"""One training step's aggregated update: task losses in, one update out."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core import taps
from pcgrad_optax._core.gram import leaf_gram, masked_gram
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.aggregate import combine_leaves
from pcgrad_optax._core.mesh import vary_like
from pcgrad_optax._core.stacked import (NotGramBased, check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._apply_if_finite import ApplyIfFiniteState
from pcgrad_optax._core.transform import (GramProbe, GramResult, GramStep,
                                          check_weights, gram_step_of)
from pcgrad_optax._core.weighted_sum import leaf_weighted_sum
from pcgrad_optax._task_value_and_grad import (check_task_losses,
                                               losses_and_vjp,
                                               pull_back_tasks)

ENGINES = ("auto", "stacked", "gram")

# engine="auto" takes the Gram engine when at least this fraction of the
# shared parameters (by element count) sit in dense (dot_general) leaves.
AUTO_DENSE_FRACTION = 0.5


def value_and_aggregate(loss_fn: Callable[..., Any], aggregator, *,
                        engine: str = "auto", shared: SharedMask = None,
                        argnums: int | Sequence[int] = 0,
                        has_aux: bool = False) -> Callable[..., Any]:
  r"""The task losses and the aggregated update of one step, in one call.

  ``step = value_and_aggregate(loss_fn, aggregator)`` gives
  ``losses, update, state = step(params, state, *batch)`` with
  ``state = aggregator.init(params)``; ``update`` has the params' structure
  and goes to any optax optimizer (``optimizer.update(update, opt_state,
  params)``), and ``state`` is the aggregator's, stepped exactly as
  ``aggregator.update`` steps it (PCGrad's key and count included).

  Engines:

  * ``"stacked"``: the per-task gradients of every leaf, ``(T,) +
    param.shape``, from one forward pass and a ``vmap`` of its VJP (as
    :func:`pcgrad_optax.task_value_and_grad`), then the aggregator. Works
    with every transformation of the package (the loss-based ones get
    ``losses=``).
  * ``"gram"``: never holds the ``T x P`` stacked gradients. The loss's
    jaxpr is traced once; every shared leaf that enters it exactly once, as
    an operand of a ``dot_general`` (Dense, Einsum, attention projections,
    through ``jit`` calls and layout-only casts, transposes, reshapes), gets
    a zero "tap" added to that ``dot_general``'s output ``Y = X W``. One
    forward pass and the T pullbacks of its VJP w.r.t. the taps (a loop
    on CPU unless the model has a convolution, a ``vmap`` elsewhere, as in
    :func:`pcgrad_optax.task_value_and_grad`) give the per-task output
    cotangents :math:`D_t = \partial L_t / \partial Y`, and the leaf's
    block of the Gram matrix is

    .. math::
      \langle g_s, g_t \rangle = \langle X^T D_s, X^T D_t \rangle
        = \sum_{n,m} (X X^T)_{nm} (D_s D_t^T)_{nm}

    (summed over the ``dot_general``'s batch axes; when ``N^2 > T C F``,
    with ``N`` the rows of ``X``, the leaf's ``T`` gradients are formed and
    contracted at once instead, which is cheaper there). Every other leaf
    (convolution kernels, embeddings, norm scales, biases, a weight used in
    two places) falls back to its own per-task gradient, whose Gram block
    is one contraction. The aggregator's weighting then gives ``w`` from the
    Gram matrix and the update is the gradient of :math:`\sum_t w_t L_t`:
    :math:`X^T (\sum_t w_t D_t)` for a dense leaf, from the same
    cotangents, when every shared leaf is dense; with shared fallback
    leaves, one more pullback (of :math:`\sum_t w_t L_t`, through the VJP
    already built) gives the shared leaves' updates, so each fallback
    leaf's ``(T,) + shape`` gradients are discarded after its Gram block
    (and the dense cotangents after theirs) instead of being held for the
    weighted sum; heads get the plain sum of their task gradients. Needs
    a Gram-based aggregator (every method whose weights are a function of
    the Gram matrix: ``pcgrad``, ``mgda``, ``upgrad``, ``cagrad``,
    ``cr_mogm``, ``constant``, ...); ``ValueError`` otherwise.
  * ``"auto"``: ``"gram"`` when the aggregator is Gram-based and at least
    half of the shared parameters (by element count) are dense leaves,
    else ``"stacked"``.

  Both engines give the same update (up to float rounding: the Gram
  matrix is summed in another order) and the same state: the method's own
  ``(gram, state) -> (weights, new_state)`` step runs on either Gram matrix,
  so PCGrad's key and count and the ``weights`` (and, with ``keep_gram``,
  ``gram``) recorded with ``num_tasks=`` are updated as ``aggregator.update``
  updates them.

  Both engines run under ``jit`` over a device mesh (sharded params and
  batch; explicit axes with or without ``jax.set_mesh``, or auto axes) and
  give the single-device result; on explicit axes the update has the
  params' shardings (a model on explicit axes must name the shardings its
  own ops cannot infer, as without this function).

  The Gram-based method is reached through ``aggregator.update`` itself
  (see :class:`pcgrad_optax._core.transform.GramProbe`), so
  ``optax.inject_hyperparams(pcgrad_optax.upgrad)(...)`` works on both
  engines, with the step's injected (or scheduled) hyperparameters and its
  ``InjectHyperparamsState``, and so does
  ``pcgrad_optax.apply_if_finite(pcgrad_optax.pcgrad(), k)``: a step whose
  losses or update are not finite is skipped (zero update, the method's
  state kept) as on the stacked gradients. Only these two wrappers are
  probed, by their state types; a transformation of the package that is
  not Gram-based answers the probe with ``NotGramBased``, and any other
  error propagates. Other wrappers (an ``optax.chain`` with the optimizer
  inside) hide the method: ``"auto"`` then takes the stacked engine and
  ``"gram"`` raises; chain the optimizer after this step instead.

  Flax NNX: ``params`` may be an ``nnx.Module``, as with
  ``nnx.value_and_grad``: ``update`` is then an ``nnx.State`` of its
  ``nnx.Param`` Variables (another filter: ``argnums=nnx.DiffState(0,
  filter)``), ready for ``nnx.Optimizer.update(model, update)``, ``state =
  aggregator.init(nnx.state(model, nnx.Param))``, and every other state
  change of the single forward pass (BatchNorm statistics, Dropout's RNG
  counts) is written back to the module once, except on a step that an
  ``apply_if_finite`` aggregator skips: the module keeps that state as it
  was (a NaN batch never enters the running statistics). Call it under
  ``nnx.jit``.
  An ``nnx.State`` from ``nnx.split`` with ``nnx.merge`` in the loss works
  too.

  Args:
    loss_fn: ``loss_fn(params, *batch)`` returning the ``(T,)`` task losses
      (``((T,), aux)`` with ``has_aux``). Plain functions of param pytrees,
      Flax Linen (``model.apply(params, x)``) and Flax NNX
      (``loss_fn(model, *batch)`` on an ``nnx.Module``, or
      ``nnx.merge(graphdef, params)(x)`` with ``params`` an ``nnx.State``)
      all work.
    aggregator: a transformation of the package (``pcgrad_optax.pcgrad()``,
      ``pcgrad_optax.upgrad()``, ...), possibly wrapped in
      ``optax.inject_hyperparams``.
    engine: ``"auto"``, ``"stacked"`` or ``"gram"`` (see above).
    shared: which leaves are shared parameters, as the transformations'
      ``shared=`` (a pytree of bools, a prefix, a callable, key paths for an
      ``nnx.State``); the others (task heads) get the plain sum (or mean,
      with the aggregator's ``reduction="mean"``) of their task gradients.
      Give it here or to the aggregator, not both; for an aggregator that
      is not Gram-based, give it to the aggregator.
    argnums: which positional argument(s) of ``loss_fn`` to differentiate
      (``params`` is argument 0); ``update`` mirrors them. For an NNX
      module one argnum, or an ``nnx.DiffState(argnum, filter)``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    ``step(params, state, *batch) -> (losses, update, new_state)``, with
    ``(losses, aux)`` in place of ``losses`` under ``has_aux``. Jit it with
    the optimizer for a whole training step.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> def task_losses(p, x, y):   # a shared trunk, one linear head per task
    ...   h = jnp.tanh(x @ p["trunk"])
    ...   return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)
    >>> params = {"trunk": jnp.full((4, 8), 0.1), "heads": jnp.ones((8, 2))}
    >>> agg = pcgrad_optax.pcgrad()
    >>> step = pcgrad_optax.value_and_aggregate(
    ...     task_losses, agg, engine="gram",
    ...     shared={"trunk": True, "heads": False})
    >>> opt = optax.adam(1e-2)
    >>> state, opt_state = agg.init(params), opt.init(params)
    >>> @jax.jit
    ... def train_step(params, state, opt_state, x, y):
    ...   losses, update, state = step(params, state, x, y)
    ...   updates, opt_state = opt.update(update, opt_state, params)
    ...   return optax.apply_updates(params, updates), state, opt_state, losses
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> params, state, opt_state, losses = train_step(
    ...     params, state, opt_state, x, y)
    >>> losses.shape, int(state.count)
    ((2,), 1)
  """
  if engine not in ENGINES:
    raise ValueError(
        f"value_and_aggregate: engine must be one of {ENGINES}, got "
        f"{engine!r}.")
  if not (callable(getattr(aggregator, "init", None))
          and callable(getattr(aggregator, "update", None))):
    raise ValueError(
        "value_and_aggregate: aggregator must be an optax transformation "
        f"with init and update (e.g. pcgrad_optax.pcgrad()), got "
        f"{type(aggregator).__name__}.")
  hook = gram_step_of(aggregator)
  if hook is not None:
    _check_shared(hook, shared)
  nnx_argnums = argnums
  if _is_diff_state(argnums):
    argnums = argnums.argnum
  single = isinstance(argnums, int)
  argnums_t = (argnums,) if single else tuple(argnums)

  def step(params, state, *batch):
    args = (params,) + tuple(batch)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and any(map(_holds_graph_node, args)):
      return _nnx_step(nnx, loss_fn, aggregator, engine, shared, nnx_argnums,
                       has_aux, args, state)
    for a in argnums_t:
      if not isinstance(a, int) or not 0 <= a < len(args):
        raise ValueError(
            f"value_and_aggregate: argnums={argnums} but loss_fn gets "
            f"{len(args)} positional arguments (params and the batch).")
    primals = args[argnums] if single else tuple(args[a] for a in argnums_t)
    leaves, treedef = jax.tree.flatten(primals)
    for path, leaf in jax.tree_util.tree_flatten_with_path(primals)[0]:
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        raise ValueError(
            "value_and_aggregate: every differentiated leaf must be floating "
            f"point; leaf '{jax.tree_util.keystr(path)}' is "
            f"{jnp.result_type(leaf)}.")

    def partial_fn(flat):
      full = list(args)
      diff = jax.tree.unflatten(treedef, flat)
      for a, v in zip(argnums_t, (diff,) if single else diff):
        full[a] = v
      return loss_fn(*full)

    found = hook if hook is not None else _query_hook(aggregator, state,
                                                      primals)
    if found is None:
      if engine == "gram":
        raise ValueError(
            "value_and_aggregate: engine='gram' needs a Gram-based "
            "aggregator (its weights a function of the Gram matrix: pcgrad, "
            "mgda, upgrad, cagrad, ...), bare or wrapped in "
            "optax.inject_hyperparams; this one is not (graddrop, gradvac "
            "and the loss-based methods need engine='stacked' or 'auto'), "
            "or it is hidden behind a wrapper that does not pass updates "
            "and state through untouched (optax.chain, ...: chain the "
            "optimizer after value_and_aggregate instead).")
      if shared is not None:
        raise ValueError(
            "value_and_aggregate: shared= applies to Gram-based aggregators; "
            "give this aggregator its own shared= instead.")
      out, grads = _stacked(partial_fn, leaves, has_aux)
      stacked = jax.tree.unflatten(treedef, grads)
      losses = out[0] if has_aux else out
      update, state = aggregator.update(stacked, state, primals,
                                        losses=losses)
      return out, update, state
    if hook is None:
      _check_shared(found, shared)

    def run(gram_step, inner_state):
      # Called by the aggregator's own update (through any wrapper such as
      # optax.inject_hyperparams) with the GramStep it was built with.
      mask_spec = shared if shared is not None else gram_step.shared
      reduction = gram_step.reduction
      check_reduction(reduction)
      mask = shared_leaves(mask_spec, primals, primals)
      use_gram = engine == "gram"
      traced = dense = None
      if engine in ("auto", "gram"):
        traced = _trace(partial_fn, leaves)
        dense = taps.find_dense_uses(traced[0].jaxpr, len(leaves))
      if engine == "auto":
        shared_size = sum(x.size for x, m in zip(leaves, mask) if m)
        dense_size = sum(x.size for x, m, u in zip(leaves, mask, dense)
                         if m and u is not None)
        use_gram = shared_size > 0 and (
            dense_size >= AUTO_DENSE_FRACTION * shared_size)
      if use_gram:
        out, flat_update, new_state = _gram_engine(
            traced, dense, leaves, mask, gram_step, reduction, inner_state,
            has_aux)
      else:
        out, flat_update, new_state = _stacked_gram(
            partial_fn, leaves, mask, gram_step, reduction, inner_state,
            has_aux)
      losses = out[0] if has_aux else out
      return GramResult(out, flat_update, losses), new_state

    result, state = aggregator.update(GramProbe(run), state, primals)
    return result.out, jax.tree.unflatten(treedef, result.update), state

  return step


def _check_shared(hook: GramStep, shared) -> None:
  if shared is not None and hook.shared is not None:
    raise ValueError(
        f"value_and_aggregate: both value_and_aggregate and {hook.method} "
        "were given a shared mask; give it once.")


def _is_diff_state(x) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.DiffState)


def _holds_graph_node(x) -> bool:
  """Whether x is or holds an ``nnx.Module`` (an ``nnx.State``'s Variables
  are params, as ever)."""
  nnx = sys.modules["flax.nnx"]
  is_module = lambda v: isinstance(v, nnx.Module)
  return any(map(is_module, jax.tree.leaves(x, is_leaf=is_module)))


def _nnx_step(nnx, loss_fn, aggregator, engine, shared, argnums, has_aux,
              args, state):
  """The step on an NNX graph node, as ``nnx.value_and_grad`` treats one.

  The node is split into the Variables of the filter (``nnx.Param``, or an
  ``nnx.DiffState``'s) and the rest; the engine runs on the loss as a
  function of the first (an ``nnx.State``: ``update`` is one), and the rest
  after the single forward pass (batch statistics, RNG counts) is written
  back to the node once.
  """
  if _is_diff_state(argnums):
    a, filt = argnums.argnum, argnums.filter
  elif isinstance(argnums, int):
    a, filt = argnums, nnx.Param
  else:
    raise ValueError(
        "value_and_aggregate: with an NNX module, argnums must be one "
        f"argnum (an int or an nnx.DiffState), got {argnums!r}.")
  if not 0 <= a < len(args):
    raise ValueError(
        f"value_and_aggregate: argnums={a} but loss_fn gets {len(args)} "
        "positional arguments (params and the batch).")
  node = args[a]
  if not isinstance(node, nnx.Module):
    raise ValueError(
        f"value_and_aggregate: argument {a} ({type(node).__name__}) is "
        "differentiated but another argument holds an NNX module: "
        "differentiate the module itself (argnums=its position, or "
        "nnx.DiffState(position, filter)).")
  others = [i for i in range(len(args)) if i != a]
  for i in others:
    if _holds_graph_node(args[i]):
      raise ValueError(
          f"value_and_aggregate: argument {i} holds an NNX module too; "
          "only the differentiated module may be one (pass other state as "
          "arrays).")
  graphdef, diff, rest = nnx.split(node, filt, ...)

  def pure(diff_state, *other_values):
    merged = nnx.merge(graphdef, diff_state, rest, copy=True)
    full = list(args)
    full[a] = merged
    for i, v in zip(others, other_values):
      full[i] = v
    out = loss_fn(*full)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "value_and_aggregate: has_aux=True but loss_fn did not return "
            "a (losses, aux) pair.")
      losses, aux = out
    else:
      losses, aux = out, None
    _, _, new_rest = nnx.split(merged, filt, ...)
    return losses, (aux, new_rest)

  inner = value_and_aggregate(pure, aggregator, engine=engine,
                              shared=shared, argnums=0, has_aux=True)
  (losses, (aux, new_rest)), update, new_state = inner(
      diff, state, *[args[i] for i in others])
  if isinstance(state, ApplyIfFiniteState):
    # A step apply_if_finite skipped leaves the rest of the module as it
    # was too (a NaN batch would enter BatchNorm's running statistics).
    skipped = new_state.total_notfinite != state.total_notfinite
    new_rest = jax.tree.map(lambda new, old: jnp.where(skipped, old, new),
                            new_rest, rest)
  state = new_state
  nnx.update(node, new_rest)
  return ((losses, aux) if has_aux else losses), update, state


# The states of the wrappers that rebuild their inner transformation at
# every update and pass updates and state through untouched: only these are
# probed for a Gram-based method inside.
_PROBED_STATES = (optax.InjectHyperparamsState,
                  optax.InjectStatefulHyperparamsState, ApplyIfFiniteState)


def _query_hook(aggregator, state, params) -> GramStep | None:
  """The GramStep an aggregator answers a :class:`GramProbe` with, or None.

  Only ``optax.inject_hyperparams`` wrappers (recognised by their state) are
  probed: their inner transformation exists only inside ``update``. A
  transformation of the package that is not Gram-based rejects the probe
  with :class:`NotGramBased`; every other error is a genuine one and
  propagates.
  """
  if not isinstance(state, _PROBED_STATES):
    return None
  try:
    found, _ = aggregator.update(GramProbe(lambda h, s: (h, s)), state,
                                 params)
  except NotGramBased:
    return None
  return found if isinstance(found, GramStep) else None


def _trace(partial_fn, leaves):
  """The closed jaxpr of ``partial_fn`` over the flat leaves, its out tree."""
  box = []

  def flat_fn(*flat):
    out = partial_fn(list(flat))
    out_flat, tree = jax.tree.flatten(out)
    box.append(tree)
    return out_flat

  closed = jax.make_jaxpr(flat_fn)(*leaves)
  return closed, box[0]


def _split_out(out, has_aux):
  """``(losses, out)``: the losses checked; ``out`` what the step returns."""
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "value_and_aggregate: has_aux=True but loss_fn did not return a "
          "(losses, aux) pair.")
    losses = out[0]
  else:
    losses = out
  check_task_losses(losses, "value_and_aggregate")
  return losses, out


def _stacked(partial_fn, leaves, has_aux):
  """``(out, stacked_flat_grads)`` from one forward pass and a vmapped VJP."""
  out, vjp_fn, aux = losses_and_vjp(partial_fn, 0, has_aux, (leaves,), {},
                                    "value_and_aggregate")
  basis = vary_like(jnp.eye(out.shape[0], dtype=out.dtype), out)
  (grads,) = pull_back_tasks(vjp_fn, basis)
  return ((out, aux) if has_aux else out), list(grads)


def _on_explicit_mesh(leaves) -> bool:
  """Whether any leaf lives on a mesh with explicit axes."""
  for x in leaves:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if jax.sharding.AxisType.Explicit in tuple(getattr(mesh, "axis_types",
                                                       ())):
      return True
  return False


def _task_coefs(weights, mask, t, reduction, acc):
  """Per leaf: ``w`` (shared) or ones (heads), divided by T for "mean"."""
  scale = 1.0 / t if reduction == "mean" else 1.0
  plain = jnp.full((t,), scale, acc)
  w = weights.astype(acc) * scale
  return [w if m else plain for m in mask]


def _stacked_gram(partial_fn, leaves, mask, hook, reduction, state,
                  has_aux):
  """The stacked engine for a Gram-based aggregator (``shared`` here)."""
  out, grads = _stacked(partial_fn, leaves, has_aux)
  t = grads[0].shape[0]
  gram = masked_gram(grads, mask, t)
  weights, state = hook.step(gram, state)
  weights = check_weights(weights, t, hook.method)
  return out, combine_leaves(grads, mask, weights, reduction), state


def _gram_engine(traced, dense, leaves, mask, hook, reduction, state,
                 has_aux):
  """Per-layer Gram matrix from activations and task cotangents."""
  closed, out_tree = traced
  fallback = [n for n, u in enumerate(dense) if u is None]
  f = taps.tapped_fn(closed, len(leaves), dense, leaves)

  def losses_of(fb, tp):
    outs, xs = f(fb, tp)
    return outs[0], (outs, xs)

  fb_leaves = [leaves[n] for n in fallback]
  tap0 = taps.zero_taps(dense)
  losses, vjp_fn, (outs, xs) = jax.vjp(losses_of, fb_leaves, tap0,
                                       has_aux=True)
  out = jax.tree.unflatten(out_tree, outs)
  losses, out = _split_out(out, has_aux)
  t = losses.shape[0]
  basis = vary_like(jnp.eye(t, dtype=losses.dtype), losses)
  if fallback and _on_explicit_mesh(leaves):
    # JAX's batching rule of a convolution's transpose reshapes the task
    # axis into a batch-sharded operand, which explicit axes reject: pull
    # the tasks back one at a time (a loop, one compiled body) instead.
    fb_grads, tap_cts = jax.lax.map(vjp_fn, basis)
  else:
    fb_grads, tap_cts = pull_back_tasks(vjp_fn, basis)

  acc = leaves_accumulation_dtype(leaves)
  gram = jnp.zeros((t, t), acc)
  for n, u in enumerate(dense):
    if mask[n] and u is not None:
      gram = gram + taps.dense_gram(xs[n], tap_cts[n], u).astype(acc)
  for g, n in zip(fb_grads, fallback):
    if mask[n]:
      gram = gram + leaf_gram(g).astype(acc)
  weights, state = hook.step(gram, state)
  weights = check_weights(weights, t, hook.method)

  coefs = _task_coefs(weights, mask, t, reduction, acc)
  pulled = None
  if any(mask[n] for n in fallback):
    # One more pullback, of sum_t c_t L_t with the shared leaves'
    # coefficients: the shared fallback leaves' updates, and the shared
    # dense leaves' weighted cotangents, come from it, so their per-task
    # gradients (and cotangents) are dead once their Gram blocks are.
    shared_coefs = next(c for c, m in zip(coefs, mask) if m)
    pulled = vjp_fn(vary_like(shared_coefs.astype(losses.dtype), losses))
  update = [None] * len(leaves)
  for k, (g, n) in enumerate(zip(fb_grads, fallback)):
    if pulled is not None and mask[n]:
      update[n] = pulled[0][k].astype(leaves[n].dtype)
    else:
      update[n] = leaf_weighted_sum(g, coefs[n])
  for n, u in enumerate(dense):
    if u is not None:
      if pulled is not None and mask[n]:
        d = pulled[1][n]
      else:
        d = jnp.tensordot(coefs[n], tap_cts[n].astype(acc), axes=1)
      update[n] = taps.dense_update(xs[n], d, u, leaves[n]).astype(
          leaves[n].dtype)
  return out, update, state

