"""The branching phase of pcgrad_optax.recon: branch, task_params, shared_mask.

Branched layers get a leading task axis of copies (the shared weights, or
fresh ones from ``init``); a task's view and the shared mask follow from it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pcgrad_optax import recon
from recon_trees import params_like


def test_branch_shapes_and_values():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)),
                        params_like())
  params["LayerNorm_0"]["scale"] = params["LayerNorm_0"]["scale"].astype(
      jnp.bfloat16)
  b = recon.branch(params, ["LayerNorm_0", "encoder/Conv_1"], 3)
  assert jax.tree.structure(b) == jax.tree.structure(params)
  for name in ("scale", "bias"):
    leaf = b["LayerNorm_0"][name]
    assert leaf.shape == (3, 4)
    assert leaf.dtype == params["LayerNorm_0"][name].dtype
    for t in range(3):
      np.testing.assert_array_equal(leaf[t], params["LayerNorm_0"][name])
  assert b["encoder"]["Conv_1"]["kernel"].shape == (3, 2, 2, 1, 3)
  assert b["Dense_0"]["kernel"] is params["Dense_0"]["kernel"]
  assert b["head"] is params["head"]
  # per-leaf grouping branches one leaf only; a single name is accepted
  c = recon.branch(params, "Dense_0/bias", 2, grouping="leaf")
  assert c["Dense_0"]["bias"].shape == (2, 4)
  assert c["Dense_0"]["kernel"].shape == (3, 4)
  # task views give back the shared weights, shared mask marks copies
  view = recon.task_params(b, ["LayerNorm_0", "encoder/Conv_1"], 2)
  for x, y in zip(jax.tree.leaves(view), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  mask = recon.shared_mask(b, ["LayerNorm_0", "encoder/Conv_1"],
                           shared=lambda p: {k: k != "head" for k in p})
  assert mask == {"encoder": {"Conv_1": {"kernel": False, "bias": False}},
                  "Dense_0": {"kernel": True, "bias": True},
                  "LayerNorm_0": {"scale": False, "bias": False},
                  "head": False}


def test_branch_reinitialises_with_init():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="head")(nn.Dense(4)(x))

  x = jnp.ones((1, 3))
  init = jax.jit(lambda k: Net().init(k, x)["params"])
  params = init(jax.random.key(0))
  b = recon.branch(params, ["Dense_0"], 2, key=7, init=init)
  keys = jax.random.split(jax.random.key(7), 2)
  for t in range(2):
    np.testing.assert_allclose(b["Dense_0"]["kernel"][t],
                               init(keys[t])["Dense_0"]["kernel"], atol=1e-6)
  assert not np.allclose(b["Dense_0"]["kernel"][0], b["Dense_0"]["kernel"][1])
  np.testing.assert_array_equal(b["head"]["kernel"], params["head"]["kernel"])
  # NNX: init from a fresh module's state
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  _, state = nnx.split(model, nnx.Param)
  nb = recon.branch(state, ["<root>"], 3, key=1, init=lambda k: nnx.state(
      nnx.Linear(3, 2, rngs=nnx.Rngs(k)), nnx.Param))
  assert nb["kernel"].shape == (3, 3, 2)
  assert not np.allclose(nb["kernel"][0], nb["kernel"][1])


def test_branch_bad_inputs():
  params = params_like()
  with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['Dense_9'\]"):
    recon.branch(params, ["Dense_0", "Dense_9"], 2)
  with pytest.raises(ValueError, match="num_tasks"):
    recon.branch(params, ["Dense_0"], 0)
  with pytest.raises(ValueError, match="without `init`"):
    recon.branch(params, ["Dense_0"], 2, key=0)
  with pytest.raises(ValueError, match="needs a PRNG `key`"):
    recon.branch(params, ["Dense_0"], 2, init=lambda k: params)
  with pytest.raises(ValueError, match="structure differs"):
    recon.branch(params, ["Dense_0"], 2, key=0,
                 init=lambda k: {"Dense_0": params["Dense_0"]})
  wrong = lambda k: dict(params, Dense_0={"kernel": jnp.zeros((3, 5)),
                                          "bias": jnp.zeros(4)})
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    recon.branch(params, ["Dense_0"], 2, key=0, init=wrong)
  b = recon.branch(params, ["Dense_0", "LayerNorm_0"], 2)
  with pytest.raises(ValueError, match="Unknown layer name"):
    recon.task_params(b, ["Dense_1"], 0)
  with pytest.raises(ValueError, match="out of range"):
    recon.task_params(b, ["Dense_0"], 2)
  mismatched = dict(b, LayerNorm_0=jax.tree.map(lambda x: x[:1],
                                                b["LayerNorm_0"]))
  with pytest.raises(ValueError, match="LayerNorm_0/.*leading task axis"):
    recon.task_params(mismatched, ["Dense_0", "LayerNorm_0"], 0)
  with pytest.raises(ValueError, match="Dense_0/bias.*no leading task axis"):
    recon.task_params(dict(b, Dense_0={"bias": jnp.zeros(()),
                                       "kernel": b["Dense_0"]["kernel"]}),
                      ["Dense_0"], 0)
  with pytest.raises(ValueError, match="grouping"):
    recon.shared_mask(b, ["Dense_0"], grouping=3)
