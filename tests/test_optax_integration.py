"""The package in optax's own terms (issue 12).

* every transformation is an ``optax.experimental.aggregating.Aggregator``
  and runs inside ``aggregating.process``; ``multi_steps`` exposes the
  ``ready`` flag ``process`` reads;
* every numeric hyperparameter takes a JAX array, also a traced one, so
  ``optax.inject_hyperparams`` wraps every factory (concrete values are still
  validated);
* the Gram-based transformations keep the last step's task weights (and,
  optionally, the Gram matrix) in their state, and ``diagnostics`` reads
  them.

The per-method checks every Spec runs are in tests/contract.py; this file
holds the issue's reproducers and what is specific to one transformation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import pcgrad_optax
from contract import params_like, stacked_grads

GRAM_FACTORIES = {
    "mean": pcgrad_optax.mean,
    "sum": pcgrad_optax.sum,
    "mgda": pcgrad_optax.mgda,
    "cagrad": pcgrad_optax.cagrad,
    "imtl_g": pcgrad_optax.imtl_g,
    "upgrad": pcgrad_optax.upgrad,
    "dualproj": pcgrad_optax.dualproj,
    "aligned_mtl": pcgrad_optax.aligned_mtl,
    "config": pcgrad_optax.config,
    "nash_mtl": pcgrad_optax.nash_mtl,
}

GRAM_WEIGHTINGS = {
    "mean": pcgrad_optax.weighting.mean,
    "sum": pcgrad_optax.weighting.sum,
    "mgda": pcgrad_optax.weighting.mgda,
    "cagrad": pcgrad_optax.weighting.cagrad,
    "imtl_g": pcgrad_optax.weighting.imtl_g,
    "upgrad": pcgrad_optax.weighting.upgrad,
    "dualproj": pcgrad_optax.weighting.dualproj,
    "aligned_mtl": pcgrad_optax.weighting.aligned_mtl,
    "config": pcgrad_optax.weighting.config,
    "nash_mtl": pcgrad_optax.weighting.nash_mtl,
}

MASK = {"trunk": True, "head": False}


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


# --- inject_hyperparams: the reproducers ---------------------------

@pytest.mark.parametrize("factory, kwargs", [
    (pcgrad_optax.cagrad, {"c": 0.4}),
    (pcgrad_optax.upgrad, {"reg_eps": 1e-4}),
    (pcgrad_optax.dualproj, {"reg_eps": 1e-4}),
    (pcgrad_optax.nash_mtl, {"max_norm": 1.0, "ridge": 1e-5}),
    (pcgrad_optax.dwa, {"num_tasks": 3, "temperature": 1.5}),
    (pcgrad_optax.gradvac, {"num_tasks": 3, "beta": 0.3}),
    (pcgrad_optax.graddrop, {"leak": 0.2}),
    (pcgrad_optax.famo, {"num_tasks": 3, "learning_rate": 0.05,
                         "weight_decay": 0.02}),
    (pcgrad_optax.uncertainty, {"num_tasks": 3, "learning_rate": 0.1}),
], ids=lambda x: getattr(x, "__name__", ""))
def test_inject_hyperparams_under_jit(factory, kwargs):
  params = params_like()
  grads = stacked_grads(3)
  extra = {"losses": jnp.array([0.5, 1.0, 2.0])}
  tx = optax.inject_hyperparams(factory)(**kwargs)
  plain = factory(**kwargs)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params, **extra))
  plain_state = plain.init(params)
  for seed in range(2):
    g = stacked_grads(3, seed)
    out, state = step(g, state)
    ref, plain_state = plain.update(g, plain_state, params, **extra)
    _close(out, ref, rtol=1e-4, atol=1e-5)
  del grads


def test_inject_hyperparams_schedule_moves_cagrad():
  # A schedule of c: the update follows c step by step.
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([[1., 0.], [-0.5, 1.]])}
  tx = optax.inject_hyperparams(pcgrad_optax.cagrad)(
      c=optax.linear_schedule(0.0, 0.5, 1))
  state = tx.init(params)
  step = jax.jit(tx.update)
  out0, state = step(grads, state, params)
  out1, state = step(grads, state, params)
  ref0, _ = pcgrad_optax.cagrad(c=0.0).update(grads, optax.EmptyState())
  ref1, _ = pcgrad_optax.cagrad(c=0.5).update(grads, optax.EmptyState())
  _close(out0, ref0)
  _close(out1, ref1)


@pytest.mark.parametrize("factory, name, value, match", [
    (pcgrad_optax.cagrad, "c", -0.1, "CAGrad's c must be a finite number"),
    (pcgrad_optax.upgrad, "reg_eps", -1.0, "reg_eps must be a finite"),
    (pcgrad_optax.dualproj, "reg_eps", np.inf, "reg_eps must be a finite"),
    (pcgrad_optax.nash_mtl, "max_norm", -1.0, "max_norm must be a finite"),
    (pcgrad_optax.nash_mtl, "ridge", np.nan, "ridge must be a finite"),
    (pcgrad_optax.graddrop, "leak", 1.5, "leak"),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_concrete_arrays_still_validated(factory, name, value, match):
  for v in (value, jnp.asarray(value), np.asarray(value)):
    with pytest.raises(ValueError, match=match):
      factory(**{name: v})
  with pytest.raises(ValueError, match=match):
    optax.inject_hyperparams(factory)(**{name: value}).init(params_like())


@pytest.mark.parametrize("factory, kwargs, match", [
    (pcgrad_optax.gradvac, {"num_tasks": 2, "beta": 1.5}, "beta"),
    (pcgrad_optax.dwa, {"num_tasks": 2, "temperature": 0.0}, "temperature"),
    (pcgrad_optax.dwa, {"num_tasks": 2, "period": 0}, "period"),
    (pcgrad_optax.cagrad, {"rescale": 3}, "rescale"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_concrete_arrays_still_validated_stateful(factory, kwargs, match):
  arrays = {k: jnp.asarray(v) for k, v in kwargs.items()}
  with pytest.raises(ValueError, match=match):
    factory(**arrays)


def test_cagrad_rescale_as_array_matches_int():
  grads = {"w": jnp.array([[1., 0.], [-0.5, 1.]])}
  for rescale in (0, 1, 2):
    ref, _ = pcgrad_optax.cagrad(rescale=rescale).update(
        grads, optax.EmptyState())
    out, _ = jax.jit(lambda r: pcgrad_optax.cagrad(rescale=r).update(
        grads, optax.EmptyState()))(jnp.asarray(rescale))
    _close(out, ref)


def test_traced_num_tasks_at_init_names_static_args():
  tx = optax.inject_hyperparams(pcgrad_optax.gradvac)(num_tasks=2)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)({"w": jnp.zeros(2)})
  tx = optax.inject_hyperparams(pcgrad_optax.gradvac,
                                static_args="num_tasks")(num_tasks=2)
  jax.jit(tx.init)({"w": jnp.zeros(2)})


# --- Aggregator and process ------------------------------------------------

def test_multi_steps_is_an_aggregator_with_ready_flag():
  params = params_like()
  post = optax.adam(1e-2)
  every_k = 3
  agg = pcgrad_optax.multi_steps(pcgrad_optax.upgrad(), every_k, num_tasks=3)
  assert isinstance(agg, aggregating.Aggregator)
  tx = aggregating.process(optax.identity(), agg, post)
  state = tx.init(params)
  assert bool(optax.tree.get(state, "ready")) is False
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  micro = [stacked_grads(3, seed) for seed in range(2 * every_k)]
  for i, g in enumerate(micro):
    adam_before = state[2]
    out, state = step(g, state)
    is_real = (i + 1) % every_k == 0
    assert bool(optax.tree.get(state, "ready")) is is_real
    count = int(optax.tree.get(state[2], "count"))
    assert count == (i + 1) // every_k
    if not is_real:   # accumulation step: adam's state did not move at all
      for a, b in zip(jax.tree.leaves(adam_before),
                      jax.tree.leaves(state[2])):
        np.testing.assert_array_equal(a, b)
      for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0)
  # The real steps equal adam on upgrad of the mean of each window.
  ref_state = post.init(params)
  up = pcgrad_optax.upgrad()
  for window in (micro[:every_k], micro[every_k:]):
    mean = jax.tree.map(lambda *x: sum(x) / every_k, *window)
    agg_out, _ = up.update(mean, up.init(params), params)
    ref, ref_state = post.update(agg_out, ref_state, params)
  _close(out, ref, rtol=1e-4, atol=1e-6)


# --- weights and Gram matrix in the state ----------------------------------

@pytest.mark.parametrize("name", sorted(GRAM_FACTORIES))
def test_gram_methods_keep_weights(name):
  params = params_like()
  grads = stacked_grads(3)
  tx = GRAM_FACTORIES[name](num_tasks=3, keep_gram=True, shared=MASK)
  state = tx.init(params)
  assert optax.tree_utils.tree_get(state, "weights").shape == (3,)
  out, state = jax.jit(lambda g, s: tx.update(g, s, params))(grads, state)
  gram = pcgrad_optax.gram_matrix(grads, shared=MASK)
  weights = GRAM_WEIGHTINGS[name](gram)
  _close(optax.tree_utils.tree_get(state, "gram"), gram)
  _close(optax.tree_utils.tree_get(state, "weights"), weights,
         rtol=1e-4, atol=1e-6)
  # The recorded weights give the shared part of the update.
  trunk = pcgrad_optax.weighted_sum(grads["trunk"], state.weights)
  _close(out["trunk"], trunk, rtol=1e-5, atol=1e-6)


def test_without_num_tasks_state_is_empty():
  tx = pcgrad_optax.upgrad()
  assert tx.init(params_like()) == optax.EmptyState()
  assert optax.tree_utils.tree_get(tx.init(params_like()), "weights") is None
  with pytest.raises(ValueError, match="num_tasks"):
    pcgrad_optax.upgrad(keep_gram=True)


def test_weights_num_tasks_mismatch_names_method():
  tx = pcgrad_optax.mgda(num_tasks=2)
  with pytest.raises(ValueError, match="mgda.*num_tasks=2"):
    tx.update(stacked_grads(3), tx.init(params_like()), params_like())


def test_pcgrad_and_gradvac_keep_weights():
  params = params_like()
  grads = stacked_grads(3)
  tx = pcgrad_optax.pcgrad(7, num_tasks=3, keep_gram=True)
  state = tx.init(params)
  out, new = tx.update(grads, state, params)
  gram = pcgrad_optax.gram_matrix(grads)
  key = jax.random.fold_in(state.key, 0)
  _close(new.weights, pcgrad_optax.weighting.pcgrad(gram, key=key),
         rtol=1e-5)
  _close(new.gram, gram)
  _close(out, pcgrad_optax.weighted_sum(grads, new.weights), rtol=1e-5)

  tx = pcgrad_optax.gradvac(3, num_tasks=3, beta=0.5, granularity="module",
                            keep_gram=True)
  state = tx.init(params)
  out, new = tx.update(grads, state, params)
  assert new.weights.shape == (2, 3) and new.gram.shape == (2, 3, 3)
  _close(new.gram[1], pcgrad_optax.gram_matrix({"k": grads["trunk"]}))


@pytest.mark.parametrize("factory", [
    pcgrad_optax.uncertainty, pcgrad_optax.dwa, pcgrad_optax.famo,
    pcgrad_optax.rlw], ids=lambda f: f.__name__)
def test_scalarization_keeps_weights(factory):
  params = params_like()
  grads = stacked_grads(3)
  tx = factory(num_tasks=3)
  state = tx.init(params)
  losses = jnp.array([0.5, 1.0, 2.0])
  for _ in range(3):
    out, state = tx.update(grads, state, params, losses=losses)
  weights = optax.tree_utils.tree_get(state, "weights")
  _close(out, pcgrad_optax.weighted_sum(grads, weights), rtol=1e-5)


def test_diagnostics_read_the_state():
  params = params_like()
  grads = stacked_grads(3)
  tx = optax.chain(pcgrad_optax.mgda(num_tasks=3, keep_gram=True),
                   optax.adam(1e-2))
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  logged = pcgrad_optax.diagnostics.from_state(state)
  gram = pcgrad_optax.gram_matrix(grads)
  _close(logged["weights"], pcgrad_optax.weighting.mgda(gram), rtol=1e-4)
  ref = pcgrad_optax.diagnostics.summary(gram)
  for key, value in ref.items():
    _close(logged[key], value, rtol=1e-5)
  _close(pcgrad_optax.diagnostics.task_weights(state), logged["weights"])
  # Without the Gram matrix: only the weights.
  tx = pcgrad_optax.mgda(num_tasks=3)
  _, state = tx.update(grads, tx.init(params), params)
  assert set(pcgrad_optax.diagnostics.from_state(state)) == {"weights"}
  # Without num_tasks: a clear error.
  with pytest.raises(ValueError, match="num_tasks"):
    pcgrad_optax.diagnostics.task_weights(
        pcgrad_optax.mgda().init(params))


def test_multi_steps_and_track_conflicts_inject_hyperparams():
  params = params_like()
  grads = stacked_grads(3)
  tx = optax.inject_hyperparams(pcgrad_optax.multi_steps)(
      pcgrad_optax.cagrad(c=0.3), every_k=2, num_tasks=3)
  plain = pcgrad_optax.multi_steps(pcgrad_optax.cagrad(c=0.3), 2,
                                   num_tasks=3)
  state, plain_state = tx.init(params), plain.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  for _ in range(2):
    out, state = step(grads, state)
    ref, plain_state = plain.update(grads, plain_state, params)
  _close(out, ref, rtol=1e-4, atol=1e-6)

  tx = optax.inject_hyperparams(pcgrad_optax.recon.track_conflicts)(
      threshold=-0.1)
  state = tx.init(params)
  _, state = jax.jit(lambda g, s: tx.update(g, s, params))(grads, state)
  plain = pcgrad_optax.recon.track_conflicts(-0.1)
  _, ref = plain.update(grads, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(state.inner_state),
                  jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_multi_steps_state_stable_through_cond():
  for dtype in (jnp.bfloat16, jnp.float32):
    params = jax.tree.map(lambda p: p.astype(dtype), params_like())
    tx = pcgrad_optax.multi_steps(
        optax.chain(pcgrad_optax.mgda(num_tasks=3), optax.adam(1e-2)), 2,
        num_tasks=3)
    state = tx.init(params)
    layout = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]

    @jax.jit
    def step(g, s, tx=tx, params=params):
      pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      return jax.lax.cond(pred, lambda: tx.update(g, s, params),
                          lambda: (params, s))

    for seed in range(3):
      out, state = step(stacked_grads(3, seed, dtype), state)
      assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == layout
      assert all(o.dtype == dtype for o in jax.tree.leaves(out))


def test_diagnostics_ignore_params_named_weights():
  # adam's moments are params-shaped: a param named "weights" is a dict key
  # of the state too, which tree_get cannot tell from the record.
  params = {"weights": jnp.zeros(2)}
  grads = {"weights": jnp.array([[1., 0.], [0., 2.]])}
  tx = optax.chain(pcgrad_optax.mgda(num_tasks=2), optax.adam(1e-2))
  _, state = tx.update(grads, tx.init(params), params)
  with pytest.raises(KeyError):
    optax.tree_utils.tree_get(state, "weights")
  _close(pcgrad_optax.diagnostics.task_weights(state),
         jnp.array([0.8, 0.2]), rtol=1e-5)
