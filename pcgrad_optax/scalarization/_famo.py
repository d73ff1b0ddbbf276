"""FAMO: fast adaptive multitask optimisation with learned task logits.

Liu, Liang, Chen, Liu, `FAMO: Fast Adaptive Multitask Optimization
<https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_losses,
                                       check_num_tasks, init_num_tasks,
                                       per_task)
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)


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
  logits = as_vector(logits, None, "logits")
  t = logits.shape[0]
  losses = as_vector(losses, t, "losses")
  shifted = losses - jnp.broadcast_to(jnp.asarray(min_losses, losses.dtype),
                                      (t,)) + eps
  scores = jax.nn.softmax(logits) / shifted
  return scores / jnp.sum(scores)


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    logits: ``(T,)`` float32 task logits :math:`\\xi`.
    prev_losses: ``(T,)`` float32 losses passed at the previous step.
    count: number of updates done so far (int32).
    opt_state: state of the optimiser of the logits.
    weights: ``(T,)`` float32 weights applied to the weighted leaves at the
      last step (zeros before the first update).
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

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

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
  expected = check_num_tasks(num_tasks)   # None when traced
  if expected is not None:
    per_task(min_losses, expected, "min_losses")
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "famo")
    logits = jnp.zeros((t,), jnp.float32)
    return FAMOState(logits=logits,
                     prev_losses=jnp.zeros((t,), jnp.float32),
                     count=jnp.zeros([], jnp.int32),
                     opt_state=opt.init(logits),
                     weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None,
                prev_batch_losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "famo")
    check_record(state.logits, t, "famo")
    min_l = per_task(min_losses, t, "min_losses")

    def log_shifted(losses):
      return jnp.log(losses - min_l + eps)

    losses = check_losses(losses, t, "famo")
    after = losses if prev_batch_losses is None else check_losses(
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
    weights = famo_weighting(logits, losses, min_losses=min_l, eps=eps)
    new_state = FAMOState(
        logits=logits, prev_losses=losses,
        count=optax.safe_increment(state.count), opt_state=opt_state,
        weights=record(weights, None, state.weights, None, t, reduction)[0])
    return combine(leaves, treedef, mask, weights, reduction), \
        cast_like(new_state, state)

  return Aggregator(init_fn, update_fn)
