"""The checklist every stacked-gradient transformation passes.

Use it from a test module:

    from contract import CONTRACT_CHECKS, Spec
    SPECS = [Spec("pcgrad", lambda **kw: pcgrad_optax.pcgrad(**kw))]

    @pytest.mark.parametrize("check", CONTRACT_CHECKS)
    @pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
    def test_contract(spec, check):
      check(spec)

A transform factory must accept ``shared=`` and ``reduction=`` keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build and call one transformation under test.

  Attributes:
    name: test id.
    make: factory ``(**kwargs) -> GradientTransformation``; must accept
      ``shared`` and ``reduction``.
    extra_args: ``T -> dict`` of extra keyword args for ``update`` (e.g.
      ``losses``).
    identity_at_t1: whether a single task's gradient passes unchanged.
    min_tasks: the fewest tasks the method is defined for (Krum, the
      trimmed mean); the checks skip their parts with fewer.
  """
  name: str
  make: Callable[..., optax.GradientTransformation]
  extra_args: Callable[[int], dict[str, Any]] = lambda t: {}
  identity_at_t1: bool = True
  min_tasks: int = 1


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
  for dtype in (jnp.bfloat16, jnp.float16):
    params = jax.tree.map(lambda p: p.astype(dtype), params_like())
    tx = spec.make()
    grads = stacked_grads(3, dtype=dtype)
    out, _ = jax.jit(lambda g, s: _update(spec, tx, g, s, params))(
        grads, tx.init(params))
    ref, _ = _update(spec, tx, stacked_grads(3), tx.init(params_like()),
                     params_like())
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


CONTRACT_CHECKS = [
    check_jit_shapes_and_finite,
    check_no_retrace,
    check_single_task,
    check_zero_and_opposite,
    check_low_precision,
    check_bad_inputs,
    check_shared_mask_heads,
    check_chain_and_scan,
]
