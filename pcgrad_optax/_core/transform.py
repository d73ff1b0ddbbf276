"""What the optax transformations of the package share.

PRNG keys in the state (:func:`canonicalize_key`), the factory of every
Gram-based method (:func:`gram_aggregator`, with the :class:`GramStep` it
attaches for :func:`pcgrad_optax.value_and_aggregate`; the stateless
:func:`gram_transform`), the state dtype guard
(:func:`cast_like`) and the docstring parts every factory repeats
(:func:`documented` fills them in, keeping docstrings literal so that their
examples run as doctests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.gram import masked_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import check_reduction


def canonicalize_key(key_or_seed: jax.Array | int) -> jax.Array:
  """A typed PRNG key from an int seed, a typed key or a legacy uint32 key."""
  if isinstance(key_or_seed, (jax.Array, jax.core.Tracer)) and jnp.issubdtype(
      key_or_seed.dtype, jax.dtypes.prng_key):
    return key_or_seed
  if hasattr(key_or_seed, "dtype") and jnp.ndim(key_or_seed) == 1:
    return jax.random.wrap_key_data(jnp.asarray(key_or_seed, jnp.uint32))
  return jax.random.key(key_or_seed)


def cast_like(new, old):
  """``new`` with each leaf cast to the dtype of ``old``'s (stable state)."""
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype),
                      new, old)


FIRST_IN_CHAIN = """
  .. warning::
    The transformation consumes *stacked* gradients (a leading task axis on
    every leaf) and emits params-shaped updates, so it must come first in an
    ``optax.chain``. Wrappers that assume params-shaped gradients
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``) cannot
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`.
"""

SHARED_ARGS = """    reduction: ``"sum"`` (the method's weights as they are) or
      ``"mean"`` (divides the update, heads included, by T).
    shared: which leaves are shared parameters: None (all), a pytree of bools
      with the params' structure (or a prefix of it) or a callable
      ``params -> pytree of bools``, like ``optax.masked``'s mask. Only shared
      leaves enter the Gram matrix and get the method's weights.
"""

WEIGHTS_SHARED_LEAVES = """
  With a ``shared`` mask, only the shared leaves are weighted; every other
  leaf (task heads) gets the plain sum (or mean) of its task axis, i.e. each
  head keeps its own task's gradient. The default (every leaf shared)
  weights the whole model, as weighting the loss does in the paper.
"""

RETURNS = """  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.
    ``update(updates, state, params=None)`` takes stacked gradients (every
    leaf of shape ``(T,) + param.shape``) and returns params-shaped updates.
"""


def documented(factory):
  """Fills the shared parts of a factory's docstring (kept a literal).

  A line ``@MARKER@`` (indented two spaces) in the docstring is replaced by
  the text of that name above; the docstring stays a literal, so
  ``__doc__`` exists before decoration and its example runs as a doctest.
  """
  doc = factory.__doc__
  if doc is None:   # python -OO strips docstrings
    return factory
  for marker, text in (("@FIRST_IN_CHAIN@", FIRST_IN_CHAIN.strip("\n")),
                       ("@SHARED_ARGS@", SHARED_ARGS.strip("\n")),
                       ("@WEIGHTS_SHARED_LEAVES@",
                        WEIGHTS_SHARED_LEAVES.strip("\n")),
                       ("@RETURNS@", RETURNS.strip("\n"))):
    doc = doc.replace("  " + marker, text)
  factory.__doc__ = doc
  return factory


class GramStep(NamedTuple):
  """How a Gram-based transformation turns a Gram matrix into task weights.

  Every Gram-based transformation of the package is built by
  :func:`gram_aggregator` and carries one (``tx.update.gram_step``, read
  with :func:`gram_step_of`), so that :func:`pcgrad_optax.value_and_aggregate`
  can compute the Gram matrix its own way and still run the method, state
  included, exactly as ``tx.update`` does.

  Attributes:
    step: ``(gram, state) -> (weights, new_state)``; ``weights`` are the
      method's ``(T,)`` weights for the "sum" reduction.
    shared: the transformation's ``shared`` mask.
    reduction: its reduction.
    method: its name, for errors.
  """
  step: Callable[[jax.Array, Any], tuple[jax.Array, Any]]
  shared: SharedMask
  reduction: str
  method: str


def check_weights(weights, t: int, method: str) -> jax.Array:
  """The ``(T,)`` weights a weighting returned, or a ValueError."""
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(
        f"{method}: the weighting returned shape {weights.shape}, expected "
        f"({t},).")
  return weights


def gram_aggregator(init_fn, step, *, shared: SharedMask, reduction: str,
                    method: str) -> optax.GradientTransformationExtraArgs:
  """A transformation running ``step`` on the Gram matrix of the gradients.

  ``step(gram, state) -> (weights, new_state)``; shared leaves get
  ``sum_t w_t g_t``, the others their plain sum (``reduction`` applies to
  both). The :class:`GramStep` is attached to ``update`` (see
  :func:`gram_step_of`).
  """
  check_reduction(reduction)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared, None, method)
    gram = masked_gram(leaves, mask, t)
    weights, new_state = step(gram, state)
    weights = check_weights(weights, t, method)
    out = combine_leaves(leaves, mask, weights, reduction)
    return jax.tree.unflatten(treedef, out), new_state

  update_fn.gram_step = GramStep(step, shared, reduction, method)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gram_step_of(tx) -> GramStep | None:
  """The :class:`GramStep` of a Gram-based transformation, else None."""
  step = getattr(getattr(tx, "update", None), "gram_step", None)
  return step if isinstance(step, GramStep) else None


def gram_transform(weighting: Callable[[jax.Array], jax.Array], *,
                   reduction: str, shared: SharedMask,
                   method: str = "gram_transform"
                   ) -> optax.GradientTransformationExtraArgs:
  """A stateless transformation applying ``weighting`` to the Gram matrix."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def step(gram, state):
    return weighting(gram), state

  return gram_aggregator(init_fn, step, shared=shared, reduction=reduction,
                         method=method)
