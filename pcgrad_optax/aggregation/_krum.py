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

from pcgrad_optax._core.checks import static_int
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.transform import (Aggregator, documented,
                                          gram_transform)
from pcgrad_optax.aggregation._solvers import solver_dtype


def _check_counts(num_byzantine, num_selected, t: int | None) -> None:
  # Concrete counts are validated (and checked against T); traced ones
  # (optax.inject_hyperparams under jit) cannot be and pass.
  f = static_int(num_byzantine, "Krum's num_byzantine", minimum=0)
  m = static_int(num_selected, "Krum's num_selected")
  if t is None:
    return
  if f is not None and t < f + 3:
    raise ValueError(
        f"Krum needs T >= num_byzantine + 3 = {f + 3} tasks "
        f"(every score sums the T - num_byzantine - 2 nearest others), got "
        f"T={t}.")
  if m is not None and t < m:
    raise ValueError(f"Krum's num_selected={m} exceeds the "
                     f"number of tasks T={t}.")


@functools.partial(jax.jit, static_argnames=("squared",))
def _krum(gram, num_byzantine, num_selected, squared):
  # The counts are arrays (possibly traced): they enter as masks over the
  # sorted distances and the score ranks, never as shapes.
  k = gram.astype(solver_dtype(gram))
  t = k.shape[0]
  sq = jnp.diagonal(k)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * k, 0)
  if not squared:
    dist = jnp.sqrt(dist)
  # Each task's score: the sum over its T - f - 2 nearest *other* tasks
  # (its own distance sorts last, as inf).
  dist = jnp.where(jnp.eye(t, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(dist, axis=1)
  keep = jnp.arange(t) < t - num_byzantine - 2
  scores = jnp.sum(jnp.where(keep[None, :], nearest, 0), axis=1)
  # The num_selected lowest scores (ties: the lower task index).
  rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
  m = num_selected.astype(k.dtype)
  weights = jnp.where(rank < num_selected, 1 / m, 0)
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
    num_byzantine: :math:`f \ge 0`, an int (or an integer JAX array, also
      a traced one; only concrete counts are checked against T).
    num_selected: :math:`m \ge 1`, likewise, default 1 (Krum).
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
  return _krum(gram, jnp.asarray(num_byzantine, jnp.int32),
               jnp.asarray(num_selected, jnp.int32), bool(squared))


@documented
def krum(num_byzantine: int, num_selected: int = 1, *, squared: bool = True,
         reduction: str = "sum", shared: SharedMask = None,
         num_tasks: int | None = None, keep_gram: bool = False
         ) -> Aggregator:
  r"""Krum / Multi-Krum (Blanchard et al., 2017) on the task gradients.

  Shared leaves get the average of the ``num_selected`` task gradients with
  the lowest Krum scores (the sum of squared distances to the
  ``T - num_byzantine - 2`` nearest others, from the Gram matrix; see
  :func:`pcgrad_optax.weighting.krum`). A robust aggregator from federated
  learning: a task whose gradient is far from the others' is never chosen.
  ``T >= num_byzantine + 3`` and ``T >= num_selected`` are checked when the
  update is traced, for concrete counts.

  The counts are hyperparameters like any other: under
  ``optax.inject_hyperparams`` they become (traced) int arrays and only mask
  the sorted distances and the ranks of the scores, so no ``static_args``
  are needed (a traced count is not checked against T).

  @FIRST_IN_CHAIN@

  Args:
    num_byzantine: :math:`f`, the number of gradients that may be outliers.
    num_selected: :math:`m`, how many are averaged (1: Krum).
    squared: score by squared distances (the paper, default) or by
      distances (torchjd).
  @SHARED_ARGS@
  @RECORD_ARGS@

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
      reduction=reduction, shared=shared, num_tasks=num_tasks,
      keep_gram=keep_gram, method="krum")
