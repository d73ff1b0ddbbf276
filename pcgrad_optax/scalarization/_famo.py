"""FAMO: fast adaptive multitask optimisation with learned task logits.

Liu, Liang, Chen, Liu, `FAMO: Fast Adaptive Multitask Optimization
<https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.checks import (as_vector, check_losses,
                                       check_num_tasks, losses_in_domain,
                                       per_task)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import Aggregator, documented
from pcgrad_optax.scalarization._scalarized import (LossScalarization,
                                                    loss_transformation,
                                                    scalarized)


def famo_weighting(logits: jax.Array, losses: jax.Array, *,
                   min_losses: jax.Array | float = 0.0, eps: float = 1e-8
                   ) -> jax.Array:
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
  by :func:`pcgrad_optax.famo`. The losses must be finite and above
  :math:`L^*`: concrete ones outside that raise a ``ValueError`` (traced
  ones give meaningless weights there; :func:`pcgrad_optax.famo` guards its
  steps against them).

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
  logits = as_vector(logits, None, "logits")
  t = logits.shape[0]
  losses = as_vector(losses, t, "losses")
  min_losses = jnp.broadcast_to(jnp.asarray(min_losses, losses.dtype), (t,))
  losses_in_domain(losses, min_losses, strict=True, method="weighting.famo",
                   bound="min_losses")
  shifted = losses - min_losses + eps
  scores = jax.nn.softmax(logits) / shifted
  return scores / jnp.sum(scores)


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    logits: ``(T,)`` float32 task logits :math:`\\xi`.
    prev_losses: ``(T,)`` float32 losses passed at the previous step.
    count: number of updates done so far (int32).
    opt_state: state of the optimiser of the logits.
    weights: ``(T,)`` weights applied to the weighted leaves at the last
      step (zeros before the first update; float32, or float64 for float64
      params).
  """
  logits: jax.Array
  prev_losses: jax.Array
  count: jax.Array
  opt_state: optax.OptState
  weights: jax.Array | None = None


@documented
def famo(*, num_tasks: int, learning_rate: float = 0.025,
         weight_decay: float = 0.01, min_losses: float | jax.Array = 0.0,
         eps: float = 1e-8,
         optimizer: optax.GradientTransformation | None = None,
         reduction: str = "sum", shared: SharedMask = None) -> Aggregator:
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

  Losses outside the domain. FAMO needs :math:`L_t > L_t^*` (the log of
  :math:`\ell_t`; below it the weight turns negative and the step goes
  uphill). Concrete ``losses`` or ``prev_batch_losses`` that are not finite
  or not above ``min_losses`` raise a ``ValueError``. Under ``jit`` such a
  step leaves the whole state (logits, stored losses, count, the logits'
  optimiser, the weights record) as it was, and the update weights only
  the tasks whose ``losses`` are in the domain, with their FAMO weights
  renormalised to sum to 1 (the others get weight 0; no task in the domain:
  a zero update of the shared leaves). Non-finite gradients still give a
  non-finite update: wrap the chain in :func:`pcgrad_optax.apply_if_finite`
  to skip those steps.

  The one-backward-pass form (no per-task gradients) is
  :func:`pcgrad_optax.scalarization.famo_loss`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    num_tasks: T.
    learning_rate: :math:`\beta` (ignored when ``optimizer`` is given).
    weight_decay: :math:`\gamma`, added to the logits' gradient.
    min_losses: scalar or ``(T,)`` lower bounds :math:`L^*` of the losses
      (0 for non-negative losses); the losses must stay above them (see
      "Losses outside the domain").
    eps: :math:`\epsilon` (``1e-8`` as in the authors' code).
    optimizer: optional optax transformation for the logits (default
      ``optax.sgd(learning_rate)``).
    reduction: ``"sum"`` (the paper: weights sum to 1) or ``"mean"``.
    shared: which leaves are weighted, as for :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`FAMOState`;
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
  check_reduction(reduction)
  init, step = _famo_method(num_tasks, learning_rate, weight_decay,
                            min_losses, eps, optimizer, "famo")
  return loss_transformation(init, step, method="famo", num_tasks=num_tasks,
                             reduction=reduction, shared=shared,
                             domain=_famo_domain(min_losses))


def _in_domain(losses, after, exact, min_l, method):
  """``(usable, ok)``: which ``losses`` are in FAMO's domain ``L > L*``, and
  whether the step is (``prev_batch_losses`` too, when ``exact``).

  Concrete losses outside it raise a ``ValueError`` naming the tasks.
  """
  usable = losses_in_domain(losses, min_l, strict=True, method=method,
                            bound="min_losses")
  ok = jnp.all(usable)
  if exact:
    ok &= jnp.all(losses_in_domain(after, min_l, strict=True, method=method,
                                   arg="prev_batch_losses",
                                   bound="min_losses"))
  return usable, ok


def _famo_domain(min_losses):
  """FAMO's :data:`~pcgrad_optax.scalarization._scalarized.Domain`."""
  def domain(losses, t, extra, method):
    prev = extra.get("prev_batch_losses")
    after = losses if prev is None else check_losses(
        prev, t, method, "prev_batch_losses")
    return _in_domain(losses, after, prev is not None,
                      per_task(min_losses, t, "min_losses"), method)[1]
  return domain


def _famo_method(num_tasks, learning_rate, weight_decay, min_losses, eps,
                 optimizer, method):
  """``(init, step)`` of FAMO (see ``_scalarized.py``)."""
  expected = check_num_tasks(num_tasks)   # None when traced
  if expected is not None:
    per_task(min_losses, expected, "min_losses")
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init(t):
    logits = jnp.zeros((t,), jnp.float32)
    return FAMOState(logits=logits,
                     prev_losses=jnp.zeros((t,), jnp.float32),
                     count=jnp.zeros([], jnp.int32),
                     opt_state=opt.init(logits))

  def step(losses, state, t, extra):
    min_l = per_task(min_losses, t, "min_losses")

    def log_shifted(losses):
      return jnp.log(losses - min_l + eps)

    prev_batch_losses = extra.get("prev_batch_losses")
    after = losses if prev_batch_losses is None else check_losses(
        prev_batch_losses, t, method, "prev_batch_losses")
    usable, ok = _in_domain(losses, after, prev_batch_losses is not None,
                            min_l, method)
    logits = state.logits
    # Step 0 has no previous losses: delta = 0 there (and no log of the
    # placeholder), and the logits keep their initial value below.
    first = state.count == 0
    before = jnp.where(first, after, state.prev_losses)
    delta = log_shifted(before) - log_shifted(after)
    z = jax.nn.softmax(logits)
    grad = z * (delta - jnp.dot(z, delta)) + weight_decay * logits
    update, opt_state = opt.update(grad.astype(logits.dtype),
                                   state.opt_state, logits)
    moved = optax.apply_updates(logits, update)
    logits = jnp.where(first, logits, moved)
    opt_state = jax.tree.map(lambda old, new: jnp.where(first, old, new),
                             state.opt_state, opt_state)
    # Outside the domain (under jit): the logits as they were, weight 0 for
    # the tasks outside it, the others' weights renormalised (and the
    # shared code keeps the whole state).
    logits = jnp.where(ok, logits, state.logits)
    safe = jnp.where(usable, losses, min_l + 1)
    weights = famo_weighting(logits, safe, min_losses=min_l, eps=eps)
    kept = jnp.where(usable, weights, 0)
    total = jnp.sum(kept)
    weights = jnp.where(ok, weights, kept / jnp.where(total > 0, total, 1))
    # The objective whose gradient is sum_t w_t grad L_t: c sum_t z_t log l_t
    # with c = 1 / sum_k z_k / l_k (held constant), as in the paper, over
    # the tasks in the domain.
    shifted = safe - min_l + eps
    z = jnp.where(usable, jax.nn.softmax(logits), 0)
    scale = jnp.sum(z / shifted)
    value = jnp.sum(z * jnp.log(shifted)) / jnp.where(scale > 0, scale, 1)
    new_state = FAMOState(logits=logits, prev_losses=losses,
                          count=optax.safe_increment(state.count),
                          opt_state=opt_state)
    return weights, value, new_state

  return init, step


def famo_loss(*, num_tasks: int, learning_rate: float = 0.025,
              weight_decay: float = 0.01,
              min_losses: float | jax.Array = 0.0, eps: float = 1e-8,
              optimizer: optax.GradientTransformation | None = None,
              reduction: str = "sum") -> LossScalarization:
  r"""FAMO as one scalar loss, one backward pass (the paper's intent).

  ``loss(losses, state, prev_batch_losses=None)`` first updates the logits
  from the stored and the new (or ``prev_batch_losses``) losses, exactly as
  :func:`famo` does, then returns FAMO's objective

  .. math::
    c \sum_t z_t \log \ell_t, \qquad
    c = \Big(\sum_k z_k/\ell_k\Big)^{-1}\ \text{(held constant)},

  whose gradient is :math:`\sum_t w_t \nabla L_t` with
  :func:`pcgrad_optax.weighting.famo`'s weights, and the next state. The
  logit update needs the losses only (never a gradient), so the state
  sequence is :func:`famo`'s step for step. There is no ``shared`` mask:
  the loss weights the whole model, as in the paper.

  Args:
    num_tasks: T.
    learning_rate: :math:`\beta` (ignored when ``optimizer`` is given).
    weight_decay: :math:`\gamma`.
    min_losses: scalar or ``(T,)`` lower bounds :math:`L^*`.
    eps: :math:`\epsilon`.
    optimizer: optional optax transformation for the logits.
    reduction: ``"sum"`` (the paper) or ``"mean"`` (divides by T).

  Returns:
    A :class:`pcgrad_optax.scalarization.LossScalarization` with a
    :class:`FAMOState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> scal = pcgrad_optax.scalarization.famo_loss(num_tasks=2)
    >>> def task_losses(p):
    ...   return jnp.stack([(p[0] - 1) ** 2 + 1, 10 * p[1] ** 2 + 1])
    >>> def objective(p, state):
    ...   return scal.loss(task_losses(p), state)
    >>> params, state = jnp.array([2.0, -2.0]), scal.init()
    >>> opt = optax.sgd(0.01)
    >>> opt_state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state, opt_state):
    ...   (_, state), g = jax.value_and_grad(objective, has_aux=True)(
    ...       params, state)
    ...   u, opt_state = opt.update(g, opt_state)
    ...   return optax.apply_updates(params, u), state, opt_state
    >>> for _ in range(20):
    ...   params, state, opt_state = step(params, state, opt_state)
    >>> bool(state.logits[0] > state.logits[1])
    True

  References:
    Liu, Liang, Chen, Liu, `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023.
  """
  init, step = _famo_method(num_tasks, learning_rate, weight_decay,
                            min_losses, eps, optimizer, "famo_loss")
  return scalarized(init, step, method="famo_loss", num_tasks=num_tasks,
                    reduction=reduction, domain=_famo_domain(min_losses))
