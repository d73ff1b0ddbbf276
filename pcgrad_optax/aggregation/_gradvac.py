"""GradVac: raise pairwise cosines to adaptive (EMA) targets.

Wang, Tsvetkov, Firat, Cao, `Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models
<https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.checks import (check_num_tasks, check_scalar,
                                       init_num_tasks)
from pcgrad_optax._core.gram import check_gram, leaf_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.transform import (Aggregator, check_record_args,
                                          documented, init_record, key_data,
                                          key_impl, keep_if_finite, record,
                                          state_key)
from pcgrad_optax.aggregation._pcgrad import random_orders, task_orders

GRADVAC_EMA_SOURCES = ("modified", "original")
GRADVAC_GRANULARITIES = ("all", "module", "leaf")

_MAX_TARGET_COSINE = 1.0 - 1e-6


def gradvac_weighting(gram: jax.Array, targets: jax.Array, *,
                      beta: float = 1e-2, key: jax.Array | None = None,
                      order: jax.Array | None = None, ema_of: str = "modified"
                      ) -> tuple[jax.Array, jax.Array]:
  r"""Gradient Vaccine (GradVac) as a weighting with EMA cosine targets.

  Algorithm 1 of Wang et al. (2021) on one group of parameters. Every task
  gradient starts as :math:`g_i^{pt} = g_i`; for every other task :math:`j`,
  in a random order drawn for :math:`i` (as in PCGrad), the cosine
  :math:`\phi_{ij} = \cos(g_i^{pt}, g_j)` against the *original* :math:`g_j`
  is compared with the target :math:`\hat\phi_{ij}`; if
  :math:`\phi_{ij} < \hat\phi_{ij}` the closed-form multiple of :math:`g_j`
  that raises the cosine exactly to the target is added,

  .. math::
    g_i^{pt} \leftarrow g_i^{pt} + \frac{\|g_i^{pt}\|\,\big(\hat\phi_{ij}
      \sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}
      {\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\; g_j ,

  and the target moves towards the measured cosine,
  :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}`.
  The update is :math:`\sum_i g_i^{pt}`. With :math:`\hat\phi = 0` the
  correction is exactly PCGrad's projection.

  Like :func:`pcgrad_optax.weighting.pcgrad` this runs on the Gram matrix:
  :math:`g_i^{pt} = \sum_k c_{ik} g_k`, so
  :math:`g_i^{pt}\cdot g_j = (CK)_{ij}` and
  :math:`\|g_i^{pt}\|^2 = (CKC^T)_{ii}`; the ``T`` steps of all tasks run in
  one ``lax.fori_loop``.

  Which cosine feeds the EMA: the paper's Algorithm 1 measures
  :math:`\phi_{ij}` on the partially vaccinated :math:`g_i^{pt}` (just before
  its correction against :math:`j`) and uses that same value for the EMA;
  LibMTL and torchjd do the same, and it is the default
  (``ema_of="modified"``). ``ema_of="original"`` tracks the cosine of the raw
  gradients :math:`\cos(g_i, g_j)` instead (order independent, symmetric).

  Edge cases: a pair where either gradient is zero is skipped (no
  correction, target unchanged), and so is a pair where :math:`g_i^{pt}` has
  cancelled down to rounding noise (below :math:`8\epsilon\sum_k |c_{ik}|
  \|g_k\|`, e.g. after an exactly opposite :math:`g_j`); targets are clipped to
  :math:`|\hat\phi| \le 1 - 10^{-6}` inside the closed form, whose denominator
  vanishes at :math:`\pm 1`.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients (of one group).
    targets: ``(T, T)`` EMA targets :math:`\hat\phi` (row ``i``, column ``j``
      is the target of task ``i`` against task ``j``; the diagonal is
      unused). The paper starts from zeros.
    beta: EMA rate in ``[0, 1]``; the paper uses ``1e-2`` (LibMTL and
      torchjd default to ``0.5``).
    key: PRNG key for the per-task random orders; ignored if ``order`` given.
    order: optional ``(T, T)`` int array; row ``i`` is the order in which
      task ``i`` visits the others (the entry equal to ``i`` is skipped).
    ema_of: ``"modified"`` (the paper) or ``"original"``, see above.

  Returns:
    ``(weights, new_targets)``: ``(T,)`` weights ``w`` with
    ``weighted_sum(stacked, w)`` equal to the GradVac update (sum
    reduction), and the updated ``(T, T)`` targets in the dtype of
    ``targets``.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [-1., 1.]])
    >>> w, targets = pcgrad_optax.weighting.gradvac(
    ...     g @ g.T, jnp.full((2, 2), 0.5), beta=0.1,
    ...     order=jnp.array([[0, 1], [1, 0]]))
    >>> print(jnp.round(w @ g, 4))  # both raised to cosine 0.5 with the other
    [0.7887 1.7887]
    >>> print(jnp.round(targets[0, 1], 4))  # 0.9 * 0.5 + 0.1 * cos(g_0, g_1)
    0.3793

  References:
    Wang, Tsvetkov, Firat, Cao, `Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  targets = jnp.asarray(targets)
  if targets.shape != (t, t):
    raise ValueError(
        f"`targets` must have shape (T, T) = ({t}, {t}) to match the Gram "
        f"matrix, got {targets.shape}.")
  _check_beta(beta)
  if ema_of not in GRADVAC_EMA_SOURCES:
    raise ValueError(
        f"Unknown ema_of {ema_of!r}; expected one of {GRADVAC_EMA_SOURCES}.")
  order = task_orders(key, order, t, "weighting.gradvac")

  dtype = gram.dtype
  beta = jnp.asarray(beta, dtype)
  eps = jnp.finfo(dtype).eps
  sq_norms = jnp.maximum(jnp.diagonal(gram), 0)
  norms = jnp.sqrt(sq_norms)
  rows = jnp.arange(t)
  if ema_of == "original":
    outer = norms[:, None] * norms[None, :]
    original_cos = jnp.clip(
        gram / jnp.where(outer > 0, outer, 1), -1, 1)

  def vaccinate_step(k, carry):
    coefs, phi_hat = carry
    j = order[:, k]                      # the task each row is compared with
    coefs_gram = coefs @ gram            # (C K)_{ik} = g_i^pt . g_k
    dots = coefs_gram[rows, j]
    sq_norm_i = jnp.maximum(jnp.sum(coefs_gram * coefs, axis=1), 0)
    norm_i = jnp.sqrt(sq_norm_i)
    # Rounding in forming g_i^pt = sum_k c_ik g_k leaves up to about
    # eps * sum_k |c_ik| ||g_k||; a smaller norm (e.g. after exactly opposite
    # gradients cancelled) is a zero gradient, whose cosine is noise.
    noise_floor = 8 * eps * (jnp.abs(coefs) @ norms)
    norm_j = norms[j]
    valid = (j != rows) & (norm_i > noise_floor) & (norm_j > 0)
    denom = jnp.where(valid, norm_i * norm_j, 1)
    phi = jnp.clip(jnp.where(valid, dots / denom, 0), -1, 1)
    # sin(phi)^2 = 1 - (a.b / |a|^2) (a.b / |b|^2), without square roots:
    # 1 - phi^2 would turn the last-bit error of the square roots in phi into
    # an error of sqrt(eps) in the sine even for exactly opposite gradients.
    ratio_i = dots / jnp.where(valid, sq_norm_i, 1)
    ratio_j = dots / jnp.where(valid, sq_norms[j], 1)
    root_phi = jnp.where(valid,
                         jnp.sqrt(jnp.maximum(1 - ratio_i * ratio_j, 0)), 0)
    target = phi_hat[rows, j]
    safe_target = jnp.clip(target, -_MAX_TARGET_COSINE, _MAX_TARGET_COSINE)
    root_target = jnp.sqrt(1 - safe_target**2)
    step = (norm_i * (safe_target * root_phi - phi * root_target)
            / (jnp.where(valid, norm_j, 1) * root_target))
    step = jnp.where(valid & (phi < target), step, 0)
    measured = phi if ema_of == "modified" else original_cos[rows, j]
    new_target = jnp.where(valid, (1 - beta) * target + beta * measured,
                           target)
    return (coefs.at[rows, j].add(step),
            phi_hat.at[rows, j].set(new_target.astype(phi_hat.dtype)))

  coefs, new_targets = lax.fori_loop(
      0, t, vaccinate_step,
      (jnp.eye(t, dtype=dtype), targets.astype(dtype)))
  return coefs.sum(axis=0), new_targets.astype(targets.dtype)


def _check_beta(beta) -> None:
  check_scalar(beta, "`beta`", lambda b: 0.0 <= b <= 1.0, "in [0, 1]")


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    key: uint32 raw data of the typed PRNG key (``jax.random.key_data``,
      which every checkpointer can store); step ``n`` draws its orders from
      ``jax.random.fold_in(jax.random.wrap_key_data(key), n)``.
    count: number of updates done so far (int32).
    targets: ``(G, T, T)`` float32 EMA cosine targets, one ``(T, T)`` block
      per parameter group (``G = 1`` for ``granularity="all"``).
    weights: ``(G, T)`` weights applied to each group's shared leaves at the
      last step (zeros before the first update), in the params'
      accumulation dtype.
    gram: with ``keep_gram``, the last step's ``(G, T, T)`` Gram blocks;
      else None.
  """
  key: jax.Array
  count: jax.Array
  targets: jax.Array
  weights: jax.Array | None = None
  gram: jax.Array | None = None


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


@functools.partial(jax.jit, static_argnames=("mask", "groups", "ema_of",
                                             "reduction"))
def _gradvac_step(leaves, targets, key, count, beta, *, mask, groups, ema_of,
                  reduction):
  t = leaves[0].shape[0]
  acc = leaves_accumulation_dtype(leaves)
  grams = [jnp.zeros((t, t), acc) for _ in range(targets.shape[0])]
  for x, m, g in zip(leaves, mask, groups):
    if m:
      grams[g] = grams[g] + leaf_gram(x).astype(acc)
  order = random_orders(jax.random.fold_in(key, count), t)
  # A group without shared leaves has a zero Gram matrix: its weights stay at
  # one (unused) and its targets untouched (zero gradients are skipped).
  grams = jnp.stack(grams)
  weights, new_targets = jax.vmap(
      lambda gram, tgt: gradvac_weighting(
          gram, tgt, beta=beta, order=order, ema_of=ema_of))(grams, targets)
  out = combine_leaves(leaves, mask, [weights[g] for g in groups], reduction)
  return out, new_targets.astype(targets.dtype), weights, grams


@documented
def gradvac(key: jax.Array | int = 0, *, num_tasks: int, beta: float = 1e-2,
            granularity: str = "all", ema_of: str = "modified",
            reduction: str = "sum", shared: SharedMask = None,
            keep_gram: bool = False) -> Aggregator:
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

  A step whose shared gradients hold a NaN or inf (a non-finite Gram
  block) leaves the whole state as it was: targets, count (so the same
  random orders come next), key and weights record, as a skipped step
  would; the targets never take in a bad batch's cosines. The update of
  such a step is still non-finite: wrap the chain in
  :func:`pcgrad_optax.apply_if_finite` to skip it (which also keeps the
  optimiser's state).

  Granularity: the paper vaccinates every model component (layer)
  separately with its own targets. ``granularity="all"`` treats the whole
  shared vector as one group (like PCGrad); ``"module"`` groups the leaves
  by their parent in the pytree (a Flax ``Dense``'s kernel and bias
  together, the paper's per-layer variant); ``"leaf"`` makes every leaf its
  own group. Each group costs one ``T x T`` Gram block; the groups run in
  one vectorised call with the same random orders.

  @FIRST_IN_CHAIN@

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
    keep_gram: also keep the last step's ``(G, T, T)`` Gram blocks in the
      state's ``gram`` (the ``(G, T)`` weights are always kept).

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`GradVacState`.

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
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_record_args(num_tasks, keep_gram, "gradvac")
  if granularity not in GRADVAC_GRANULARITIES:
    raise ValueError(f"Unknown granularity {granularity!r}; expected one of "
                     f"{GRADVAC_GRANULARITIES}.")
  _check_beta(beta)
  if ema_of not in GRADVAC_EMA_SOURCES:
    raise ValueError(f"Unknown ema_of {ema_of!r}; expected one of "
                     f"{GRADVAC_EMA_SOURCES}.")
  impl = key_impl(key)

  def init_fn(params):
    _, num_groups = _gradvac_groups(params, granularity)
    t = init_num_tasks(expected, "gradvac")
    weights, gram = init_record(params, t, keep_gram, "gradvac",
                                (num_groups,))
    return GradVacState(
        key=key_data(key), count=jnp.zeros([], jnp.int32),
        targets=jnp.zeros((num_groups, t, t), jnp.float32),
        weights=weights, gram=gram)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "gradvac")
    groups, num_groups = _gradvac_groups(updates, granularity)
    if state.targets.shape != (num_groups, t, t):
      raise ValueError(
          f"gradvac state targets have shape {state.targets.shape}, expected "
          f"{(num_groups, t, t)} for granularity={granularity!r}: the "
          "gradients' structure differs from the params given to init.")
    out, targets, weights, grams = _gradvac_step(
        leaves, state.targets, state_key(state.key, impl), state.count,
        jnp.asarray(beta, jnp.float32), mask=tuple(mask),
        groups=tuple(groups), ema_of=ema_of, reduction=reduction)
    step_grams = grams
    weights, grams = record(weights, grams, state.weights, state.gram, t,
                            reduction)
    # A non-finite shared gradient leaves the whole state as it was.
    return jax.tree.unflatten(treedef, out), keep_if_finite(
        step_grams, GradVacState(state.key, optax.safe_increment(state.count),
                                 targets, weights, grams), state)

  return Aggregator(init_fn, update_fn)
