"""What the optax transformations of the package share.

PRNG keys in the state (:func:`canonicalize_key`, kept as raw key data by
:func:`key_data` and wrapped again by :func:`state_key`), the stateless
factory of
every Gram-based method (:func:`gram_transform`), the state dtype guard
(:func:`cast_like`) and the docstring parts every factory repeats
(:func:`documented` fills them in, keeping docstrings literal so that their
examples run as doctests).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from pcgrad_optax._core.aggregate import aggregate
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


def key_impl(key_or_seed: jax.Array | int):
  """The PRNG implementation of a typed key; None (jax's default) otherwise.

  A factory records it once, so that :func:`state_key` wraps the raw data
  kept in its state with the implementation the key was made with.
  """
  if isinstance(key_or_seed, (jax.Array, jax.core.Tracer)) and jnp.issubdtype(
      key_or_seed.dtype, jax.dtypes.prng_key):
    return jax.random.key_impl(key_or_seed)
  return None


def key_data(key_or_seed: jax.Array | int) -> jax.Array:
  """The raw uint32 data of :func:`canonicalize_key`'s key, as states keep it.

  States hold the key's data rather than the typed key: every serialiser
  (``flax.serialization``, orbax, pickle, NumPy) handles a uint32 array,
  whereas ``flax.serialization.to_bytes`` rejects typed PRNG keys. The
  transformation wraps it again with :func:`state_key` when it draws, so
  the random numbers are those of the typed key.
  """
  return jax.random.key_data(canonicalize_key(key_or_seed))


def state_key(data: jax.Array, impl=None) -> jax.Array:
  """The typed key whose raw data a state keeps (a typed key passes as is)."""
  if jnp.issubdtype(data.dtype, jax.dtypes.prng_key):
    return data
  return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32), impl=impl)


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
    wrap it; accumulate micro-batches with :func:`pcgrad_optax.multi_steps`
    and skip non-finite steps with :func:`pcgrad_optax.apply_if_finite`.
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


def gram_transform(weighting: Callable[[jax.Array], jax.Array], *,
                   reduction: str, shared: SharedMask
                   ) -> optax.GradientTransformationExtraArgs:
  """A stateless transformation applying ``weighting`` to the Gram matrix."""
  check_reduction(reduction)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    combined, _, _ = aggregate(updates, weighting, params=params,
                                     shared=shared, reduction=reduction)
    return combined, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
