"""Every loss-level method: its one-backward-pass path vs its stacked path.

For each method, ``<method>_loss(...)`` (a ``LossScalarization``) and the
transformation ``<method>(...)`` are built with the same hyperparameters and
stepped side by side on a small two-layer model for several steps (the
parameters moved by the stacked path's update, so both see the same losses):

* the gradient of ``loss(losses, state)`` (one ``jax.value_and_grad``, one
  backward pass) equals the stacked path's update with ``shared=None``
  (T backward passes, ``task_value_and_grad``), to float32 tolerance;
* one VJP of the loss vector with ``weights(losses, state)`` gives the same;
* the state after every step is the transformation's, leaf for leaf;
* the value of ``loss`` is the method's objective (a float64 formula here).

Also: ``reduction="mean"``, the extra arguments (FAMO's
``prev_batch_losses``, COSMOS/PBI's per-step ``preference``), bad loss
shapes raise at trace time, and a non-finite loss leaves the state as it
was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po

T = 3


def task_losses(params, x):
  """(T,) positive losses of a shared trunk and one head row per task."""
  h = jnp.tanh(x @ params["trunk"])                      # (B, 4)
  out = h @ params["head"].T                             # (B, T)
  return jnp.mean((out - jnp.arange(T)) ** 2, axis=0) + 0.1


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"trunk": jnp.asarray(rng.standard_normal((5, 4)) * 0.5,
                               jnp.float32),
          "head": jnp.asarray(rng.standard_normal((T, 4)) * 0.5,
                              jnp.float32)}


BATCHES = [jnp.asarray(np.random.default_rng(10 + n).standard_normal((16, 5)),
                       jnp.float32) for n in range(6)]


def _gls(losses):
  return np.exp(np.mean(np.log(losses)))


# name: (transformation factory, loss factory, kwargs, objective in float64
# from the losses and the state *before* the step, or None to skip it).
METHODS = {
    "rlw": (po.rlw, po.scalarization.rlw_loss, dict(key=3), None),
    "uncertainty": (po.uncertainty, po.scalarization.uncertainty_loss,
                    dict(num_tasks=T, learning_rate=0.3),
                    lambda l, s: np.sum(np.exp(-np.asarray(s.log_vars)) * l
                                        + np.asarray(s.log_vars))),
    "dwa": (po.dwa, po.scalarization.dwa_loss, dict(num_tasks=T), None),
    "famo": (po.famo, po.scalarization.famo_loss,
             dict(num_tasks=T, learning_rate=0.5), None),
    "imtl_l": (po.imtl_l, po.scalarization.imtl_l_loss,
               dict(num_tasks=T, learning_rate=0.3),
               lambda l, s: np.sum(np.exp(np.asarray(s.log_scales)) * l
                                   - np.asarray(s.log_scales))),
    "stch": (po.stch, po.scalarization.stch_loss,
             dict(num_tasks=T, warmup_steps=2, mu=0.5), None),
    "geometric_mean": (po.geometric_mean,
                       po.scalarization.geometric_mean_loss, {},
                       lambda l, s: _gls(l)),
    "cosmos": (po.cosmos, po.scalarization.cosmos_loss,
               dict(preference=jnp.array([0.2, 0.5, 0.3]), lambda_=2.0),
               lambda l, s, r=(0.2, 0.5, 0.3): (np.dot(r, l) - 2.0 * np.dot(
                   r, l) / (np.linalg.norm(r) * np.linalg.norm(l)))),
    "pbi": (po.pbi, po.scalarization.pbi_loss,
            dict(preference=jnp.array([1.0, 2.0, 1.0]), theta=3.0), None),
}


def _run_side_by_side(name, reduction="sum", extra_fn=None, steps=6):
  make_tx, make_loss, kwargs, objective = METHODS[name]
  tx = make_tx(reduction=reduction, **kwargs)
  scal = make_loss(reduction=reduction, **kwargs)
  params = init_params()
  tx_state, loss_state = tx.init(params), scal.init(params)
  stacked = jax.jit(po.task_value_and_grad(task_losses))

  @jax.jit
  def one_pass(params, state, x, extra):
    def objective_fn(p, s):
      return scal.loss(task_losses(p, x), s, **extra)
    return jax.value_and_grad(objective_fn, has_aux=True)(params, state)

  @jax.jit
  def one_vjp(params, state, x, extra):
    losses, vjp_fn = jax.vjp(lambda p: task_losses(p, x), params)
    w, state = scal.weights(losses, state, **extra)
    return vjp_fn(w)[0], state

  tx_update = jax.jit(tx.update)
  for n in range(steps):
    x = BATCHES[n]
    extra = {} if extra_fn is None else extra_fn(n, params)
    losses, grads = stacked(params, x)
    before = loss_state
    update, tx_state = tx_update(grads, tx_state, params, losses=losses,
                                 **extra)
    (value, loss_state), g = one_pass(params, loss_state, x, extra)
    g_vjp, vjp_state = one_vjp(params, before, x, extra)
    scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(update))
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(update),
                       jax.tree.leaves(g_vjp)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale,
                                 err_msg=f"{name} step {n}")
      np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-6 * scale)
    for a, b, c in zip(jax.tree.leaves(loss_state), jax.tree.leaves(tx_state),
                       jax.tree.leaves(vjp_state)):
      if jnp.issubdtype(jnp.asarray(b).dtype, jax.dtypes.prng_key):
        a, b, c = (jax.random.key_data(v) for v in (a, b, c))
      # The losses come from two compiled programs (one forward inside
      # task_value_and_grad, one inside value_and_grad): equal to rounding.
      # With the same losses the states are identical (test below).
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-7)
      np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    if objective is not None and reduction == "sum":
      ref = objective(np.asarray(losses, np.float64), before,
                      *([np.asarray(extra["preference"], np.float64)]
                        if "preference" in extra else []))
      np.testing.assert_allclose(value, ref, rtol=1e-5)
    params = jax.tree.map(lambda p, u: p - 0.05 * u, params, update)
  return tx_state


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_pass_gradient_and_states_equal_stacked_path(name):
  _run_side_by_side(name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_losses_give_identical_states_and_weights(name):
  # Stacked "gradients" I_T: the transformation's update is its weights.
  make_tx, make_loss, kwargs, _ = METHODS[name]
  tx, scal = make_tx(**kwargs), make_loss(**kwargs)
  grads = {"w": jnp.eye(T)}
  params = {"w": jnp.zeros(T)}
  tx_state, state = tx.init(params), scal.init()
  rng = np.random.default_rng(3)
  update = jax.jit(tx.update)
  weights = jax.jit(scal.weights)
  for _ in range(5):
    losses = jnp.asarray(rng.uniform(0.2, 3.0, T), jnp.float32)
    u, tx_state = update(grads, tx_state, params, losses=losses)
    w, state = weights(losses, state)
    np.testing.assert_allclose(w, u["w"], rtol=2e-7, atol=1e-9)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(tx_state)):
      if jnp.issubdtype(jnp.asarray(b).dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["uncertainty", "stch", "cosmos"])
def test_one_pass_mean_reduction(name):
  _run_side_by_side(name, reduction="mean", steps=3)


def test_one_pass_famo_exact_mode_and_per_step_preference():
  # FAMO's exact "after" losses: the previous batch at the current params.
  def famo_extra(n, params):
    if n == 0:
      return {}
    return {"prev_batch_losses": task_losses(params, BATCHES[n - 1])}

  state = _run_side_by_side("famo", extra_fn=famo_extra)
  assert np.abs(np.asarray(state.logits)).max() > 1e-3
  rays = np.random.default_rng(5).dirichlet(np.ones(T), size=6)
  for name in ("cosmos", "pbi"):
    _run_side_by_side(
        name, extra_fn=lambda n, p: {"preference": jnp.asarray(rays[n],
                                                                jnp.float32)})


def test_objective_values_stch_and_pbi():
  # STCH: the log-loss sum during the warm-up, then T mu LSE(log(L/n)/mu)
  # with n the warm-up mean; PBI: d1 + theta d2.
  scal = po.scalarization.stch_loss(num_tasks=T, warmup_steps=2, mu=0.5)
  state = scal.init()
  seq = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 1.0], [1.2, 1.0, 1.5]])
  for n, losses in enumerate(seq):
    value, state = scal.loss(jnp.asarray(losses, jnp.float32), state)
    if n < 2:
      ref = np.sum(np.log(losses))
    else:
      f = np.log(losses / seq[:2].mean(axis=0))
      ref = T * 0.5 * np.log(np.sum(np.exp(f / 0.5)))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
  w = np.array([1.0, 2.0, 1.0])
  scal = po.scalarization.pbi_loss(w, theta=3.0)
  losses = np.array([0.5, 2.0, 1.5])
  value, _ = scal.loss(jnp.asarray(losses, jnp.float32), scal.init())
  u = w / np.linalg.norm(w)
  d1 = losses @ u
  np.testing.assert_allclose(
      value, d1 + 3.0 * np.linalg.norm(losses - d1 * u), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_pass_bad_losses(name):
  make_tx, make_loss, kwargs, _ = METHODS[name]
  scal = make_loss(**kwargs)
  state = scal.init()
  if name in ("rlw", "geometric_mean"):        # any T: a matrix is bad
    bad_shape, match = jnp.ones((2, 2)), r"losses.*\(T,\).*\(2, 2\)"
  elif name in ("cosmos", "pbi"):             # T from the preference
    bad_shape, match = jnp.ones(2), r"preference.*losses.*\(2,\).*\(3,\)"
  else:
    bad_shape, match = jnp.ones(2), r"losses.*\(3,\).*\(2,\)"
  with pytest.raises(ValueError, match=match):
    jax.jit(scal.loss)(bad_shape, state)
  # A non-finite loss: the state is kept (no NaN written into it).
  bad = jnp.array([1.0, jnp.nan, 2.0])
  _, new_state = jax.jit(scal.loss)(bad, state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
      np.testing.assert_array_equal(a, b)
  tx = make_tx(**kwargs)
  params = init_params()
  grads = jax.tree.map(lambda p: jnp.ones((T,) + p.shape), params)
  tx_state = tx.init(params)
  _, new_tx_state = jax.jit(tx.update)(grads, tx_state, params, losses=bad)
  for a, b in zip(jax.tree.leaves(new_tx_state), jax.tree.leaves(tx_state)):
    if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
      np.testing.assert_array_equal(a, b)


def test_one_pass_bf16_losses():
  # bf16 losses: the scalar is float32, the gradient flows back in bf16.
  scal = po.scalarization.geometric_mean_loss()
  losses = jnp.array([1.0, 4.0], jnp.bfloat16)
  g, _ = jax.grad(scal.loss, has_aux=True)(losses, scal.init())
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g, np.float32), [1.0, 0.25],
                             rtol=1e-2)


def test_loss_scalarization_is_chainable_with_optax():
  # The gradient of the scalar is params-shaped: any optax optimiser, and
  # optax wrappers on params-shaped gradients (apply_if_finite, MultiSteps),
  # apply to it directly.
  scal = po.scalarization.famo_loss(num_tasks=T)
  opt = optax.MultiSteps(optax.apply_if_finite(optax.adam(1e-2), 3), 2)
  params = init_params()
  opt_state, state = opt.init(params), scal.init()
  for x in BATCHES[:4]:
    (_, state), g = jax.value_and_grad(
        lambda p, s: scal.loss(task_losses(p, x), s), has_aux=True)(
            params, state)
    u, opt_state = opt.update(g, opt_state, params)
    params = optax.apply_updates(params, u)
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_pass_jits_once_and_scans(name):
  # The state keeps its structure and dtypes: one trace for many steps, and
  # lax.scan over training steps works.
  _, make_loss, kwargs, _ = METHODS[name]
  scal = make_loss(**kwargs)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)
    (_, state), g = jax.value_and_grad(
        lambda p, s: scal.loss(task_losses(p, x), s), has_aux=True)(
            params, state)
    return jax.tree.map(lambda p, u: p - 0.05 * u, params, g), state

  params, state = init_params(), scal.init()
  for x in BATCHES[:3]:
    params, state = step(params, state, x)
  assert len(traces) == 1

  def body(carry, x):
    return step(*carry, x), None

  (params, _), _ = jax.lax.scan(body, (init_params(), scal.init()),
                                jnp.stack(BATCHES[:3]))
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
