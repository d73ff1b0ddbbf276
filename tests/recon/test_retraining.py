"""The retraining phase of pcgrad_optax.recon, and all phases end to end.

task_losses, value_and_grad and with_branches train a branched model: each
task's gradient reaches only its own copy of a branched layer. The end-to-end
tests search (track_conflicts), select and branch layers, then retrain, with
flax linen and with flax nnx. Last, with_branches with nothing branched passes
the parts of the aggregator contract about the wrapper itself.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import contract
import pcgrad_optax
from contract import Spec
from pcgrad_optax import recon


# ----------------------------------------------------------------------------
# Training a branched model.


class TinyLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.LayerNorm(name="b_norm")(nn.Dense(6, name="a_dense")(x)))
    h = nn.relu(nn.Dense(6, name="c_dense")(h))
    return jnp.stack([nn.Dense(1, name="head_0")(h)[:, 0],
                      nn.Dense(1, name="head_1")(h)[:, 0]])


def tiny_linen_init(key, x):
  return TinyLinen().init(key, x)["params"]


def regression_data():
  # NumPy-made: eager jnp ops would each compile on first use
  x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
  y = np.stack([np.sin(2 * x[:, 0]), x[:, 1] * x[:, 2] - x[:, 0]])
  return jnp.asarray(x), jnp.asarray(y)


@functools.lru_cache(maxsize=1)
def linen_problem():
  x, y = regression_data()
  net = TinyLinen()
  params = jax.jit(tiny_linen_init)(jax.random.key(1), x)

  def task_loss(p, t, x, y):
    return jnp.mean((net.apply({"params": p}, x)[t] - y[t]) ** 2)

  return params, task_loss, x, y


HEADS = lambda p: {k: not k.startswith("head") for k in p}


def test_branched_gradients_reach_only_their_own_copy():
  params, task_loss, x, y = linen_problem()
  chosen = ["b_norm", "c_dense"]
  b = recon.branch(params, chosen, 2, key=3,
                   init=lambda k: tiny_linen_init(k, x))
  simple = pcgrad_optax.pcgrad(shared=recon.shared_mask(b, chosen,
                                                        shared=HEADS))
  wrapped = recon.with_branches(pcgrad_optax.pcgrad(shared=HEADS), chosen)
  mean = recon.with_branches(
      pcgrad_optax.pcgrad(shared=HEADS, reduction="mean"), chosen,
      reduction="mean")

  @jax.jit
  def compute(b):
    # simple path: standard stacked layout, (T, T, ...) blocks for copies
    losses_fn = recon.task_losses(task_loss, chosen, 2)
    losses, stacked = pcgrad_optax.task_value_and_grad(losses_fn)(b, x, y)
    # lean path
    lean_losses, lean = recon.value_and_grad(task_loss, chosen, 2)(b, x, y)
    # references: task t's loss and gradient on the ordinary params of its
    # own view, computed without any of the machinery above
    views = [recon.task_params(b, chosen, t) for t in range(2)]
    ref_losses = jnp.stack([task_loss(v, t, x, y)
                            for t, v in enumerate(views)])
    refs = [jax.grad(task_loss)(v, t, x, y) for t, v in enumerate(views)]
    u_simple, _ = simple.update(stacked, simple.init(b), b)
    u_wrapped, _ = wrapped.update(lean, wrapped.init(b), b)
    u_mean, _ = mean.update(lean, mean.init(b), b)
    return dict(losses=losses, stacked=stacked, lean_losses=lean_losses,
                lean=lean, ref_losses=ref_losses, refs=refs,
                u_simple=u_simple, u_wrapped=u_wrapped, u_mean=u_mean)

  r = jax.tree.map(np.asarray, compute(b))
  np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-6)
  np.testing.assert_allclose(r["lean_losses"], r["ref_losses"], rtol=1e-6)
  stacked, lean = r["stacked"], r["lean"]
  for t in range(2):
    ref = r["refs"][t]
    for name in chosen:
      for leaf in ref[name]:
        s = stacked[name][leaf]
        assert s.shape == (2,) + b[name][leaf].shape
        np.testing.assert_allclose(s[t, t], ref[name][leaf], atol=1e-6)
        np.testing.assert_array_equal(s[t, 1 - t], 0.0)   # other copy
        assert lean[name][leaf].shape == b[name][leaf].shape
        np.testing.assert_allclose(lean[name][leaf][t], ref[name][leaf],
                                   atol=1e-6)
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(stacked["a_dense"][leaf][t],
                                 ref["a_dense"][leaf], atol=1e-6)
      np.testing.assert_allclose(lean["a_dense"][leaf][t],
                                 ref["a_dense"][leaf], atol=1e-6)
  # the two paths give the same PCGrad update; copies get their own grads
  for a, c in zip(jax.tree.leaves(r["u_simple"]),
                  jax.tree.leaves(r["u_wrapped"])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  for name in chosen:
    for leaf in b[name]:
      np.testing.assert_allclose(r["u_wrapped"][name][leaf],
                                 lean[name][leaf])
  # mean reduction divides the copies' grads by T, as for the heads
  np.testing.assert_allclose(r["u_mean"]["c_dense"]["kernel"],
                             lean["c_dense"]["kernel"] / 2, rtol=1e-6)
  np.testing.assert_allclose(r["u_mean"]["head_0"]["kernel"],
                             lean["head_0"]["kernel"].mean(0), rtol=1e-6)


def test_branched_training_bad_inputs():
  params, task_loss, x, y = linen_problem()
  b = recon.branch(params, ["c_dense"], 2)
  with pytest.raises(ValueError, match="c_dense/.*num_tasks=3"):
    recon.value_and_grad(task_loss, ["c_dense"], 3)(b, x, y)
  with pytest.raises(ValueError, match="scalar"):
    recon.task_losses(lambda p, t, x, y: x[:, 0], ["c_dense"], 2)(b, x, y)
  with pytest.raises(ValueError, match="Unknown layer name"):
    recon.value_and_grad(task_loss, ["d_dense"], 2)(b, x, y)
  # the errors come from shapes alone: zeros in the lean layout will do
  lean = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      recon.value_and_grad(task_loss, ["c_dense"], 2), b, x, y)[1])
  tx = recon.with_branches(pcgrad_optax.pcgrad(shared=HEADS), ["c_dense"])
  state = tx.init(b)
  stacked_copy = dict(lean, c_dense=jax.tree.map(
      lambda g: jnp.stack([g, g]), lean["c_dense"]))
  with pytest.raises(ValueError, match="c_dense/.*param's shape"):
    tx.update(stacked_copy, state, b)
  with pytest.raises(ValueError, match="a_dense"):
    tx.update(dict(lean, a_dense=jax.tree.map(lambda g: g[:1],
                                              lean["a_dense"])), state, b)
  with pytest.raises(ValueError, match="reduction"):
    recon.with_branches(pcgrad_optax.pcgrad(), ["c_dense"], reduction="max")


# ----------------------------------------------------------------------------
# Search, branch and retrain, end to end.


def _fit(params, grad_fn, tx, args, steps):
  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      losses, grads = grad_fn(params, *args)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), losses.sum()
    (params, state), losses = jax.lax.scan(step, (params, tx.init(params)),
                                           None, length=steps)
    return params, state, losses

  return run(params)


def test_search_branch_retrain_linen():
  params, task_loss, x, y = linen_problem()
  # 1. search with joint-style PCGrad training, scores on shared layers
  tx = optax.chain(recon.track_conflicts(0.0, shared=HEADS),
                   pcgrad_optax.pcgrad(shared=HEADS), optax.adam(1e-2))
  grad_fn = recon.value_and_grad(task_loss, [], 2)
  params, state, _ = _fit(params, grad_fn, tx, (x, y), 40)
  scores = state[0].scores
  assert list(scores) == ["a_dense", "b_norm", "c_dense"]
  assert int(state[0].count) == 40
  # 2. branch the top-2 layers, fresh copies
  chosen = recon.select_layers(scores, 2)
  assert len(chosen) == 2 and set(chosen) <= set(scores)
  b = recon.branch(params, chosen, 2, key=0,
                   init=lambda k: tiny_linen_init(k, x))
  # 3. retrain; the conflict tracker now sees only the remaining layers
  mask = recon.shared_mask(b, chosen, shared=HEADS)
  tx = optax.chain(
      recon.with_branches(optax.chain(
          recon.track_conflicts(shared=mask),
          pcgrad_optax.pcgrad(shared=HEADS)), chosen), optax.adam(1e-2))
  b, state, losses = _fit(b, recon.value_and_grad(task_loss, chosen, 2), tx,
                          (x, y), 60)
  assert list(state[0][0].scores) == [n for n in scores if n not in chosen]
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.7 * losses[:5].mean()


class TinyNNX(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 6, rngs=rngs)
    self.head_0 = nnx.Linear(6, 1, rngs=rngs)
    self.head_1 = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.out(nnx.relu(self.norm(self.dense(x)))))
    return jnp.stack([self.head_0(h)[:, 0], self.head_1(h)[:, 0]])


def test_search_branch_retrain_nnx():
  x, y = regression_data()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TinyNNX(nnx.Rngs(0))))
  state = jax.jit(lambda k: nnx.state(TinyNNX(nnx.Rngs(k)), nnx.Param))(
      jax.random.key(0))

  def task_loss(s, t, x, y):
    return jnp.mean((nnx.merge(graphdef, s)(x)[t] - y[t]) ** 2)

  # an NNX state's mask must be a State (a plain dict is not its prefix)
  heads = lambda s: nnx.State({k: not k.startswith("head") for k in s})
  # simple path for the search: standard stacked gradients
  tx = optax.chain(recon.track_conflicts(shared=heads),
                   pcgrad_optax.pcgrad(shared=heads), optax.adam(1e-2))
  grad_fn = pcgrad_optax.task_value_and_grad(
      recon.task_losses(task_loss, [], 2))
  state, opt_state, _ = _fit(state, grad_fn, tx, (x, y), 30)
  scores = opt_state[0].scores
  assert list(scores) == ["dense", "norm", "out"]
  chosen = recon.select_layers(scores, 1)
  b = recon.branch(state, chosen, 2)
  leaf = jax.tree.leaves(b[chosen[0]])[0]
  assert leaf.shape[0] == 2
  # simple path for retraining too: the shared mask makes copies task-specific
  mask = recon.shared_mask(b, chosen, shared=heads)
  tx = optax.chain(pcgrad_optax.pcgrad(shared=mask), optax.adam(1e-2))
  grad_fn = pcgrad_optax.task_value_and_grad(
      recon.task_losses(task_loss, chosen, 2))
  b2, _, losses = _fit(b, grad_fn, tx, (x, y), 40)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()
  # the copies moved apart (each follows its own task)
  copies = jax.tree.leaves(b2[chosen[0]])[0]
  assert not np.allclose(copies[0], copies[1])
  # a task's view merges back into a working module
  out = nnx.merge(graphdef, recon.task_params(b2, chosen, 1))(x)
  assert out.shape == (2, 32)


# ----------------------------------------------------------------------------
# with_branches with nothing branched is an ordinary aggregator: the parts of
# the checklist about the wrapper itself (the rest is pcgrad's own contract).


def _wrapped_pcgrad(shared=None, reduction="sum"):
  return recon.with_branches(
      pcgrad_optax.pcgrad(shared=shared, reduction=reduction), [],
      reduction=reduction)


@pytest.mark.parametrize("check", [
    contract.check_jit_shapes_and_finite, contract.check_bad_inputs,
    contract.check_chain_and_scan], ids=lambda c: c.__name__)
def test_with_branches_contract(check):
  check(Spec("recon.with_branches", _wrapped_pcgrad))
