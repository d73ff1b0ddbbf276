"""Optax transformations of the Gram-based aggregator family.

Every transformation here is the same thing: build the Gram matrix of the
shared leaves of the stacked per-task gradients, ask a pure weighting from
:mod:`pcgrad_optax.weighting` for task weights, combine the shared leaves
with them, and give non-shared leaves (task heads) the plain sum (or mean)
over the task axis. They share one factory and the interface of
:func:`pcgrad_optax.pcgrad`: stacked gradients in (every leaf
``(T,) + param.shape``), params-shaped updates out, ``shared=`` and
``reduction=``, stateless (``optax.EmptyState``).

``reduction="sum"`` applies the method's weights as its paper defines them
(see each weighting); ``reduction="mean"`` divides the whole update, shared
leaves and heads, by ``T``. For the linear baselines that means::

  transformation            shared leaves        heads
  sum()                     sum_t g_t            sum_t g_t
  sum(reduction="mean")     (1/T) sum_t g_t      (1/T) sum_t g_t
  mean()                    (1/T) sum_t g_t      sum_t g_t
  mean(reduction="mean")    (1/T^2) sum_t g_t    (1/T) sum_t g_t

so ``sum(reduction="mean")`` is the gradient of the mean loss, and ``mean()``
averages the shared part while each head keeps its own task's gradient at
full strength.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from pcgrad_optax import _core
from pcgrad_optax import _gram_weightings as gw
from pcgrad_optax._transforms import _FIRST_IN_CHAIN

# One transformation per Gram weighting, under the weighting's name.
__all__ = list(gw.__all__)

_SHARED_ARGS = """    reduction: ``"sum"`` (the method's weights as they are) or
      ``"mean"`` (divides the update, heads included, by T).
    shared: which leaves are shared parameters: None (all), a pytree of bools
      with the params' structure (or a prefix of it) or a callable
      ``params -> pytree of bools``, like ``optax.masked``'s mask. Only shared
      leaves enter the Gram matrix and get the method's weights.
"""

_RETURNS = """  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.
    ``update(updates, state, params=None)`` takes stacked gradients (every
    leaf of shape ``(T,) + param.shape``) and returns params-shaped updates.
"""


def _documented(factory):
  """Fills the shared parts of a factory's docstring (kept a literal)."""
  doc = factory.__doc__
  for marker, text in (("@FIRST_IN_CHAIN@", _FIRST_IN_CHAIN.strip("\n")),
                       ("@SHARED_ARGS@", _SHARED_ARGS.strip("\n")),
                       ("@RETURNS@", _RETURNS.strip("\n"))):
    doc = doc.replace("  " + marker, text)
  factory.__doc__ = doc
  return factory


def _gram_transform(weighting: Callable[[jax.Array], jax.Array], *,
                    reduction: str, shared: _core.SharedMask
                    ) -> optax.GradientTransformationExtraArgs:
  """A stateless transformation applying ``weighting`` to the Gram matrix."""
  _core.check_reduction(reduction)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    combined, _, _ = _core.aggregate(updates, weighting, params=params,
                                     shared=shared, reduction=reduction)
    return combined, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_choice(value, choices, what: str) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; expected one of {choices}.")


def _check_nonnegative(value, what: str) -> None:
  if not (isinstance(value, (int, float)) and value >= 0
          and value != float("inf")):
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")


# ---------------------------------------------------------------------------


@_documented
def mean(*, reduction: str = "sum", shared: _core.SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""Linear scalarisation with equal weights: the mean task gradient.

  Shared leaves get :math:`\frac1T \sum_t g_t`
  (:func:`pcgrad_optax.weighting.mean`); heads get their plain sum, i.e. each
  head its own task's gradient. ``reduction="mean"`` divides both by T once
  more (so the shared part by :math:`T^2`); for the mean of everything use
  :func:`sum` with ``reduction="mean"``.

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.mean()
    >>> grads = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([2., 3.], dtype=float32)
  """
  return _gram_transform(gw.mean, reduction=reduction, shared=shared)


@_documented
def sum(*, reduction: str = "sum", shared: _core.SharedMask = None  # noqa: A001
        ) -> optax.GradientTransformationExtraArgs:
  r"""Linear scalarisation with unit weights: the summed task gradient.

  Every leaf gets :math:`\sum_t g_t` (:func:`pcgrad_optax.weighting.sum`),
  the gradient of :math:`\sum_t L_t`; with ``reduction="mean"`` every leaf
  gets :math:`\frac1T \sum_t g_t`, the gradient of the mean loss.

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.sum(reduction="mean")
    >>> grads = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([2., 3.], dtype=float32)
  """
  return _gram_transform(gw.sum, reduction=reduction, shared=shared)


@_documented
def mgda(*, normalization: str = "none", reduction: str = "sum",
         shared: _core.SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""MGDA: the exact min-norm point of the convex hull of task gradients.

  Shared leaves get :math:`\sum_t w_t g_t` with
  :math:`w = \arg\min_{w \in \Delta_T} \|\sum_t w_t g_t\|^2`
  (Sener & Koltun, 2018), solved exactly (closed form for two tasks, an
  active-set method otherwise; see :func:`pcgrad_optax.weighting.mgda`).
  The update never conflicts with any task and vanishes at
  Pareto-stationary points. With ``reduction="sum"`` it is the min-norm
  vector itself (the paper's and torchjd's convention).

  @FIRST_IN_CHAIN@

  Args:
    normalization: ``"none"`` (the paper) or ``"l2"`` (weights solved on
      unit gradients, applied to the raw ones, as the official code's
      ``normalization_type="l2"``).
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import pcgrad_optax
    >>> tx = optax.chain(pcgrad_optax.mgda(), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> np.round(np.asarray(updates["w"], np.float64), 4)
    array([-0.8, -0.4])

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """
  _check_choice(normalization, gw.MGDA_NORMALIZATIONS, "MGDA normalization")
  return _gram_transform(
      lambda gram: gw.mgda(gram, normalization=normalization),
      reduction=reduction, shared=shared)


@_documented
def cagrad(c: float = 0.5, *, rescale: int = 0, reduction: str = "sum",
           shared: _core.SharedMask = None
           ) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: conflict-averse gradient descent (Liu et al., 2021).

  Shared leaves get the update maximising the worst task's improvement in
  the ball of radius :math:`c\|g_0\|` around the mean gradient :math:`g_0`:
  :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w` with :math:`w` the
  solution of the dual over the simplex (solved to round-off; see
  :func:`pcgrad_optax.weighting.cagrad`). For one task the update is
  :math:`(1 + c)\,g`.

  @FIRST_IN_CHAIN@

  Args:
    c: radius factor, ``>= 0`` (0 gives the mean gradient).
    rescale: ``0`` the paper's update (default), ``1`` divides by
      :math:`1 + c^2` (the official code's default), ``2`` by :math:`1 + c`.
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.cagrad(c=0.5)
    >>> grads = {"w": jnp.array([[1., 0.], [-0.5, 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> np.round(np.asarray(updates["w"], np.float64), 3)
    array([0.458, 0.687])

  References:
    Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  _check_nonnegative(c, "CAGrad's c")
  _check_choice(rescale, gw.CAGRAD_RESCALES, "CAGrad rescale")
  return _gram_transform(lambda gram: gw.cagrad(gram, c, rescale=rescale),
                         reduction=reduction, shared=shared)


@_documented
def imtl_g(*, reduction: str = "sum", shared: _core.SharedMask = None
           ) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: equal projections of the update on every unit task gradient.

  Shared leaves get :math:`\sum_t \alpha_t g_t` with
  :math:`\sum_t \alpha_t = 1` and :math:`u \cdot g_t/\|g_t\|` equal for all
  tasks (Liu et al., 2021; closed form, see
  :func:`pcgrad_optax.weighting.imtl_g`).

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.imtl_g()
    >>> grads = {"w": jnp.array([[1., 0.], [0., 3.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([0.75, 0.75], dtype=float32)

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
  """
  return _gram_transform(gw.imtl_g, reduction=reduction, shared=shared)


@_documented
def upgrad(*, task_weights: jax.Array | None = None, reg_eps: float = 0.0,
           reduction: str = "sum", shared: _core.SharedMask = None
           ) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad: the average of the gradients projected onto their dual cone.

  Shared leaves get :math:`\frac1T \sum_i \pi_{\mathcal C}(g_i)` with
  :math:`\mathcal C = \{x : g_t \cdot x \ge 0\ \forall t\}` (Quinton & Rey,
  2024), each projection an exact small QP (see
  :func:`pcgrad_optax.weighting.upgrad`). Never conflicts with any task;
  the plain mean when no pair conflicts.

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` preference vector (default ``1/T``).
    reg_eps: ridge on ``K / trace(K)`` (torchjd's default projector uses
      ``1e-4``); ``0`` (default) is exact.
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.upgrad()
    >>> grads = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([0.25, 0.75], dtype=float32)

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  _check_nonnegative(reg_eps, "reg_eps")
  return _gram_transform(
      lambda gram: gw.upgrad(gram, task_weights=task_weights,
                             reg_eps=reg_eps),
      reduction=reduction, shared=shared)


@_documented
def dualproj(*, task_weights: jax.Array | None = None, reg_eps: float = 0.0,
             reduction: str = "sum", shared: _core.SharedMask = None
             ) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: the mean gradient projected onto the dual cone (GEM-style).

  Shared leaves get :math:`\pi_{\mathcal C}(\frac1T \sum_t g_t)`, the
  closest vector to the mean gradient that conflicts with no task
  (Lopez-Paz & Ranzato, 2017; see :func:`pcgrad_optax.weighting.dualproj`).

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` preference vector replacing the mean.
    reg_eps: ridge on ``K / trace(K)`` (torchjd uses ``1e-4``); ``0``
      (default) is exact.
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.dualproj()
    >>> grads = {"w": jnp.array([[1., 1.], [-3., 0.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([-0.75,  0.75], dtype=float32)

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  """
  _check_nonnegative(reg_eps, "reg_eps")
  return _gram_transform(
      lambda gram: gw.dualproj(gram, task_weights=task_weights,
                               reg_eps=reg_eps),
      reduction=reduction, shared=shared)


@_documented
def aligned_mtl(*, task_weights: jax.Array | None = None,
                scale_mode: str = "min", reduction: str = "sum",
                shared: _core.SharedMask = None
                ) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: gradients aligned to condition number one, then summed.

  Shared leaves get :math:`G^T B p` with
  :math:`B = \sigma_{\min} V \Sigma^{-1} V^T` from the eigendecomposition of
  the Gram matrix (Senushkin et al., 2023; see
  :func:`pcgrad_optax.weighting.aligned_mtl`). ``reduction="mean"`` gives
  torchjd's convention (task weights ``1/T``).

  @FIRST_IN_CHAIN@

  Args:
    task_weights: optional ``(T,)`` :math:`p` (default ones, the paper).
    scale_mode: ``"min"`` (paper), ``"median"`` or ``"rmse"``.
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.aligned_mtl()
    >>> grads = {"w": jnp.array([[2., 0.], [0., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([1., 1.], dtype=float32)

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task
    Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
  """
  _check_choice(scale_mode, gw.ALIGNED_MTL_SCALE_MODES,
                "Aligned-MTL scale_mode")
  return _gram_transform(
      lambda gram: gw.aligned_mtl(gram, task_weights=task_weights,
                                  scale_mode=scale_mode),
      reduction=reduction, shared=shared)


@_documented
def config(*, reduction: str = "sum", shared: _core.SharedMask = None
           ) -> optax.GradientTransformationExtraArgs:
  r"""ConFIG: the conflict-free direction of equal angles with every task.

  Shared leaves get :math:`(\sum_t g_t \cdot \hat g_c)\,\hat g_c` with
  :math:`g_c = U^+ 1` for the unit gradients :math:`U` (Liu et al., 2024;
  see :func:`pcgrad_optax.weighting.config`).

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.config()
    >>> grads = {"w": jnp.array([[1., 0.], [0., 3.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([2., 2.], dtype=float32)

  References:
    Liu, Chu & Thuerey, `ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
  """
  return _gram_transform(gw.config, reduction=reduction, shared=shared)


@_documented
def nash_mtl(*, normalization: str = "none", max_norm: float = 0.0,
             ridge: float = 1e-6, reduction: str = "sum",
             shared: _core.SharedMask = None
             ) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL: the Nash bargaining update (Navon et al., 2022).

  Shared leaves get :math:`\sum_t \alpha_t g_t` with
  :math:`K\alpha = 1/\alpha`, :math:`\alpha > 0`, solved to convergence by
  damped Newton every step (see :func:`pcgrad_optax.weighting.nash_mtl`).
  With the default ``normalization="none"`` the update is invariant to the
  scale of every task's gradient (one task: its unit gradient);
  ``"frobenius"`` gives the official code's scaling.

  @FIRST_IN_CHAIN@

  Args:
    normalization: ``"none"`` (paper) or ``"frobenius"`` (official code).
    max_norm: if ``> 0``, the update's norm is clipped to it.
    ridge: diagonal added to the cosine matrix (default ``1e-6``; 0 exact).
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.nash_mtl()
    >>> grads = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> jnp.round(updates["w"], 4)
    Array([1., 1.], dtype=float32)

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  _check_choice(normalization, gw.NASH_MTL_NORMALIZATIONS,
                "Nash-MTL normalization")
  _check_nonnegative(max_norm, "Nash-MTL's max_norm")
  _check_nonnegative(ridge, "Nash-MTL's ridge")
  return _gram_transform(
      lambda gram: gw.nash_mtl(gram, normalization=normalization,
                               max_norm=max_norm, ridge=ridge),
      reduction=reduction, shared=shared)
