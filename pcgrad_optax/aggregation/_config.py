"""ConFIG: the conflict-free direction of equal angles with every task.

Liu, Chu & Thuerey, `ConFIG: Towards Conflict-free Training of Physics
Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import (equal_cosine_direction, mm,
                                               safe_div)


@jax.jit
def _config(gram):
  norms, nonzero, cos, beta = equal_cosine_direction(gram)
  # g_c = sum_j beta_j u_j; |g_c|^2 = beta^T C beta; sum_i g_i.g_c = n^T C b.
  c_beta = mm(cos, beta)
  sq_norm = jnp.dot(beta, c_beta)
  length = jnp.dot(norms, c_beta)
  scale = safe_div(length, sq_norm)
  eps = jnp.finfo(cos.dtype).eps
  scale = jnp.where(sq_norm > eps * jnp.sum(beta * beta), scale, 0)
  alpha = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1), 0)
  return (scale * alpha).astype(gram.dtype)


def config_weighting(gram: jax.Array) -> jax.Array:
  r"""ConFIG: the conflict-free update of Liu et al. (2024).

  The direction solves :math:`u_t \cdot g_c = 1` for every unit gradient
  :math:`u_t = g_t / \|g_t\|` with the pseudo-inverse (equal angles with all
  tasks), and its length is the sum of the gradients' projections on it:

  .. math::
    g_c = U^{+} 1, \qquad
    d = \Big(\sum_t g_t \cdot \hat g_c\Big)\, \hat g_c,
    \quad \hat g_c = g_c / \|g_c\| .

  In Gram terms :math:`g_c = \sum_j \beta_j u_j` with
  :math:`\beta = C^{+} 1` (``C`` the cosine matrix), so the weights are
  :math:`\frac{n^T C \beta}{\beta^T C \beta}\, \beta_t / \|g_t\|`. This is
  the official ``ConFIG_update`` with its defaults (equal weights,
  ``ProjectionLength``; its ``lstsq``/``pinv`` paths agree with the
  pseudo-inverse here). When the gradients are linearly independent the
  update conflicts with no task. A zero gradient's unit vector is taken as
  zero (its equation is dropped), as the official code's ``nan_to_num``
  does.

  Scaling: all gradients times :math:`s > 0` scales the update by :math:`s`;
  scaling one task's gradient keeps the direction and changes the length.

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> w = pcgrad_optax.weighting.config(g @ g.T)
    >>> jnp.round(w @ g, 4)
    Array([2., 2.], dtype=float32)

  References:
    Liu, Chu, Thuerey, `ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
  """
  return _config(check_gram(gram))


@documented
def config(*, reduction: str = "sum", shared: SharedMask = None,
           num_tasks: int | None = None, keep_gram: bool = False
           ) -> Aggregator:
  r"""ConFIG: the conflict-free direction of equal angles with every task.

  Shared leaves get :math:`(\sum_t g_t \cdot \hat g_c)\,\hat g_c` with
  :math:`g_c = U^+ 1` for the unit gradients :math:`U` (Liu et al., 2024;
  see :func:`pcgrad_optax.weighting.config`).

  @FIRST_IN_CHAIN@

  Args:
  @SHARED_ARGS@
  @RECORD_ARGS@

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
  return gram_transform(config_weighting, reduction=reduction, shared=shared,
                        num_tasks=num_tasks, keep_gram=keep_gram,
                        method="config")
