"""Constant: fixed task weights (tuned linear scalarisation).

The baseline the recent comparisons of multi-task optimisers recommend:
linear scalarisation with task weights tuned like any other hyperparameter
(Xin, Ghorbani, Gilmer, Garg & Firat, `Do Current Multi-Task Optimization
Methods in Deep Learning Even Help? <https://arxiv.org/abs/2209.11379>`_,
NeurIPS 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine, resolve
from pcgrad_optax._core.checks import check_num_tasks
from pcgrad_optax._core.gram import check_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction
from pcgrad_optax._core.transform import (Aggregator, GramState, GramStep,
                                          answers_probe, check_record,
                                          check_record_args, documented,
                                          gram_transform, init_record,
                                          record)


def _check_weights(weights, t: int | None, dtype) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.ndim != 1 or (t is not None and weights.shape != (t,)):
    expected = "(T,)" if t is None else f"(T,) = ({t},)"
    raise ValueError(f"Constant's `weights` must have shape {expected}, got "
                     f"{weights.shape}.")
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    weights = weights.astype(jnp.float32)
  return weights.astype(jnp.promote_types(weights.dtype, dtype))


def constant_weighting(gram: jax.Array, weights: jax.Array) -> jax.Array:
  r"""Fixed task weights: :math:`u = \sum_t w_t g_t` for given :math:`w`.

  The Gram matrix is only used for its size (the weights must have shape
  ``(T,)``), so the weighting composes with every tool that takes one.

  Args:
    gram: ``(T, T)`` Gram matrix (only its shape is used).
    weights: ``(T,)`` task weights (any real numbers; a JAX array, also a
      traced one, e.g. under ``optax.inject_hyperparams``).

  Returns:
    ``weights`` in the Gram matrix's dtype (or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> g = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> w = pcgrad_optax.weighting.constant(g @ g.T, jnp.array([1., 2.]))
    >>> w @ g
    Array([8., 3., 3.], dtype=float32)
  """
  gram = check_gram(gram)
  return _check_weights(weights, gram.shape[0], gram.dtype)


@documented
def constant(weights: jax.Array, *, reduction: str = "sum",
             shared: SharedMask = None,
             num_tasks: int | None = None, keep_gram: bool = False
             ) -> Aggregator:
  r"""Fixed task weights: linear scalarisation with tuned weights.

  Shared leaves get :math:`\sum_t w_t g_t` with the given ``weights`` (the
  gradient of :math:`\sum_t w_t L_t`); heads get their plain sum. No Gram
  matrix is built, unless ``keep_gram=True`` asks for it in the state.
  The tuned-weights baseline that Xin et al. (2022) find
  matches most multi-task optimisers when the weights are tuned.

  @FIRST_IN_CHAIN@

  Args:
    weights: ``(T,)`` task weights (a Python sequence or a JAX array, also
      a traced one).
  @SHARED_ARGS@
  @RECORD_ARGS@

  @RETURNS@

  Example:
    >>> import jax.numpy as jnp
    >>> import pcgrad_optax
    >>> tx = pcgrad_optax.constant(jnp.array([1., 2.]))
    >>> grads = {"w": jnp.array([[-4., 1., 1.], [6., 1., 1.]])}
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(3)}))
    >>> updates["w"]
    Array([8., 3., 3.], dtype=float32)

  References:
    Xin, Ghorbani, Gilmer, Garg & Firat, `Do Current Multi-Task
    Optimization Methods in Deep Learning Even Help?
    <https://arxiv.org/abs/2209.11379>`_, NeurIPS 2022.
  """
  check_reduction(reduction)
  records = check_record_args(num_tasks, keep_gram, "constant")
  expected = check_num_tasks(num_tasks) if records else None
  _check_weights(weights, expected, jnp.float32)
  if keep_gram:   # the state's Gram matrix needs the Gram pass
    return gram_transform(lambda gram: constant_weighting(gram, weights),
                          reduction=reduction, shared=shared,
                          num_tasks=num_tasks, keep_gram=True,
                          method="constant")

  def init_fn(params):
    if not records:
      return optax.EmptyState()
    return GramState(*init_record(params, num_tasks, False, "constant"))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, expected,
                                       "constant")
    w = _check_weights(weights, t, jnp.float32)
    out = combine(leaves, treedef, mask, w, reduction)
    if not records:
      return out, state
    check_record(state.weights, t, "constant")
    return out, GramState(*record(w, None, state.weights, None, t,
                                  reduction))

  def gram_step(gram, state):   # value_and_aggregate's engines
    t = gram.shape[0]
    w = _check_weights(weights, t, jnp.float32)
    if not records:
      return w, state
    check_record(state.weights, t, "constant")
    return w, GramState(*record(w, None, state.weights, None, t, reduction))

  hook = GramStep(gram_step, shared, reduction, "constant")
  return Aggregator(init_fn, answers_probe(update_fn, hook))
