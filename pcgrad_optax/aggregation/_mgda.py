"""MGDA: the exact min-norm point of the convex hull of the task gradients.

Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
<https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
"""

from __future__ import annotations

import functools

import jax

from pcgrad_optax._core.checks import check_choice
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (cosines, min_norm_simplex,
                                               normalized)

MGDA_NORMALIZATIONS = ("none", "l2")


@functools.partial(jax.jit, static_argnames=("normalization",))
def _mgda(gram, normalization):
  gram_n = normalized(gram)
  if normalization == "l2":
    gram_n = cosines(gram_n, zero_diagonal_for_zero_tasks=True)[2]
  return min_norm_simplex(gram_n)[0].astype(gram.dtype)


def mgda_weighting(gram: jax.Array, *, normalization: str = "none"
                   ) -> jax.Array:
  r"""MGDA: the exact min-norm point of the convex hull of the gradients.

  Sener & Koltun (2018) take the Multiple-Gradient Descent Algorithm's
  common descent direction, the minimum-norm element of the convex hull of
  the task gradients:

  .. math::
    w = \arg\min_{w \in \Delta_T} \Big\| \sum_t w_t g_t \Big\|^2
      = \arg\min_{w \ge 0,\ 1^T w = 1} w^T K w,
    \qquad u = \sum_t w_t g_t .

  The update :math:`u` never conflicts with any task
  (:math:`g_t \cdot u \ge \|u\|^2 \ge 0`) and is zero exactly at
  Pareto-stationary points. The paper (and torchjd, LibMTL) solve the QP with
  Frank–Wolfe, which stops short of the optimum; here it is solved exactly:
  closed form for ``T = 2``, otherwise an active-set NNLS reformulation
  (see ``min_norm_simplex``) in cosine variables, so the result is the true
  min-norm point to round-off (about ``1e-7`` of the largest gradient norm on
  well-conditioned float32 problems, a few ``1e-4`` on nearly degenerate
  ones).

  With ``reduction="sum"`` the transformation returns the min-norm vector
  itself (weights on the simplex), as the paper and torchjd do; LibMTL does
  the same. The scaling: multiplying every gradient by :math:`s > 0` leaves
  the weights unchanged and scales the update by :math:`s`.

  Args:
    gram: ``(T, T)`` Gram matrix.
    normalization: ``"none"`` (the paper's MGDA), or ``"l2"``: the weights
      are solved on the unit gradients :math:`g_t / \|g_t\|` and applied to
      the raw gradients, as the official code's ``normalization_type="l2"``
      does (then the weights only depend on the directions). LibMTL's
      ``mgda_gn="l2"`` instead returns the min-norm point of the *unit*
      gradients, whose weights are ``mgda(K, normalization="l2") /
      sqrt(diag(K))``. The loss-based normalisations need the losses and are
      not Gram-only.

  Returns:
    ``(T,)`` weights on the simplex.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 2.]])
    >>> w = pcgrad_optax.weighting.mgda(g @ g.T)
    >>> np.round(np.asarray(w, np.float64), 4)
    array([0.8, 0.2])
    >>> np.round(np.asarray(w @ g, np.float64), 4)  # the min-norm point
    array([0.8, 0.4])

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018; Désidéri, `Multiple-
    gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_, 2012.
  """
  gram = check_gram(gram)
  if normalization not in MGDA_NORMALIZATIONS:
    raise ValueError(f"Unknown MGDA normalization {normalization!r}; expected "
                     f"one of {MGDA_NORMALIZATIONS}.")
  return _mgda(gram, normalization)


@documented
def mgda(*, normalization: str = "none", reduction: str = "sum",
         shared: SharedMask = None,
         num_tasks: int | None = None, keep_gram: bool = False
         ) -> Aggregator:
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
  @RECORD_ARGS@

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
  check_choice(normalization, MGDA_NORMALIZATIONS, "MGDA normalization")
  return gram_transform(
      lambda gram: mgda_weighting(gram, normalization=normalization),
      reduction=reduction, shared=shared,
      num_tasks=num_tasks, keep_gram=keep_gram,
      method="mgda")
