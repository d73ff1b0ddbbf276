"""One training step's aggregated update: task losses in, one update out."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pcgrad_optax._core import taps
from pcgrad_optax._core.gram import leaf_gram, masked_gram
from pcgrad_optax._core.masks import SharedMask, shared_leaves
from pcgrad_optax._core.aggregate import combine_leaves
from pcgrad_optax._core.mesh import vary_like
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.transform import (GramProbe, GramStep, check_weights,
                                          gram_step_of)
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
    forward pass and a ``vmap`` over the tasks of the VJP w.r.t. the taps
    give the per-task output cotangents :math:`D_t = \partial L_t /
    \partial Y`, and the leaf's block of the Gram matrix is

    .. math::
      \langle g_s, g_t \rangle = \langle X^T D_s, X^T D_t \rangle
        = \sum_{n,m} (X X^T)_{nm} (D_s D_t^T)_{nm}

    (summed over the ``dot_general``'s batch axes; when ``N^2 > T C F``,
    with ``N`` the rows of ``X``, the leaf's ``T`` gradients are formed and
    contracted at once instead, which is cheaper there). Every other leaf
    (convolution kernels, embeddings, norm scales, biases, a weight used in
    two places) falls back to its own per-task gradient, whose Gram block
    is one contraction. The aggregator's weighting then gives ``w`` from the
    Gram matrix and the update is the gradient of :math:`\sum_t w_t L_t`,
    formed from the same cotangents without a second backward pass:
    :math:`X^T (\sum_t w_t D_t)` for a dense leaf, :math:`\sum_t w_t g_t`
    for a fallback one. Needs a Gram-based aggregator (every method whose
    weights are a function of the Gram matrix: ``pcgrad``, ``mgda``,
    ``upgrad``, ``cagrad``, ...); ``ValueError`` otherwise.
  * ``"auto"``: ``"gram"`` when the aggregator is Gram-based and at least
    half of the shared parameters (by element count) are dense leaves,
    else ``"stacked"``.

  Both engines give the same update (up to float rounding: the Gram
  matrix is summed in another order) and the same state: the method's own
  ``(gram, state) -> (weights, new_state)`` step runs on either Gram matrix,
  so PCGrad's key and count and the ``weights`` (and, with ``keep_gram``,
  ``gram``) recorded with ``num_tasks=`` are updated as ``aggregator.update``
  updates them.

  The Gram-based method is reached through ``aggregator.update`` itself
  (see :class:`pcgrad_optax._core.transform.GramProbe`), so
  ``optax.inject_hyperparams(pcgrad_optax.upgrad)(...)`` works on both
  engines, with the step's injected (or scheduled) hyperparameters and its
  ``InjectHyperparamsState``. Wrappers that transform ``updates`` (an
  ``optax.chain`` with the optimizer inside) hide the method: ``"auto"``
  then takes the stacked engine and ``"gram"`` raises; chain the optimizer
  after this step instead.

  Flax NNX: give the state, not the module. ``graphdef, params, rest =
  nnx.split(model, nnx.Param, ...)``, a ``loss_fn(params, *batch)`` calling
  ``nnx.merge(graphdef, params, rest)(...)``, and ``nnx.update(model,
  optax.apply_updates(params, updates))`` after the optimizer step (an
  ``nnx.Module`` as ``params`` raises ``ValueError``; state changes of the
  forward pass such as batch statistics are not written back).

  Args:
    loss_fn: ``loss_fn(params, *batch)`` returning the ``(T,)`` task losses
      (``((T,), aux)`` with ``has_aux``). Plain functions of param pytrees,
      Flax Linen (``model.apply(params, x)``) and Flax NNX
      (``nnx.merge(graphdef, params)(x)`` with ``params`` an
      ``nnx.State``) all work.
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
      (``params`` is argument 0); ``update`` mirrors them.
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
  single = isinstance(argnums, int)
  argnums_t = (argnums,) if single else tuple(argnums)

  def step(params, state, *batch):
    args = (params,) + tuple(batch)
    for a in argnums_t:
      if not isinstance(a, int) or not 0 <= a < len(args):
        raise ValueError(
            f"value_and_aggregate: argnums={argnums} but loss_fn gets "
            f"{len(args)} positional arguments (params and the batch).")
    primals = args[argnums] if single else tuple(args[a] for a in argnums_t)
    _check_not_nnx_module(primals)
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
      return (out, flat_update), new_state

    (out, flat_update), state = aggregator.update(GramProbe(run), state,
                                                  primals)
    return out, jax.tree.unflatten(treedef, flat_update), state

  return step


def _check_shared(hook: GramStep, shared) -> None:
  if shared is not None and hook.shared is not None:
    raise ValueError(
        f"value_and_aggregate: both value_and_aggregate and {hook.method} "
        "were given a shared mask; give it once.")


def _check_not_nnx_module(primals) -> None:
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return
  is_module = lambda x: isinstance(x, nnx.Module)
  if any(map(is_module, jax.tree.leaves(primals, is_leaf=is_module))):
    raise ValueError(
        "value_and_aggregate: params holds an nnx.Module (or another NNX "
        "graph node); pass its state instead: graphdef, params, rest = "
        "nnx.split(model, nnx.Param, ...) and a loss_fn(params, *batch) "
        "that calls nnx.merge(graphdef, params, rest)(...); then "
        "nnx.update(model, new_params) after the optimizer step.")


def _query_hook(aggregator, state, params) -> GramStep | None:
  """The GramStep an aggregator answers a :class:`GramProbe` with, or None.

  Reaches Gram-based transformations through wrappers that rebuild them at
  every update (``optax.inject_hyperparams``); any other aggregator fails on
  the probe or returns something else, and is not Gram-based here.
  """
  try:
    found, _ = aggregator.update(GramProbe(lambda h, s: (h, s)), state,
                                 params)
  except Exception:   # noqa: BLE001 - any failure: not Gram-based
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
  fb_grads, tap_cts = jax.vmap(vjp_fn)(basis)

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
  update = [None] * len(leaves)
  for g, n in zip(fb_grads, fallback):
    update[n] = leaf_weighted_sum(g, coefs[n])
  for n, u in enumerate(dense):
    if u is not None:
      d = jnp.tensordot(coefs[n], tap_cts[n].astype(acc), axes=1)
      update[n] = taps.dense_update(xs[n], d, u, leaves[n]).astype(
          leaves[n].dtype)
  return out, update, state

