"""task_value_and_grad against jax.jacrev / per-task jax.grad, and on NNX.

On an ``nnx.Module`` it must behave like ``nnx.value_and_grad``: stacked
gradients of the filtered Variables as an ``nnx.State``, every other state
change of the one forward pass written back once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po


RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 3)).astype(np.float32)
Y = RNG.standard_normal((16, 3)).astype(np.float32)
PARAMS = {"w": RNG.standard_normal((3, 4)).astype(np.float32),
          "b": RNG.standard_normal(4).astype(np.float32)}
HEAD = RNG.standard_normal((4, 3)).astype(np.float32)


def three_losses(params, head, x, *, temperature=1.0):
  h = jnp.tanh(x @ params["w"] + params["b"]) / temperature
  pred = h @ head
  return jnp.mean((pred - Y) ** 2, axis=0)       # (3,) task losses


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def per_task_grads(fn, argnums, *args, **kwargs):
  """Stacks jax.grad of each task's loss separately."""
  t = fn(*args, **kwargs).shape[0]
  grads = [jax.grad(lambda *a, i=i: fn(*a, **kwargs)[i], argnums=argnums)(
      *args) for i in range(t)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *grads)


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_argnums_int(batched):
  calls = []

  def counted(*args, **kwargs):
    calls.append(None)
    return three_losses(*args, **kwargs)

  @jax.jit
  def everything(params):
    losses, grads = po.task_value_and_grad(counted, batched=batched)(
        params, HEAD, X, temperature=2.0)
    return (losses, grads, three_losses(params, HEAD, X, temperature=2.0),
            jax.jacrev(lambda p: three_losses(p, HEAD, X,
                                              temperature=2.0))(params),
            per_task_grads(three_losses, 0, params, HEAD, X,
                           temperature=2.0))

  losses, grads, direct, jac, per_task = everything(PARAMS)
  assert len(calls) == 1        # one forward pass, shared by the T VJPs
  np.testing.assert_allclose(losses, direct, rtol=1e-6)
  assert_trees_close(grads, jac)
  assert_trees_close(grads, per_task)
  assert grads["w"].shape == (3, 3, 4)


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_argnums_tuple_and_jit(batched):
  @jax.jit
  def everything(params, head, x):
    return (po.task_value_and_grad(three_losses, argnums=(0, 1),
                                   batched=batched)(params, head, x)[1],
            jax.jacrev(three_losses, argnums=(0, 1))(params, head, x),
            per_task_grads(three_losses, (0, 1), params, head, x),
            po.task_value_and_grad(three_losses, argnums=1, batched=batched)(
                params, head, x)[1])

  grads, jac, per_task, head_only = everything(PARAMS, HEAD, X)
  assert isinstance(grads, tuple) and len(grads) == 2
  assert_trees_close(grads, jac)
  assert_trees_close(grads, per_task)
  assert_trees_close(head_only, jac[1])


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_has_aux(batched):
  def with_aux(params, head, x):
    losses = three_losses(params, head, x)
    return losses, {"total": jnp.sum(losses)}

  @jax.jit
  def everything(params, head, x):
    return (po.task_value_and_grad(with_aux, has_aux=True, batched=batched)(
        params, head, x),
            jax.jacrev(with_aux, has_aux=True)(params, head, x)[0],
            po.task_value_and_grad(with_aux, argnums=(1,), has_aux=True,
                                   batched=batched)(params, head, x)[1],
            jax.jacrev(with_aux, argnums=(1,), has_aux=True)(
                params, head, x)[0])

  ((losses, aux), grads), jac, grads2, jac2 = everything(PARAMS, HEAD, X)
  np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
  assert_trees_close(grads, jac)
  assert_trees_close(grads2, jac2)


@pytest.mark.parametrize("make_losses", [
    lambda l: jnp.sum(l),          # scalar
    lambda l: l[:, None],          # (T, 1)
    lambda l: jnp.stack([l, l]),   # (2, T)
], ids=["scalar", "column", "matrix"])
def test_task_value_and_grad_rejects_non_vector(make_losses):
  fn = po.task_value_and_grad(lambda p: make_losses(
      three_losses(p, HEAD, X)))
  with pytest.raises(ValueError, match="vector"):
    jax.jit(fn)(PARAMS)
  with pytest.raises(ValueError, match="vector"):
    jax.eval_shape(fn, PARAMS)


def test_task_value_and_grad_bad_argnums():
  with pytest.raises(ValueError, match="argnums"):
    po.task_value_and_grad(three_losses, argnums=3)(PARAMS, HEAD, X)


# --- Flax NNX modules: like nnx.value_and_grad, state written back once ---


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def _make_model(seed=0):
  nnx = _nnx()

  class Model(nnx.Module):
    """A trunk with BatchNorm, Dropout and a call counter; T linear heads."""

    def __init__(self, num_tasks, rngs):
      self.trunk = nnx.Linear(3, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.head = nnx.Linear(8, num_tasks, rngs=rngs)
      self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x):
      self.calls[...] += 1
      return self.head(self.drop(nnx.relu(self.bn(self.trunk(x)))))

  return lambda t: Model(t, nnx.Rngs(seed, dropout=seed + 1))


def nnx_task_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0)       # (T,)


def _batch(t, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((16, 3)), jnp.float32),
          jnp.asarray(rng.standard_normal((16, t)), jnp.float32))


def _assert_states_equal(a, b, rtol=0.0, atol=0.0):
  nnx = _nnx()
  sa, sb = nnx.state(a), nnx.state(b)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(sa)[0],
                          jax.tree.leaves(sb)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_nnx_one_task_equals_nnx_value_and_grad():
  # T = 1: PCGrad is the identity, so task_value_and_grad + pcgrad + SGD
  # must train like nnx.value_and_grad + SGD: params, batch stats, RNG counts
  # and the call counter equal after every step. (SGD, not Adam: Adam's
  # first steps are lr * sign(g) and flip on float noise of a zero gradient.)
  import optax  # pylint: disable=g-import-not-at-top
  nnx = _nnx()
  make = _make_model()
  ours, ref = make(1), make(1)
  opt = nnx.Optimizer(ours, optax.chain(po.pcgrad(), optax.sgd(0.1, 0.9)),
                      wrt=nnx.Param)
  opt_ref = nnx.Optimizer(ref, optax.sgd(0.1, 0.9), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    losses, grads = po.task_value_and_grad(nnx_task_losses)(model, x, y)
    optimizer.update(model, grads)
    return losses, grads

  @nnx.jit
  def ref_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: nnx_task_losses(m, x, y)[0])(model)
    optimizer.update(model, grads)
    return loss, grads

  for i in range(3):
    x, y = _batch(1, seed=i)
    losses, grads = step(ours, opt, x, y)
    loss, ref_grads = ref_step(ref, opt_ref, x, y)
    _assert_states_equal(ours, ref, rtol=1e-6, atol=1e-7)
    assert isinstance(grads, nnx.State)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert g.shape == (1,) + r.shape
      np.testing.assert_allclose(g[0], r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses[0], loss, rtol=1e-6)
  assert int(ours.calls[...]) == 3
  assert int(ours.drop.rngs.count[...]) == 3
  assert not np.allclose(ours.bn.mean[...], 0.0)   # the batch stats moved


@pytest.mark.parametrize("batched", [True, False])
def test_nnx_three_tasks_state_moves_as_one_forward_pass(batched):
  nnx = _nnx()
  make = _make_model(seed=3)
  model, once = make(3), make(3)
  clones = [make(3) for _ in range(3)]
  x, y = _batch(3)

  @nnx.jit
  def grad_step(model, x, y):
    return po.task_value_and_grad(nnx_task_losses, batched=batched)(
        model, x, y)

  losses, grads = grad_step(model, x, y)
  nnx.jit(lambda m, x: m(x))(once, x)              # one plain forward pass
  _assert_states_equal(model, once)               # bit-identical
  assert int(model.calls[...]) == 1
  assert int(model.drop.rngs.count[...]) == 1

  # Each task's row is nnx.grad of that task's loss from the same state
  # (a clone of the model before the step: same dropout mask).
  assert isinstance(grads, nnx.State)
  params = nnx.state(once, nnx.Param)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for t, clone in enumerate(clones):
    ref = nnx.jit(nnx.grad(lambda m, t=t: nnx_task_losses(m, x, y)[t]))(
        clone)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      assert g.shape == (3,) + r.shape
      np.testing.assert_allclose(g[t], r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses, nnx_task_losses(make(3), x, y),
                             rtol=1e-6)


def test_nnx_diff_state_aux_argnums_and_eager():
  nnx = _nnx()
  model = _make_model(seed=5)(2)
  x, y = _batch(2)
  rngs = nnx.Rngs(noise=7)
  scale = jnp.float32(2.0)

  def losses_fn(model, scale, rngs, x, y):
    noise = 0.01 * jax.random.normal(rngs.noise(), x.shape)
    losses = scale * nnx_task_losses(model, x + noise, y)
    return losses, {"sum": jnp.sum(losses)}

  head_only = nnx.DiffState(0, nnx.PathContains("head"))
  fn = po.task_value_and_grad(losses_fn, argnums=(head_only, 1),
                              has_aux=True)
  (losses, aux), (head_grads, scale_grad) = fn(model, scale, rngs, x, y)
  assert isinstance(head_grads, nnx.State)
  assert set(head_grads.keys()) == {"head"}
  assert head_grads["head"]["kernel"].shape == (2, 8, 2)
  np.testing.assert_allclose(scale_grad, losses / scale, rtol=1e-6)
  np.testing.assert_allclose(aux["sum"], jnp.sum(losses), rtol=1e-6)
  # Eager (no jit): the module and the separate nnx.Rngs argument are
  # updated once.
  assert int(model.calls[...]) == 1
  assert int(model.drop.rngs.count[...]) == 1
  assert int(rngs.noise.count[...]) == 1

  # A single DiffState is one argnum: grads are not wrapped in a tuple.
  _, grads = po.task_value_and_grad(
      lambda m: nnx_task_losses(m, x, y),
      argnums=nnx.DiffState(0, nnx.BatchStat))(model)
  assert isinstance(grads, nnx.State) and set(grads.keys()) == {"bn"}
  # The memory variant shares the forward pass and the write-back.
  _, mem_grads = po.memory.task_value_and_grad(
      nnx_task_losses, tasks_per_chunk=1)(model, x, y)
  assert isinstance(mem_grads, nnx.State)
  assert int(model.calls[...]) == 3


def test_nnx_modules_inside_containers():
  # A dict of two models and an array: the grads mirror the dict (an
  # nnx.State per model, the array's stacked gradient), and both models'
  # state moves once, as one forward pass of each would move it.
  nnx = _nnx()
  make = _make_model(seed=7)
  pair, once = {"a": make(2), "b": make(2)}, {"a": make(2), "b": make(2)}
  x, y = _batch(2)

  def losses_fn(models, x, y):
    h = models["a"](x) + models["b"](x) * models["w"]
    return jnp.mean((h - y) ** 2, axis=0)

  w = jnp.float32(0.5)
  losses, grads = nnx.jit(po.task_value_and_grad(losses_fn))(
      {**pair, "w": w}, x, y)
  ref_losses = losses_fn({**once, "w": w}, x, y)      # moves `once` once
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert set(grads) == {"a", "b", "w"}
  assert isinstance(grads["a"], nnx.State) and grads["w"].shape == (2,)
  for name in ("a", "b"):
    _assert_states_equal(pair[name], once[name])
  assert int(pair["a"].calls[...]) == 1


def test_nnx_bare_variable_like_nnx_grad():
  nnx = _nnx()
  param = nnx.Param(jnp.array([1.0, 2.0]))
  losses, grads = po.task_value_and_grad(
      lambda v: jnp.stack([jnp.sum(v[...] ** 2), jnp.sum(v[...])]))(param)
  ref = nnx.grad(lambda v: jnp.sum(v[...] ** 2))(param)
  assert type(grads) is type(ref)
  np.testing.assert_allclose(grads[...], [[2.0, 4.0], [1.0, 1.0]])
  np.testing.assert_allclose(losses, [5.0, 3.0])


def test_nnx_diff_state_on_a_plain_argument_rejected():
  nnx = _nnx()
  with pytest.raises(ValueError, match="DiffState"):
    po.task_value_and_grad(three_losses, argnums=nnx.DiffState(0, nnx.Param))(
        PARAMS, HEAD, X)


# --- the CPU loop over tasks (benchmarks/results/step_profile.md) -----------

def _trunk_losses(p, x):
  """A two-layer trunk with T = 5 linear heads; distinctive leaf shapes."""
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  h = jax.nn.relu(h @ p["w2"])
  return jnp.mean((h @ p["heads"]) ** 2, axis=0)           # (5,)


def _trunk_params():
  rng = np.random.default_rng(3)
  return ({"w1": rng.standard_normal((24, 40)).astype(np.float32) / 5,
           "b1": rng.standard_normal(40).astype(np.float32),
           "w2": rng.standard_normal((40, 56)).astype(np.float32) / 6,
           "heads": rng.standard_normal((56, 5)).astype(np.float32) / 7},
          rng.standard_normal((32, 24)).astype(np.float32))


def _conv_losses(p, x):
  h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h).reshape(x.shape[0], -1)
  return jnp.mean((h @ p["heads"]) ** 2, axis=0)           # (3,)


def _conv_params():
  rng = np.random.default_rng(4)
  return ({"k": rng.standard_normal((3, 3, 2, 4)).astype(np.float32) / 4,
           "heads": rng.standard_normal((6 * 6 * 4, 3)).astype(np.float32)
                    / 12},
          rng.standard_normal((8, 6, 6, 2)).astype(np.float32))


def _force_vmap(monkeypatch):
  from pcgrad_optax._core import cpu
  monkeypatch.setattr(cpu, "loop_over_tasks", lambda _: False)


@pytest.mark.parametrize("case", ["dense", "conv"])
def test_loop_over_tasks_equals_vmap_and_sequential(case, monkeypatch):
  # Every formulation of the pullbacks gives the same stacked gradients.
  fn, (params, x) = {"dense": (_trunk_losses, _trunk_params()),
                     "conv": (_conv_losses, _conv_params())}[case]
  default = jax.jit(po.task_value_and_grad(fn))(params, x)
  sequential = jax.jit(po.task_value_and_grad(fn, batched=False))(params, x)
  _force_vmap(monkeypatch)
  vmapped = jax.jit(po.task_value_and_grad(fn))(params, x)
  for other in (sequential, vmapped):
    assert_trees_close(default, other, rtol=1e-5, atol=1e-6)
  assert_trees_close(default[1], per_task_grads(fn, 0, params, x),
                     rtol=1e-5, atol=1e-6)


def _task_axis_transposes(hlo: str, t: int, shapes) -> list[str]:
  """transpose/copy instructions producing a (T,) + shape array."""
  wanted = {(t,) + tuple(s) for s in shapes}
  found = []
  for m in re.finditer(r"= f32\[([0-9,]*)\]\{[0-9,]*\} (transpose|copy)\(",
                       hlo):
    dims = tuple(int(d) for d in m.group(1).split(",") if d)
    if dims in wanted:
      found.append(m.group(0))
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")
def test_cpu_pullbacks_are_a_loop_without_task_axis_transposes(monkeypatch):
  # The structural guard of the fix: on CPU the stacked dense weight
  # gradients are written by a while loop in their own layout, with no
  # transposing copy of a (T, in, out) array, in task_value_and_grad and in
  # value_and_aggregate's stacked engine, jitted with an optimizer.
  params, x = _trunk_params()
  shapes = [params["w1"].shape, params["w2"].shape]
  opt = optax.adam(1e-3)
  agg = po.pcgrad(key=0, shared={"w1": True, "b1": True, "w2": True,
                                 "heads": False})

  def user_step():           # task_value_and_grad + pcgrad + adam, new fn
    def step(p, s, a, x):    # (a new function: no cached trace is reused)
      _, g = po.task_value_and_grad(_trunk_losses)(p, x)
      u, a = agg.update(g, a, p)
      u, s = opt.update(u, s, p)
      return optax.apply_updates(p, u), s, a
    return step

  engine = po.value_and_aggregate(_trunk_losses, po.pcgrad(key=0),
                                  engine="stacked",
                                  shared={"w1": True, "b1": True, "w2": True,
                                          "heads": False})

  def engine_step(p, s, a, x):
    _, u, a = engine(p, a, x)
    u, s = opt.update(u, s, p)
    return optax.apply_updates(p, u), s, a

  args = (params, opt.init(params), agg.init(params), x)

  def hlo(step):
    return jax.jit(step).lower(*args).compile().as_text()

  for step in (user_step(), engine_step):
    text = hlo(step)
    assert " while(" in text
    assert not _task_axis_transposes(text, 5, shapes)
  # The check is not vacuous: the vmap formulation has those transposes.
  _force_vmap(monkeypatch)
  assert _task_axis_transposes(hlo(user_step()), 5, shapes)


def test_cpu_pullbacks_keep_vmap_for_convolutions():
  # XLA:CPU runs a convolution's kernel gradient inside a loop body through
  # its generic (slow) code, so a pullback holding a convolution keeps the
  # vmap: no while loop in its HLO.
  params, x = _conv_params()
  text = jax.jit(po.task_value_and_grad(_conv_losses)).lower(
      params, x).compile().as_text()
  assert " while(" not in text
