"""One of the two processes of tests/test_sharding.py's multi-process check.

Run by the test as ``python worker.py PROCESS_ID PORT OUT.npz CKPT_DIR``,
twice (the same CKPT_DIR, a folder both can write): two CPU processes on
this machine (one device each) join one 2-device system with
``jax.distributed`` and gloo collectives, and train the model below for
:data:`STEPS` steps with each of :data:`METHODS` in two layouts over the
2-device mesh:

  fsdp: ``jax.jit`` over explicitly sharded arrays, no ``jax.set_mesh``
        (how most tutorials place arrays), every param split over the
        "data" axis that also splits the batch (FSDP / ZeRO-3): each weight
        gathered just before use, its gradient reduce-scattered back by the
        transpose.
  dp:   params replicated, the batch split; inside ``jax.shard_map`` under
        ``jax.set_mesh``, per-task gradients averaged over "data" by
        ``sharding.task_value_and_grad`` before the surgery.

Each process loads only its own half of every batch
(``jax.make_array_from_process_local_data``); the trained params, gathered
with ``multihost_utils.process_allgather``, go to OUT.npz. One method's
sharded params and optimizer state are saved to CKPT_DIR and restored with
orbax by both processes. The test compares OUT.npz with :func:`reference`,
one process training on the whole batches.

The model and data are importable without side effects (the test imports
this file for :func:`reference`).
"""

from __future__ import annotations

import sys

import numpy as np

T, IN, HID, BATCH, STEPS = 3, 8, 16, 16, 3
METHODS = ("pcgrad", "mgda", "gradvac")
LAYOUTS = ("fsdp", "dp")
CHECKPOINTED = "gradvac"   # its fsdp params and state go through orbax
GLOO_UNAVAILABLE = 77   # exit status: this jaxlib has no gloo collectives


def make_tx(method: str):
  import optax
  import pcgrad_optax
  inner = {"pcgrad": lambda: pcgrad_optax.pcgrad(5),
           "mgda": pcgrad_optax.mgda,
           "gradvac": lambda: pcgrad_optax.gradvac(5, num_tasks=T,
                                                   beta=0.5)}[method]()
  return optax.chain(inner, optax.adam(1e-2))


def init_params() -> dict:
  rng = np.random.default_rng(0)
  return {"w1": (rng.standard_normal((IN, HID)) / 3).astype(np.float32),
          "b1": (rng.standard_normal(HID) / 10).astype(np.float32),
          "w2": (rng.standard_normal((HID, T)) / 4).astype(np.float32)}


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of one step; targets of opposite signs conflict."""
  rng = np.random.default_rng(100 + step)
  x = rng.standard_normal((BATCH, IN)).astype(np.float32)
  y = np.stack([x[:, 0] + x[:, 1], -x[:, 0], x[:, 2] - x[:, 1]], 1)
  return x, y.astype(np.float32)


def task_losses(p, x, y):
  """(T,) mean squared errors of a 1-hidden-layer MLP with T outputs."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  def gathered(w):   # FSDP: an explicitly sharded weight, gathered for use
    sharding = jax.typeof(w).sharding
    if any(s is not None for s in getattr(sharding, "spec", ())):
      w = jax.sharding.reshard(w, NamedSharding(sharding.mesh, P()))
    return w

  h = jnp.tanh(x @ gathered(p["w1"]) + gathered(p["b1"]))
  return jnp.mean((h @ gathered(p["w2"]) - y) ** 2, axis=0)


def reference(method: str) -> dict:
  """The params after STEPS steps in one process, whole batches, no mesh."""
  import jax
  import optax
  import pcgrad_optax
  tx = make_tx(method)

  @jax.jit
  def step(params, state, x, y):
    _, grads = pcgrad_optax.task_value_and_grad(task_losses)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = init_params()
  state = tx.init(params)
  for i in range(STEPS):
    params, state = step(params, state, *batch(i))
  return jax.tree.map(np.asarray, params)


def check_checkpoint(path: str, tree) -> None:
  """Orbax save and restore of sharded params and state, from every process
  (each writes its own shards; a process that skipped save would leave the
  others waiting); the restored tree equals the saved one, shards included."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(path, abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
      np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))


def gloo_missing() -> str | None:
  """Why this jax cannot run CPU collectives over gloo, or None."""
  import jax
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # noqa: BLE001  (no such option in this jax)
    return f"{type(e).__name__}: {e}"
  try:
    from jax._src.lib import _jax   # private: a hint where it exists
  except ImportError:
    return None                     # jax.devices() below will tell
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib was built without gloo TCP collectives"
  return None


def main(process_id: int, port: int, out: str, ckpt: str) -> None:
  import jax
  why = gloo_missing()
  if why is None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=process_id,
                               initialization_timeout=60,
                               shutdown_timeout_seconds=30)
    try:
      jax.devices()   # the CPU client and its gloo collectives start here
    except Exception as e:  # noqa: BLE001
      if "gloo" not in str(e).lower():
        raise
      why = f"{type(e).__name__}: {e}"
  if why is not None:
    print(f"gloo unavailable: {why}", file=sys.stderr)
    sys.exit(GLOO_UNAVAILABLE)

  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  import pcgrad_optax

  assert jax.process_count() == 2 and jax.device_count() == 2, (
      jax.process_count(), jax.devices())
  mesh = jax.make_mesh((2,), ("data",))      # both processes' devices
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  data = NamedSharding(mesh, P("data"))

  def local_batch(i):   # this process's rows only, as one global array
    return tuple(jax.make_array_from_process_local_data(data, a[mine])
                 for a in batch(i))

  def place(tree, specs):   # every process holds the whole initial value
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(
            a.shape, NamedSharding(mesh, s), lambda idx: a[idx]),
        tree, specs, is_leaf=lambda s: isinstance(s, P))

  results = {}
  for method in METHODS:
    tx = make_tx(method)
    # fsdp: jit over the mesh, params split like the batch.
    specs = {"w1": P("data", None), "b1": P("data"), "w2": P("data", None)}
    params = place(init_params(), specs)
    state = tx.init(params)

    @jax.jit
    def fsdp_step(params, state, x, y, tx=tx):
      _, grads = pcgrad_optax.task_value_and_grad(task_losses)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for i in range(STEPS):
      params, state = fsdp_step(params, state, *local_batch(i))
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
        specs, is_leaf=lambda s: isinstance(s, P))):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                            leaf.ndim), leaf.sharding
    results["fsdp"] = params
    if method == CHECKPOINTED:
      check_checkpoint(ckpt, {"params": params, "opt_state": state})

    # dp: shard_map, per-task gradients averaged over "data" first.
    def dp_local(params, state, x, y, tx=tx):
      _, grads = pcgrad_optax.sharding.task_value_and_grad(
          task_losses, "data")(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
      params = place(init_params(), jax.tree.map(lambda _: P(), specs))
      state = jax.jit(tx.init)(params)
      dp_step = jax.jit(jax.shard_map(
          dp_local, in_specs=(P(), P(), P("data"), P("data")),
          out_specs=(P(), P())))
      for i in range(STEPS):
        params, state = dp_step(params, state, *local_batch(i))
    results["dp"] = params

    for layout in LAYOUTS:
      gathered = multihost_utils.process_allgather(results[layout],
                                                   tiled=True)
      for name, value in gathered.items():
        results[f"{method}/{layout}/{name}"] = np.asarray(value)
    del results["fsdp"], results["dp"]
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
