"""Weightings that need more than one Gram matrix: state, randomness, losses.

These are the pure cores of the stateful transformations in
:mod:`pcgrad_optax` (:func:`pcgrad_optax.gradvac`, :func:`pcgrad_optax.rlw`,
:func:`pcgrad_optax.dwa`, :func:`pcgrad_optax.uncertainty`,
:func:`pcgrad_optax.famo`): every function here maps its inputs (a Gram matrix
and EMA targets, a PRNG key, loss histories, learnable log-variances or
logits) to ``(T,)`` task weights, and the transformations keep the inputs in
their state. They are re-exported as ``pcgrad_optax.weighting.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["dwa", "famo", "gradvac", "rlw", "uncertainty"]

GRADVAC_EMA_SOURCES = ("modified", "original")
RLW_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")
UNCERTAINTY_TASK_TYPES = ("regression", "classification")

# |target cosine| is kept below this in GradVac's closed form, whose
# denominator sqrt(1 - target^2) vanishes at +-1.
_MAX_TARGET_COSINE = 1.0 - 1e-6


def _weighting_lib():
  # weighting.py imports this module at its end, so look it up lazily.
  from pcgrad_optax import weighting
  return weighting


def _as_vector(x, num_tasks: int | None, name: str,
               dtype=jnp.float32) -> jax.Array:
  """A float vector of task quantities, validated at trace time."""
  x = jnp.asarray(x)
  if x.ndim != 1 or (num_tasks is not None and x.shape[0] != num_tasks):
    expected = "(T,)" if num_tasks is None else f"(T,) = ({num_tasks},)"
    raise ValueError(f"`{name}` must have shape {expected}, got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(dtype)
  return x.astype(jnp.promote_types(x.dtype, dtype))


def gradvac(gram: jax.Array, targets: jax.Array, *, beta: float = 1e-2,
            key: jax.Array | None = None, order: jax.Array | None = None,
            ema_of: str = "modified") -> tuple[jax.Array, jax.Array]:
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
  weighting = _weighting_lib()
  gram = weighting.check_gram(gram)
  t = gram.shape[0]
  targets = jnp.asarray(targets)
  if targets.shape != (t, t):
    raise ValueError(
        f"`targets` must have shape (T, T) = ({t}, {t}) to match the Gram "
        f"matrix, got {targets.shape}.")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
  if ema_of not in GRADVAC_EMA_SOURCES:
    raise ValueError(
        f"Unknown ema_of {ema_of!r}; expected one of {GRADVAC_EMA_SOURCES}.")
  if order is None:
    if key is None:
      raise ValueError("weighting.gradvac needs a PRNG `key` or an `order`.")
    order = weighting.random_orders(key, t)
  order = jnp.asarray(order)
  if order.shape != (t, t) or not jnp.issubdtype(order.dtype, jnp.integer):
    raise ValueError(
        f"`order` must be an integer array of shape (T, T) = ({t}, {t}), got "
        f"{order.dtype} {order.shape}.")

  dtype = gram.dtype
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


def rlw(key: jax.Array, num_tasks: int, *,
        distribution: str = "normal") -> jax.Array:
  r"""Random loss weighting (RLW): fresh random task weights.

  .. math::
    \tilde\lambda \sim \mathcal N(0, I_T), \qquad
    \lambda = \operatorname{softmax}(\tilde\lambda),

  the paper's main variant (also LibMTL's and torchjd's). The weights lie on
  the simplex, so with the ``"sum"`` reduction the update is
  :math:`\sum_t \lambda_t g_t` (a random convex combination), exactly the
  paper's loss :math:`\sum_t \lambda_t L_t`.

  Other samplers: ``"uniform"`` is the softmax of
  :math:`\tilde\lambda \sim U(0, 1)^T`; ``"dirichlet"`` draws
  :math:`\lambda \sim \mathrm{Dir}(1, \dots, 1)`, uniform on the simplex,
  used as drawn (no softmax).

  Args:
    key: PRNG key.
    num_tasks: T.
    distribution: ``"normal"`` (default), ``"uniform"`` or ``"dirichlet"``.

  Returns:
    ``(T,)`` float32 weights, positive and summing to 1.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.rlw(jax.random.key(0), 3)
    >>> w.shape, bool(jnp.isclose(w.sum(), 1.0)), bool(jnp.all(w > 0))
    ((3,), True, True)

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, `Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
  if distribution == "normal":
    return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))
  if distribution == "uniform":
    return jax.nn.softmax(jax.random.uniform(key, (num_tasks,), jnp.float32))
  if distribution == "dirichlet":
    return jax.random.dirichlet(key, jnp.ones((num_tasks,), jnp.float32))
  raise ValueError(f"Unknown distribution {distribution!r}; expected one of "
                   f"{RLW_DISTRIBUTIONS}.")


def dwa(prev_losses: jax.Array, prev_prev_losses: jax.Array, *,
        temperature: float = 2.0) -> jax.Array:
  r"""Dynamic weight average (DWA) from the last two loss values.

  .. math::
    r_t = \frac{L_t(n-1)}{L_t(n-2)}, \qquad
    \lambda_t(n) = T\,\frac{\exp(r_t / \tau)}{\sum_k \exp(r_k / \tau)},

  so the weights sum to ``T`` and a task whose loss went down more slowly
  gets more weight. The paper uses :math:`\tau = 2`, weights 1 for the first
  two epochs, and epoch-averaged losses (see :func:`pcgrad_optax.dwa`, which
  keeps the history). A non-positive previous-previous loss gives ratio 1
  (no information) rather than a division by zero; losses are assumed
  positive.

  Args:
    prev_losses: ``(T,)`` losses :math:`L(n-1)`.
    prev_prev_losses: ``(T,)`` losses :math:`L(n-2)`.
    temperature: :math:`\tau > 0`.

  Returns:
    ``(T,)`` positive weights summing to T.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.dwa(jnp.array([1.0, 0.5]),
    ...                                jnp.array([1.0, 1.0]))
    >>> print(jnp.round(w, 4))
    [1.1244 0.8756]

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  prev = _as_vector(prev_losses, None, "prev_losses")
  t = prev.shape[0]
  prev_prev = _as_vector(prev_prev_losses, t, "prev_prev_losses")
  if not temperature > 0:
    raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
  positive = prev_prev > 0
  ratio = jnp.where(positive, prev / jnp.where(positive, prev_prev, 1), 1)
  return t * jax.nn.softmax(ratio / temperature)


def _uncertainty_factors(task_types: Sequence[str] | None, num_tasks: int
                         ) -> tuple[jax.Array, jax.Array]:
  """(weight factor a_t, regulariser factor b_t) of a_t e^{-s} L + b_t s."""
  if task_types is None:
    return jnp.ones((num_tasks,)), jnp.ones((num_tasks,))
  if isinstance(task_types, str):
    task_types = [task_types] * num_tasks
  task_types = list(task_types)
  if len(task_types) != num_tasks:
    raise ValueError(
        f"`task_types` has {len(task_types)} entries, expected one per task "
        f"(T={num_tasks}).")
  for kind in task_types:
    if kind not in UNCERTAINTY_TASK_TYPES:
      raise ValueError(f"Unknown task type {kind!r}; expected one of "
                       f"{UNCERTAINTY_TASK_TYPES}.")
  weight = jnp.array([0.5 if k == "regression" else 1.0 for k in task_types])
  return weight, jnp.full((num_tasks,), 0.5)


def uncertainty(log_vars: jax.Array, *,
                task_types: Sequence[str] | str | None = None) -> jax.Array:
  r"""Homoscedastic-uncertainty weights from learnable log-variances.

  With :math:`s_t = \log\sigma_t^2`, Kendall et al. (2018) minimise, jointly
  over the network and :math:`s`,

  .. math::
    \sum_t a_t\, e^{-s_t} L_t + b_t\, s_t,

  so the task weights are :math:`a_t e^{-s_t}`. The paper's factors are
  :math:`a = b = \tfrac12` for a regression (Gaussian) task and
  :math:`a = 1, b = \tfrac12` for a classification (softmax) task
  (``task_types``). By default (``task_types=None``) every task uses
  :math:`a = b = 1`: the objective :math:`e^{-s}L + s`, weights
  :math:`e^{-s}` (1 at :math:`s=0`). That is exactly twice the paper's
  regression objective — the same optimum :math:`s^* = \log L` and the same
  relative weights, with the factor 2 a global step size. (LibMTL and the
  Nash-MTL/FAMO code use :math:`\tfrac12(e^{-s}L + s)`, the regression form,
  for every task.)

  Args:
    log_vars: ``(T,)`` log-variances :math:`s`.
    task_types: None, ``"regression"``, ``"classification"``, or one of these
      per task.

  Returns:
    ``(T,)`` weights :math:`a_t e^{-s_t}`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> log_vars = jnp.log(jnp.array([1.0, 4.0]))
    >>> print(jnp.round(pcgrad_optax.weighting.uncertainty(log_vars), 3))
    [1.   0.25]
    >>> pcgrad_optax.weighting.uncertainty(
    ...     jnp.zeros(2), task_types=("regression", "classification"))
    Array([0.5, 1. ], dtype=float32)

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  log_vars = _as_vector(log_vars, None, "log_vars")
  weight_factor, _ = _uncertainty_factors(task_types, log_vars.shape[0])
  return weight_factor.astype(log_vars.dtype) * jnp.exp(-log_vars)


def famo(logits: jax.Array, losses: jax.Array, *,
         min_losses: jax.Array | float = 0.0, eps: float = 1e-8) -> jax.Array:
  r"""FAMO's task weights from its logits and the current losses.

  FAMO descends :math:`\sum_t z_t \log \ell_t` with
  :math:`z = \operatorname{softmax}(\xi)` and normalises so that the weights
  on the loss gradients sum to one:

  .. math::
    w_t = \frac{z_t / \ell_t}{\sum_k z_k / \ell_k},
    \qquad \ell_t = L_t - L_t^* + \epsilon ,

  the update :math:`\sum_t w_t \nabla L_t = c\sum_t z_t \nabla\log\ell_t`
  with :math:`c = (\sum_k z_k/\ell_k)^{-1}`. :math:`L^*` (``min_losses``) are
  lower bounds of the losses (0 for non-negative losses); the
  :math:`\epsilon = 10^{-8}` is the authors' code's. The logits are updated
  by :func:`pcgrad_optax.famo`.

  Args:
    logits: ``(T,)`` logits :math:`\xi`.
    losses: ``(T,)`` current task losses :math:`L`.
    min_losses: scalar or ``(T,)`` lower bounds :math:`L^*`.
    eps: :math:`\epsilon`.

  Returns:
    ``(T,)`` positive weights summing to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> print(pcgrad_optax.weighting.famo(jnp.zeros(2), jnp.array([1.0, 3.0])))
    [0.75 0.25]

  References:
    Liu, Liang, Chen, Liu, `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023.
  """
  logits = _as_vector(logits, None, "logits")
  t = logits.shape[0]
  losses = _as_vector(losses, t, "losses")
  shifted = losses - jnp.broadcast_to(jnp.asarray(min_losses, losses.dtype),
                                      (t,)) + eps
  scores = jax.nn.softmax(logits) / shifted
  return scores / jnp.sum(scores)
