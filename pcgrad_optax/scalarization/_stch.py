"""STCH: smooth Tchebycheff scalarisation, nadir point from a warm-up.

Lin, Zhang, Yang, Liu, Wang, Zhang, `Smooth Tchebycheff Scalarization for
Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_, ICML 2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.checks import (as_vector, check_num_tasks,
                                       check_positive, concrete,
                                       losses_in_domain, static_int)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    bounded_below,
                                                    finite,
                                                    loss_transformation,
                                                    preference_vector,
                                                    scalarized)


def stch_weighting(losses: jax.Array, *, mu: float = 1.0,
                   preference: jax.Array | None = None,
                   reference: jax.Array | float | None = None,
                   log_losses: bool = True, eps: float = 1e-20
                   ) -> jax.Array:
  r"""Smooth Tchebycheff's gradient weights on the task losses.

  The smooth Tchebycheff scalarisation of objectives :math:`f_t` with
  preference :math:`\lambda` and smoothing :math:`\mu > 0` is

  .. math::
    S_\mu(f) = c\,\mu \log \sum_t \exp\Big(\frac{\lambda_t f_t}{\mu}\Big),

  a smooth upper bound of :math:`c\max_t \lambda_t f_t`, tight as
  :math:`\mu \to 0`; its gradient weights on the loss gradients are

  .. math::
    w_t = c\,\operatorname{softmax}\Big(\frac{\lambda f}{\mu}\Big)_t
      \lambda_t\,\frac{\partial f_t}{\partial L_t}.

  Two forms of :math:`f`:

  * ``log_losses=True`` (default; the paper's multi-task experiments, the
    authors' code and LibMTL): :math:`f_t = \log(L_t/n_t + \epsilon)` with
    :math:`n` the nadir point (``reference``; :func:`pcgrad_optax.stch`
    estimates it during a warm-up), :math:`\lambda = 1`, :math:`c = T`, so
    :math:`w_t = T\,\operatorname{softmax}(\lambda f/\mu)_t\,\lambda_t /
    (L_t + \epsilon n_t)`: at balanced losses these are the weights
    :math:`1/L_t` of :math:`\sum_t\log L_t`. Losses must be :math:`\ge 0`.
  * ``log_losses=False`` (the paper's general definition and torchjd's
    ``STCH``): :math:`f_t = L_t - z_t` with :math:`z` the ideal point
    (``reference``, default 0), :math:`\lambda = 1/T` by default,
    :math:`c = 1`: :math:`w = \operatorname{softmax}(\lambda f/\mu)\odot
    \lambda`.

  Args:
    losses: ``(T,)`` task losses.
    mu: smoothing :math:`\mu > 0` (the authors' code: 1; torchjd has no
      default; the paper tries 0.01 to 1).
    preference: ``(T,)`` :math:`\lambda \ge 0` (default: 1, or 1/T with
      ``log_losses=False``).
    reference: scalar or ``(T,)`` nadir point :math:`n > 0` (log form,
      default 1) or ideal point :math:`z` (linear form, default 0).
    log_losses: which form (see above).
    eps: :math:`\epsilon` of the log form (the authors' ``1e-20``).

  Returns:
    ``(T,)`` non-negative weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.stch(jnp.array([1.0, 3.0]), mu=1.0)
    >>> print(jnp.round(w, 4))  # 2 softmax(log L) / L = 2 / (1 + 3)
    [0.5 0.5]
    >>> w = pcgrad_optax.weighting.stch(jnp.array([1.0, 4.0]), mu=0.01,
    ...                                 log_losses=False)
    >>> print(jnp.round(w, 4))  # the largest loss takes all: lambda = 1/2
    [0.  0.5]

  References:
    Lin, Zhang, Yang, Liu, Wang, Zhang, `Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_,
    ICML 2024.
  """
  losses = as_vector(losses, None, "losses")
  weights, _ = _stch_weights_and_value(
      losses, mu=mu, preference=preference, reference=reference,
      log_losses=log_losses, eps=eps, method="stch")
  return weights


def _stch_weights_and_value(losses, *, mu, preference, reference, log_losses,
                            eps, method):
  t = losses.shape[0]
  check_positive(mu, "`mu`")
  losses_in_domain(losses, 0.0 if log_losses else None, method=method)
  lam = preference_vector(preference, t, 1.0 if log_losses else 1.0 / t)
  if log_losses:
    n = jnp.broadcast_to(jnp.asarray(1.0 if reference is None else reference,
                                     losses.dtype), (t,))
    n = jnp.where(n > 0, n, 1.0)          # a degenerate nadir estimate
    f = jnp.log(losses / n + eps)
    slope = 1.0 / (losses + eps * n)      # d f / d L
    c = t
  else:
    z = 0.0 if reference is None else reference
    f = losses - jnp.broadcast_to(jnp.asarray(z, losses.dtype), (t,))
    slope = jnp.ones_like(losses)
    c = 1
  y = lam * f / mu
  weights = c * jax.nn.softmax(y) * lam * slope
  value = c * mu * jax.nn.logsumexp(y)
  return weights, value


class STCHState(NamedTuple):
  """State of :func:`stch`.

  Attributes:
    count: number of updates done so far (int32).
    loss_sum: ``(T,)`` float32 sum of the losses of the warm-up steps that
      estimate the nadir point (fixed after the warm-up).
    weights: ``(T,)`` weights applied to the weighted leaves at the last
      step (zeros before the first update; float32, or float64 for float64
      params).
  """
  count: jax.Array
  loss_sum: jax.Array
  weights: jax.Array | None = None


def _stch_method(num_tasks, mu, warmup_steps, nadir_steps, preference,
                 reference, log_losses, eps, method):
  """``(init, step)`` of STCH (see ``_scalarized.py``)."""
  expected = check_num_tasks(num_tasks)   # None when traced
  check_positive(mu, "`mu`")
  # Step counts may be traced (optax.inject_hyperparams): validated when
  # concrete, used as arrays (no Python branch on their values).
  warmup = static_int(warmup_steps, "`warmup_steps`", minimum=0)
  if nadir_steps is None:
    nadir_steps = warmup_steps
  nadir = concrete(nadir_steps)
  if nadir is not None:
    ok = (nadir.ndim == 0 and nadir.dtype != bool
          and jnp.issubdtype(nadir.dtype, jnp.integer))
    if ok and warmup is not None:
      ok = 0 <= int(nadir) <= warmup and (warmup == 0 or int(nadir) > 0)
    if not ok:
      shown = nadir_steps if isinstance(nadir_steps, int) else nadir.tolist()
      raise ValueError(f"`nadir_steps` must be an int in [1, warmup_steps="
                       f"{warmup_steps}], got {shown!r}.")
  if preference is not None and expected is not None:
    preference_vector(preference, expected, 1.0)

  def init(t):
    return STCHState(count=jnp.zeros([], jnp.int32),
                     loss_sum=jnp.zeros((t,), jnp.float32))

  def step(losses, state, t, extra):
    del t, extra
    if reference is None:
      # The warm-up's nadir (ideal) estimate; all zeros without a warm-up,
      # which is the default point: n = 1 (a non-positive nadir counts as
      # 1) in the log form, z = 0 in the linear one.
      point = state.loss_sum / jnp.maximum(nadir_steps, 1)
    else:
      point = reference
    weights, value = _stch_weights_and_value(
        losses, mu=mu, preference=preference, reference=point,
        log_losses=log_losses, eps=eps, method=method)
    # Warm-up: the sum of the log-losses (linear form: of the losses), the
    # last nadir_steps of it averaged into the nadir estimate. Without a
    # warm-up (warmup_steps=0), `warm` is always False.
    if log_losses:
      warm_w, warm_v = 1.0 / (losses + eps), jnp.sum(jnp.log(losses + eps))
    else:
      warm_w, warm_v = jnp.ones_like(losses), jnp.sum(losses)
    warm = state.count < warmup_steps
    weights = jnp.where(warm, warm_w, weights)
    value = jnp.where(warm, warm_v, value)
    collect = warm & (state.count >= warmup_steps - nadir_steps)
    loss_sum = jnp.where(collect, state.loss_sum + losses, state.loss_sum)
    return weights, value, STCHState(optax.safe_increment(state.count),
                                     loss_sum)

  return init, step


@documented
def stch(*, num_tasks: int, warmup_steps: int, mu: float = 1.0,
         nadir_steps: int | None = None, preference: jax.Array | None = None,
         reference: jax.Array | float | None = None, log_losses: bool = True,
         eps: float = 1e-20, reduction: str = "sum",
         shared: SharedMask = None) -> Aggregator:
  r"""STCH: smooth Tchebycheff scalarisation with a nadir-point warm-up.

  The update is :math:`\sum_t w_t g_t` with the gradient weights of the
  smooth Tchebycheff scalarisation :math:`S_\mu` (see
  :func:`pcgrad_optax.weighting.stch` for both forms). By default, as in
  the paper's multi-task experiments and the authors' code (and LibMTL),
  on the log of the nadir-normalised losses,

  .. math::
    S_\mu = T\mu\log\sum_t \exp\Big(\frac{\lambda_t}{\mu}
      \log\Big(\frac{L_t}{n_t} + \epsilon\Big)\Big),

  where the nadir point :math:`n` is the mean of the losses over the last
  ``nadir_steps`` of ``warmup_steps`` warm-up steps, during which the
  update is the gradient of :math:`\sum_t \log(L_t + \epsilon)` (weights
  :math:`1/(L_t+\epsilon)`). The authors count epochs: ``warmup_epoch = 4``
  warm-up epochs, then one more epoch, also with the log-loss sum, whose
  mean losses are the nadir; that is ``warmup_steps = 5 * steps_per_epoch,
  nadir_steps = steps_per_epoch`` here. ``reference`` fixes the nadir point
  (no estimate); with ``warmup_steps=0`` and no ``reference``, :math:`n = 1`.

  ``log_losses=False`` is the paper's general definition and torchjd's
  ``STCH(mu, weights, reference)``:
  :math:`\mu\log\sum_t\exp(\lambda_t(L_t - z_t)/\mu)` with the ideal point
  :math:`z` (``reference``, or the warm-up mean, or 0) and default
  :math:`\lambda = 1/T`; torchjd's is ``warmup_steps=0``.

  The losses (extra argument ``losses``) are needed; with ``log_losses``
  they must be :math:`\ge 0` (a ValueError for concrete ones; a loss of
  exactly 0 gets the weight :math:`1/\epsilon`, as in the authors' code).
  Under ``jit`` a step with a loss outside that (a non-finite one, or a
  negative one in the log form) leaves the whole state as it was: it is not
  counted, so the warm-up and the nadir estimate use good steps only. The
  one-backward-pass form is :func:`pcgrad_optax.scalarization.stch_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T.
    warmup_steps: steps before STCH starts (0: none).
    mu: smoothing :math:`\mu > 0` (the authors' default 1).
    nadir_steps: how many of the last warm-up steps are averaged into the
      nadir point (default: all of them).
    preference: ``(T,)`` :math:`\lambda \ge 0` (default 1; 1/T with
      ``log_losses=False``).
    reference: fixed nadir (log form) or ideal (linear form) point, scalar
      or ``(T,)``; None: estimated during the warm-up.
    log_losses: the log form (default) or the linear form.
    eps: :math:`\epsilon` (the authors' ``1e-20``).
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with an :class:`STCHState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses (ValueError otherwise).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.stch(num_tasks=2, warmup_steps=1)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> u, state = tx.update(g, state, params, losses=jnp.array([1.0, 4.0]))
    >>> print(u["w"])  # warm-up: 1 / L; the nadir is now (1, 4)
    [1.   0.25]
    >>> u, state = tx.update(g, state, params, losses=jnp.array([0.5, 4.0]))
    >>> print(jnp.round(u["w"], 4))  # 2 softmax(log(L / n)) / L
    [1.3333 0.3333]

  References:
    Lin, Zhang, Yang, Liu, Wang, Zhang, `Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_,
    ICML 2024.
  """
  check_reduction(reduction)
  init, step = _stch_method(num_tasks, mu, warmup_steps, nadir_steps,
                            preference, reference, log_losses, eps, "stch")
  return loss_transformation(init, step, method="stch", num_tasks=num_tasks,
                             reduction=reduction, shared=shared,
                             domain=bounded_below(0.0) if log_losses
                             else finite)


def stch_loss(*, num_tasks: int, warmup_steps: int, mu: float = 1.0,
              nadir_steps: int | None = None,
              preference: jax.Array | None = None,
              reference: jax.Array | float | None = None,
              log_losses: bool = True, eps: float = 1e-20,
              reduction: str = "sum") -> LossScalarization:
  r"""STCH as one scalar loss (one backward pass).

  ``loss(losses, state)`` returns the smooth Tchebycheff value :math:`S_\mu`
  (during the warm-up: :math:`\sum_t \log(L_t + \epsilon)`) with the
  gradient of :func:`stch`'s update (``shared=None``) and the next state,
  the nadir estimate accumulated exactly as :func:`stch` does (it needs the
  losses only). Arguments as for :func:`stch`; no ``shared`` mask.

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization` with an
    :class:`STCHState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.stch_loss(num_tasks=2,
    ...                                             warmup_steps=1)
    >>> state = scal.init()
    >>> _, state = scal.loss(jnp.array([1.0, 4.0]), state)   # warm-up
    >>> g, state = jax.grad(scal.loss, has_aux=True)(jnp.array([0.5, 4.0]),
    ...                                              state)
    >>> print(jnp.round(g, 4))
    [1.3333 0.3333]

  References:
    Lin, Zhang, Yang, Liu, Wang, Zhang, `Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_,
    ICML 2024.
  """
  init, step = _stch_method(num_tasks, mu, warmup_steps, nadir_steps,
                            preference, reference, log_losses, eps,
                            "stch_loss")
  return scalarized(init, step, method="stch_loss", num_tasks=num_tasks,
                    reduction=reduction,
                    domain=bounded_below(0.0) if log_losses else finite)
