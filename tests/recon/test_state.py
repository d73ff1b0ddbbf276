"""Model state of branched layers: branch_state, task_state, merge_task_states.

A branched BatchNorm layer gets one set of running statistics per task; the
training step of a network with a branched BatchNorm and a shared one
downstream of it is checked against a NumPy forward pass written here: each
task normalises with its own batch statistics, the branched layer keeps each
task's running statistics, the shared one their mean.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pcgrad_optax import recon

MOMENTUM = 0.9
EPS = 1e-5


def test_branch_state_and_task_view():
  stats = {"bn_0": {"mean": jnp.arange(3.0), "var": jnp.ones(3)},
           "block": {"bn_1": {"mean": jnp.zeros(2, jnp.bfloat16),
                              "var": jnp.ones(2, jnp.bfloat16)}}}
  # conv_0 holds no state: skipped; a single name is one name
  b = recon.branch_state(stats, ["conv_0", "block/bn_1"], 3)
  assert jax.tree.structure(b) == jax.tree.structure(stats)
  assert b["bn_0"]["mean"] is stats["bn_0"]["mean"]
  assert b["block"]["bn_1"]["mean"].shape == (3, 2)
  assert b["block"]["bn_1"]["mean"].dtype == jnp.bfloat16
  assert recon.branch_state(stats, "bn_0", 2)["bn_0"]["var"].shape == (2, 3)
  b = b.copy()
  b["block"] = {"bn_1": {"mean": jnp.asarray([[1, 2], [3, 4], [5, 6]],
                                             jnp.bfloat16),
                         "var": b["block"]["bn_1"]["var"]}}
  view = recon.task_state(b, ["block/bn_1"], 2)
  np.testing.assert_array_equal(view["block"]["bn_1"]["mean"], [5, 6])
  np.testing.assert_array_equal(view["bn_0"]["mean"], [0, 1, 2])
  traced = jax.jit(lambda t: recon.task_state(b, ["block/bn_1"], t))(1)
  np.testing.assert_array_equal(traced["block"]["bn_1"]["mean"], [3, 4])
  with pytest.raises(ValueError, match="out of range"):
    recon.task_state(b, ["block/bn_1"], 3)
  with pytest.raises(ValueError, match="block/bn_1/.*leading task axis"):
    recon.task_state(dict(b, block={"bn_1": {
        "mean": b["block"]["bn_1"]["mean"][:2],
        "var": b["block"]["bn_1"]["var"]}}), ["block/bn_1"], 0)
  with pytest.raises(ValueError, match="num_tasks"):
    recon.branch_state(stats, ["bn_0"], 0)
  with pytest.raises(ValueError, match="Layer names must be str"):
    recon.branch_state(stats, [3], 2)


def test_merge_task_states():
  per_task = {"bn_0": {"mean": jnp.asarray([[1., 2.], [3., 6.]]),
                       "var": jnp.asarray([[1., 1.], [2., 2.]],
                                          jnp.bfloat16)},
              "bn_1": {"mean": jnp.asarray([[1., 2.], [3., 6.]])},
              "count": jnp.asarray([4, 4], jnp.int32)}
  m = recon.merge_task_states(per_task, ["bn_1"])
  np.testing.assert_array_equal(m["bn_0"]["mean"], [2., 4.])
  assert m["bn_0"]["var"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(m["bn_0"]["var"], [1.5, 1.5])
  np.testing.assert_array_equal(m["bn_1"]["mean"], per_task["bn_1"]["mean"])
  assert m["count"].shape == () and int(m["count"]) == 4
  with pytest.raises(ValueError, match="bn_1/mean.*T=2"):
    recon.merge_task_states(dict(per_task, bn_1={"mean": jnp.zeros((3, 2))}),
                            ["bn_1"])
  with pytest.raises(ValueError, match="count.*shape \\(\\)"):
    recon.merge_task_states(dict(per_task, count=jnp.asarray(4)), ["bn_1"])


class BNNet(nn.Module):
  """Dense -> BN (branched) -> ReLU -> Dense -> BN (shared) -> ReLU -> heads."""

  @nn.compact
  def __call__(self, x, train=True):
    bn = lambda name: nn.BatchNorm(use_running_average=not train,
                                   momentum=MOMENTUM, epsilon=EPS, name=name)
    h = nn.relu(bn("b_bn")(nn.Dense(5, name="a_dense")(x)))
    h = nn.relu(bn("d_bn")(nn.Dense(4, name="c_dense")(h)))
    return jnp.stack([nn.Dense(1, name=f"head_{t}")(h)[:, 0]
                      for t in range(2)])


def _numpy_forward(p, s, x, t, train):
  """Task t's predictions and new batch statistics, in float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), s)
  x = np.asarray(x, np.float64)
  new = {}

  def bn(name, h, branched):
    scale, bias = p[name]["scale"], p[name]["bias"]
    mean, var = s[name]["mean"], s[name]["var"]
    if branched:
      scale, bias, mean, var = scale[t], bias[t], mean[t], var[t]
    if train:
      mean_b, var_b = h.mean(0), h.var(0)
      new[name] = (MOMENTUM * mean + (1 - MOMENTUM) * mean_b,
                   MOMENTUM * var + (1 - MOMENTUM) * var_b)
      mean, var = mean_b, var_b
    return (h - mean) / np.sqrt(var + EPS) * scale + bias

  h = x @ p["a_dense"]["kernel"] + p["a_dense"]["bias"]
  h = np.maximum(bn("b_bn", h, True), 0)
  h = h @ p["c_dense"]["kernel"] + p["c_dense"]["bias"]
  h = np.maximum(bn("d_bn", h, False), 0)
  out = h @ p[f"head_{t}"]["kernel"][:, 0] + p[f"head_{t}"]["bias"][0]
  return out, new


@pytest.mark.parametrize("batched", [True, False])
def test_branched_batchnorm_step_matches_numpy(batched):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 3)).astype(np.float32)
  y = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
  net = BNNet()
  v = jax.jit(net.init)(jax.random.key(0), x)
  chosen = ["b_bn"]
  params = recon.branch(v["params"], chosen, 2)
  stats = recon.branch_state(v["batch_stats"], chosen, 2)
  # distinct copies, and non-trivial running statistics
  params["b_bn"] = jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
      params["b_bn"])
  stats = jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), stats)

  def task_loss(p, t, s, x, y):
    out, new = net.apply(
        {"params": p, "batch_stats": recon.task_state(s, chosen, t)}, x,
        mutable=["batch_stats"])
    return jnp.mean((out[t] - y[t]) ** 2), new["batch_stats"]

  def task_eval(p, t, s, x, y):
    out = net.apply(
        {"params": p, "batch_stats": recon.task_state(s, chosen, t)}, x,
        train=False)
    return jnp.mean((out[t] - y[t]) ** 2)

  grad_fn = recon.value_and_grad(task_loss, chosen, 2, has_aux=True,
                                 batched=batched)
  eval_fn = recon.task_losses(task_eval, chosen, 2, batched=batched)

  @jax.jit
  def step(params, stats):
    (losses, new), grads = grad_fn(params, stats, x, y)
    return losses, recon.merge_task_states(new, chosen), grads

  losses, merged, grads = step(params, stats)
  evals = jax.jit(eval_fn)(params, merged, x, y)
  fwd = [_numpy_forward(params, stats, x, t, True) for t in range(2)]
  for t in range(2):
    np.testing.assert_allclose(losses[t], np.mean((fwd[t][0] - y[t]) ** 2),
                               rtol=1e-5)
  for k, key in enumerate(("mean", "var")):
    for t in range(2):   # the branched BN keeps each task's statistics
      np.testing.assert_allclose(merged["b_bn"][key][t],
                                 fwd[t][1]["b_bn"][k], rtol=1e-5, atol=1e-6)
    # the shared BN downstream: the mean of the tasks' updates
    np.testing.assert_allclose(
        merged["d_bn"][key],
        (fwd[0][1]["d_bn"][k] + fwd[1][1]["d_bn"][k]) / 2, rtol=1e-5,
        atol=1e-6)
  # the two tasks' statistics do differ downstream of the branched layer
  assert not np.allclose(fwd[0][1]["d_bn"][0], fwd[1][1]["d_bn"][0])
  # evaluation reads each task's own running statistics
  for t in range(2):
    out, _ = _numpy_forward(params, jax.tree.map(np.asarray, merged), x, t,
                            False)
    np.testing.assert_allclose(evals[t], np.mean((out - y[t]) ** 2),
                               rtol=1e-5)
  # gradients of branched leaves: the diagonal layout, row t = task t
  assert grads["b_bn"]["scale"].shape == params["b_bn"]["scale"].shape
  assert grads["a_dense"]["kernel"].shape == (2, 3, 5)


def test_value_and_grad_batched_false_matches_vmap():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((8, 3)).astype(np.float32)
  y = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
  net = BNNet()
  v = jax.jit(net.init)(jax.random.key(1), x)
  for chosen in (["a_dense", "d_bn"], ["b_bn", "c_dense", "head_1"]):
    params = recon.branch(v["params"], chosen, 2, key=0,
                          init=lambda k: net.init(k, x)["params"])
    stats = recon.branch_state(v["batch_stats"], chosen, 2)

    def task_loss(p, t, s, x, y, chosen=chosen):
      out, new = net.apply(
          {"params": p, "batch_stats": recon.task_state(s, chosen, t)}, x,
          mutable=["batch_stats"])
      return jnp.mean((out[t] - y[t]) ** 2), new["batch_stats"]

    a = jax.jit(recon.value_and_grad(task_loss, chosen, 2, has_aux=True))(
        params, stats, x, y)
    b = jax.jit(recon.value_and_grad(task_loss, chosen, 2, has_aux=True,
                                     batched=False))(params, stats, x, y)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert u.shape == w.shape and u.dtype == w.dtype
      np.testing.assert_allclose(u, w, rtol=2e-5, atol=1e-6)


def test_nnx_batch_stats_share_the_params_layer_names():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, momentum=MOMENTUM, rngs=rngs)
      self.head_0 = nnx.Linear(4, 1, rngs=rngs)
      self.head_1 = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.norm(self.dense(x)))
      return jnp.stack([self.head_0(h)[:, 0], self.head_1(h)[:, 0]])

  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param,
                                      nnx.BatchStat)
  assert recon.layer_names(stats) == ["norm"]
  assert "norm" in recon.layer_names(params)
  chosen = ["dense", "norm"]
  params = recon.branch(params, chosen, 2)
  stats = recon.branch_state(stats, chosen, 2)
  assert stats["norm"]["mean"].shape == (2, 4)
  x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)

  def task_loss(p, t, s, x):
    model = nnx.merge(graphdef, p, recon.task_state(s, chosen, t))
    out = model(x)
    return jnp.mean(out[t] ** 2), nnx.state(model, nnx.BatchStat)

  (losses, new), _ = jax.jit(recon.value_and_grad(
      task_loss, chosen, 2, has_aux=True))(params, stats, x)
  merged = recon.merge_task_states(new, chosen)
  assert merged["norm"]["mean"].shape == (2, 4)
  assert losses.shape == (2,)
  # task 0's running mean moved towards task 0's batch mean only
  h = np.asarray(x @ params["dense"]["kernel"][0] + params["dense"]["bias"][0])
  np.testing.assert_allclose(merged["norm"]["mean"][0],
                             (1 - MOMENTUM) * h.mean(0), rtol=1e-5,
                             atol=1e-6)
