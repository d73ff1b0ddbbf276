"""CR-MOGM: an exponential moving average of any Gram weighting's weights.

Zhou, Zhang, Jiang, Zhong, Gu & Zhu, `On the Convergence of Stochastic
Multi-Objective Gradient Manipulation and Beyond
<https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_,
NeurIPS 2022.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.checks import (check_num_tasks, check_scalar,
                                       init_num_tasks)
from pcgrad_optax._core.gram import check_gram, masked_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, GramStep,
                                          answers_probe, check_record,
                                          check_record_args, documented,
                                          init_record, keep_if_finite)


def _check_beta(beta) -> None:
  # Concrete values (numbers or arrays) are validated; traced ones pass.
  check_scalar(beta, "CR-MOGM's beta", lambda b: 0.0 <= b <= 1.0,
               "in [0, 1]")


def cr_mogm_weighting(gram: jax.Array, previous: jax.Array, *,
                      weighting: Callable[[jax.Array], jax.Array],
                      beta: float = 0.9) -> jax.Array:
  r"""One CR-MOGM step: the EMA of a weighting's weights (Zhou et al., 2022).

  With :math:`\hat\lambda_k` the weights ``weighting(gram)`` of the current
  (stochastic) gradients and :math:`\lambda_{k-1}` the previous smoothed
  weights,

  .. math::
    \lambda_k = \beta\, \lambda_{k-1} + (1 - \beta)\, \hat\lambda_k .

  Gradient manipulation with weights computed from the current mini-batch
  only can fail to converge to Pareto-stationary points; averaging the
  weights over steps reduces the correlation between the weights and the
  gradients they multiply, which restores convergence (the paper's
  Theorem; it lets :math:`\beta_k \to 1` as the learning rate decays, which
  ``optax.inject_hyperparams`` can schedule).

  Convention: ``beta`` multiplies the *previous* weights, the EMA decay of
  ``optax.ema``. The two libraries that implement the method agree on
  this: torchjd's ``CRMOGMWeighting(alpha=...)`` (whose documentation
  reads the paper's Corollary 1 as a coefficient on the previous weights
  that starts near 0 and rises to 1 as the learning rate decays, e.g.
  ``1 - lr_k / lr_0``) and LibMOON's CR-MOGM core (a momentum on the
  previous weights). The paper's abstract describes the scheme as
  exponentially averaging the past weights; its full text was not at hand
  to check the symbol, so there is no second convention to offer (with
  the coefficient on the new weights, pass ``1 - beta``). A constant
  ``beta`` is the libraries' default (0.9); the corollary's schedule is
  ``optax.inject_hyperparams(pcgrad_optax.cr_mogm, static_args=(
  "weighting", "num_tasks"))(weighting=..., beta=schedule, num_tasks=T)``.

  Args:
    gram: ``(T, T)`` Gram matrix.
    previous: ``(T,)`` previous smoothed weights :math:`\lambda_{k-1}`.
    weighting: a pure Gram weighting ``(T, T) -> (T,)``, e.g.
      :func:`pcgrad_optax.weighting.mgda` or ``functools.partial(
      pcgrad_optax.weighting.cagrad, c=0.5)``.
    beta: EMA decay in ``[0, 1]`` (0: the weighting itself; 1: frozen).

  Returns:
    ``(T,)`` smoothed weights :math:`\lambda_k`.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> fresh = pcgrad_optax.weighting.mgda(g @ g.T)
    >>> np.round(np.asarray(fresh, np.float64), 4)
    array([0.9, 0.1])
    >>> w = pcgrad_optax.weighting.cr_mogm(
    ...     g @ g.T, jnp.array([0.5, 0.5]),
    ...     weighting=pcgrad_optax.weighting.mgda, beta=0.5)
    >>> np.round(np.asarray(w, np.float64), 4)
    array([0.7, 0.3])

  References:
    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, `On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_,
    NeurIPS 2022.
  """
  gram = check_gram(gram)
  _check_beta(beta)
  t = gram.shape[0]
  fresh = jnp.asarray(weighting(gram))
  if fresh.shape != (t,):
    raise ValueError(f"CR-MOGM's weighting returned shape {fresh.shape}, "
                     f"expected (T,) = ({t},).")
  previous = jnp.asarray(previous)
  if previous.shape != (t,):
    raise ValueError(f"CR-MOGM's `previous` weights must have shape (T,) = "
                     f"({t},), got {previous.shape}.")
  return _ema(previous, fresh, beta, gram.dtype)


def _ema(previous, fresh, beta, dtype):
  dtype = jnp.promote_types(fresh.dtype, dtype)
  beta = jnp.asarray(beta, dtype)
  return beta * previous.astype(dtype) + (1 - beta) * fresh.astype(dtype)


class CRMOGMState(NamedTuple):
  """State of :func:`cr_mogm`.

  Attributes:
    count: number of updates done so far (int32).
    weights: ``(T,)`` float32 smoothed weights :math:`\\lambda_{k-1}` (the
      initial weights before the first update): the last step's task
      weights for ``reduction="sum"`` (``"mean"`` applies them divided by
      T, the recurrence keeps them undivided).
    gram: with ``keep_gram``, the last step's ``(T, T)`` Gram matrix of the
      shared leaves (zeros before the first update, in the params'
      accumulation dtype); else None.
  """
  count: jax.Array
  weights: jax.Array
  gram: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("weighting", "mask",
                                             "reduction", "restart"))
def _cr_mogm_step(leaves, previous, count, beta, *, weighting, mask,
                  reduction, restart):
  t = leaves[0].shape[0]
  gram = masked_gram(leaves, list(mask), t)
  smoothed = _smoothed_weights(gram, previous, count, beta,
                               weighting=weighting, restart=restart)
  return combine_leaves(leaves, mask, smoothed, reduction), smoothed, gram


def _smoothed_weights(gram, previous, count, beta, *, weighting, restart):
  """One EMA step of the weighting's weights on this step's Gram matrix."""
  t = gram.shape[0]
  fresh = jnp.asarray(weighting(gram))
  if fresh.shape != (t,):
    raise ValueError(f"CR-MOGM's weighting returned shape {fresh.shape}, "
                     f"expected (T,) = ({t},).")
  if restart:
    # No initial weights: lambda_0 = lambda_hat_1, so the first step gives
    # the weighting's own weights.
    previous = jnp.where(count == 0, fresh.astype(previous.dtype), previous)
  return _ema(previous, fresh, beta, gram.dtype)


@documented
def cr_mogm(weighting: Callable[[jax.Array], jax.Array],
            beta: float = 0.9, *, num_tasks: int,
            initial_weights: jax.Array | None = None,
            reduction: str = "sum", shared: SharedMask = None,
            keep_gram: bool = False) -> Aggregator:
  r"""CR-MOGM (Zhou et al., 2022): smooth any Gram weighting over steps.

  Every step computes ``weighting``'s weights :math:`\hat\lambda_k` on the
  Gram matrix of the shared leaves and applies their exponential moving
  average :math:`\lambda_k = \beta\lambda_{k-1} + (1-\beta)\hat\lambda_k`
  (kept in the state) to the shared leaves; heads get their plain sum. With
  ``initial_weights=None`` the first step uses :math:`\hat\lambda_1` itself
  (:math:`\lambda_0 = \hat\lambda_1`, as torchjd 0.18; earlier torchjd
  started from uniform weights, ``initial_weights=jnp.full(T, 1 / T)``).
  See :func:`pcgrad_optax.weighting.cr_mogm` for the convention of
  ``beta``.

  A step whose shared gradients hold a NaN or inf (its Gram matrix is not
  finite) leaves the whole state, count included, as it was, so the bad
  step's weights never enter the average; its update is still non-finite:
  wrap the chain in :func:`pcgrad_optax.apply_if_finite` to skip it.

  @FIRST_IN_CHAIN@

  Args:
    weighting: a stateless Gram weighting ``(T, T) -> (T,)`` (e.g.
      :func:`pcgrad_optax.weighting.mgda`; bind keyword arguments with
      ``functools.partial``). It is a static argument of the jitted step,
      so pass the same (hashable) callable every time.
    beta: EMA decay in ``[0, 1]`` (default 0.9), a Python number or a JAX
      array (schedulable with ``optax.inject_hyperparams``).
    num_tasks: T (the weights are allocated at ``init``).
    initial_weights: optional ``(T,)`` :math:`\lambda_0`.
    reduction: ``"sum"`` or ``"mean"`` (divides the update by T).
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.
    keep_gram: also keep the last step's ``(T, T)`` Gram matrix in the
      state's ``gram`` (the smoothed weights are always kept).

  With ``optax.inject_hyperparams``, pass ``static_args="weighting"`` (a
  callable argument would be taken for a schedule), and also
  ``"num_tasks"`` for a jitted ``init``.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`CRMOGMState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.cr_mogm(pcgrad_optax.weighting.mgda, 0.5,
    ...                           num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.array([[1., 0.], [0., 3.]])}, state)
    >>> np.round(np.asarray(state.weights, np.float64), 4)  # MGDA's own
    array([0.9, 0.1])
    >>> u, state = tx.update({"w": jnp.array([[3., 0.], [0., 1.]])}, state)
    >>> np.round(np.asarray(state.weights, np.float64), 4)  # EMA, beta 1/2
    array([0.5, 0.5])

  References:
    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, `On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_,
    NeurIPS 2022.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_record_args(num_tasks, keep_gram, "cr_mogm")
  _check_beta(beta)
  if not callable(weighting):
    raise ValueError(f"CR-MOGM's weighting must be a callable (T, T) -> "
                     f"(T,), got {weighting!r}.")

  def initial(t):
    if initial_weights is None:
      return jnp.full((t,), 1.0 / t, jnp.float32)
    w = jnp.asarray(initial_weights, jnp.float32)
    if w.shape != (t,):
      raise ValueError(f"CR-MOGM's initial_weights must have shape (T,) = "
                       f"({t},), got {w.shape}.")
    return w

  if expected is not None:
    initial(expected)   # its shape is checked at once

  def init_fn(params):
    t = init_num_tasks(expected, "cr_mogm")
    _, gram = init_record(params, t, keep_gram, "cr_mogm")
    return CRMOGMState(count=jnp.zeros([], jnp.int32), weights=initial(t),
                       gram=gram)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "cr_mogm")
    check_record(state.weights, t, "cr_mogm")
    out, smoothed, gram = _cr_mogm_step(
        leaves, state.weights, state.count, jnp.asarray(beta, jnp.float32),
        weighting=weighting, mask=tuple(mask), reduction=reduction,
        restart=initial_weights is None)
    return jax.tree.unflatten(treedef, out), _next_state(state, smoothed,
                                                         gram)

  def gram_step(gram, state):
    # The same step on a Gram matrix formed elsewhere (value_and_aggregate).
    check_record(state.weights, gram.shape[0], "cr_mogm")
    smoothed = _smoothed_weights(
        gram, state.weights, state.count, jnp.asarray(beta, jnp.float32),
        weighting=weighting, restart=initial_weights is None)
    return smoothed, _next_state(state, smoothed, gram)

  hook = GramStep(gram_step, shared, reduction, "cr_mogm")
  return Aggregator(init_fn, answers_probe(update_fn, hook))


def _next_state(state, smoothed, gram):
  # A non-finite shared gradient leaves the whole state as it was.
  return keep_if_finite(gram, CRMOGMState(
      optax.safe_increment(state.count), smoothed.astype(state.weights.dtype),
      None if state.gram is None else gram.astype(state.gram.dtype)), state)
