"""Issue 12's API on issue 13's loss-level methods, both paths.

Every loss-level method's transformation is an optax ``Aggregator``; with
``num_tasks`` its state keeps the last step's applied ``(T,)`` weights in
``weights`` (``GramState`` for the stateless ones), the same on the
one-backward-pass path; numeric hyperparameters (step counts, preferences,
``num_tasks``) may be traced (``optax.inject_hyperparams`` under ``jit``),
concrete arrays are validated like numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import pcgrad_optax as po

T = 3
PARAMS = {"trunk": jnp.zeros((2, 3)), "head": jnp.zeros((T, 2))}
LOSSES = jnp.array([0.5, 1.0, 2.0])

# name: (transformation, one-pass factory, kwargs without num_tasks,
# whether num_tasks is required).
METHODS = {
    "rlw": (po.rlw, po.scalarization.rlw_loss, dict(key=1), False),
    "uncertainty": (po.uncertainty, po.scalarization.uncertainty_loss,
                    dict(learning_rate=0.3), True),
    "dwa": (po.dwa, po.scalarization.dwa_loss, dict(temperature=1.5), True),
    "famo": (po.famo, po.scalarization.famo_loss, dict(learning_rate=0.5),
             True),
    "imtl_l": (po.imtl_l, po.scalarization.imtl_l_loss,
               dict(learning_rate=0.3), True),
    "stch": (po.stch, po.scalarization.stch_loss,
             dict(warmup_steps=2, nadir_steps=1, mu=0.5), True),
    "geometric_mean": (po.geometric_mean,
                       po.scalarization.geometric_mean_loss, {}, False),
    "cosmos": (po.cosmos, po.scalarization.cosmos_loss,
               dict(preference=jnp.array([0.2, 0.5, 0.3]), lambda_=2.0),
               False),
    "pbi": (po.pbi, po.scalarization.pbi_loss,
            dict(preference=jnp.array([1.0, 2.0, 1.0]), theta=3.0), False),
}


def grads_like(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((T,) + p.shape), jnp.float32),
      PARAMS)


def losses_at(n):
  return LOSSES * (1.0 + 0.3 * n) ** jnp.array([-1.0, 0.5, 0.0])


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weights_recorded_on_both_paths(name, reduction):
  make_tx, make_loss, kwargs, _ = METHODS[name]
  tx = make_tx(num_tasks=T, reduction=reduction, **kwargs)
  scal = make_loss(num_tasks=T, reduction=reduction, **kwargs)
  assert isinstance(tx, aggregating.Aggregator)
  state, sstate = tx.init(PARAMS), scal.init(PARAMS)
  np.testing.assert_array_equal(state.weights, np.zeros(T))
  update, weights = jax.jit(tx.update), jax.jit(scal.weights)
  for n in range(4):
    grads = grads_like(n)
    out, state = update(grads, state, PARAMS, losses=losses_at(n))
    w, sstate = weights(losses_at(n), sstate)
    recorded = optax.tree_utils.tree_get(state, "weights")
    assert recorded.shape == (T,) and recorded.dtype == jnp.float32
    # The record is what was applied (reduction included), on both paths.
    np.testing.assert_allclose(
        out["trunk"], jnp.einsum("t,t...->...", recorded, grads["trunk"]),
        rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sstate.weights, w, rtol=1e-6)
    # (Two compiled programs: equal up to an ulp or so.)
    np.testing.assert_allclose(sstate.weights, recorded, rtol=1e-6,
                               atol=1e-7)
  np.testing.assert_array_equal(po.diagnostics.task_weights(
      optax.chain(tx, optax.sgd(0.1)).init(PARAMS)), np.zeros(T))


@pytest.mark.parametrize("name", sorted(
    n for n, (_, _, _, required) in METHODS.items() if not required))
def test_no_num_tasks_no_record(name):
  make_tx, make_loss, kwargs, _ = METHODS[name]
  for make in (make_tx, make_loss):
    state = make(**kwargs).init(PARAMS)
    assert optax.tree_utils.tree_get(state, "weights") is None
  if name != "rlw":
    state = make_tx(num_tasks=T, **kwargs).init(PARAMS)
    assert isinstance(state, po.GramState) and state.gram is None
    np.testing.assert_array_equal(state.weights, np.zeros(T))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_num_tasks_mismatch(name):
  make_tx, make_loss, kwargs, _ = METHODS[name]
  tx = make_tx(num_tasks=T, **kwargs)
  injected = optax.inject_hyperparams(make_tx)(num_tasks=T, **kwargs)
  state = injected.init(PARAMS)
  grads = jax.tree.map(lambda g: g[:2], grads_like())
  with pytest.raises(ValueError, match=r"T=2|\(2,\)|2 tasks"):
    tx.update(grads, tx.init(PARAMS), PARAMS, losses=LOSSES[:2])
  with pytest.raises(ValueError, match=r"num_tasks=3.*T=2|\(3,\).*\(2,\)"):
    # num_tasks traced: the state's shape still catches it.
    jax.jit(injected.update)(grads, state, PARAMS, losses=LOSSES[:2])
  scal = make_loss(num_tasks=T, **kwargs)
  with pytest.raises(ValueError, match=r"losses.*\(3,\).*\(2,\)"):
    scal.loss(LOSSES[:2], scal.init())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inject_hyperparams_num_tasks_traced(name):
  # Every numeric hyperparameter (warmup_steps, nadir_steps, preferences,
  # num_tasks) injected: init outside jit, updates under jit.
  make_tx, _, kwargs, _ = METHODS[name]
  plain = make_tx(num_tasks=T, **kwargs)
  injected = optax.inject_hyperparams(make_tx)(num_tasks=T, **kwargs)
  state, ref_state = injected.init(PARAMS), plain.init(PARAMS)
  step = jax.jit(injected.update)
  for n in range(4):
    grads = grads_like(n)
    out, state = step(grads, state, PARAMS, losses=losses_at(n))
    ref, ref_state = plain.update(grads, ref_state, PARAMS,
                                  losses=losses_at(n))
    np.testing.assert_allclose(out["trunk"], ref["trunk"], rtol=1e-5,
                               atol=1e-6)
    # f32 rounding: jitted and eager steps fuse differently (weights up to
    # about 3 here, so atol is a few ulps of the largest).
    np.testing.assert_allclose(state.inner_state.weights, ref_state.weights,
                               rtol=1e-5, atol=1e-6)


def test_stch_warmup_schedule_traced_on_the_one_pass_path():
  # The one-pass factories take traced hyperparameters too: built inside
  # jit from arrays, the same weights and state as from Python numbers.
  kwargs = dict(warmup_steps=2, nadir_steps=1, mu=0.5)

  @jax.jit
  def run(warmup_steps, nadir_steps, mu, state, losses):
    scal = po.scalarization.stch_loss(
        num_tasks=T, warmup_steps=warmup_steps, nadir_steps=nadir_steps,
        mu=mu)
    return scal.weights(losses, state)

  scal = po.scalarization.stch_loss(num_tasks=T, **kwargs)
  state = ref_state = scal.init()
  for n in range(4):
    w, state = run(jnp.asarray(2), jnp.asarray(1), jnp.asarray(0.5), state,
                   losses_at(n))
    ref, ref_state = scal.weights(losses_at(n), ref_state)
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    np.testing.assert_allclose(state.loss_sum, ref_state.loss_sum)


@pytest.mark.parametrize("factory, kwargs, match", [
    (po.stch, dict(num_tasks=2, warmup_steps=0, mu=0.0), "mu"),
    (po.stch, dict(num_tasks=2, warmup_steps=-1), "warmup_steps"),
    (po.stch, dict(num_tasks=2, warmup_steps=2, nadir_steps=3),
     "nadir_steps"),
    (po.stch, dict(num_tasks=2, warmup_steps=2, nadir_steps=0),
     "nadir_steps"),
    (po.cosmos, dict(lambda_=-1.0), "lambda_"),
    (po.pbi, dict(theta=-1.0), "theta"),
    (po.pbi, dict(num_tasks=2, preference=np.array([1.0, -1.0])),
     "preference"),
    (po.dwa, dict(num_tasks=2, temperature=0.0), "temperature"),
    (po.imtl_l, dict(num_tasks=0), "num_tasks"),
    (po.geometric_mean, dict(num_tasks=1.5), "num_tasks"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_concrete_arrays_still_validated(factory, kwargs, match):
  arrays = {k: jnp.asarray(v) for k, v in kwargs.items()}
  for kw in (kwargs, arrays):
    with pytest.raises(ValueError, match=match):
      factory(**kw)
  with pytest.raises(ValueError, match=match):
    optax.inject_hyperparams(factory)(**kwargs).init(PARAMS)
