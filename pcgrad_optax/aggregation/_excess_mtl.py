"""ExcessMTL: task weights driven by estimated excess risks.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, `Robust Multi-Task Learning
with Excess Risks <https://arxiv.org/abs/2402.02009>`_, ICML 2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_num_tasks,
                                       init_num_tasks)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.task_state import (check_count, check_range,
                                           init_task_tree,
                                           replace_task_tree,
                                           task_tree_leaves)
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)


def excess_mtl_weighting(weights: jax.Array, excess_risks: jax.Array,
                         baseline: jax.Array, *, step_size: float = 1e-2
                         ) -> jax.Array:
  r"""ExcessMTL's exponentiated-gradient step on the task weights.

  .. math::
    \alpha_t \leftarrow \frac{\alpha_t \exp(\eta\, r_t)}
      {\sum_s \alpha_s \exp(\eta\, r_s)}, \qquad
    r_t = \hat E_t / \hat E_t^{(0)},

  a mirror-ascent step of the min-max problem
  :math:`\min_\theta \max_{\alpha\in\Delta} \sum_t \alpha_t E_t(\theta)`
  on the excess risks :math:`\hat E_t`, each divided by its baseline
  :math:`\hat E_t^{(0)}` ("scale processing": tasks with different loss
  scales become comparable). Computed in log space (a softmax of
  :math:`\log\alpha + \eta r`), so large ratios saturate instead of
  overflowing. A task whose baseline is 0 has no scale: its ratio is taken
  as 0.

  Args:
    weights: ``(T,)`` current weights :math:`\alpha` (on the simplex).
    excess_risks: ``(T,)`` estimates :math:`\hat E_t` (see
      :func:`pcgrad_optax.excess_mtl`).
    baseline: ``(T,)`` :math:`\hat E_t^{(0)}`.
    step_size: :math:`\eta > 0`.

  Returns:
    The new ``(T,)`` weights, summing to one.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> w = pcgrad_optax.weighting.excess_mtl(
    ...     jnp.array([0.5, 0.5]), jnp.array([2.0, 1.0]), jnp.ones(2),
    ...     step_size=1.0)
    >>> print([round(float(v), 4) for v in w])  # e^2 : e^1
    [0.7311, 0.2689]

  References:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, `Robust Multi-Task
    Learning with Excess Risks <https://arxiv.org/abs/2402.02009>`_,
    ICML 2024.
  """
  weights = as_vector(weights, None, "weights")
  t = weights.shape[0]
  excess = as_vector(excess_risks, t, "excess_risks", weights.dtype)
  base = as_vector(baseline, t, "baseline", weights.dtype)
  check_range(step_size, "step_size", low_open=True)
  positive = base > 0
  ratio = jnp.where(positive, excess / jnp.where(positive, base, 1), 0)
  return jax.nn.softmax(jnp.log(weights)
                        + jnp.asarray(step_size, ratio.dtype) * ratio)


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl`.

  Attributes:
    count: number of updates done so far (int32).
    alpha: ``(T,)`` float32 task weights :math:`\\alpha` (on the simplex,
      ``1/T`` at first).
    baseline: ``(T,)`` float32 sum of the excess risks of the warm-up
      steps, then (from the last warm-up step on) their mean
      :math:`\\hat E^{(0)}`.
    sq_sum: the AdaGrad accumulators :math:`\\sum_s g_{t,s}^2`: the params'
      structure, a ``(T,) + param.shape`` f32 (f64 for f64 params) array per
      shared leaf, ``optax.MaskedNode()`` for the other leaves.
    weights: ``(T,)`` float32 weights applied to the shared leaves at the
      last step (zeros before the first update), as in every state of the
      package: :math:`\\alpha` after the step, divided by T with
      ``reduction="mean"``.
  """
  count: jax.Array
  alpha: jax.Array
  baseline: jax.Array
  sq_sum: optax.Params
  weights: jax.Array


@documented
def excess_mtl(*, num_tasks: int, step_size: float = 1e-2,
               warmup_steps: int = 1, eps: float = 1e-7,
               reduction: str = "sum", shared: SharedMask = None
               ) -> Aggregator:
  r"""ExcessMTL: weight the tasks by how far they are from convergence.

  Algorithm 1 of He et al. (2024). The excess risk of task :math:`t`,
  :math:`E_t = L_t(\theta) - L_t(\theta_t^*)`, is estimated by a
  second-order Taylor expansion around :math:`\theta`, with the Hessian
  replaced by a diagonal AdaGrad (empirical Fisher) preconditioner per task:

  .. math::
    H_t = \operatorname{diag}\Big(\sqrt{\textstyle\sum_{s \le k}
      g_{t,s}^2 + \epsilon}\Big), \qquad
    \hat E_t = g_t^\top H_t^{-1} g_t
      = \sum_p \frac{g_{t,p}^2}{\sqrt{\sum_s g_{t,s,p}^2 + \epsilon}}

  (the Taylor expansion's factor 1/2 cancels in the ratio below; the
  accumulators :math:`\sum_s g_{t,s}^2` are the state, ``T x`` the shared
  size, and include the current step). The first ``warmup_steps`` steps keep
  the weights at :math:`1/T` and record the mean of :math:`\hat E_t` as the
  baseline :math:`\hat E_t^{(0)}`; after them every step moves the weights
  by :func:`pcgrad_optax.weighting.excess_mtl`,
  :math:`\alpha_t \propto \alpha_t \exp(\eta\,\hat E_t / \hat E_t^{(0)})`,
  and the update is :math:`\sum_t \alpha_t g_t` with the new weights. The
  excess risks come from the gradients alone: no losses are needed.

  Conventions: the weights are on the simplex (the paper; torchjd). The
  authors' code and LibMTL start from ones and keep the weights summing to
  T, so their update is T times this one. ``warmup_steps=1`` (the default)
  is their behaviour: the first step only records the baseline; the paper's
  Appendix C.1 collects it over the first epochs (``warmup_steps`` = their
  number of steps), as torchjd's ``n_warmup_steps`` does (torchjd's
  ``n_warmup_steps=0`` also moves the weights on the first step). The step
  size :math:`\eta = 10^{-2}` is the authors' code's default (torchjd 1);
  :math:`\epsilon = 10^{-7}` theirs too.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T (the state is allocated at ``init``).
    step_size: :math:`\eta > 0`.
    warmup_steps: steps (a positive int) whose mean excess risk is the
      baseline, with uniform weights.
    eps: :math:`\epsilon \ge 0` inside the square root.
    reduction: ``"sum"`` (weights on the simplex) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`; the excess risks are measured on them.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with an :class:`ExcessMTLState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.excess_mtl(num_tasks=2, step_size=1.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update)
    >>> u, state = step({"w": jnp.array([[1., 0.], [0., 1.]])}, state, params)
    >>> # task 0 stalls (same gradient), task 1 converges (gradient / 10):
    >>> u, state = step({"w": jnp.array([[1., 0.], [0., .1]])}, state, params)
    >>> print([round(float(v), 4) for v in state.alpha])  # task 0 gains
    [0.6676, 0.3324]

  References:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, `Robust Multi-Task
    Learning with Excess Risks <https://arxiv.org/abs/2402.02009>`_,
    ICML 2024.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(step_size, "step_size", low_open=True)
  check_range(eps, "eps")
  check_count(warmup_steps, "warmup_steps")

  def init_fn(params):
    t = init_num_tasks(expected, "excess_mtl")
    return ExcessMTLState(
        count=jnp.zeros([], jnp.int32),
        alpha=jnp.full((t,), 1.0 / t, jnp.float32),
        baseline=jnp.zeros((t,), jnp.float32),
        sq_sum=init_task_tree(params, shared, t),
        weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "excess_mtl")
    check_record(state.weights, t, "excess_mtl")
    sq_sum = task_tree_leaves(state.sq_sum, leaves, mask, "excess_mtl",
                              "sq_sum")
    acc = leaves_accumulation_dtype(leaves)
    new_sq, excess = [], jnp.zeros((t,), acc)
    for s, x in zip(sq_sum, (x for x, m in zip(leaves, mask) if m)):
      sq = jnp.square(x.astype(s.dtype))
      total = s + sq
      new_sq.append(total)
      excess = excess + jnp.sum(
          sq / jnp.sqrt(total + jnp.asarray(eps, s.dtype)),
          axis=tuple(range(1, x.ndim))).astype(acc)
    excess = excess.astype(jnp.float32 if acc != jnp.float64 else acc)
    in_warmup = state.count < warmup_steps
    last_warmup = state.count == warmup_steps - 1
    total = jnp.where(in_warmup, state.baseline + excess, state.baseline)
    baseline = jnp.where(last_warmup, total / warmup_steps, total)
    weights = jnp.where(
        in_warmup, state.alpha,
        excess_mtl_weighting(state.alpha, excess, state.baseline,
                             step_size=step_size))
    new_state = ExcessMTLState(
        count=optax.safe_increment(state.count), alpha=weights,
        baseline=baseline, sq_sum=replace_task_tree(state.sq_sum, new_sq),
        weights=record(weights, None, state.weights, None, t, reduction)[0])
    return combine(leaves, treedef, mask, weights, reduction), cast_like(
        new_state, state)

  return Aggregator(init_fn, update_fn)
