"""The last step's task weights in the states of issue 13's methods.

ExcessMTL, MoCo, DB-MTL, GradNorm, SDMGrad and MoDo keep, like every state
of the package (issue 12), a ``weights`` field: the ``(T,)`` weights applied
to the shared leaves at the last step, zeros before the first update,
divided by T with ``reduction="mean"``. The shared part of each update is
checked to be ``weights @ source`` with the source each method weights (the
gradients, MoCo's tracked gradients, DB-MTL's buffers, the two batches'
mean). Also: concrete array hyperparameters are validated, traced ones are
not; the two-batch methods inside ``aggregating.process`` with their second
batch preprocessed by the caller.
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
PARAMS = {"a": jnp.zeros(4), "b": jnp.zeros((2, 3))}
LOSSES = jnp.array([0.5, 1.0, 2.0])


def stacked(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(scale * rng.standard_normal((T,) + p.shape),
                            jnp.float32), PARAMS)


def flat(tree, lead=()):
  return np.concatenate([np.asarray(x, np.float64).reshape(lead + (-1,))
                         for x in jax.tree.leaves(tree)], axis=-1)


CASES = {
    "excess_mtl": dict(step_size=0.5),
    "moco": dict(beta_sigma=0.0, gamma_sigma=0.0, rho=0.1),
    "db_mtl": dict(beta=0.5),
    "gradnorm": dict(learning_rate=0.1),
    "sdmgrad": dict(lambda_=0.3, learning_rate=1.0, num_steps=5),
    "modo": dict(step_size=0.1),
}


def extra_args(name, seed):
  if name in ("sdmgrad", "modo"):
    return {"second_grads": stacked(100 + seed)}
  if name in ("db_mtl", "gradnorm"):
    return {"losses": LOSSES * (1.0 + 0.1 * seed)}
  return {}


def source(name, state, grads, extra):
  """The (T, P) per-task vectors the method's weights multiply."""
  if name == "moco":
    return flat(state.tracked, (T,))
  if name == "db_mtl":
    return flat(state.buffers, (T,))
  if name in ("sdmgrad", "modo"):
    return (flat(grads, (T,)) + flat(extra["second_grads"], (T,))) / 2
  return flat(grads, (T,))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(CASES))
def test_weights_are_the_applied_weights(name, reduction):
  tx = getattr(po, name)(num_tasks=T, reduction=reduction, **CASES[name])
  state = tx.init(PARAMS)
  assert state.weights.shape == (T,) and state.weights.dtype == jnp.float32
  np.testing.assert_array_equal(state.weights, np.zeros(T))
  step = jax.jit(tx.update)
  for seed in range(3):
    grads, extra = stacked(seed), extra_args(name, seed)
    before = state
    out, state = step(grads, state, PARAMS, **extra)
    w = np.asarray(state.weights, np.float64)
    np.testing.assert_allclose(flat(out), w @ source(name, state, grads,
                                                     extra),
                               rtol=1e-5, atol=1e-6)
    # The record against the method's own iterate.
    scale = 1.0 / T if reduction == "mean" else 1.0
    if name in ("moco", "modo"):
      expected = state.lambdas
    elif name == "excess_mtl":
      expected = state.alpha
    elif name == "sdmgrad":
      lam = CASES[name]["lambda_"]
      expected = (state.inner_weights + lam / T) / (1 + lam)
    elif name == "db_mtl":   # every buffer scaled to the largest norm
      norms = np.linalg.norm(flat(state.buffers, (T,)), axis=1)
      expected = norms.max() / norms
    else:   # GradNorm applies the weights of before its step.
      expected = before.param
    np.testing.assert_allclose(w, scale * np.asarray(expected), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_diagnostics_find_the_weights_in_a_chain(name):
  tx = optax.chain(getattr(po, name)(num_tasks=T, **CASES[name]),
                   optax.sgd(0.1))
  _, state = tx.update(stacked(0), tx.init(PARAMS), PARAMS,
                       **extra_args(name, 0))
  np.testing.assert_array_equal(po.diagnostics.task_weights(state),
                                state[0].weights)
  assert set(po.diagnostics.from_state(state)) == {"weights"}


@pytest.mark.parametrize("name,bad", [
    ("moco", dict(gamma=jnp.array(-1.0))),
    ("moco", dict(beta=jnp.array([0.5, 0.5]))),
    ("db_mtl", dict(beta=jnp.array(1.0, jnp.bfloat16))),
    ("excess_mtl", dict(warmup_steps=jnp.array(0))),
    ("sdmgrad", dict(num_steps=jnp.array(2.0))),
    ("sdmgrad", dict(momentum=np.float32(1.0))),
    ("modo", dict(rho=jnp.array(np.nan))),
    ("gradnorm", dict(alpha=jnp.array(-0.5))),
    ("gradnorm", dict(num_tasks=jnp.array(0))),
])
def test_concrete_array_hyperparameters_are_validated(name, bad):
  key = next(iter(bad))
  kwargs = dict(num_tasks=T) | bad
  with pytest.raises(ValueError, match=key):
    getattr(po, name)(**kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_traced_hyperparameters_and_num_tasks(name):
  factory = getattr(po, name)
  hyper = {k: jnp.asarray(v) for k, v in CASES[name].items()}
  plain = factory(num_tasks=T, **CASES[name])
  state = plain.init(PARAMS)
  extra = extra_args(name, 0)

  @jax.jit
  def step(num_tasks, hyper, state):
    # num_tasks traced too: the state's shapes carry T.
    return factory(num_tasks=num_tasks, **hyper).update(
        stacked(0), state, PARAMS, **extra)

  out, new = step(jnp.asarray(T), hyper, state)
  ref, ref_state = plain.update(stacked(0), state, PARAMS, **extra)
  np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.weights, ref_state.weights, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="num_tasks is traced"):
    jax.jit(lambda t: factory(num_tasks=t, **CASES[name]).init(PARAMS))(
        jnp.asarray(T))


def clip(tree):
  return jax.vmap(lambda g: optax.projections.projection_l2_ball(g, 1.0))(
      tree)


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_process_with_the_second_batch_preprocessed_by_the_caller(name):
  # aggregating.process preprocesses `grads` only; extra arguments (the
  # second batch) pass through untouched, so the caller clips them too.
  tx = getattr(po, name)(num_tasks=T, **CASES[name])
  pipeline = aggregating.process(
      optax.with_extra_args_support(optax.stateless(lambda g, p: clip(g))),
      tx, optax.sgd(1.0))
  grads, second = stacked(0, 3.0), stacked(1, 3.0)
  out, state = jax.jit(pipeline.update)(
      grads, pipeline.init(PARAMS), PARAMS, second_grads=clip(second),
      unexpected_extra_args_your_optimizer_doesnt_expect=1)
  ref, ref_state = tx.update(clip(grads), tx.init(PARAMS), PARAMS,
                             second_grads=clip(second))
  np.testing.assert_allclose(flat(out), -flat(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state[1].weights, ref_state.weights,
                             rtol=1e-5, atol=1e-6)
  # Every task of the update's sources is clipped: the weighted sum of
  # vectors in the unit ball with simplex weights stays in it.
  assert np.linalg.norm(flat(ref)) <= 1.0 + 1e-5
