"""The checklist every stacked-gradient transformation passes.

Use it from a test module:

    from contract import CONTRACT_CHECKS, Spec
    SPECS = [Spec("pcgrad", lambda **kw: pcgrad_optax.pcgrad(**kw))]

    @pytest.mark.parametrize("check", CONTRACT_CHECKS)
    @pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
    def test_contract(spec, check):
      check(spec)

A transform factory must accept ``shared=`` and ``reduction=`` keywords.

The last checks are optax's own (``optax/_src/alias_test.py``), run on the
package's factory itself (``Spec.factory``, with ``num_tasks`` and
``keep_gram=True`` where it takes them): it is an
``optax.experimental.aggregating.Aggregator`` and works inside
``aggregating.process``; it can be wrapped in ``optax.inject_hyperparams``;
updates keep the gradients' dtype (bf16, f16, f32, and f64 under x64); the
state's shapes, dtypes and shardings are unchanged by an update, also through
``lax.cond``; nothing compiles on the second ``update`` call; unexpected
extra arguments are accepted and ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build and call one transformation under test.

  Attributes:
    name: test id.
    make: factory ``(**kwargs) -> GradientTransformation``; must accept
      ``shared`` and ``reduction``. Either the package's factory itself, or a
      wrapper with attributes ``factory`` (the package's factory) and
      ``kwargs`` (the fixed arguments it adds), which the optax checks use.
    extra_args: ``T -> dict`` of extra keyword args for ``update`` (e.g.
      ``losses``).
    identity_at_t1: whether a single task's gradient passes unchanged.
    min_tasks: the fewest tasks the method is defined for (Krum, the
      trimmed mean); the checks skip their parts with fewer (the optax
      checks use ``OPTAX_T = 3`` tasks, so it must be <= 3).
    static_args: arguments ``optax.inject_hyperparams`` must not inject
      besides ``num_tasks`` (a callable one, e.g. CR-MOGM's ``weighting``,
      would be taken for a schedule).
  """
  name: str
  make: Callable[..., optax.GradientTransformation]
  extra_args: Callable[[int], dict[str, Any]] = lambda t: {}
  identity_at_t1: bool = True
  min_tasks: int = 1
  static_args: tuple[str, ...] = ()

  @property
  def factory(self) -> Callable[..., optax.GradientTransformation]:
    """The package's own factory (what ``inject_hyperparams`` wraps)."""
    factory = getattr(self.make, "factory", self.make)
    params = inspect.signature(factory).parameters.values()
    if all(p.kind == p.VAR_KEYWORD for p in params):
      raise AssertionError(
          f"Spec {self.name!r}: make must be the package's factory (or carry "
          "`factory`/`kwargs` attributes) so that the optax checks can wrap "
          "it in optax.inject_hyperparams.")
    return factory

  @property
  def kwargs(self) -> dict[str, Any]:
    """The fixed keyword arguments the Spec gives its factory."""
    return dict(getattr(self.make, "kwargs", {}))


def params_like():
  return {"trunk": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
          "head": jnp.zeros((4, 2))}


def stacked_grads(t: int, seed: int = 0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((t,) + p.shape), dtype),
      params_like())


def _update(spec: Spec, tx, grads, state, params):
  t = jax.tree.leaves(grads)[0].shape[0]
  return tx.update(grads, state, params, **spec.extra_args(t))


def check_jit_shapes_and_finite(spec: Spec):
  params = params_like()
  tx = spec.make()
  state = tx.init(params)
  grads = stacked_grads(4)
  out, state = jax.jit(lambda g, s: _update(spec, tx, g, s, params))(
      grads, state)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    assert o.shape == p.shape and o.dtype == p.dtype
    assert np.all(np.isfinite(o))


def check_no_retrace(spec: Spec):
  params = params_like()
  tx = spec.make()
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return _update(spec, tx, g, s, params)

  state = tx.init(params)
  for seed in range(3):
    _, state = step(stacked_grads(3, seed), state)
  assert len(traces) == 1


def check_single_task(spec: Spec):
  if spec.min_tasks > 1:
    return
  params = params_like()
  tx = spec.make()
  grads = stacked_grads(1)
  out, _ = _update(spec, tx, grads, tx.init(params), params)
  for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert np.all(np.isfinite(o))
    if spec.identity_at_t1:
      np.testing.assert_allclose(o, g[0], rtol=1e-5, atol=1e-6)


def check_zero_and_opposite(spec: Spec):
  params = params_like()
  tx = spec.make()
  zeros = jax.tree.map(jnp.zeros_like, stacked_grads(3))
  out, _ = _update(spec, tx, zeros, tx.init(params), params)
  for o in jax.tree.leaves(out):
    assert np.all(np.isfinite(o))
  g = stacked_grads(1)
  opposite = jax.tree.map(lambda x: jnp.concatenate([x, -x]), g)
  if spec.min_tasks > 2:   # the opposite pair and a zero gradient
    opposite = jax.tree.map(lambda x: jnp.concatenate([x, -x, 0 * x]), g)
  out, _ = _update(spec, tx, opposite, tx.init(params), params)
  for o in jax.tree.leaves(out):
    assert np.all(np.isfinite(o))
  # one task with a zero gradient, others not
  mixed = jax.tree.map(lambda x: x.at[1].set(0.0), stacked_grads(3))
  out, _ = _update(spec, tx, mixed, tx.init(params), params)
  for o in jax.tree.leaves(out):
    assert np.all(np.isfinite(o))


def check_low_precision(spec: Spec):
  """bf16 and f16 updates (one jitted program) are close to the f32 one."""
  tx = spec.make()
  ref, _ = _update(spec, tx, stacked_grads(3), tx.init(params_like()),
                   params_like())
  dtypes = (jnp.bfloat16, jnp.float16)
  cases = []   # (tx, params, grads), one transformation per dtype
  for dtype in dtypes:
    params = jax.tree.map(lambda p, d=dtype: p.astype(d), params_like())
    cases.append((spec.make(), params, stacked_grads(3, dtype=dtype)))
  outs = jax.jit(lambda grads, states: [
      _update(spec, tx, g, s, params)[0]
      for (tx, params, _), g, s in zip(cases, grads, states)])(
          [g for *_, g in cases], [tx.init(p) for tx, p, _ in cases])
  for dtype, out in zip(dtypes, outs):
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      assert o.dtype == dtype
      assert np.all(np.isfinite(np.asarray(o, np.float32)))
      scale = np.max(np.abs(r)) + 1e-3
      np.testing.assert_allclose(np.asarray(o, np.float32), r,
                                 atol=0.05 * scale, rtol=0.05)


def check_bad_inputs(spec: Spec):
  params = params_like()
  tx = spec.make()
  state = tx.init(params)
  grads = stacked_grads(3)
  bad_t = dict(grads, head=grads["head"][:2])
  with pytest.raises(ValueError, match="head"):
    _update(spec, tx, bad_t, state, params)
  no_axis = dict(grads, head=jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="head"):
    _update(spec, tx, no_axis, state, params)
  with pytest.raises(ValueError, match="head"):
    _update(spec, tx, no_axis, state, None)
  bad_mask = spec.make(shared={"trunk": True})
  with pytest.raises(ValueError, match="mask"):
    _update(spec, bad_mask, grads, bad_mask.init(params), params)
  with pytest.raises(ValueError, match="reduction"):
    spec.make(reduction="median")
  # errors are raised while tracing
  with pytest.raises(ValueError, match="head"):
    jax.jit(lambda g, s: _update(spec, tx, g, s, params))(bad_t, state)


def check_shared_mask_heads(spec: Spec):
  params = params_like()
  grads = stacked_grads(3)
  for reduction, combine in (("sum", np.sum), ("mean", np.mean)):
    mask = {"trunk": True, "head": False}
    tx = spec.make(shared=mask, reduction=reduction)
    out, _ = _update(spec, tx, grads, tx.init(params), params)
    np.testing.assert_allclose(out["head"], combine(grads["head"], axis=0),
                               rtol=1e-5, atol=1e-6)
    # callable mask with the same meaning, and the heads don't change the
    # shared part
    tx2 = spec.make(shared=lambda p: {"trunk": True, "head": False},
                    reduction=reduction)
    out2, _ = _update(spec, tx2, grads, tx2.init(params), params)
    moved_head = dict(grads, head=grads["head"] * 100.0)
    out3, _ = _update(spec, tx2, moved_head, tx2.init(params), params)
    for a, b, c in zip(jax.tree.leaves(out["trunk"]),
                       jax.tree.leaves(out2["trunk"]),
                       jax.tree.leaves(out3["trunk"])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def check_chain_and_scan(spec: Spec):
  params = params_like()
  tx = optax.chain(spec.make(), optax.adam(1e-2))
  grads = stacked_grads(3)

  def body(carry, _):
    p, s = carry
    u, s = _update(spec, tx, grads, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=3)
  for leaf in jax.tree.leaves(p):
    assert np.all(np.isfinite(leaf))


# --- optax's own checks (optax/_src/alias_test.py) -------------------------

OPTAX_T = 3
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def optax_kwargs(spec: Spec, t: int = OPTAX_T, **overrides) -> dict:
  """The Spec's factory arguments, with num_tasks=T and keep_gram=True."""
  names = inspect.signature(spec.factory).parameters
  kwargs = spec.kwargs
  if "num_tasks" in names:
    kwargs["num_tasks"] = t
  if "keep_gram" in names:
    kwargs["keep_gram"] = True
  return kwargs | overrides


def _x64(dtype):
  # float64 needs x64, switched on for this block only (never leaks).
  if dtype == jnp.float64:
    return jax.enable_x64(True)
  return contextlib.nullcontext()


def _layout(tree):
  return [(jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", False),
           getattr(x, "sharding", None)) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  a = optax.tree_utils.tree_unwrap_random_key_data(a)
  b = optax.tree_utils.tree_unwrap_random_key_data(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


@contextlib.contextmanager
def count_compilations():
  """A list that grows by one per XLA compilation inside the block."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _inject(spec: Spec, static=()):
  """``optax.inject_hyperparams`` of the Spec's factory."""
  return optax.inject_hyperparams(
      spec.factory, static_args=tuple(static) + tuple(spec.static_args))


def check_is_aggregator_in_process(spec: Spec):
  """An ``Aggregator``; in ``process`` it equals the manual pipeline."""
  tx = spec.factory(**optax_kwargs(spec))
  assert isinstance(tx, aggregating.Aggregator), type(tx)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  radius = 1.5

  def clip(stacked):   # per task: each task's gradient into an l2 ball
    return jax.vmap(
        lambda g: optax.projections.projection_l2_ball(g, radius))(stacked)

  pre = optax.with_extra_args_support(
      optax.stateless(lambda g, params: clip(g)))
  post = optax.adam(1e-2)
  pipeline = aggregating.process(pre, tx, post)
  params = params_like()
  state = pipeline.init(params)
  agg_state, post_state = tx.init(params), post.init(params)
  step = jax.jit(lambda g, s: _update(spec, pipeline, g, s, params))
  for seed in range(2):
    grads = jax.tree.map(lambda x: 3.0 * x, stacked_grads(OPTAX_T, seed))
    out, state = step(grads, state)
    agg, agg_state = _update(spec, tx, clip(grads), agg_state, params)
    ref, post_state = post.update(agg, post_state, params)
    _assert_trees_equal(out, ref, rtol=1e-4, atol=1e-6)
    _assert_trees_equal(state[1], agg_state, rtol=1e-4, atol=1e-6)


def check_inject_hyperparams(spec: Spec):
  """Wrapped in ``inject_hyperparams``: the same updates and inner states."""
  kwargs = optax_kwargs(spec)
  plain = spec.factory(**kwargs)
  static = [n for n in ("num_tasks",) if n in kwargs]
  injected = _inject(spec, static)(
      **kwargs)
  params = params_like()
  for variant in (lambda f: f, jax.jit):
    state, state_inject = (variant(plain.init)(params),
                           variant(injected.init)(params))
    # Built once: every seed reuses the same (jitted) functions.
    update = variant(lambda g, s: _update(spec, plain, g, s, params))
    update_inject = variant(
        lambda g, s: _update(spec, injected, g, s, params))
    for seed in range(2):
      grads = stacked_grads(OPTAX_T, seed)
      out, state = update(grads, state)
      out_inject, state_inject = update_inject(grads, state_inject)
      _assert_trees_equal(out_inject, out, rtol=1e-4, atol=1e-6)
      _assert_trees_equal(state_inject.inner_state, state, rtol=1e-4,
                          atol=1e-6)
  # num_tasks injected as a hyperparameter too (not static): init outside
  # jit, update under jit.
  injected = _inject(spec)(**kwargs)
  state = injected.init(params)
  out, _ = jax.jit(lambda g, s: _update(spec, injected, g, s, params))(
      stacked_grads(OPTAX_T), state)
  ref, _ = _update(spec, plain, stacked_grads(OPTAX_T), plain.init(params),
                   params)
  _assert_trees_equal(out, ref, rtol=1e-4, atol=1e-6)


def check_dtype_and_state_stability(spec: Spec):
  """Updates keep the gradients' dtype; the state keeps its layout.

  For bf16, f16, f32 and f64 (x64) params and gradients, with and without
  ``inject_hyperparams``: two jitted steps through ``lax.cond`` (as optax's
  ``test_state_shape_dtype_shard_stability``), every update leaf in its
  gradient's dtype and finite, the state's shapes, dtypes, weak types and
  shardings those of ``init``. Every case without x64 is one program, and
  the f64 cases another (each update keeps its own ``lax.cond``).
  """
  for dtypes in (DTYPES[:-1], DTYPES[-1:]):
    with _x64(dtypes[0]):
      cases = []   # (label, tx, params, dtype)
      for dtype in dtypes:
        params = jax.tree.map(lambda p, d=dtype: p.astype(d), params_like())
        cases += [(f"{jnp.dtype(dtype).name}/{kind}", tx, params, dtype)
                  for kind, tx in (
                      ("plain", spec.factory(**optax_kwargs(spec))),
                      ("inject_hyperparams",
                       _inject(spec)(**optax_kwargs(spec))))]

      @jax.jit
      def step(grads, states, cases=cases):
        pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0

        def one(tx, params, g, s):
          return jax.lax.cond(pred, lambda: _update(spec, tx, g, s, params),
                              lambda: (params, s))

        return [one(tx, params, g, s)
                for (_, tx, params, _), g, s in zip(cases, grads, states)]

      # lax.cond itself fails unless the update's dtypes are the
      # gradients' (the other branch returns params-dtype arrays) and the
      # new state has the old one's types.
      states = [tx.init(params) for _, tx, params, _ in cases]
      layouts = [_layout(state) for state in states]
      for seed in range(2):
        grads = [stacked_grads(OPTAX_T, seed, dtype=dtype)
                 for *_, dtype in cases]
        results = step(grads, states)
        states = [state for _, state in results]
        for (label, *_), (out, state), g_tree, layout in zip(
            cases, results, grads, layouts):
          for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(g_tree)):
            assert o.dtype == g.dtype, (label, o.dtype)
            assert np.all(np.isfinite(np.asarray(o, np.float64))), label
          assert _layout(state) == layout, label


def check_no_compile_on_second_update(spec: Spec):
  """The second ``update`` call compiles nothing (eagerly and jitted)."""
  params = params_like()
  for tx in (spec.factory(**optax_kwargs(spec)),
             _inject(spec)(**optax_kwargs(spec))):
    jitted = jax.jit(lambda g, s, tx=tx: _update(spec, tx, g, s, params))
    eager = lambda g, s, tx=tx: _update(spec, tx, g, s, params)  # noqa: E731
    for update in (eager, jitted):
      state = tx.init(params)
      _, state = update(stacked_grads(OPTAX_T, 0), state)
      with count_compilations() as compiles:
        out, state = update(stacked_grads(OPTAX_T, 1), state)
        jax.block_until_ready((out, state))
      assert not compiles, (
          f"{len(compiles)} compilation(s) on the second "
          f"{'jitted' if update is jitted else 'eager'} update")


def check_extra_args_ignored(spec: Spec):
  """Unexpected extra keyword arguments are accepted and ignored."""
  params = params_like()
  tx = spec.factory(**optax_kwargs(spec))
  grads = stacked_grads(OPTAX_T)
  extra = spec.extra_args(OPTAX_T)

  @jax.jit
  def step(g, s):
    return tx.update(g, s, params, **extra,
                     unexpected_extra_args_your_optimizer_doesnt_expect=1)

  out, state = step(grads, tx.init(params))
  ref, ref_state = tx.update(grads, tx.init(params), params, **extra)
  _assert_trees_equal(out, ref, rtol=1e-4, atol=1e-6)
  _assert_trees_equal(state, ref_state, rtol=1e-4, atol=1e-6)
  chained = optax.chain(tx, optax.sgd(0.1))
  chained.update(grads, chained.init(params), params, **extra,
                 unexpected_extra_args_your_optimizer_doesnt_expect=1)


CONTRACT_CHECKS = [
    check_jit_shapes_and_finite,
    check_no_retrace,
    check_single_task,
    check_zero_and_opposite,
    check_low_precision,
    check_bad_inputs,
    check_shared_mask_heads,
    check_chain_and_scan,
    # optax's own checks.
    check_is_aggregator_in_process,
    check_inject_hyperparams,
    check_dtype_and_state_stability,
    check_no_compile_on_second_update,
    check_extra_args_ignored,
]
