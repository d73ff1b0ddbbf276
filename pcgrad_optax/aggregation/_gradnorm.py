"""GradNorm: learnt task weights that balance the weighted gradient norms.

Chen, Badrinarayanan, Lee, Rabinovich, `GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks
<https://arxiv.org/abs/1711.02257>`_, ICML 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import (as_vector, check_choice, check_losses,
                                       check_num_tasks, init_num_tasks)
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)
from pcgrad_optax._core.task_state import check_range
from pcgrad_optax._core.transform import (Aggregator, cast_like,
                                          check_record, documented, record)

GRADNORM_PARAMETRIZATIONS = ("weights", "softmax")


def _task_weights(param, parametrization):
  if parametrization == "softmax":
    return param.shape[0] * jax.nn.softmax(param)
  return param


def _balance_loss(param, norms, loss_ratios, alpha, parametrization):
  r"""GradNorm's :math:`L_{grad}` with the targets held constant."""
  g = _task_weights(param, parametrization) * norms
  ratios = loss_ratios / jnp.mean(loss_ratios)
  target = jax.lax.stop_gradient(
      jnp.mean(g) * ratios ** jnp.asarray(alpha, g.dtype))
  diff = g - target
  # |G_t - target| has a kink where a task is balanced: a difference within
  # rounding error of the targets counts as 0 (the subgradient 0, the
  # minimal-norm one), so that the step does not depend on how equal norms
  # round (e.g. per-task clipped gradients, jit or not).
  tol = jax.lax.stop_gradient(
      32 * jnp.finfo(g.dtype).eps * jnp.max(jnp.abs(target)))
  return jnp.sum(jnp.where(jnp.abs(diff) <= tol, 0 * diff, jnp.abs(diff)))


def _renormalized(w):
  """Clipped at 0 and rescaled to sum T (ones if nothing is left)."""
  t = w.shape[0]
  w = jnp.maximum(w, 0)
  total = jnp.sum(w)
  return jnp.where(total > 0, t * w / jnp.where(total > 0, total, 1),
                   jnp.ones_like(w))


def _loss_ratios(losses, initial_losses):
  positive = initial_losses > 0
  return jnp.where(positive, losses / jnp.where(positive, initial_losses, 1),
                   1.0)


def gradnorm_weighting(gram: jax.Array, weights: jax.Array,
                       loss_ratios: jax.Array, *, alpha: float = 1.5,
                       learning_rate: float = 0.025) -> jax.Array:
  r"""One GradNorm step of the task weights (plain gradient descent).

  With :math:`G_t = w_t \|g_t\|` (the norms from the Gram matrix's
  diagonal), :math:`\bar G = \operatorname{mean}_t G_t`, the loss ratios
  :math:`\tilde L_t = L_t / L_t(0)` and the relative inverse training rates
  :math:`r_t = \tilde L_t / \operatorname{mean}_s \tilde L_s`,

  .. math::
    L_{grad}(w) = \sum_t \big| G_t - \bar G\, r_t^{\alpha} \big|,

  with the targets :math:`\bar G r_t^\alpha` held constant, so
  :math:`\partial L_{grad} / \partial w_t = \|g_t\|\,
  \operatorname{sign}(G_t - \bar G r_t^\alpha)` (0 for a task within
  rounding error of its target, :math:`32\,\epsilon_{mach}
  \max_s \bar G r_s^\alpha`: the subgradient at the kink). The step
  :math:`w \leftarrow w - \eta\, \nabla_w L_{grad}` is followed by the
  paper's renormalisation :math:`\sum_t w_t = T` (after clipping negative
  weights at 0, which the paper leaves open; all-zero weights restart at
  ones). Tasks that train slowly (large :math:`r_t`) get larger gradient
  norms; :math:`\alpha` sets the strength of that restoring force.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients (only its diagonal
      is used).
    weights: ``(T,)`` current weights (ones at first).
    loss_ratios: ``(T,)`` :math:`\tilde L_t = L_t / L_t(0)`.
    alpha: :math:`\alpha \ge 0` (1.5 as in the paper's NYUv2 experiments,
      LibMTL's default).
    learning_rate: :math:`\eta > 0`.

  Returns:
    The new ``(T,)`` weights, non-negative, summing to T.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[3., 0.], [0., 1.]])
    >>> w = pcgrad_optax.weighting.gradnorm(g @ g.T, jnp.ones(2), jnp.ones(2),
    ...                                     learning_rate=0.1)
    >>> print([round(float(v), 4) for v in w])  # the larger gradient loses
    [0.7778, 1.2222]

  References:
    Chen, Badrinarayanan, Lee, Rabinovich, `GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks
    <https://arxiv.org/abs/1711.02257>`_, ICML 2018.
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  weights = as_vector(weights, t, "weights", gram.dtype).astype(gram.dtype)
  ratios = as_vector(loss_ratios, t, "loss_ratios", gram.dtype).astype(
      gram.dtype)
  check_range(alpha, "alpha")
  check_range(learning_rate, "learning_rate", low_open=True)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
  grad = jax.grad(_balance_loss)(weights, norms, ratios, alpha, "weights")
  return _renormalized(weights - jnp.asarray(learning_rate, gram.dtype) * grad)


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    count: number of updates done so far (int32).
    param: ``(T,)`` float32 learnt parameter: the weights (ones at first),
      or with ``parametrization="softmax"`` the logits :math:`\\xi` of
      :math:`w = T \\operatorname{softmax}(\\xi)` (zeros at first).
    initial_losses: ``(T,)`` float32 losses :math:`L(0)` of the first step.
    opt_state: state of the optimiser of ``param``.
    weights: ``(T,)`` float32 weights applied to the shared leaves at the
      last step (zeros before the first update), as in every state of the
      package: the weights of ``param`` before the step, divided by T with
      ``reduction="mean"``.
  """
  count: jax.Array
  param: jax.Array
  initial_losses: jax.Array
  opt_state: optax.OptState
  weights: jax.Array


@documented
def gradnorm(alpha: float = 1.5, *, num_tasks: int,
             learning_rate: float = 0.025,
             optimizer: optax.GradientTransformation | None = None,
             parametrization: str = "weights", reduction: str = "sum",
             shared: SharedMask = None) -> Aggregator:
  r"""GradNorm: learn task weights that equalise the weighted gradient norms.

  Algorithm 1 of Chen et al. (2018). Step :math:`k` weights the task
  gradients with the current weights, :math:`u = \sum_t w_t(k)\, g_t`, and
  moves the weights by one step of an optimiser (default plain SGD with
  ``learning_rate``) on

  .. math::
    L_{grad} = \sum_t \big| w_t \|g_t\| - \bar G\, r_t^{\alpha} \big|,
    \qquad r_t = \frac{L_t(k)/L_t(0)}{\operatorname{mean}_s L_s(k)/L_s(0)},

  targets held constant (see :func:`pcgrad_optax.weighting.gradnorm`), then
  renormalises them to :math:`\sum_t w_t = T` (after clipping at 0). The
  initial losses :math:`L(0)` are those of the first step (state). The
  norms :math:`\|g_t\|` are over the shared leaves, from one pass over them
  (the paper measures them on the last shared layer to save a backward pass
  per task; with the stacked gradients at hand they are free for any
  ``shared`` set).

  Conventions: the paper's weights are the parameter and the learning rate
  of the weights is a hyperparameter of its own; the gradient of
  :math:`L_{grad}` scales with the gradient norms, so a scale-free
  optimiser (``optimizer=optax.adam(...)``) may be easier to tune. LibMTL
  learns logits :math:`\xi` with :math:`w = T\operatorname{softmax}(\xi)`
  (``parametrization="softmax"``; no renormalisation needed) with the
  model's optimiser, and keeps equal weights for the whole first epoch,
  whose mean losses are its :math:`L(0)`.

  @WEIGHTS_SHARED_LEAVES@

  @FIRST_IN_CHAIN@

  Args:
    alpha: :math:`\alpha \ge 0`, the strength of the restoring force (1.5).
    num_tasks: T.
    learning_rate: the weights' learning rate (ignored when ``optimizer``
      is given).
    optimizer: optional optax transformation for the weights (default
      ``optax.sgd(learning_rate)``).
    parametrization: ``"weights"`` (the paper) or ``"softmax"`` (LibMTL).
    reduction: ``"sum"`` (weights sum to T) or ``"mean"``.
    shared: which leaves are shared parameters, as for
      :func:`pcgrad_optax.pcgrad`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with a :class:`GradNormState`;
    ``update(grads, state, params=None, *, losses)`` needs the ``(T,)``
    task losses (ValueError otherwise).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.gradnorm(num_tasks=2, learning_rate=0.1)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([[3., 0.], [0., 1.]])}
    >>> step = jax.jit(tx.update)
    >>> u, state = step(g, state, params, losses=jnp.array([1., 1.]))
    >>> print(u["w"])  # this step's weights are the initial ones
    [3. 1.]
    >>> print([round(float(v), 4) for v in state.param])  # the next step's
    [0.7778, 1.2222]

  References:
    Chen, Badrinarayanan, Lee, Rabinovich, `GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks
    <https://arxiv.org/abs/1711.02257>`_, ICML 2018.
  """
  check_reduction(reduction)
  expected = check_num_tasks(num_tasks)   # None when traced
  check_range(alpha, "alpha")
  check_range(learning_rate, "learning_rate", low_open=True)
  check_choice(parametrization, GRADNORM_PARAMETRIZATIONS, "parametrization")
  opt = optimizer if optimizer is not None else optax.sgd(learning_rate)

  def init_fn(params):
    del params
    t = init_num_tasks(expected, "gradnorm")
    start = jnp.zeros if parametrization == "softmax" else jnp.ones
    param = start((t,), jnp.float32)
    return GradNormState(count=jnp.zeros([], jnp.int32), param=param,
                         initial_losses=jnp.ones((t,), jnp.float32),
                         opt_state=opt.init(param),
                         weights=jnp.zeros((t,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "gradnorm")
    check_record(state.weights, t, "gradnorm")
    losses = check_losses(losses, t, "gradnorm")
    acc = leaves_accumulation_dtype(leaves)
    sq = sum((jnp.sum(jnp.square(x.astype(acc)), axis=tuple(range(1, x.ndim)))
              for x, m in zip(leaves, mask) if m), jnp.zeros((t,), acc))
    norms = jnp.sqrt(sq).astype(state.param.dtype)
    initial = jnp.where(state.count == 0, losses.astype(jnp.float32),
                        state.initial_losses)
    ratios = _loss_ratios(losses.astype(jnp.float32), initial)
    param = state.param
    weights = _task_weights(param, parametrization)
    grad = jax.grad(_balance_loss)(param, norms, ratios.astype(param.dtype),
                                   alpha, parametrization)
    step, opt_state = opt.update(grad, state.opt_state, param)
    new_param = optax.apply_updates(param, step)
    if parametrization == "weights":
      new_param = _renormalized(new_param)
    new_state = GradNormState(count=optax.safe_increment(state.count),
                              param=new_param, initial_losses=initial,
                              opt_state=opt_state,
                              weights=record(weights, None, state.weights,
                                             None, t, reduction)[0])
    return combine(leaves, treedef, mask, weights, reduction), cast_like(
        new_state, state)

  return Aggregator(init_fn, update_fn)
