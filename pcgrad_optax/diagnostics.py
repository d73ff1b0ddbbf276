"""Gradient-conflict diagnostics from the task Gram matrix.

Everything here is a pure, jit-able function of the ``(T, T)`` Gram matrix
``K = G G^T`` of the task gradients (``O(T^2)`` work, nothing touches the
gradients), cheap enough to log every step:

* :func:`task_norms` -- :math:`\\|g_i\\|`;
* :func:`cosine_similarities` -- pairwise :math:`\\cos(g_i, g_j)`;
* :func:`conflict_fraction` -- share of task pairs with cosine below a
  threshold (0: "conflicting gradients"; Recon also counts below
  :math:`S < 0`);
* :func:`magnitude_similarity` -- PCGrad's gradient-magnitude similarity
  :math:`2\\|g_i\\|\\|g_j\\| / (\\|g_i\\|^2 + \\|g_j\\|^2)`;
* :func:`summary` -- all of the above as a dict of arrays for a logger;
* :func:`task_weights`, :func:`last_gram`, :func:`from_state` -- the last
  step's task weights and Gram matrix as the transformations keep them in
  their state (and the summary of that Gram matrix).

The cheapest way to log: build the transformation with ``num_tasks`` (and
``keep_gram=True`` for the Gram matrix); its state then holds what the step
computed anyway, with no extra pass over the gradients::

  tx = optax.chain(pcgrad_optax.upgrad(num_tasks=T, keep_gram=True),
                   optax.adam(1e-3))
  ...
  updates, opt_state = tx.update(grads, opt_state, params)
  logs = pcgrad_optax.diagnostics.from_state(opt_state)  # weights, cosines..

Or build the Gram matrix from the same stacked gradients and the same
``shared`` mask the transformation uses, with
:func:`pcgrad_optax.gram_matrix` (one extra pass over the shared leaves)::

  @jax.jit
  def train_step(params, opt_state):
    losses, grads = pcgrad_optax.task_value_and_grad(task_losses)(params)
    gram = pcgrad_optax.gram_matrix(grads, shared=shared_mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, pcgrad_optax.diagnostics.summary(gram)

Zero gradients: a task whose gradient is zero has cosine 0 with every task
(itself included) and never counts as conflicting.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from pcgrad_optax._core.gram import check_gram

__all__ = [
    "conflict_fraction",
    "cosine_similarities",
    "from_state",
    "last_gram",
    "magnitude_similarity",
    "summary",
    "task_norms",
    "task_weights",
]

# The package's state types that record the last step's weights (and Gram).
_RECORDING_STATES = frozenset({
    "GramState", "PCGradState", "GradVacState", "RLWState", "DWAState",
    "FAMOState", "UncertaintyState", "IMTLLState", "STCHState",
    # Issue 13's stateful gradient-level methods.
    "ExcessMTLState", "MoCoState", "DBMTLState", "GradNormState",
    "SDMGradState", "MoDoState"})


def task_norms(gram: jax.Array) -> jax.Array:
  r"""Norms of the task gradients, :math:`\|g_i\| = \sqrt{K_{ii}}`.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients.

  Returns:
    ``(T,)`` non-negative norms (f32, or f64 for an f64 Gram matrix).

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import diagnostics
    >>> g = jnp.array([[3., 4.], [0., 1.]])
    >>> print(diagnostics.task_norms(g @ g.T))
    [5. 1.]
  """
  gram = check_gram(gram)
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))


def cosine_similarities(gram: jax.Array) -> jax.Array:
  r"""Pairwise cosine similarities of the task gradients.

  .. math::
    C_{ij} = \frac{K_{ij}}{\sqrt{K_{ii} K_{jj}}},

  clipped to :math:`[-1, 1]` (rounding can overshoot), with :math:`C_{ij} =
  0` where either gradient is zero (no ``0/0``) and an exact 1 on the
  diagonal of non-zero gradients. Symmetric.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients.

  Returns:
    ``(T, T)`` cosines.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import diagnostics
    >>> g = jnp.array([[1., 0.], [-1., 0.], [0., 0.]])
    >>> print(diagnostics.cosine_similarities(g @ g.T))
    [[ 1. -1.  0.]
     [-1.  1.  0.]
     [ 0.  0.  0.]]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020 (conflicting
    gradients: cosine < 0).
  """
  gram = check_gram(gram)
  norms = task_norms(gram)
  outer = norms[:, None] * norms[None, :]
  valid = outer > 0
  cos = jnp.clip(jnp.where(valid, gram / jnp.where(valid, outer, 1), 0), -1, 1)
  eye = jnp.eye(gram.shape[0], dtype=bool)
  return jnp.where(eye & valid, jnp.ones_like(cos), cos)


def _pair_mask(num_tasks: int) -> jax.Array:
  """Upper triangle without the diagonal: each unordered pair once."""
  return jnp.triu(jnp.ones((num_tasks, num_tasks), bool), k=1)


def conflict_fraction(gram: jax.Array, threshold: float = 0.0) -> jax.Array:
  r"""Fraction of task pairs whose gradients conflict.

  .. math::
    \frac{\#\{i < j : g_i \ne 0,\ g_j \ne 0,\ \cos(g_i, g_j) < S\}}
         {T(T-1)/2}

  with threshold :math:`S` (0: the PCGrad paper's "conflicting gradients";
  Recon counts pairs below a severity :math:`S < 0`, e.g. -0.01 or -0.02).
  The comparison is strict. Pairs with a zero gradient never count. 0 for
  T = 1.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients.
    threshold: :math:`S`.

  Returns:
    Scalar fraction in ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import diagnostics
    >>> g = jnp.array([[1., 0.], [-1., 0.1], [0., 1.]])
    >>> print(diagnostics.conflict_fraction(g @ g.T))  # only (0, 1) conflicts
    0.33333334

  References:
    Shi et al., `Recon: Reducing Conflicting Gradients from the Root for
    Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_, ICLR 2023.
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  if t < 2:
    return jnp.zeros([], gram.dtype)
  norms = task_norms(gram)
  nonzero = (norms[:, None] > 0) & (norms[None, :] > 0)
  conflicting = (cosine_similarities(gram) < threshold) & nonzero & \
      _pair_mask(t)
  return jnp.sum(conflicting).astype(gram.dtype) / (t * (t - 1) // 2)


def magnitude_similarity(gram: jax.Array) -> jax.Array:
  r"""Pairwise gradient-magnitude similarity (the PCGrad paper's measure).

  .. math::
    \Phi_{ij} = \frac{2\,\|g_i\|\,\|g_j\|}{\|g_i\|^2 + \|g_j\|^2} \in [0, 1],

  1 for equal magnitudes, near 0 when one gradient dominates. Two zero
  gradients have similarity 1 (equal magnitudes); one zero gradient gives 0.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients.

  Returns:
    ``(T, T)`` symmetric similarities with unit diagonal.

  Example:
    >>> import jax.numpy as jnp
    >>> from pcgrad_optax import diagnostics
    >>> g = jnp.array([[1., 0.], [0., 3.]])
    >>> print(diagnostics.magnitude_similarity(g @ g.T))
    [[1.  0.6]
     [0.6 1. ]]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  gram = check_gram(gram)
  sq = jnp.maximum(jnp.diagonal(gram), 0)
  norms = jnp.sqrt(sq)
  denom = sq[:, None] + sq[None, :]
  return jnp.where(
      denom > 0,
      jnp.minimum(2 * norms[:, None] * norms[None, :]
                  / jnp.where(denom > 0, denom, 1), 1),
      jnp.ones_like(denom))


def summary(gram: jax.Array, *, threshold: float = -0.01
            ) -> dict[str, jax.Array]:
  r"""Every diagnostic of the Gram matrix, as a dict of arrays for logging.

  Keys (pair statistics run over the :math:`T(T-1)/2` unordered pairs; for
  T = 1 there are none and they read 1 for the similarities, 0 for the
  fractions):

  * ``"task_norms"`` ``(T,)``: :func:`task_norms`;
  * ``"cosines"`` ``(T, T)``: :func:`cosine_similarities`;
  * ``"magnitude_similarity"`` ``(T, T)``: :func:`magnitude_similarity`;
  * ``"mean_cosine"``, ``"min_cosine"``: over the pairs;
  * ``"mean_magnitude_similarity"``: over the pairs;
  * ``"conflict_fraction"``: pairs with cosine < 0;
  * ``"conflict_fraction_below_threshold"``: pairs with cosine <
    ``threshold`` (Recon's severity measure; its thresholds are -0.01,
    -0.02 and -0.04 depending on the data set).

  Every value is a JAX array with a shape fixed by T, so the dict can be
  returned from a jitted or scanned step.

  Args:
    gram: ``(T, T)`` Gram matrix of the task gradients, e.g.
      ``pcgrad_optax.gram_matrix(stacked_grads, shared=mask)``.
    threshold: severity threshold for ``"conflict_fraction_below_threshold"``.

  Returns:
    Dict from the names above to arrays.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import pcgrad_optax
    >>> grads = {"w": jnp.array([[1., 0.], [-1., 0.1], [0., 2.]])}
    >>> stats = jax.jit(pcgrad_optax.diagnostics.summary)(
    ...     pcgrad_optax.gram_matrix(grads))
    >>> print(f"{stats['conflict_fraction']:.3f} {stats['min_cosine']:.3f}")
    0.333 -0.995
    >>> sorted(stats)[:3]
    ['conflict_fraction', 'conflict_fraction_below_threshold', 'cosines']
  """
  gram = check_gram(gram)
  t = gram.shape[0]
  cos = cosine_similarities(gram)
  mag = magnitude_similarity(gram)
  pairs = _pair_mask(t)
  num_pairs = max(t * (t - 1) // 2, 1)
  one = jnp.ones([], gram.dtype)
  if t > 1:
    mean_cos = jnp.sum(jnp.where(pairs, cos, 0)) / num_pairs
    min_cos = jnp.min(jnp.where(pairs, cos, jnp.inf))
    mean_mag = jnp.sum(jnp.where(pairs, mag, 0)) / num_pairs
  else:
    mean_cos = min_cos = mean_mag = one
  return {
      "task_norms": task_norms(gram),
      "cosines": cos,
      "magnitude_similarity": mag,
      "mean_cosine": mean_cos,
      "min_cosine": min_cos,
      "mean_magnitude_similarity": mean_mag,
      "conflict_fraction": conflict_fraction(gram, 0.0),
      "conflict_fraction_below_threshold": conflict_fraction(gram, threshold),
  }


def _recorded(opt_state: Any, field: str, required: bool):
  """The one ``field`` of the package's states in ``opt_state`` (or None)."""
  found = [
      value for path, value in otu.tree_get_all_with_path(opt_state, field)
      if value is not None and isinstance(path[-1], otu.NamedTupleKey)
      and path[-1].tuple_name in _RECORDING_STATES]
  if len(found) > 1:
    raise ValueError(
        f"The optimizer state holds {len(found)} '{field}' records (several "
        "pcgrad_optax transformations); pick one with "
        "optax.tree_utils.tree_get_all_with_path.")
  if not found:
    if not required:
      return None
    hint = ("build the transformation with num_tasks=T" if field == "weights"
            else "build the transformation with num_tasks=T, keep_gram=True")
    raise ValueError(
        f"The optimizer state holds no '{field}' of a pcgrad_optax "
        f"transformation: {hint} (init only sees the params, so the record's "
        "shape must be known up front).")
  return found[0]


def task_weights(opt_state: Any) -> jax.Array:
  r"""The last step's task weights, as a transformation keeps them.

  Finds the ``weights`` field of the (one) pcgrad_optax transformation in
  ``opt_state``, e.g. the state of ``optax.chain(pcgrad_optax.mgda(
  num_tasks=T), optax.adam(1e-3))``: the ``(T,)`` weights applied to the
  shared leaves at the last update (GradVac: ``(G, T)``, one row per
  parameter group); zeros before the first update. Unlike
  ``optax.tree_utils.tree_get(opt_state, "weights")`` it only looks at the
  package's state types, so a parameter named ``weights`` (a dict key in
  Adam's params-shaped moments) does not get in the way.

  Args:
    opt_state: an optimizer state holding one pcgrad_optax transformation's
      state, built with ``num_tasks``.

  Returns:
    The weights array.

  Raises:
    ValueError: if no transformation in ``opt_state`` records weights (it
      was built without ``num_tasks``), or several do.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import pcgrad_optax
    >>> tx = optax.chain(pcgrad_optax.mgda(num_tasks=2), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> w = pcgrad_optax.diagnostics.task_weights(state)
    >>> print(np.round(np.asarray(w, np.float64), 4))
    [0.8 0.2]
  """
  return _recorded(opt_state, "weights", required=True)


def last_gram(opt_state: Any) -> jax.Array:
  """The last step's Gram matrix, kept by a transformation with keep_gram.

  Args:
    opt_state: an optimizer state holding one pcgrad_optax transformation's
      state, built with ``num_tasks`` and ``keep_gram=True``.

  Returns:
    The ``(T, T)`` Gram matrix of the shared leaves at the last update
    (GradVac: ``(G, T, T)``); zeros before the first update.

  Raises:
    ValueError: if no transformation in ``opt_state`` keeps the Gram matrix,
      or several do.
  """
  return _recorded(opt_state, "gram", required=True)


def from_state(opt_state: Any, *, threshold: float = -0.01
               ) -> dict[str, jax.Array]:
  r"""What to log from an optimizer state: weights, and the Gram summary.

  ``{"weights": task_weights(opt_state)}``, plus every entry of
  :func:`summary` of the kept Gram matrix when the transformation was built
  with ``keep_gram=True`` (GradVac: only with one parameter group). Nothing
  touches the gradients: the values are those the last update computed.
  Jit-able.

  Args:
    opt_state: an optimizer state holding one pcgrad_optax transformation's
      state, built with ``num_tasks``.
    threshold: as for :func:`summary`.

  Returns:
    Dict from names to arrays.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.upgrad(num_tasks=2, keep_gram=True)
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> logs = pcgrad_optax.diagnostics.from_state(state)
    >>> print(jnp.round(logs["weights"], 4), f"{logs['min_cosine']:.3f}")
    [1.   0.75] -0.707
  """
  out = {"weights": task_weights(opt_state)}
  gram = _recorded(opt_state, "gram", required=False)
  if gram is not None and gram.ndim == 3 and gram.shape[0] == 1:
    gram = gram[0]   # GradVac with one group
  if gram is not None and gram.ndim == 2:
    out.update(summary(gram, threshold=threshold))
  return out
