"""Stateful, random and loss-based transformations on stacked gradients.

GradVac (EMA cosine targets), GradDrop (random sign dropout), RLW (random
weights), uncertainty weighting, DWA and FAMO (which need the task losses).
Each has the interface of :func:`pcgrad_optax.pcgrad`: ``update`` takes
stacked per-task gradients (every leaf of shape ``(T,) + param.shape``) and
returns params-shaped updates; ``shared`` selects the shared leaves, every
other leaf (a task head) gets the plain sum (or mean) over its task axis;
``reduction`` is ``"sum"`` or ``"mean"``; PRNG keys live in the state.

The loss-based transformations take the per-task losses as an extra
argument, ``tx.update(grads, state, params, losses=losses)``, which
``optax.chain`` passes through. The transformations whose state has a
per-task shape need ``num_tasks`` up front, like
:func:`pcgrad_optax.multi_steps`, because ``init`` only sees the params.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax import _core
from pcgrad_optax import _loss_weightings as lw
from pcgrad_optax._transforms import canonicalize_key

PyTree = Any

__all__ = [
    "DWAState",
    "FAMOState",
    "GradDropState",
    "GradVacState",
    "RLWState",
    "UncertaintyState",
    "dwa",
    "famo",
    "graddrop",
    "gradvac",
    "rlw",
    "uncertainty",
]

GRADVAC_GRANULARITIES = ("all", "module", "leaf")


# ---------------------------------------------------------------------------
# Shared helpers.


def _check_num_tasks_arg(num_tasks) -> None:
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or \
      num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")


def _resolve(updates, params, shared, num_tasks: int | None, method: str):
  """Validates stacked gradients; returns (leaves, treedef, mask, T)."""
  t = _core.num_tasks(updates, params)
  if num_tasks is not None and t != num_tasks:
    path, first = jax.tree_util.tree_flatten_with_path(updates)[0][0]
    raise ValueError(
        f"{method} was built with num_tasks={num_tasks} but the stacked "
        f"gradients have T={t} tasks (leaf '{_core.leaf_name(path)}' has "
        f"shape {tuple(first.shape)}).")
  mask = _core.shared_leaves(shared, updates, params)
  leaves, treedef = jax.tree.flatten(updates)
  return leaves, treedef, mask, t


def _accumulation_dtype(leaves):
  return jnp.result_type(*[_core.accumulation_dtype(x.dtype) for x in leaves])


def _combine_leaves(leaves, mask, weights, reduction: str) -> list:
  """Shared leaves get ``sum_t w_t g_t``, the others ``sum_t g_t``.

  ``weights`` is ``(T,)`` or a per-leaf list of ``(T,)`` weights; "mean"
  divides by T.
  """
  t = leaves[0].shape[0]
  acc = _accumulation_dtype(leaves)
  scale = 1.0 / t if reduction == "mean" else 1.0
  if not isinstance(weights, list):
    weights = [weights] * len(leaves)
  plain = jnp.full((t,), scale, acc)
  return [_core.leaf_weighted_sum(x, w.astype(acc) * scale if m else plain)
          for x, m, w in zip(leaves, mask, weights)]


_combine_leaves_jit = jax.jit(_combine_leaves,
                              static_argnames=("mask", "reduction"))


def _combine(leaves, treedef, mask, weights, reduction: str):
  return jax.tree.unflatten(
      treedef, _combine_leaves_jit(leaves, tuple(mask), weights, reduction))


def _check_losses(losses, t: int, method: str, arg: str = "losses"
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


def _cast_like(new, old):
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype),
                      new, old)


# ---------------------------------------------------------------------------
# GradVac.


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    key: typed PRNG key; step ``n`` draws its orders from
      ``jax.random.fold_in(key, n)``.
    count: number of updates done so far (int32).
    targets: ``(G, T, T)`` float32 EMA cosine targets, one ``(T, T)`` block
      per parameter group (``G = 1`` for ``granularity="all"``).
  """
  key: jax.Array
  count: jax.Array
  targets: jax.Array


def _gradvac_groups(tree, granularity: str) -> tuple[list[int], int]:
  """Static group index of every leaf and the number of groups."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if granularity == "all":
    return [0] * len(paths), 1
  if granularity == "leaf":
    return list(range(len(paths))), len(paths)
  ids: dict[tuple, int] = {}
  groups = [ids.setdefault(tuple(p[:-1]), len(ids)) for p in paths]
  return groups, len(ids)


# The per-step cores below are jitted with their configuration static: inside
# a user's jit they are inlined, and an eager caller compiles each shape once
# instead of re-tracing the fori_loop / per-leaf ops on every call.
@functools.partial(jax.jit, static_argnames=("mask", "groups", "beta",
                                             "ema_of", "reduction"))
def _gradvac_step(leaves, targets, key, count, *, mask, groups, beta, ema_of,
                  reduction):
  t = leaves[0].shape[0]
  acc = _accumulation_dtype(leaves)
  grams = [jnp.zeros((t, t), acc) for _ in range(targets.shape[0])]
  for x, m, g in zip(leaves, mask, groups):
    if m:
      grams[g] = grams[g] + _core.leaf_gram(x).astype(acc)
  order = lw._weighting_lib().random_orders(jax.random.fold_in(key, count), t)
  # A group without shared leaves has a zero Gram matrix: its weights stay at
  # one (unused) and its targets untouched (zero gradients are skipped).
  weights, new_targets = jax.vmap(
      lambda gram, tgt: lw.gradvac(gram, tgt, beta=beta, order=order,
                                   ema_of=ema_of))(jnp.stack(grams), targets)
  out = _combine_leaves(leaves, mask, [weights[g] for g in groups], reduction)
  return out, new_targets.astype(targets.dtype)


def gradvac(key: jax.Array | int = 0, *, num_tasks: int, beta: float = 1e-2,
            granularity: str = "all", ema_of: str = "modified",
            reduction: str = "sum", shared: _core.SharedMask = None
            ) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Vaccine (GradVac): raise pairwise cosines to adaptive targets.

  Each step applies Algorithm 1 of Wang et al. (2021) to the shared
  parameters: for every task :math:`i` and every other task :math:`j` in a
  random order drawn afresh for :math:`i`, if
  :math:`\phi_{ij} = \cos(g_i^{pt}, g_j) < \hat\phi_{ij}` the closed-form
  multiple of the original :math:`g_j` that raises the cosine exactly to the
  target is added to :math:`g_i^{pt}`; the targets are EMAs of the measured
  cosines, :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} +
  \beta\phi_{ij}`, start at 0 and live in the state; the update is
  :math:`\sum_i g_i^{pt}` (or the mean). See
  :func:`pcgrad_optax.weighting.gradvac` for the formula, the Gram-matrix
  formulation and the edge cases.

  Granularity: the paper vaccinates every model component (layer)
  separately with its own targets. ``granularity="all"`` treats the whole
  shared vector as one group (like PCGrad); ``"module"`` groups the leaves
  by their parent in the pytree (a Flax ``Dense``'s kernel and bias
  together, the paper's per-layer variant); ``"leaf"`` makes every leaf its
  own group. Each group costs one ``T x T`` Gram block; the groups run in
  one vectorised call with the same random orders.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    key: int seed or PRNG key for the random orders.
    num_tasks: T (the targets are allocated at ``init``).
    beta: EMA rate in ``[0, 1]``; ``1e-2`` as in the paper (LibMTL and
      torchjd default to ``0.5``).
    granularity: ``"all"``, ``"module"`` or ``"leaf"``, see above.
    ema_of: ``"modified"`` (the paper: the cosine of the partially
      vaccinated gradient) or ``"original"`` (the raw gradients' cosine).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`GradVacState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = pcgrad_optax.gradvac(num_tasks=2, beta=0.5)
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}  # cosine -0.71
    >>> u, state = tx.update(g, state, params)  # targets 0: PCGrad's step
    >>> print(jnp.round(u["w"], 4))
    [0.5 1.5]
    >>> print(jnp.round(state.targets[0], 4))  # EMA towards -0.71
    [[ 0.     -0.3536]
     [-0.3536  0.    ]]

  References:
    Wang, Tsvetkov, Firat, Cao, `Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
  """
  _core.check_reduction(reduction)
  _check_num_tasks_arg(num_tasks)
  if granularity not in GRADVAC_GRANULARITIES:
    raise ValueError(f"Unknown granularity {granularity!r}; expected one of "
                     f"{GRADVAC_GRANULARITIES}.")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
  if ema_of not in lw.GRADVAC_EMA_SOURCES:
    raise ValueError(f"Unknown ema_of {ema_of!r}; expected one of "
                     f"{lw.GRADVAC_EMA_SOURCES}.")

  def init_fn(params):
    _, num_groups = _gradvac_groups(params, granularity)
    return GradVacState(
        key=canonicalize_key(key), count=jnp.zeros([], jnp.int32),
        targets=jnp.zeros((num_groups, num_tasks, num_tasks), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, num_tasks,
                                        "gradvac")
    groups, num_groups = _gradvac_groups(updates, granularity)
    if state.targets.shape != (num_groups, t, t):
      raise ValueError(
          f"gradvac state targets have shape {state.targets.shape}, expected "
          f"{(num_groups, t, t)} for granularity={granularity!r}: the "
          "gradients' structure differs from the params given to init.")
    out, targets = _gradvac_step(
        leaves, state.targets, state.key, state.count, mask=tuple(mask),
        groups=tuple(groups), beta=beta, ema_of=ema_of, reduction=reduction)
    return jax.tree.unflatten(treedef, out), GradVacState(
        state.key, optax.safe_increment(state.count), targets)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# GradDrop.


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    key: typed PRNG key. At step ``n`` the uniform draws of the leaf at
      position ``l`` in ``jax.tree.leaves`` order are
      ``jax.random.uniform(fold_in(fold_in(key, n), l), leaf.shape[1:])``
      (float32), one per coordinate, shared by all tasks.
    count: number of updates done so far (int32).
  """
  key: jax.Array
  count: jax.Array


@functools.partial(jax.jit, static_argnames=("mask", "reduction"))
def _graddrop_step(leaves, key, count, leak, *, mask, reduction):
  t = leaves[0].shape[0]
  step_key = jax.random.fold_in(key, count)
  scale = 1.0 / t if reduction == "mean" else 1.0
  out = []
  for index, (x, m) in enumerate(zip(leaves, mask)):
    acc = _core.accumulation_dtype(x.dtype)
    if not m:
      out.append(_core.leaf_weighted_sum(x, jnp.full((t,), scale, acc)))
      continue
    uniform = jax.random.uniform(jax.random.fold_in(step_key, index),
                                 x.shape[1:], jnp.float32)
    # Two passes over the task axis, never a (T, ...) temporary.
    total, total_abs = _core.sum_over_tasks(
        x, lambda g, _: (g.astype(acc), jnp.abs(g.astype(acc))))
    nonzero = total_abs > 0
    purity = jnp.where(
        nonzero, 0.5 * (1 + total / jnp.where(nonzero, total_abs, 1)), 0.5)
    leaks = jnp.broadcast_to(leak.astype(acc), (t,))

    def kept(g, task, purity=purity, uniform=uniform):
      g = g.astype(acc)
      keep = ((purity > uniform) & (g > 0)) | ((purity < uniform) & (g < 0))
      return jnp.where(keep, g, leaks[task] * g)

    out.append((_core.sum_over_tasks(x, kept) * scale).astype(x.dtype))
  return out


def graddrop(key: jax.Array | int = 0, *, leak: float | jax.Array = 0.0,
             reduction: str = "sum", shared: _core.SharedMask = None
             ) -> optax.GradientTransformationExtraArgs:
  r"""GradDrop: keep one sign per coordinate, chosen by its sign purity.

  For every coordinate of the shared leaves, with task gradients
  :math:`g_i`, the positive sign purity and a uniform draw

  .. math::
    P = \tfrac12\Big(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Big), \qquad
    U \sim \mathcal U(0, 1),

  keep the positive components where :math:`P > U` and the negative ones
  where :math:`P < U`: with :math:`M_i = [P > U][g_i > 0] + [P < U][g_i < 0]`
  the update is

  .. math::
    \sum_i \big(\ell_i + (1 - \ell_i) M_i\big)\, g_i

  (or the mean), with leak :math:`\ell_i` (0 in the paper's multi-task
  experiments). A coordinate where every task's gradient is zero has
  :math:`P = \tfrac12` (0/0 otherwise) and gets 0. Elementwise over the
  stacked leaves: no Gram matrix, no loop over tasks; heads get plain sums.

  This is the parameter-gradient version (as in torchjd and the
  Nash-MTL/FAMO code). The paper applies the mask to the gradients at a
  layer's *activations* (summed over the batch to compute :math:`P`), just
  after the shared trunk; the masked activation gradient is then
  back-propagated through the shared layers, so all parameters upstream
  see one consistent sign choice per activation unit. Here every shared
  parameter coordinate picks its own sign, which needs only the stacked
  parameter gradients. Like torchjd we use the identity for the paper's
  monotone purity transform :math:`f(P)`.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    key: int seed or PRNG key for the uniform draws (see
      :class:`GradDropState` for how they are derived, so a test can
      regenerate them).
    leak: scalar or ``(T,)`` leak values :math:`\ell_i` in ``[0, 1]``; 1
      passes task ``i``'s gradient through untouched.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`GradDropState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.graddrop(0)
    >>> params = {"w": jnp.zeros(3)}
    >>> g = {"w": jnp.array([[1., 2., -1.], [3., -2., -1.]])}
    >>> u, state = tx.update(g, tx.init(params), params)
    >>> print(u["w"][0], u["w"][2])  # pure signs are always kept
    4.0 -2.0
    >>> bool(u["w"][1] in (2.0, -2.0))  # P = 1/2: one sign, at random
    True

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, `Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  _core.check_reduction(reduction)
  leak_array = jnp.asarray(leak, jnp.float32)
  if leak_array.ndim > 1:
    raise ValueError(f"`leak` must be a scalar or shape (T,), got "
                     f"{leak_array.shape}.")
  if not isinstance(leak, jax.core.Tracer) and not np.all(
      (np.asarray(leak) >= 0) & (np.asarray(leak) <= 1)):
    raise ValueError(f"`leak` must be in [0, 1], got {leak!r}.")

  def init_fn(params):
    del params
    return GradDropState(key=canonicalize_key(key),
                         count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, None,
                                        "graddrop")
    if leak_array.ndim == 1 and leak_array.shape != (t,):
      raise ValueError(f"`leak` must be a scalar or shape (T,) = ({t},), "
                       f"got {leak_array.shape}.")
    out = _graddrop_step(leaves, state.key, state.count, leak_array,
                         mask=tuple(mask), reduction=reduction)
    return jax.tree.unflatten(treedef, out), GradDropState(
        state.key, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# RLW.


class RLWState(NamedTuple):
  """State of :func:`rlw`.

  Attributes:
    key: typed PRNG key; step ``n`` draws its weights with
      ``pcgrad_optax.weighting.rlw(jax.random.fold_in(key, n), T)``.
    count: number of updates done so far (int32).
  """
  key: jax.Array
  count: jax.Array


def rlw(key: jax.Array | int = 0, *, distribution: str = "normal",
        reduction: str = "sum", shared: _core.SharedMask = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting (RLW): a fresh random convex combination per step.

  .. math::
    \lambda = \operatorname{softmax}(\tilde\lambda), \quad
    \tilde\lambda \sim \mathcal N(0, I_T), \qquad
    u = \sum_t \lambda_t g_t ,

  drawn afresh every step (see :func:`pcgrad_optax.weighting.rlw` for the
  other samplers). Weighting the gradients is the same as weighting the
  losses, so no losses are needed. The weights sum to 1, as in the paper, so
  the ``"sum"`` reduction is a random *average* of the task gradients (the
  ``"mean"`` reduction divides it by T once more).

  With a ``shared`` mask, only the shared leaves are weighted; every other
  leaf (task heads) gets the plain sum (or mean) of its task axis, i.e. each
  head keeps its own task's gradient. The default (every leaf shared)
  weights the whole model, as weighting the loss does in the paper.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    key: int seed or PRNG key.
    distribution: ``"normal"`` (the paper's), ``"uniform"`` or
      ``"dirichlet"``.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`RLWState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.rlw(0)
    >>> params = {"w": jnp.zeros(2)}
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, tx.init(params), params)
    >>> print(jnp.round(u["w"].sum(), 4))  # a convex combination
    1.0

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, `Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  _core.check_reduction(reduction)
  if distribution not in lw.RLW_DISTRIBUTIONS:
    raise ValueError(f"Unknown distribution {distribution!r}; expected one "
                     f"of {lw.RLW_DISTRIBUTIONS}.")

  def init_fn(params):
    del params
    return RLWState(key=canonicalize_key(key), count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, None, "rlw")
    weights = lw.rlw(jax.random.fold_in(state.key, state.count), t,
                     distribution=distribution)
    return _combine(leaves, treedef, mask, weights, reduction), RLWState(
        state.key, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Uncertainty weighting.


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`.

  Attributes:
    log_vars: ``(T,)`` float32 learnable log-variances :math:`s_t`.
    opt_state: state of the optimiser of the log-variances.
  """
  log_vars: jax.Array
  opt_state: optax.OptState


def uncertainty(*, num_tasks: int, learning_rate: float = 1e-2,
                task_types: Sequence[str] | str | None = None,
                init_log_vars: float | jax.Array = 0.0,
                optimizer: optax.GradientTransformation | None = None,
                reduction: str = "sum", shared: _core.SharedMask = None
                ) -> optax.GradientTransformationExtraArgs:
  r"""Uncertainty weighting (Kendall et al., 2018) with learnable log-variances.

  The task weights are :math:`a_t e^{-s_t}` (see
  :func:`pcgrad_optax.weighting.uncertainty` for the factors :math:`a_t,
  b_t`; by default :math:`a = b = 1`), and the log-variances :math:`s` in
  the state are trained by gradient descent on the paper's objective
  :math:`\sum_t a_t e^{-s_t} L_t + b_t s_t`, whose gradient is

  .. math::
    \frac{\partial}{\partial s_t} = b_t - a_t e^{-s_t} L_t .

  Each step uses the weights of the current :math:`s` (as joint training
  does: the network's and :math:`s`'s gradients come from the same forward
  pass), then updates :math:`s \leftarrow s - \eta\,\partial/\partial s`
  with ``learning_rate`` :math:`\eta` (or the given ``optimizer``). The
  stationary point is :math:`s_t = \log(a_t L_t / b_t)`, i.e. weight
  :math:`b_t / L_t`. With plain gradient descent :math:`s` moves by
  :math:`\eta(a e^{-s} L - b)` per step, which is slow to recover from
  losses that vary by orders of magnitude; ``optimizer=optax.adam(1e-2)``
  is scale free.

  The losses are the extra argument ``losses`` of ``update``.

  With a ``shared`` mask, only the shared leaves are weighted; every other
  leaf (task heads) gets the plain sum (or mean) of its task axis, i.e. each
  head keeps its own task's gradient. The default (every leaf shared)
  weights the whole model, as weighting the loss does in the paper.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    num_tasks: T.
    learning_rate: :math:`\eta` of the gradient descent on :math:`s`
      (ignored when ``optimizer`` is given).
    task_types: None (the objective :math:`e^{-s}L + s`, twice the paper's
      regression form), ``"regression"``/``"classification"`` or one per
      task (the paper's exact factors).
    init_log_vars: scalar or ``(T,)`` initial :math:`s` (0: weights
      :math:`a_t`).
    optimizer: optional optax transformation for :math:`s` (default
      ``optax.sgd(learning_rate)``).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`UncertaintyState`; ``update(grads, state, params=None, *,
    losses)`` needs the ``(T,)`` task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.uncertainty(num_tasks=2, learning_rate=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params, losses=jnp.array([1.0, 3.0]))
    >>> print(u["w"])  # s = 0: weights 1
    [1. 1.]
    >>> print(state.log_vars)  # s - 0.5 * (1 - L)
    [0. 1.]

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  _core.check_reduction(reduction)
  _check_num_tasks_arg(num_tasks)
  weight_factor, reg_factor = lw._uncertainty_factors(task_types, num_tasks)
  init_s = jnp.asarray(init_log_vars, jnp.float32)
  if init_s.ndim > 1 or (init_s.ndim == 1 and init_s.shape != (num_tasks,)):
    raise ValueError(f"`init_log_vars` must be a scalar or shape (T,) = "
                     f"({num_tasks},), got {init_s.shape}.")
  init_s = jnp.broadcast_to(init_s, (num_tasks,))
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init_fn(params):
    del params
    return UncertaintyState(log_vars=init_s, opt_state=opt.init(init_s))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, num_tasks,
                                        "uncertainty")
    losses = _check_losses(losses, t, "uncertainty")
    log_vars = state.log_vars
    weights = lw.uncertainty(log_vars, task_types=task_types)
    grad_s = (reg_factor - weight_factor * jnp.exp(-log_vars) * losses)
    grad_s = grad_s.astype(log_vars.dtype)
    step, opt_state = opt.update(grad_s, state.opt_state, log_vars)
    new_log_vars = optax.apply_updates(log_vars, step)
    return _combine(leaves, treedef, mask, weights, reduction), \
        UncertaintyState(_cast_like(new_log_vars, log_vars),
                         _cast_like(opt_state, state.opt_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# DWA.


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    count: number of updates done so far (int32).
    loss_sum: ``(T,)`` float32 sum of the losses of the current period.
    history: ``(2, T)`` float32 mean losses of the last two complete periods
      (row 0 the most recent).
    periods: number of complete periods (int32, capped at 2).
  """
  count: jax.Array
  loss_sum: jax.Array
  history: jax.Array
  periods: jax.Array


def dwa(*, num_tasks: int, temperature: float = 2.0, period: int = 1,
        reduction: str = "sum", shared: _core.SharedMask = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic weight average (DWA): weight tasks by their loss descent rate.

  With :math:`\bar L(k)` the mean loss of period :math:`k` (a period is
  ``period`` steps; the paper uses an epoch),

  .. math::
    \lambda_t(k) = T\,\operatorname{softmax}_t\!\Big(
      \frac{\bar L_t(k-1)}{\tau\,\bar L_t(k-2)}\Big), \qquad
    \lambda(0) = \lambda(1) = 1,

  and the update during period :math:`k` is :math:`\sum_t \lambda_t g_t`
  (:func:`pcgrad_optax.weighting.dwa`; :math:`\tau = 2` as in the paper).
  The weights of a step never use that step's own losses; the losses (extra
  argument ``losses``) are accumulated into the current period's mean and
  rotated into the two-period history when the period ends. ``period=1``
  is the common per-step variant: step :math:`n \ge 2` uses
  :math:`L(n-1)/L(n-2)`, steps 0 and 1 have weights 1. The losses are
  assumed positive (a non-positive :math:`\bar L(k-2)` gives ratio 1).

  With a ``shared`` mask, only the shared leaves are weighted; every other
  leaf (task heads) gets the plain sum (or mean) of its task axis, i.e. each
  head keeps its own task's gradient. The default (every leaf shared)
  weights the whole model, as weighting the loss does in the paper.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    num_tasks: T.
    temperature: :math:`\tau > 0`.
    period: number of steps whose losses are averaged (steps per epoch for
      the paper's version).
    reduction: ``"sum"`` (the paper: weights sum to T) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`DWAState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)`` task
    losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.dwa(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> for losses in ([1.0, 1.0], [1.0, 0.5], [0.9, 0.4]):
    ...   u, state = tx.update(g, state, params, losses=jnp.array(losses))
    >>> print(jnp.round(u["w"], 4))  # third step: ratios 1 and 0.5
    [1.1244 0.8756]

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  _core.check_reduction(reduction)
  _check_num_tasks_arg(num_tasks)
  if not temperature > 0:
    raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
  if not isinstance(period, int) or isinstance(period, bool) or period < 1:
    raise ValueError(f"`period` must be a positive int, got {period!r}.")

  def init_fn(params):
    del params
    return DWAState(count=jnp.zeros([], jnp.int32),
                    loss_sum=jnp.zeros((num_tasks,), jnp.float32),
                    history=jnp.ones((2, num_tasks), jnp.float32),
                    periods=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, num_tasks,
                                        "dwa")
    losses = _check_losses(losses, t, "dwa")
    weights = jnp.where(
        state.periods >= 2,
        lw.dwa(state.history[0], state.history[1], temperature=temperature),
        jnp.ones((t,), jnp.float32))
    loss_sum = state.loss_sum + losses
    period_done = (state.count + 1) % period == 0
    history = jnp.where(
        period_done, jnp.stack([loss_sum / period, state.history[0]]),
        state.history)
    new_state = DWAState(
        count=optax.safe_increment(state.count),
        loss_sum=jnp.where(period_done, jnp.zeros_like(loss_sum), loss_sum),
        history=history,
        periods=jnp.minimum(state.periods + period_done.astype(jnp.int32), 2))
    return _combine(leaves, treedef, mask, weights, reduction), \
        _cast_like(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# FAMO.


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    logits: ``(T,)`` float32 task logits :math:`\\xi`.
    prev_losses: ``(T,)`` float32 losses passed at the previous step.
    count: number of updates done so far (int32).
    opt_state: state of the optimiser of the logits.
  """
  logits: jax.Array
  prev_losses: jax.Array
  count: jax.Array
  opt_state: optax.OptState


def famo(*, num_tasks: int, learning_rate: float = 0.025,
         weight_decay: float = 0.01, min_losses: float | jax.Array = 0.0,
         eps: float = 1e-8,
         optimizer: optax.GradientTransformation | None = None,
         reduction: str = "sum", shared: _core.SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""FAMO: fast adaptive multitask optimisation with learned logits.

  The update is the loss-gradient combination of
  :func:`pcgrad_optax.weighting.famo`,

  .. math::
    u = \sum_t w_t g_t, \qquad
    w_t = \frac{z_t/\ell_t}{\sum_k z_k/\ell_k}, \quad
    z = \operatorname{softmax}(\xi), \quad \ell_t = L_t - L_t^* + \epsilon,

  and the logits :math:`\xi` (state, zeros at first) learn from how much each
  task's log-loss went down over the last step,
  :math:`\delta_t = \log\ell_t^{\text{before}} - \log\ell_t^{\text{after}}`,

  .. math::
    \xi \leftarrow \xi - \beta\big(J_z(\xi)^\top\delta + \gamma\,\xi\big),
    \qquad J_z(\xi)^\top\delta = z \odot (\delta - z^\top\delta),

  with learning rate :math:`\beta` and weight decay :math:`\gamma`: a task
  that improved less than the weighted average gains weight.

  Losses before and after a step. At step :math:`n` the transformation is
  given ``losses`` :math:`L(\theta_n; b_n)` and stores them. At step
  :math:`n+1` it first updates the logits with :math:`\delta` between the
  stored :math:`L(\theta_n; b_n)` and an "after" value, then weights the
  gradients with the new logits and :math:`L(\theta_{n+1}; b_{n+1})`:

  * default: "after" is the new step's ``losses``
    :math:`L(\theta_{n+1}; b_{n+1})`, so FAMO costs nothing extra (with
    mini-batches, :math:`\delta` then mixes the step's progress with batch
    noise);
  * exact (the paper and the authors' code, one more forward pass): pass
    ``prev_batch_losses`` :math:`= L(\theta_{n+1}; b_n)`, the previous
    step's batch re-evaluated at the current parameters.

  Paper vs code: Algorithm 1 of the paper takes a plain gradient step on the
  logits (the default here, :math:`\beta = 0.025`, :math:`\gamma = 0.01` as
  in the authors' ``famo.py``; the paper tunes :math:`\gamma` per
  benchmark). The authors' code instead feeds the same gradient,
  :math:`J^\top\delta + \gamma\xi` (torch's Adam ``weight_decay`` adds
  :math:`\gamma\xi`), to Adam: ``optimizer=optax.adam(0.025)`` reproduces
  it. The code also clips the model's gradient norm (max 1), which is an
  ``optax.clip_by_global_norm(1.0)`` after this transformation.

  With a ``shared`` mask, only the shared leaves are weighted; every other
  leaf (task heads) gets the plain sum (or mean) of its task axis, i.e. each
  head keeps its own task's gradient. The default (every leaf shared)
  weights the whole model, as weighting the loss does in the paper.

  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.

  Args:
    num_tasks: T.
    learning_rate: :math:`\beta` (ignored when ``optimizer`` is given).
    weight_decay: :math:`\gamma`, added to the logits' gradient.
    min_losses: scalar or ``(T,)`` lower bounds :math:`L^*` of the losses
      (0 for non-negative losses); the losses must stay above them.
    eps: :math:`\epsilon` (``1e-8`` as in the authors' code).
    optimizer: optional optax transformation for the logits (default
      ``optax.sgd(learning_rate)``).
    reduction: ``"sum"`` (the paper: weights sum to 1) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`FAMOState`;
    ``update(grads, state, params=None, *, losses, prev_batch_losses=None)``
    needs the ``(T,)`` task losses (ValueError otherwise).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> params = {"w": jnp.array([2.0, -2.0])}
    >>> def task_losses(p):
    ...   return jnp.stack([(p["w"][0] - 1) ** 2 + 1, 10 * p["w"][1] ** 2 + 1])
    >>> tx = optax.chain(pcgrad_optax.famo(num_tasks=2), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   losses, grads = pcgrad_optax.task_value_and_grad(task_losses)(params)
    ...   updates, state = tx.update(grads, state, params, losses=losses)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(20):
    ...   params, state = step(params, state)
    >>> logits = state[0].logits  # task 0's log-loss falls more slowly,
    >>> bool(logits[0] > logits[1])  # so it gains weight
    True

  References:
    Liu, Liang, Chen, Liu, `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023.
  """
  _core.check_reduction(reduction)
  _check_num_tasks_arg(num_tasks)
  min_l = jnp.asarray(min_losses, jnp.float32)
  if min_l.ndim > 1 or (min_l.ndim == 1 and min_l.shape != (num_tasks,)):
    raise ValueError(f"`min_losses` must be a scalar or shape (T,) = "
                     f"({num_tasks},), got {min_l.shape}.")
  min_l = jnp.broadcast_to(min_l, (num_tasks,))
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def log_shifted(losses):
    return jnp.log(losses - min_l + eps)

  def init_fn(params):
    del params
    logits = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(logits=logits,
                     prev_losses=jnp.zeros((num_tasks,), jnp.float32),
                     count=jnp.zeros([], jnp.int32),
                     opt_state=opt.init(logits))

  def update_fn(updates, state, params=None, *, losses=None,
                prev_batch_losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = _resolve(updates, params, shared, num_tasks,
                                        "famo")
    losses = _check_losses(losses, t, "famo")
    after = losses if prev_batch_losses is None else _check_losses(
        prev_batch_losses, t, "famo", "prev_batch_losses")
    logits = state.logits
    # Step 0 has no previous losses: delta = 0 there (and no log of the
    # placeholder), and the logits keep their initial value below.
    first = state.count == 0
    before = jnp.where(first, after, state.prev_losses)
    delta = log_shifted(before) - log_shifted(after)
    z = jax.nn.softmax(logits)
    grad = z * (delta - jnp.dot(z, delta)) + weight_decay * logits
    step, opt_state = opt.update(grad.astype(logits.dtype), state.opt_state,
                                 logits)
    moved = optax.apply_updates(logits, step)
    logits = jnp.where(first, logits, moved)
    opt_state = jax.tree.map(lambda old, new: jnp.where(first, old, new),
                             state.opt_state, opt_state)
    weights = lw.famo(logits, losses, min_losses=min_l, eps=eps)
    new_state = FAMOState(logits=logits, prev_losses=losses,
                          count=optax.safe_increment(state.count),
                          opt_state=opt_state)
    return _combine(leaves, treedef, mask, weights, reduction), \
        _cast_like(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
