"""Multi-device checks on 8 simulated CPU devices.

Run by tests/test_sharding.py in a child process with JAX_NUM_CPU_DEVICES=8
(see conftest.py here). Every check compares against the same computation on
one device, with no mesh, to float tolerance.

Layouts:
  fsdp: 1-D mesh of 8, every param split on a feature axis.
  tp:   (data=2, model=4) mesh, Megatron column/row split on "model".
  dp:   1-D mesh of 8, params replicated, the batch split.
  mix:  (data=2, model=4), params split over both axes at once.
each in three modes (MODES):
  explicit:        AxisType.Explicit under jax.set_mesh;
  explicit-nomesh: AxisType.Explicit (jax.make_mesh's default) with the
                   arrays placed by jax.device_put(x, NamedSharding(mesh, s))
                   and no jax.set_mesh anywhere (shard_map gets mesh=);
  auto:            AxisType.Auto under jax.set_mesh (and, for the main
                   transformations, "auto-nomesh": without it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import factory_args
import pcgrad_optax
from pcgrad_optax import memory
from pcgrad_optax import recon
from pcgrad_optax import sharding as pgs
from pcgrad_optax._core.aggregate import aggregate

T = 4
RTOL, ATOL = 2e-5, 2e-6

MODES = ("explicit", "explicit-nomesh", "auto")
AXIS_TYPES = {"explicit": AxisType.Explicit,
              "explicit-nomesh": AxisType.Explicit,
              "auto": AxisType.Auto, "auto-nomesh": AxisType.Auto}

PARAM_SHAPES = {"trunk": {"kernel": (16, 64), "bias": (64,)}, "head": (64, 8)}
MIN_LEAF = 64   # no collective may carry this many numbers

LAYOUTS = {
    "fsdp": ((8,), ("fsdp",), {
        "trunk": {"kernel": P("fsdp", None), "bias": P("fsdp")},
        "head": P("fsdp", None)}),
    "tp": ((2, 4), ("data", "model"), {
        "trunk": {"kernel": P(None, "model"), "bias": P("model")},
        "head": P("model", None)}),
    "dp": ((8,), ("data",), {
        "trunk": {"kernel": P(), "bias": P()}, "head": P()}),
    "mix": ((2, 4), ("data", "model"), {
        "trunk": {"kernel": P("data", "model"), "bias": P("model")},
        "head": P("model", "data")}),
}


def make_mesh(layout: str, mode: str):
  shape, names, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, names,
                       axis_types=(AXIS_TYPES[mode],) * len(names))


def is_explicit(mode: str) -> bool:
  return mode.startswith("explicit")


def uses_set_mesh(mode: str) -> bool:
  return not mode.endswith("-nomesh")


def scope(mesh, mode: str):
  """jax.set_mesh(mesh), or nothing at all in the "-nomesh" modes."""
  return jax.set_mesh(mesh) if uses_set_mesh(mode) else contextlib.nullcontext()


def shard_map(fn, mesh, mode: str, **kwargs):
  """jax.shard_map over the context mesh, or over mesh= without one."""
  if not uses_set_mesh(mode):
    kwargs["mesh"] = mesh
  return jax.shard_map(fn, **kwargs)


def is_spec(x):
  return isinstance(x, P)


def put(tree, mesh, specs, stacked=False):
  if stacked:
    specs = pgs.stacked_sharding(specs)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, specs, is_leaf=is_spec)


def assert_sharded_like(tree, mesh, specs):
  for x, s in zip(jax.tree.leaves(tree),
                  jax.tree.leaves(specs, is_leaf=is_spec)):
    want = NamedSharding(mesh, s)
    assert x.sharding.is_equivalent_to(want, x.ndim), (
        f"got {x.sharding}, want {want}")


def assert_tree_close(got, want, rtol=RTOL, atol=ATOL):
  """Leafwise allclose; atol scales with the leaf's largest entry (sharded
  reductions add in another order, and some methods amplify rounding)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=atol * max(1.0, float(np.max(np.abs(w)))))


_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast)(-start)?\(")


def largest_collective(hlo_text: str) -> int:
  """Element count of the largest array any collective in the HLO moves."""
  largest = 0
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1)):
      largest = max(largest, math.prod(int(d) for d in dims.split(",") if d))
  return largest


# ---------------------------------------------------------------------------
# The transformations under test: pcgrad always, the rest of the family when
# it exists (discovered, so new aggregators are picked up without edits).

MAIN = ("pcgrad", "mgda", "cagrad")


def family_names() -> list[str]:
  names = []
  for mod_name in ("aggregation", "scalarization"):
    mod = getattr(pcgrad_optax, mod_name, None)
    names += [n for n in getattr(mod, "__all__", []) if n[:1].islower()]
  return sorted(set(names) - set(MAIN))


def build(name: str):
  """(factory, extra update kwargs) for transformation `name`."""
  factory = getattr(pcgrad_optax, name)
  # Required arguments and the second batch: tests/factory_args.py.
  kwargs = factory_args.factory_kwargs(name, T, always_num_tasks=False)
  make = functools.partial(factory, **kwargs)
  try:
    tx = make()
  except TypeError as e:   # a factory with required arguments we don't know
    pytest.skip(f"pcgrad_optax.{name}(**{kwargs}) needs more arguments: {e}")
  if not isinstance(tx, optax.GradientTransformation):
    pytest.skip(f"pcgrad_optax.{name} is not a transformation factory")
  update_params = inspect.signature(tx.update).parameters
  extra = {}
  if "losses" in update_params:
    extra["losses"] = jnp.arange(1.0, T + 1.0)
  if name in factory_args.SECOND_BATCH:
    extra["second_grads"] = random_tree(np.random.default_rng(1), T)
  return make, extra


def random_tree(rng, t=None):
  shape = (lambda s: (t,) + s) if t else (lambda s: s)
  return jax.tree.map(
      lambda s: rng.standard_normal(shape(s)).astype(np.float32),
      PARAM_SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def one_update(txs, extras):
  """One update of each transformation in `txs` (a dict), one program."""
  def run(grads, states, params):
    return {name: tx.update(grads, states[name], params, **extras[name])
            for name, tx in txs.items()}
  return run


def transform_data():
  rng = np.random.default_rng(0)
  return random_tree(rng), random_tree(rng, T)


@functools.cache
def reference(names: tuple[str, ...]):
  """One update of each transformation on one device, no mesh."""
  built = {n: build(n) for n in names}
  txs = {n: make() for n, (make, _) in built.items()}
  extras = {n: extra for n, (_, extra) in built.items()}
  params, grads = transform_data()
  states = {n: tx.init(params) for n, tx in txs.items()}
  return jax.jit(one_update(txs, extras))(grads, states, params)


def run_transforms(names: tuple[str, ...], layout: str, mode: str):
  """(mesh, outputs, largest collective) of one program updating each of
  `names` on the layout's mesh."""
  built = {n: build(n) for n in names}
  extras = {n: extra for n, (_, extra) in built.items()}
  params_np, grads_np = transform_data()
  mesh = make_mesh(layout, mode)
  specs = LAYOUTS[layout][2]
  with scope(mesh, mode):
    params = put(params_np, mesh, specs)
    grads = put(grads_np, mesh, specs, stacked=True)
    txs = {n: make() for n, (make, _) in built.items()}
    states = {n: tx.init(params) for n, tx in txs.items()}
    compiled = jax.jit(one_update(txs, extras)).lower(
        grads, states, params).compile()
    got = compiled(grads, states, params)
  return mesh, got, largest_collective(compiled.as_text())


def check_outputs(names, got, want, mesh, specs):
  for name in names:
    assert_tree_close(got[name][0], want[name][0])
    assert_sharded_like(got[name][0], mesh, specs)
    # The new state has the same structure as on one device.
    assert jax.tree.structure(got[name][1]) == jax.tree.structure(
        want[name][1])


def check_transforms(names: tuple[str, ...], layout: str, mode: str):
  """Sharded == one device, updates keep the params' sharding, and no
  collective moves a whole leaf."""
  mesh, got, largest = run_transforms(names, layout, mode)
  check_outputs(names, got, reference(names), mesh, LAYOUTS[layout][2])
  assert largest < MIN_LEAF, (
      f"{names} on {layout}/{mode}: a collective moves {largest} numbers "
      f"(a whole leaf has >= {MIN_LEAF}); only T x T = {T * T} are needed")


def buildable(name: str) -> bool:
  try:
    build(name)
  except pytest.skip.Exception:
    return False
  return True


@functools.cache
def family_run(mode: str):
  """(names, mesh, outputs, largest collective, error) of one program of
  every buildable family member on the "mix" layout; error: why it could
  not be built or run (then each test checks its member alone)."""
  names = tuple(n for n in family_names() if buildable(n))
  try:
    return (names,) + run_transforms(names, "mix", mode) + (None,)
  except Exception as e:  # noqa: BLE001 (reported by the per-member check)
    return names, None, None, None, e


def test_issue_16_reproducer():
  """jax.make_mesh's default (explicit) axes, arrays placed with
  device_put(x, NamedSharding(mesh, P(None, "data"))), no jax.set_mesh:
  jit(pcgrad().update) used to fail naming its Gram's output sharding with a
  bare PartitionSpec."""
  mesh = jax.make_mesh((8,), ("data",))
  assert mesh.axis_types == (AxisType.Explicit,)
  rng = np.random.default_rng(16)
  grads_np = rng.standard_normal((T, 3, 16)).astype(np.float32)
  params_np = np.zeros((3, 16), np.float32)
  grads = jax.device_put(grads_np, NamedSharding(mesh, P(None, None, "data")))
  params = jax.device_put(params_np, NamedSharding(mesh, P(None, "data")))
  tx = pcgrad_optax.pcgrad()
  update, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want, _ = jax.jit(tx.update)(grads_np, tx.init(params_np), params_np)
  assert_tree_close(update, want)
  assert update.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, "data")), 2)


@pytest.mark.parametrize("layout,mode", [
    (layout, mode) for layout in ("fsdp", "tp", "dp") for mode in MODES
    # dp shards no param: without set_mesh it is the explicit case again.
    if (layout, mode) != ("dp", "explicit-nomesh")] + [
        ("fsdp", "auto-nomesh")])
def test_main_transforms(layout, mode):
  """pcgrad (and mgda, cagrad once they exist) in one program per layout."""
  names = tuple(n for n in MAIN if hasattr(pcgrad_optax, n))
  check_transforms(names, layout, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", family_names())
def test_family_transforms(name, mode):
  """Every other transformation of the family, params split over 2 axes.

  The whole family is one program per mode (compiled once, far faster than
  one program each); a member whose check fails there, or any member when
  the program has a collective that moves a whole leaf or cannot be built,
  is checked again alone, in a program of its own, for the verdict."""
  build(name)   # skips a factory that is not a buildable transformation
  names, mesh, got, largest, error = family_run(mode)
  if error is None and largest < MIN_LEAF:
    try:
      check_outputs((name,), got, reference(names), mesh,
                    LAYOUTS["mix"][2])
      return
    except Exception:  # noqa: BLE001 (the verdict: its own program, below)
      pass
  check_transforms((name,), "mix", mode)


# ---------------------------------------------------------------------------
# A whole training step: task_value_and_grad -> pcgrad -> adam, under jit.

IN, HID = 16, 64


def mlp_params(rng):
  return {"w1": (rng.standard_normal((IN, HID)) / 4).astype(np.float32),
          "b1": np.zeros(HID, np.float32),
          "w2": (rng.standard_normal((HID, T)) / 8).astype(np.float32)}


MLP_SPECS = {
    "fsdp": {"w1": P("fsdp", None), "b1": P("fsdp"), "w2": P("fsdp", None)},
    "tp": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)},
    "dp": {"w1": P(), "b1": P(), "w2": P()},
}
BATCH_SPECS = {"fsdp": P(), "tp": P("data"), "dp": P("data")}


def mlp_task_losses(p, x, y, layout=None, mesh=None):
  """Per-task mean squared errors of a 1-hidden-layer MLP with T outputs.

  ``mesh``: the explicit-axis mesh the params live on (None: auto axes or one
  device). The model names its shardings on it, as user code must when no
  jax.set_mesh is active (a bare PartitionSpec needs one)."""
  w1, w2 = p["w1"], p["w2"]
  if mesh is not None and layout == "fsdp":
    # FSDP: gather each weight just before use; its gradient is
    # reduce-scattered back to the param's sharding by the transpose.
    w1 = jax.sharding.reshard(w1, NamedSharding(mesh, P()))
    w2 = jax.sharding.reshard(w2, NamedSharding(mesh, P()))
  h = jnp.tanh(x @ w1 + p["b1"])
  out = None
  if mesh is not None and layout == "tp":   # row-parallel: name the output
    out = NamedSharding(mesh, P(BATCH_SPECS["tp"][0], None))
  z = jnp.einsum("bh,ht->bt", h, w2, out_sharding=out)
  return jnp.mean((z - y) ** 2, axis=0)


def train_step(tx, layout=None, mesh=None):
  losses_fn = functools.partial(mlp_task_losses, layout=layout, mesh=mesh)

  def run(params, state, x, y):
    _, grads = pcgrad_optax.task_value_and_grad(losses_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return run


def mlp_data(rng, batch=32):
  x = rng.standard_normal((batch, IN)).astype(np.float32)
  # Targets of opposite signs make the tasks conflict.
  y = np.concatenate([x[:, :T // 2], -x[:, :T - T // 2]], 1).astype(
      np.float32)
  return x, y


TRAIN_TX = optax.chain(pcgrad_optax.pcgrad(), optax.adam(1e-2))


def train_data():
  rng = np.random.default_rng(1)
  return (mlp_params(rng),) + mlp_data(rng)


@functools.cache
def train_reference():
  params, x, y = train_data()
  return jax.jit(train_step(TRAIN_TX))(params, TRAIN_TX.init(params), x, y)


def put_mlp(layout, mode):
  """(mesh, params, x, y) of the MLP placed on the layout's mesh."""
  params_np, x_np, y_np = train_data()
  mesh = make_mesh(layout, mode)
  batch = NamedSharding(mesh, BATCH_SPECS[layout])
  return (mesh, put(params_np, mesh, MLP_SPECS[layout]),
          jax.device_put(x_np, batch), jax.device_put(y_np, batch))


@pytest.mark.parametrize("layout,mode", [
    ("fsdp", "explicit"), ("tp", "explicit"), ("dp", "explicit"),
    ("fsdp", "explicit-nomesh"), ("tp", "auto")])
def test_train_step(layout, mode):
  """task_value_and_grad -> pcgrad -> adam -> apply_updates under jit."""
  ref, _ = train_reference()
  mesh, params, x, y = put_mlp(layout, mode)
  with scope(mesh, mode):
    state = TRAIN_TX.init(params)
    new, _ = jax.jit(train_step(
        TRAIN_TX, layout, mesh if is_explicit(mode) else None))(
            params, state, x, y)
  assert_tree_close(new, ref, rtol=1e-4, atol=1e-5)
  assert_sharded_like(new, mesh, MLP_SPECS[layout])


MULTI_STEPS = pcgrad_optax.multi_steps(
    optax.chain(pcgrad_optax.pcgrad(), optax.sgd(0.1)), 2, num_tasks=T)


@jax.jit
def multi_steps_two_calls(grads, state, params):   # accumulate, then step
  _, state = MULTI_STEPS.update(grads, state, params)
  return MULTI_STEPS.update(jax.tree.map(lambda g: -0.5 * g, grads), state,
                            params)


@pytest.mark.parametrize("mode", MODES)
def test_multi_steps_fsdp(mode):
  """The micro-batch accumulator is sharded like the params."""
  params_np, grads_np = transform_data()
  want, _ = multi_steps_two_calls(grads_np, MULTI_STEPS.init(params_np),
                                  params_np)
  mesh = make_mesh("fsdp", mode)
  specs = LAYOUTS["fsdp"][2]
  with scope(mesh, mode):
    params = put(params_np, mesh, specs)
    state = MULTI_STEPS.init(params)
    assert_sharded_like(state.acc_grads, mesh, pgs.stacked_sharding(specs))
    got, state = multi_steps_two_calls(put(grads_np, mesh, specs, True),
                                       state, params)
  assert_tree_close(got, want)
  assert_sharded_like(got, mesh, specs)
  assert_sharded_like(state.acc_grads, mesh, pgs.stacked_sharding(specs))


# ---------------------------------------------------------------------------
# Memory-lean paths on a mesh.

MEMORY_ORDER = np.stack([np.random.default_rng(3).permutation(T)
                         for _ in range(T)])


def memory_weighting(gram):
  return pcgrad_optax.weighting.pcgrad(gram, order=jnp.asarray(MEMORY_ORDER))


@functools.cache
def memory_reference():
  params, x, y = train_data()
  _, stacked = jax.jit(pcgrad_optax.task_value_and_grad(mlp_task_losses))(
      params, x, y)

  @jax.jit
  def combine(stacked):
    gram = pcgrad_optax.gram_matrix(stacked)
    return gram, pcgrad_optax.weighted_sum(stacked, memory_weighting(gram))
  return combine(stacked)


@pytest.mark.parametrize("layout,mode", [("tp", "explicit"),
                                         ("fsdp", "explicit-nomesh"),
                                         ("fsdp", "auto")])
def test_memory_paths_on_mesh(layout, mode):
  """streaming_aggregate and chunked bf16 task gradients on a mesh."""
  gram_ref, update_ref = memory_reference()
  explicit = is_explicit(mode)
  mesh, params, x, y = put_mlp(layout, mode)

  def run(params, x, y):
    losses_fn = functools.partial(mlp_task_losses, layout=layout,
                                  mesh=mesh if explicit else None)
    _, update, _, _ = memory.streaming_aggregate(
        losses_fn, memory_weighting, tasks_per_chunk=3)(params, x, y)
    _, stacked = memory.task_value_and_grad(
        losses_fn, tasks_per_chunk=3, dtype=jnp.bfloat16)(params, x, y)
    return (update, optax.apply_updates(params, update),
            pcgrad_optax.gram_matrix(stacked))

  specs = MLP_SPECS[layout]
  with scope(mesh, mode):
    update, new_params, gram_bf16 = jax.jit(run)(params, x, y)
  assert_tree_close(update, update_ref, rtol=1e-4, atol=1e-6)
  # Explicit axes fix the update's sharding; with auto axes the compiler
  # picks it, and what matters is that the new params keep theirs.
  if explicit:
    assert_sharded_like(update, mesh, specs)
  assert_sharded_like(new_params, mesh, specs)
  np.testing.assert_allclose(gram_bf16, gram_ref, rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(gram_ref))))


# ---------------------------------------------------------------------------
# Recon on a mesh: branch a sharded layer, retrain with the lean layout.

RECON_SPECS = {   # FSDP: every leaf of the branched params split on "fsdp"
    "l1": {"w": P("fsdp", None), "b": P("fsdp")},
    "l2": {"w": P(None, "fsdp", None), "b": P(None, None)},  # branched
}
RECON_LAYERS = ["l2"]


def gathered(w):
  """FSDP: an explicitly sharded weight gathered just before use, on the
  mesh in its own type (so the same code runs with and without
  jax.set_mesh); a no-op on auto axes and on one device."""
  sharding = jax.typeof(w).sharding
  if any(s is not None for s in getattr(sharding, "spec", ())):
    w = jax.sharding.reshard(w, NamedSharding(sharding.mesh, P()))
  return w


def recon_task_loss(p, t, x, y):
  h = jnp.tanh(x @ gathered(p["l1"]["w"]) + gathered(p["l1"]["b"]))
  z = h @ gathered(p["l2"]["w"]) + p["l2"]["b"]  # (B, T): head t reads z_t
  return jnp.mean((jnp.take(z, t, axis=1) - y[:, t]) ** 2)


def recon_params():
  params, _, _ = train_data()
  return recon.branch({"l1": {"w": params["w1"], "b": params["b1"]},
                       "l2": {"w": params["w2"],
                              "b": np.zeros(T, np.float32)}},
                      RECON_LAYERS, T)


RECON_TX = optax.chain(
    recon.with_branches(optax.chain(recon.track_conflicts(0.0),
                                    pcgrad_optax.pcgrad()), RECON_LAYERS),
    optax.adam(1e-2))


@jax.jit
def recon_step(params, state, x, y):
  """The lean path's step, with the simple path's update beside it."""
  _, grads = recon.value_and_grad(recon_task_loss, RECON_LAYERS, T)(
      params, x, y)
  cos = recon.pairwise_cosines({"l1": grads["l1"]})
  updates, state = RECON_TX.update(grads, state, params)
  # Simple path: (T, T, ...) blocks for the branched leaves, masked out.
  _, stacked = pcgrad_optax.task_value_and_grad(recon.task_losses(
      recon_task_loss, RECON_LAYERS, T))(params, x, y)
  simple = pcgrad_optax.pcgrad(shared=recon.shared_mask(
      params, RECON_LAYERS))
  simple_updates, _ = simple.update(stacked, simple.init(params), params)
  return optax.apply_updates(params, updates), state, cos, simple_updates


@functools.cache
def recon_reference():
  params = recon_params()
  _, x, y = train_data()
  return recon_step(params, RECON_TX.init(params), x, y)


@pytest.mark.parametrize("mode", MODES)
def test_recon_on_mesh(mode):
  """recon.branch / value_and_grad / with_branches / track_conflicts /
  pairwise_cosines, and task_losses / shared_mask (the simple path), on
  FSDP-sharded params equal one device."""
  want_params, want_state, want_cos, want_simple = recon_reference()
  _, x_np, y_np = train_data()
  mesh = make_mesh("fsdp", mode)
  with scope(mesh, mode):
    params_np = recon_params()
    params = put(params_np, mesh, RECON_SPECS)
    state = RECON_TX.init(params)
    new, state, cos, simple = recon_step(params, state, x_np, y_np)
  assert_tree_close(new, want_params, rtol=1e-4, atol=1e-5)
  assert_tree_close(simple, want_simple)
  if is_explicit(mode):   # auto axes: an update's sharding is XLA's choice
    assert_sharded_like(simple, mesh, RECON_SPECS)
  assert_sharded_like(new, mesh, RECON_SPECS)
  assert_tree_close(cos, want_cos, rtol=1e-4, atol=1e-5)
  assert jax.tree.map(int, state[0][0].scores) == jax.tree.map(
      int, want_state[0][0].scores)


# ---------------------------------------------------------------------------
# shard_map: model-parallel Gram with one psum, data-parallel averaging.

def count_psums(jaxpr) -> int:
  """psum equations in a jaxpr and every jaxpr nested in its equations."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name.startswith("psum")
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        sub = getattr(sub, "jaxpr", sub)   # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          count += count_psums(sub)
  return count


@pytest.mark.parametrize("mode", MODES)
def test_shard_map_gram_one_psum(mode):
  rng = np.random.default_rng(4)
  stacked_np = {"w": rng.standard_normal((T, 6, 16)).astype(np.float32),
                "b": rng.standard_normal((T, 16)).astype(np.float32),
                "c": rng.standard_normal((T, 5)).astype(np.float32)}
  in_specs = {"w": P(None, "data", "model"), "b": P(None, "model"),
              "c": P()}   # b replicated over "data", c over both axes
  full = np.concatenate([v.reshape(T, -1) for v in stacked_np.values()], 1)
  gram_ref = full.astype(np.float64) @ full.astype(np.float64).T
  mesh = make_mesh("mix", mode)
  order = jnp.asarray(np.stack([rng.permutation(T) for _ in range(T)]))

  def local(g):
    update, gram, weights = pgs.aggregate(
        g, lambda k: pcgrad_optax.weighting.pcgrad(k, order=order),
        ("data", "model"))
    # Every device's own copy of the weights, to check they agree.
    return update, gram, weights[None]

  with scope(mesh, mode):
    stacked = put(stacked_np, mesh, in_specs)
    fn = jax.jit(shard_map(
        local, mesh, mode, in_specs=(in_specs,),
        out_specs=({"w": P("data", "model"), "b": P("model"), "c": P()}, P(),
                   P(("data", "model")))))
    update, gram, weights = fn(stacked)
    jaxpr = jax.make_jaxpr(fn)(stacked)
  np.testing.assert_allclose(gram, gram_ref, rtol=1e-5)
  assert count_psums(jaxpr.jaxpr) == 1
  assert weights.shape == (8, T)
  weights = np.asarray(weights)
  np.testing.assert_array_equal(weights, np.broadcast_to(weights[0], (8, T)))
  w_ref = jax.jit(pcgrad_optax.weighting.pcgrad)(
      jnp.asarray(gram_ref, jnp.float32), order=order)
  update_ref = jax.jit(pcgrad_optax.weighted_sum)(stacked_np, w_ref)
  assert_tree_close(update, update_ref, rtol=1e-4, atol=1e-5)


def shard_map_losses(p, x, y):
  """The MLP with w1/b1 column- and w2 row-split over "model" (Megatron)."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  z = lax.psum(h @ p["w2"], "model")
  return jnp.mean((z - y) ** 2, axis=0)


@pytest.mark.parametrize("mode", MODES)
def test_shard_map_data_and_model_parallel_step(mode):
  """DP x MP inside shard_map equals PCGrad on the full batch, one device."""
  rng = np.random.default_rng(5)
  params_np = mlp_params(rng)
  x_np, y_np = mlp_data(rng)
  key = jax.random.key(7)
  weighting = functools.partial(pcgrad_optax.weighting.pcgrad, key=key)
  _, stacked = jax.jit(pcgrad_optax.task_value_and_grad(mlp_task_losses))(
      params_np, x_np, y_np)
  # w2 (row-parallel, split over "model") is a task head here: plain sum.
  shared = {"w1": True, "b1": True, "w2": False}
  update_ref, _, _ = jax.jit(functools.partial(
      aggregate, weighting=weighting, shared=shared))(
          stacked)

  specs = MLP_SPECS["tp"]
  mesh = make_mesh("tp", mode)

  def local(p, x, y):
    _, grads = pgs.task_value_and_grad(shard_map_losses, "data")(p, x, y)
    update, _, _ = pgs.aggregate(grads, weighting, "model", params=p,
                                 shared=shared)
    return update

  with scope(mesh, mode):
    params = put(params_np, mesh, specs)
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(x_np, batch)
    y = jax.device_put(y_np, batch)
    update = jax.jit(shard_map(
        local, mesh, mode, in_specs=(specs, P("data"), P("data")),
        out_specs=specs))(params, x, y)
  assert_tree_close(update, update_ref, rtol=1e-4, atol=1e-6)
  assert_sharded_like(update, mesh, specs)


def test_data_parallel_average_before_surgery(mode="explicit"):
  """pmean of per-task gradients, then PCGrad == PCGrad on the full batch;
  PCGrad per device, then pmean of the updates, is not."""
  rng = np.random.default_rng(6)
  params_np = mlp_params(rng)
  x_np, y_np = mlp_data(rng, batch=64)
  tx = pcgrad_optax.pcgrad(3)
  state0 = tx.init(params_np)
  _, stacked = jax.jit(pcgrad_optax.task_value_and_grad(mlp_task_losses))(
      params_np, x_np, y_np)
  update_ref, _ = jax.jit(tx.update)(stacked, state0, params_np)

  mesh = make_mesh("dp", mode)

  def before(p, x, y, s):
    _, grads = pgs.task_value_and_grad(mlp_task_losses, "data")(p, x, y)
    return tx.update(grads, s, p)[0]

  def unchecked(p, x, y, s):
    # check_vma=False: gradients come out per device. sharding's helper
    # pmean-s them (right); the other output runs PCGrad on each device's
    # own batch and averages the updates afterwards (the wrong way round).
    right = before(p, x, y, s)
    _, grads = pcgrad_optax.task_value_and_grad(mlp_task_losses)(p, x, y)
    wrong = lax.pmean(tx.update(grads, s, p)[0], "data")
    return right, wrong

  with scope(mesh, mode):
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(x_np, batch)
    y = jax.device_put(y_np, batch)
    in_specs = (P(), P("data"), P("data"), P())
    checked = jax.jit(shard_map(before, mesh, mode, in_specs=in_specs,
                                out_specs=P()))(params_np, x, y, state0)
    right, wrong = jax.jit(shard_map(
        unchecked, mesh, mode, in_specs=in_specs, out_specs=P(),
        check_vma=False))(params_np, x, y, state0)
  assert_tree_close(checked, update_ref, rtol=1e-4, atol=1e-6)
  assert_tree_close(right, update_ref, rtol=1e-4, atol=1e-6)
  gap = max(float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
            for a, r in zip(jax.tree.leaves(wrong),
                            jax.tree.leaves(update_ref)))
  assert gap > 1e-3, gap


def test_gram_matrix_rejects_unaveraged_data_axis():
  mesh = make_mesh("tp", "explicit")
  g = np.ones((T, 8, 4), np.float32)
  with jax.set_mesh(mesh):
    fn = jax.shard_map(lambda g: pgs.gram_matrix(g, "model"),
                       in_specs=P(None, "data", "model"), out_specs=P())
    with pytest.raises(ValueError, match="average"):
      fn(jax.device_put(g, P(None, "data", "model")))
