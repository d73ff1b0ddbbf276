"""Krum and Multi-Krum: Byzantine-robust selection of task gradients.

Blanchard, El Mhamdi, Guerraoui & Stainer, `Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent
<https://arxiv.org/abs/1703.02757>`_,
NeurIPS 2017.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import documented, gram_transform
from pcgrad_optax.aggregation._solvers import solver_dtype


def _check_counts(num_byzantine, num_selected, t: int | None) -> None:
  for name, value, low in (("num_byzantine", num_byzantine, 0),
                           ("num_selected", num_selected, 1)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"Krum's {name} must be an int >= {low}, got "
                       f"{value!r}.")
  if t is None:
    return
  if t < num_byzantine + 3:
    raise ValueError(
        f"Krum needs T >= num_byzantine + 3 = {num_byzantine + 3} tasks "
        f"(every score sums the T - num_byzantine - 2 nearest others), got "
        f"T={t}.")
  if t < num_selected:
    raise ValueError(f"Krum's num_selected={num_selected} exceeds the "
                     f"number of tasks T={t}.")


@functools.partial(jax.jit, static_argnames=("num_byzantine", "num_selected",
                                             "squared"))
def _krum(gram, num_byzantine, num_selected, squared):
  k = gram.astype(solver_dtype(gram))
  t = k.shape[0]
  sq = jnp.diagonal(k)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * k, 0)
  if not squared:
    dist = jnp.sqrt(dist)
  # Each task's score: the sum over its T - f - 2 nearest *other* tasks.
  dist = jnp.where(jnp.eye(t, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(dist, axis=1)[:, :t - num_byzantine - 2]
  scores = jnp.sum(nearest, axis=1)
  # The num_selected lowest scores (ties: the lower task index).
  chosen = jnp.argsort(scores, stable=True)[:num_selected]
  weights = jnp.zeros((t,), k.dtype).at[chosen].set(1.0 / num_selected)
  return weights.astype(gram.dtype)


def krum_weighting(gram: jax.Array, *, num_byzantine: int,
                   num_selected: int = 1, squared: bool = True
                   ) -> jax.Array:
  r"""Krum / Multi-Krum weights from the Gram matrix (Blanchard et al., 2017).

  With :math:`f` = ``num_byzantine`` of the :math:`T` gradients possibly
  adversarial, each gradient is scored by the sum of its squared distances
  to its :math:`T - f - 2` nearest other gradients,

  .. math::
    s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad
    \|g_i - g_j\|^2 = K_{ii} + K_{jj} - 2 K_{ij},

  and Krum keeps the gradient with the lowest score. Multi-Krum
  (``num_selected`` :math:`= m > 1`) keeps the :math:`m` lowest scores and
  averages them: weight :math:`1/m` on each kept task, 0 elsewhere (as
  torchjd). Ties go to the lower task index. The paper's guarantee needs
  :math:`2f + 2 < T`; like torchjd we only require :math:`T \ge f + 3` (at
  least one neighbour) and :math:`T \ge m`. The distances come from the Gram
  matrix, so gradients much closer to each other than to the origin lose
  relative precision (``K_ii + K_jj - 2K_ij`` cancels).

  Args:
    gram: ``(T, T)`` Gram matrix.
    num_byzantine: :math:`f \ge 0` (a Python int).
    num_selected: :math:`m \ge 1` (a Python int), default 1 (Krum).
    squared: ``True`` (the paper) scores by squared distances; ``False``
      by distances, as torchjd does.

  Returns:
    ``(T,)`` weights: ``1 / num_selected`` on the selected tasks.

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[1., 0.], [1.1, 0.], [0.9, 0.1], [-5., 5.]])
    >>> pcgrad_optax.weighting.krum(g @ g.T, num_byzantine=1)
    Array([1., 0., 0., 0.], dtype=float32)

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, `Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent
    <https://arxiv.org/abs/1703.02757>`_,
    NeurIPS 2017.
  """
  gram = check_gram(gram)
  _check_counts(num_byzantine, num_selected, gram.shape[0])
  return _krum(gram, num_byzantine, num_selected, bool(squared))


@documented
def krum(num_byzantine: int, num_selected: int = 1, *, squared: bool = True,
         reduction: str = "sum", shared: SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""Krum / Multi-Krum (Blanchard et al., 2017) on the task gradients.

  Shared leaves get the average of the ``num_selected`` task gradients with
  the lowest Krum scores (the sum of squared distances to the
  ``T - num_byzantine - 2`` nearest others, from the Gram matrix; see
  :func:`pcgrad_optax.weighting.krum`). A robust aggregator from federated
  learning: a task whose gradient is far from the others' is never chosen.
  ``T >= num_byzantine + 3`` and ``T >= num_selected`` are checked when the
  update is traced.

  @FIRST_IN_CHAIN@

  Args:
    num_byzantine: :math:`f`, the number of gradients that may be outliers.
    num_selected: :math:`m`, how many are averaged (1: Krum).
    squared: score by squared distances (the paper, default) or by
      distances (torchjd).
  @SHARED_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.krum(1, num_selected=2)
    >>> g = {"w": jnp.array([[1., 0.], [1.2, 0.], [0.9, 0.1], [-5., 5.]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"]
    Array([0.95, 0.05], dtype=float32)

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, `Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent
    <https://arxiv.org/abs/1703.02757>`_,
    NeurIPS 2017.
  """
  _check_counts(num_byzantine, num_selected, None)
  return gram_transform(
      lambda gram: krum_weighting(gram, num_byzantine=num_byzantine,
                                  num_selected=num_selected, squared=squared),
      reduction=reduction, shared=shared)
