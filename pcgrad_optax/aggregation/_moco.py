"""MoCo: multi-objective gradient correction with tracked task gradients.

Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, `Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach
<https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.checks import (as_vector, check_choice, check_losses,
                                       check_num_tasks, init_num_tasks)
from pcgrad_optax._core.gram import check_gram, leaf_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.task_state import (check_range, init_task_tree,
                                           replace_task_tree,
                                           task_tree_leaves)
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)
from pcgrad_optax.aggregation._simplex import project_to_simplex

MOCO_WEIGHT_UPDATES = ("projection", "softmax")


def moco_weighting(tracked_gram: jax.Array, weights: jax.Array, *,
                   step_size: float = 0.1, rho: float = 0.0,
                   weight_update: str = "projection") -> jax.Array:
  r"""MoCo's step of the task weights on the tracked gradients' Gram matrix.

  .. math::
    \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,
      (Y Y^\top + \rho I)\,\lambda\big),

  a projected gradient step on :math:`\tfrac12\|Y^\top\lambda\|^2 +
  \tfrac\rho2\|\lambda\|^2` over the simplex, where the rows of :math:`Y`
  are the tracked task gradients (see :func:`pcgrad_optax.moco`); the paper
  projects (``weight_update="projection"``). LibMTL (from the authors'
  shared code) replaces the projection by a softmax of the same step
  (``weight_update="softmax"``).

  Args:
    tracked_gram: ``(T, T)`` Gram matrix :math:`Y Y^\top` of the tracked
      gradients.
    weights: ``(T,)`` current :math:`\lambda` (``1/T`` at first).
    step_size: :math:`\gamma_k > 0` of this step.
    rho: :math:`\rho \ge 0`.
    weight_update: ``"projection"`` or ``"softmax"``.

  Returns:
    The new ``(T,)`` weights (on the simplex); MoCo's update is
    :math:`Y^\top\lambda`.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> y = jnp.array([[1., 0.], [0., 2.]])
    >>> w = pcgrad_optax.weighting.moco(y @ y.T, jnp.array([0.5, 0.5]))
    >>> print([round(float(v), 4) for v in w])  # 0.5 - 0.1 * [0.5, 2], shifted
    [0.575, 0.425]

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, `Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach
    <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023.
  """
  gram = check_gram(tracked_gram)
  t = gram.shape[0]
  weights = as_vector(weights, t, "weights", gram.dtype).astype(gram.dtype)
  check_range(step_size, "step_size", low_open=True)
  check_range(rho, "rho")
  if weight_update not in MOCO_WEIGHT_UPDATES:
    raise ValueError(f"Unknown weight_update {weight_update!r}; expected one "
                     f"of {MOCO_WEIGHT_UPDATES}.")
  step = jnp.asarray(step_size, gram.dtype)
  moved = weights - step * (gram @ weights
                            + jnp.asarray(rho, gram.dtype) * weights)
  if weight_update == "softmax":
    return jax.nn.softmax(moved)
  return project_to_simplex(moved)


class MoCoState(NamedTuple):
  """State of :func:`moco`.

  Attributes:
    count: number of updates done so far (int32).
    lambdas: ``(T,)`` float32 task weights :math:`\\lambda` (on the
      simplex, ``1/T`` at first), moved every step.
    tracked: the tracked gradients :math:`Y`: the params' structure, a
      ``(T,) + param.shape`` f32 (f64 for f64 params) array per shared leaf,
      ``optax.MaskedNode()`` for the other leaves; zeros at first.
    weights: ``(T,)`` float32 weights applied at the last step (zeros
      before the first update), as in every state of the package: the
      shared part of the update is ``sum_t weights[t] y_t`` (on the tracked
      gradients), i.e. :math:`\\lambda` after the step, divided by T with
      ``reduction="mean"``.
  """
  count: jax.Array
  lambdas: jax.Array
  tracked: optax.Params
  weights: jax.Array


def _decayed(rate, sigma, k):
  return rate / k ** jnp.asarray(sigma, jnp.float32)


@documented
def moco(*, num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5,
         gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0,
         weight_update: str = "projection", normalize: bool = False,
         reduction: str = "sum", shared: SharedMask = None) -> Aggregator:
  r"""MoCo: MGDA-like weights on tracked (bias-corrected) task gradients.

  Algorithm 1 of Fernando et al. (2023) on the shared parameters. At step
  :math:`k = 1, 2, \dots` with task gradients :math:`h_t`,

  .. math::
    y_t &\leftarrow y_t - \beta_k\,(y_t - h_t), \\
    \lambda &\leftarrow \Pi_\Delta\big(\lambda - \gamma_k\,
      (Y Y^\top + \rho I)\,\lambda\big), \\
    u &= Y^\top \lambda = \textstyle\sum_t \lambda_t y_t,

  with :math:`\beta_k = \beta / k^{\sigma_\beta}`,
  :math:`\gamma_k = \gamma / k^{\sigma_\gamma}`, :math:`Y` (state, of
  ``T x`` the shared size, zeros at first) tracking the expected task
  gradients so that the MGDA-type weights are not biased by stochastic
  gradients; :math:`\lambda` starts at :math:`1/T`. Per step: one pass to
  move :math:`Y`, one to form its Gram matrix (the weighting,
  :func:`pcgrad_optax.weighting.moco`, runs on ``T x T`` numbers), one for
  the weighted sum; the task heads get their plain gradients.

  Conventions. Defaults: :math:`\beta = 0.5, \sigma_\beta = 0.5,
  \gamma = 0.1, \sigma_\gamma = 0.5, \rho = 0` (LibMTL's; the decays
  :math:`k^{-1/2}` are those of the authors' code). The paper projects
  :math:`Y`'s rows onto balls of radius :math:`L_t` (bounded gradients);
  like both codes this does not. LibMTL (from the authors' shared code)
  differs in two places, both options here: ``weight_update="softmax"``
  replaces the projection by a softmax, and ``normalize=True`` tracks
  :math:`h_t = L_t\, g_t / (\|g_t\| + 10^{-8})` instead of :math:`g_t`
  (needs ``losses=``); together they give LibMTL's MoCo.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T (the state is allocated at ``init``).
    beta: :math:`\beta \in (0, 1]`, the tracking rate.
    beta_sigma: :math:`\sigma_\beta \ge 0`, its decay exponent.
    gamma: :math:`\gamma > 0`, the weights' step size.
    gamma_sigma: :math:`\sigma_\gamma \ge 0`.
    rho: :math:`\rho \ge 0`, the weights' :math:`\ell_2` regulariser.
    weight_update: ``"projection"`` (the paper) or ``"softmax"`` (LibMTL).
    normalize: track loss-scaled unit gradients (LibMTL), see above.
    reduction: ``"sum"`` (weights on the simplex) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`MoCoState`;
    with ``normalize=True``,
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.moco(num_tasks=2, beta_sigma=0.0, gamma_sigma=0.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> for _ in range(3):
    ...   u, state = jax.jit(tx.update)(g, state, params)
    >>> print([round(float(v), 4) for v in state.lambdas])  # to MGDA's 0.8
    [0.6046, 0.3954]
    >>> print([round(float(v), 4) for v in u["w"]])  # Y = (1 - 0.5^3) g
    [0.529, 0.692]

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, `Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach
    <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(beta, "beta", low_open=True, high=1.0)
  check_range(beta_sigma, "beta_sigma")
  check_range(gamma, "gamma", low_open=True)
  check_range(gamma_sigma, "gamma_sigma")
  check_range(rho, "rho")
  check_choice(weight_update, MOCO_WEIGHT_UPDATES, "weight_update")

  def init_fn(params):
    t = init_num_tasks(expected, "moco")
    return MoCoState(
        count=jnp.zeros([], jnp.int32),
        lambdas=jnp.full((t,), 1.0 / t, jnp.float32),
        tracked=init_task_tree(params, shared, t),
        weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "moco")
    check_record(state.weights, t, "moco")
    tracked = task_tree_leaves(state.tracked, leaves, mask, "moco",
                               "tracked")
    shared_grads = [x for x, m in zip(leaves, mask) if m]
    acc = leaves_accumulation_dtype(leaves)
    if normalize:
      losses = check_losses(losses, t, "moco")
      sq = sum((jnp.sum(jnp.square(x.astype(acc)),
                        axis=tuple(range(1, x.ndim)))
                for x in shared_grads), jnp.zeros((t,), acc))
      scale = losses.astype(acc) / (jnp.sqrt(sq) + 1e-8)
    k = (state.count + 1).astype(jnp.float32)
    beta_k = _decayed(beta, beta_sigma, k)
    gamma_k = _decayed(gamma, gamma_sigma, k)
    new_tracked = []
    for y, x in zip(tracked, shared_grads):
      h = x.astype(y.dtype)
      if normalize:
        h = h * scale.astype(y.dtype).reshape((t,) + (1,) * (x.ndim - 1))
      new_tracked.append(y - beta_k.astype(y.dtype) * (y - h))
    gram = jnp.zeros((t, t), acc)
    for y in new_tracked:
      gram = gram + leaf_gram(y).astype(acc)
    weights = moco_weighting(gram, state.lambdas, step_size=gamma_k, rho=rho,
                             weight_update=weight_update)
    # The shared leaves' update is Y^T lambda; the heads' the plain sum.
    ys = iter(new_tracked)
    sources = [next(ys) if m else x for x, m in zip(leaves, mask)]
    out = [o.astype(x.dtype) for o, x in zip(
        combine_leaves(sources, mask, weights, reduction), leaves)]
    new_state = MoCoState(
        count=optax.safe_increment(state.count), lambdas=weights,
        tracked=replace_task_tree(state.tracked, new_tracked),
        weights=record(weights, None, state.weights, None, t, reduction)[0])
    return jax.tree.unflatten(treedef, out), cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
