"""Two-dimensional two-task toy problems from the gradient-surgery papers.

Two landscapes, each a function from a point in the plane to the ``(2,)``
vector of task losses, so :func:`pcgrad_optax.task_value_and_grad` gives the
stacked ``(2, 2)`` per-task gradients directly:

* :func:`losses`: the toy of the follow-up papers (the form in the CAGrad and
  Nash-MTL code). A flat plateau for ``x2 > 0`` where the log terms are
  nearly constant, and a curved valley near ``x2 = -8.36`` that holds the
  Pareto set (``-7 <= x1 <= 7``). :data:`STARTS` are the three published
  starting points.
* :func:`pcgrad_paper_losses`: the toy of the PCGrad paper (Fig. 1,
  Appendix D), started from :data:`PCGRAD_PAPER_START`.

Every function broadcasts over leading axes (a ``(..., 2)`` input gives
``(..., 2)`` losses), so a whole contour grid is one call, and keeps the
input's floating dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Floor inside the logs (the papers' ``LOWER``): keeps ``log`` finite where
#: its argument crosses zero.
LOWER = 5e-6

#: The three starting points of the CAGrad toy, shape ``(3, 2)``.
STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))

#: The minimiser of the mean loss ``(L1 + L2) / 2`` (to 4 decimals) and its
#: value; CAGrad (c = 0.5) is reported to reach it from every start.
MEAN_LOSS_ARGMIN = (0.0, -8.3551)
MEAN_LOSS_MIN = -15.0916

#: Starting point of the PCGrad paper's toy.
PCGRAD_PAPER_START = (0.5, -3.0)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != 2:
    raise ValueError(
        f"The toy losses take points of shape (..., 2), got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x[..., 0], x[..., 1]


def _log_floor(z: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(jnp.abs(z), LOWER))


def losses(x: jax.Array) -> jax.Array:
  r"""Task losses of the follow-ups' two-task toy (CAGrad, Nash-MTL).

  With :math:`x = (x_1, x_2)` and :math:`\ell(z) = \log\max(|z|, 5\cdot
  10^{-6})`,

  .. math::
    f_1 &= \ell\big(\tfrac12(-x_1-7) - \tanh(-x_2)\big) + 6, &
    f_2 &= \ell\big(\tfrac12(-x_1+3) + \tanh(-x_2) + 2\big) + 6, \\
    s_1 &= \tfrac{(7-x_1)^2 + 0.1(x_2+8)^2}{10} - 20, &
    s_2 &= \tfrac{(x_1+7)^2 + 0.1(x_2+8)^2}{10} - 20, \\
    c_1 &= \max(\tanh(x_2/2), 0), & c_2 &= \max(\tanh(-x_2/2), 0), \\
    L_1 &= c_1 f_1 + c_2 s_1, & L_2 &= c_1 f_2 + c_2 s_2 .

  Args:
    x: points, shape ``(..., 2)``.

  Returns:
    ``(..., 2)`` array ``[L1, L2]`` in the input's floating dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import toy
    >>> l1, l2 = toy.losses(jnp.array(toy.MEAN_LOSS_ARGMIN))
    >>> print(f"{l1:.3f} {l2:.3f}")  # both tasks equal at the mean's minimum
    -15.092 -15.092

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021 (the toy's code).
  """
  x1, x2 = _split(x)
  f1 = _log_floor(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)) + 6.0
  f2 = _log_floor(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0) + 6.0
  valley = 0.1 * (-x2 - 8.0) ** 2
  s1 = ((-x1 + 7.0) ** 2 + valley) / 10.0 - 20.0
  s2 = ((-x1 - 7.0) ** 2 + valley) / 10.0 - 20.0
  c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
  return jnp.stack([f1 * c1 + s1 * c2, f2 * c1 + s2 * c2], axis=-1)


def pcgrad_paper_losses(theta: jax.Array) -> jax.Array:
  r"""Task losses of the PCGrad paper's toy (Yu et al. 2020, Fig. 1, App. D).

  .. math::
    L_1 = 20 \log\max\big(|\tfrac12\theta_1 + \tanh\theta_2|,
          5\cdot 10^{-6}\big), \qquad
    L_2 = 25 \log\max\big(|\tfrac12\theta_1 - \tanh\theta_2 + 2|,
          5\cdot 10^{-6}\big).

  Args:
    theta: points, shape ``(..., 2)``.

  Returns:
    ``(..., 2)`` array ``[L1, L2]`` in the input's floating dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import toy
    >>> l1, l2 = toy.pcgrad_paper_losses(jnp.array(toy.PCGRAD_PAPER_START))
    >>> print(f"{l1:.3f} {l2:.3f}")
    -5.886 29.428

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  t1, t2 = _split(theta)
  return jnp.stack([20.0 * _log_floor(0.5 * t1 + jnp.tanh(t2)),
                    25.0 * _log_floor(0.5 * t1 - jnp.tanh(t2) + 2.0)],
                   axis=-1)
