"""What the optax transformations of the package share.

PRNG keys in the state (:func:`canonicalize_key`, kept as raw key data by
:func:`key_data` and wrapped again by :func:`state_key`), the factory of
every Gram-based method (:func:`gram_aggregator`, with the :class:`GramStep`
it attaches for :func:`pcgrad_optax.value_and_aggregate`; the stateless
:func:`gram_transform`), the record of the last step's task weights and Gram
matrix in the state (:class:`GramState`, :func:`init_record`,
:func:`check_record`, :func:`record`), the state dtype guard
(:func:`cast_like`) and the docstring parts every factory repeats
(:func:`documented` fills them in, keeping docstrings literal so that their
examples run as doctests).

Every transformation that maps stacked gradients to one params-shaped update
is an :class:`optax.experimental.aggregating.Aggregator` (a
``GradientTransformationExtraArgs``, so ``optax.chain`` takes it as before):
:data:`Aggregator` is that type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from pcgrad_optax._core.aggregate import combine_leaves, resolve
from pcgrad_optax._core.checks import check_num_tasks, init_num_tasks
from pcgrad_optax._core.gram import masked_gram
from pcgrad_optax._core.masks import SharedMask
from pcgrad_optax._core.stacked import (check_reduction,
                                        leaves_accumulation_dtype)

# optax's type for transformations from per-element (here: per-task) updates
# to one update; every transformation of the package returns one.
Aggregator = aggregating.Aggregator


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


def keep_if_finite(gram, new_state, old_state):
  """``new_state``, or all of ``old_state`` if ``gram`` is not finite.

  For the stateful gradient-level methods: a NaN or inf in a shared
  gradient reaches the step's Gram matrix (``gram``, any shape), which is
  cheap to check; such a step then leaves the whole state (counts, keys,
  EMA targets or weights, the records) as it was, so a bad batch never
  enters an average, and a run with it is the run without it. (The
  update itself is still non-finite: skip it with
  :func:`pcgrad_optax.apply_if_finite`.)
  """
  ok = jnp.all(jnp.isfinite(gram))
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, old_state)


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

RECORD_ARGS = """    num_tasks: optional T. Given, the state is a
      :class:`pcgrad_optax.GramState` holding the last step's task weights
      (``weights``) for logging, at no extra pass over the gradients. None
      (default): the state is ``optax.EmptyState`` and nothing is recorded
      (``init`` only sees the params, so the ``(T,)`` shape must be known up
      front).
    keep_gram: also keep the last step's ``(T, T)`` Gram matrix (``gram``);
      needs ``num_tasks``. (With ``optax.inject_hyperparams`` and a jitted
      ``init``, pass ``static_args="num_tasks"``.)
"""

RETURNS = """  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``). ``update(updates, state,
    params=None)`` takes stacked gradients (every leaf of shape
    ``(T,) + param.shape``) and returns params-shaped updates. The state is
    ``optax.EmptyState``, or a :class:`pcgrad_optax.GramState` with
    ``num_tasks``.
"""


EXTRA_BATCHES = """
  Extra batches and ``optax.experimental.aggregating.process``: optax's
  extra arguments pass through wrappers untouched, so in
  ``aggregating.process(pre, tx, post)`` the preprocessor ``pre`` (e.g.
  per-task clipping) transforms ``grads`` only, and ``second_grads`` /
  ``third_grads`` reach this transformation unprocessed. That part of the
  Aggregator contract (the aggregator sees preprocessed per-task updates)
  cannot hold for batches passed as extra arguments: apply the same
  preprocessing to them before the call (see the test of ``process`` in
  ``tests/aggregation/test_stateful_records.py``). Other extra arguments
  are accepted and ignored.
"""
# The loss-level methods without state of their own (COSMOS, PBI, the
# geometric mean): their ``num_tasks`` argument and the first lines of their
# Returns (each continues with its ``update`` signature).
STATELESS_RECORD_ARGS = """
    num_tasks: optional T. Given, the state keeps the last step's ``(T,)``
      weights (``weights``) for logging; None (default): no state.
"""

STATELESS_RETURNS = """
  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` (a
    ``GradientTransformationExtraArgs``) with ``optax.EmptyState``, or with
    ``num_tasks`` a :class:`pcgrad_optax.GramState` holding the last step's
    weights (``gram`` None);
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
                       ("@RECORD_ARGS@", RECORD_ARGS.strip("\n")),
                       ("@EXTRA_BATCHES@", EXTRA_BATCHES.strip("\n")),
                       ("@RETURNS@", RETURNS.strip("\n")),
                       ("@STATELESS_RECORD_ARGS@",
                        STATELESS_RECORD_ARGS.strip("\n")),
                       ("@STATELESS_RETURNS@",
                        STATELESS_RETURNS.strip("\n"))):
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


class GramResult(NamedTuple):
  """What :func:`pcgrad_optax.value_and_aggregate`'s engines compute for a
  :class:`GramProbe`: the first element of the pair ``run`` returns.

  A wrapper that forwards the probe to its inner transformation (such as
  :func:`pcgrad_optax.apply_if_finite`) gets it back and may replace the
  update.

  Attributes:
    out: what the step returns first (the losses, or ``(losses, aux)``).
    update: the flat list of params-shaped update leaves.
    losses: the ``(T,)`` task losses.
  """
  out: Any
  update: list
  losses: jax.Array


def check_weights(weights, t: int, method: str) -> jax.Array:
  """The ``(T,)`` weights a weighting returned, or a ValueError."""
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(
        f"{method}: the weighting returned shape {weights.shape}, expected "
        f"({t},).")
  return weights


class GramProbe:
  """Asks a Gram-based transformation for its :class:`GramStep`.

  ``tx.update(GramProbe(run), state, params)`` on a transformation built by
  :func:`gram_aggregator` returns ``run(gram_step, state)`` (a pair
  ``(result, new_state)``) instead of aggregating: how
  :func:`pcgrad_optax.value_and_aggregate` reaches the method through
  ``optax.inject_hyperparams``, whose inner transformation, built from the
  step's hyperparameters inside ``update``, is the one that answers. Every
  other transformation of the package rejects a probe with
  :class:`pcgrad_optax._core.stacked.NotGramBased` when it checks its
  stacked gradients (the one error that means "not Gram-based"). A pytree
  with no leaves, so a ``jax.tree.map`` over it returns another probe.
  """
  __slots__ = ("run",)
  gram_probe = True   # what the stacked checks recognise

  def __init__(self, run: Callable[[GramStep, Any], tuple[Any, Any]]):
    self.run = run


jax.tree_util.register_pytree_node(
    GramProbe, lambda p: ((), p.run), lambda run, _: GramProbe(run))


def answers_probe(update_fn, hook: GramStep):
  """``update_fn`` answering a :class:`GramProbe` with ``hook``, and carrying
  it (``update.gram_step``, read by :func:`gram_step_of`)."""

  def update(updates, state, params=None, **extra_args):
    if isinstance(updates, GramProbe):
      return updates.run(hook, state)
    return update_fn(updates, state, params, **extra_args)

  update.gram_step = hook
  return update


def gram_aggregator(init_fn, step, *, shared: SharedMask, reduction: str,
                    method: str, expected_tasks: int | None = None
                    ) -> Aggregator:
  """A transformation running ``step`` on the Gram matrix of the gradients.

  ``step(gram, state) -> (weights, new_state)``; shared leaves get
  ``sum_t w_t g_t``, the others their plain sum (``reduction`` applies to
  both). The :class:`GramStep` is attached to ``update`` (see
  :func:`gram_step_of`) and answers a :class:`GramProbe` passed as
  ``updates``. ``expected_tasks``: the T the transformation was built for
  (None: any), checked against the gradients.
  """
  check_reduction(reduction)
  hook = GramStep(step, shared, reduction, method)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef, mask, t = resolve(updates, params, shared,
                                       expected_tasks, method)
    gram = masked_gram(leaves, mask, t)
    weights, new_state = step(gram, state)
    weights = check_weights(weights, t, method)
    out = combine_leaves(leaves, mask, weights, reduction)
    return jax.tree.unflatten(treedef, out), new_state

  return Aggregator(init_fn, answers_probe(update_fn, hook))


def gram_step_of(tx) -> GramStep | None:
  """The :class:`GramStep` of a Gram-based transformation, else None."""
  step = getattr(getattr(tx, "update", None), "gram_step", None)
  return step if isinstance(step, GramStep) else None


class GramState(NamedTuple):
  """State of a stateless Gram-based transformation built with ``num_tasks``.

  Also the state of the stateless loss-level methods
  (:func:`pcgrad_optax.geometric_mean`, :func:`pcgrad_optax.cosmos`,
  :func:`pcgrad_optax.pbi`) built with ``num_tasks`` (``gram`` None).

  ``optax.tree_utils.tree_get(state, "weights")`` finds the weights in a
  chain (or :func:`pcgrad_optax.diagnostics.from_state` reads both).

  Attributes:
    weights: ``(T,)`` task weights applied to the shared leaves at the last
      step (the shared part of the update is ``sum_t weights[t] g_t``, so
      ``reduction="mean"`` is included); zeros before the first update. In
      the params' accumulation dtype (f32, or f64 for f64 params).
    gram: ``(T, T)`` Gram matrix of the shared leaves at the last step
      (zeros before the first update) with ``keep_gram=True``, else None.
  """
  weights: jax.Array
  gram: jax.Array | None = None


def check_record_args(num_tasks, keep_gram: bool, method: str) -> bool:
  """Validates a factory's ``num_tasks``/``keep_gram``; True if it records.

  A traced ``num_tasks`` (``optax.inject_hyperparams`` under ``jit``) still
  records: its value lives in the state's shapes.
  """
  if not isinstance(keep_gram, bool):
    raise ValueError(f"{method}: keep_gram must be a bool, got {keep_gram!r}.")
  if num_tasks is None:
    if keep_gram:
      raise ValueError(
          f"{method}: keep_gram=True needs num_tasks (the state's (T, T) "
          "Gram matrix is allocated at init, which only sees the params).")
    return False
  check_num_tasks(num_tasks)
  return True


def init_record(params, num_tasks, keep_gram: bool, method: str,
                groups: tuple[int, ...] = ()):
  """Zero ``(weights, gram)`` of shapes ``groups + (T,)``, ``groups + (T, T)``.

  In the params' accumulation dtype (what the Gram matrix of params-dtype
  gradients is), so the state's dtypes do not change at the first update.
  """
  t = init_num_tasks(check_num_tasks(num_tasks), method)
  leaves = jax.tree.leaves(params)
  dtype = leaves_accumulation_dtype(leaves) if leaves else jnp.float32
  weights = jnp.zeros(groups + (t,), dtype)
  gram = jnp.zeros(groups + (t, t), dtype) if keep_gram else None
  return weights, gram


def check_record(weights_state: jax.Array, t: int, method: str) -> None:
  """ValueError unless the state was allocated for the gradients' T."""
  if weights_state.shape[-1] != t:
    raise ValueError(
        f"{method} was built with num_tasks={weights_state.shape[-1]} but "
        f"the stacked gradients have T={t} tasks.")


def record(weights, gram, weights_state, gram_state, t: int, reduction: str):
  """The new ``(weights, gram)`` of the state: applied weights, same dtypes.

  ``weights`` are the method's (the "sum" reduction); the record holds the
  weights applied to the shared leaves, so "mean" divides them by T.
  """
  scale = 1.0 / t if reduction == "mean" else 1.0
  new_weights = (weights * scale).astype(weights_state.dtype)
  new_gram = None if gram_state is None else gram.astype(gram_state.dtype)
  return new_weights, new_gram


def gram_transform(weighting: Callable[[jax.Array], jax.Array], *,
                   reduction: str, shared: SharedMask,
                   num_tasks: int | None = None, keep_gram: bool = False,
                   method: str = "gram_transform") -> Aggregator:
  """A transformation applying ``weighting`` to the Gram matrix.

  Stateless (``optax.EmptyState``) unless ``num_tasks`` is given; then its
  state is a :class:`GramState` with the last step's weights (and Gram
  matrix with ``keep_gram``), which the aggregation already computes: no
  extra pass over the gradients.
  """
  check_reduction(reduction)
  records = check_record_args(num_tasks, keep_gram, method)
  expected = check_num_tasks(num_tasks) if records else None

  def init_fn(params):
    if not records:
      return optax.EmptyState()
    return GramState(*init_record(params, num_tasks, keep_gram, method))

  def step(gram, state):
    t = gram.shape[0]
    weights = check_weights(weighting(gram), t, method)
    if not records:
      return weights, state
    check_record(state.weights, t, method)
    return weights, GramState(*record(weights, gram, state.weights,
                                      state.gram, t, reduction))

  return gram_aggregator(init_fn, step, shared=shared, reduction=reduction,
                         method=method, expected_tasks=expected)
