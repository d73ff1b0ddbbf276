"""Scale: multi-device and multi-process checks (in child processes),
memory-lean paths.

The multi-device checks live in tests/multidevice/ and need 8 simulated CPU
devices, which JAX only accepts before it starts; this process already runs
JAX on one device, so they run in a fresh Python with JAX_NUM_CPU_DEVICES=8.
The multi-process check runs tests/multiprocess/worker.py as two processes
joined by jax.distributed (gloo) and compares them with this process.
The rest of this file checks pcgrad_optax.memory against float64 NumPy
references built from the formulas, and pcgrad_optax.sharding's validation
on one device.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pcgrad_optax
from pcgrad_optax import memory
from pcgrad_optax import sharding

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_multidevice_checks():
  """tests/multidevice on 8 simulated CPU devices, in a child process."""
  env = dict(os.environ)
  env["JAX_NUM_CPU_DEVICES"] = "8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PCGRAD_OPTAX_MULTIDEVICE"] = "1"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f]
  # The checks are about values and shardings, not speed: skip LLVM's
  # expensive optimisations to compile the many small programs faster.
  flags += ["--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true"]
  env["XLA_FLAGS"] = " ".join(flags)
  cmd = [sys.executable, "-m", "pytest", "-q", "-rs",
         os.path.join(TESTS, "multidevice")]
  if importlib.util.find_spec("xdist") is not None:
    # One process: the suite's other worker already uses the second core,
    # and extra workers would each recompile the cached references.
    cmd[3:3] = ["-n", "0"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  if proc.returncode != 0:
    pytest.fail(
        f"multi-device checks failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-30000:]}\n{proc.stderr[-5000:]}", pytrace=False)
  assert " passed" in proc.stdout, proc.stdout[-3000:]


# ---------------------------------------------------------------------------
# Two processes, one 2-device system (jax.distributed on localhost, gloo).

WORKER = os.path.join(TESTS, "multiprocess", "worker.py")
MULTIPROCESS_TIMEOUT_S = 300   # both workers together, start to finish
MULTIPROCESS_RTOL = 5e-7       # measured: <= 1.1e-7 (f32, 3 Adam steps)


def _load_worker():
  spec = importlib.util.spec_from_file_location("multiprocess_worker",
                                                WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)   # no side effects: main() is guarded
  return module


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_workers(tmp_path, attempt: int):
  """Starts both workers on a free port: (processes, log paths, outputs)."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"])
  port = _free_port()
  outs = [tmp_path / f"out{attempt}_{i}.npz" for i in range(2)]
  logs = [tmp_path / f"log{attempt}_{i}.txt" for i in range(2)]
  procs = []
  for i in range(2):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, str(i), str(port), str(outs[i]),
           str(tmp_path / f"ckpt{attempt}")],
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs, logs, outs


def _wait_or_kill(procs, deadline: float) -> list[int]:
  """Exit codes; whichever worker fails first gets its peer killed at once
  (the peer would wait for it until jax.distributed's own timeouts), and
  both are killed at the deadline (exit codes < 0)."""
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [p.returncode for p in procs]


def test_two_processes_equal_one(tmp_path):
  """FSDP and data-parallel training over two jax.distributed processes
  (one CPU device each, gloo collectives) equals one process, for pcgrad,
  mgda (a solver) and gradvac (state: EMA targets and a key)."""
  worker = _load_worker()
  want = None
  for attempt in range(2):
    started = time.monotonic()
    procs, logs, outs = _start_workers(tmp_path, attempt)
    try:
      if want is None:   # the reference, while the workers start up
        want = {m: worker.reference(m) for m in worker.METHODS}
    finally:
      codes = _wait_or_kill(procs, started + MULTIPROCESS_TIMEOUT_S)
    logs = [log.read_text() for log in logs]
    if worker.GLOO_UNAVAILABLE in codes:
      pytest.skip("jax.distributed on CPU needs gloo collectives, which this "
                  "jax/jaxlib lacks: " + logs[codes.index(
                      worker.GLOO_UNAVAILABLE)].strip()[-300:])
    in_use = any("address already in use" in log.lower() for log in logs)
    if codes == [0, 0] or not in_use:
      break       # else: the free port was taken meanwhile; try another
  if codes != [0, 0]:
    pytest.fail(
        f"multi-process workers exited {codes} (negative: killed) after "
        f"{time.monotonic() - started:.0f}s (limit "
        f"{MULTIPROCESS_TIMEOUT_S}s):\n" +
        "\n".join(f"--- process {i} ---\n{log[-6000:]}"
                  for i, log in enumerate(logs)), pytrace=False)
  got = [np.load(out) for out in outs]
  init = worker.init_params()
  worst = 0.0
  for method in worker.METHODS:
    for name, ref in want[method].items():
      # Training moved the params (the check is not about the start).
      assert np.max(np.abs(ref - init[name])) > 1e-2 * np.max(np.abs(ref))
      for layout in worker.LAYOUTS:
        key = f"{method}/{layout}/{name}"
        np.testing.assert_array_equal(got[0][key], got[1][key])
        err = float(np.max(np.abs(got[0][key] - ref)) / np.max(np.abs(ref)))
        worst = max(worst, err)
        assert err <= MULTIPROCESS_RTOL, (key, err)
  # The methods differ from each other: the surgery shows in the result.
  for a, b in [("pcgrad", "mgda"), ("pcgrad", "gradvac")]:
    gap = max(float(np.max(np.abs(want[a][n] - want[b][n])))
              for n in want[a])
    assert gap > 1e-4, (a, b, gap)
  print(f"two processes vs one: max relative error {worst:.1e}")


# ---------------------------------------------------------------------------
# A linear multi-task model with a closed-form Jacobian.
#   h = X W + b   (B, k);  task t reads out z_t = h c_t;
#   L_t = 0.5 * mean_b (z_t - y_t)^2
#   dL_t/dW = X^T r_t c_t^T / B,  dL_t/db = mean(r_t) c_t,  r_t = z_t - y_t.

def make_problem(t: int, seed: int = 0, batch: int = 6, d: int = 4,
                 k: int = 3):
  rng = np.random.default_rng(seed)
  params = {"W": rng.standard_normal((d, k)), "b": rng.standard_normal(k)}
  data = {"x": rng.standard_normal((batch, d)),
          "c": rng.standard_normal((t, k)),
          "y": rng.standard_normal((batch, t))}
  return params, data


def task_losses(params, x, c, y):
  h = x @ params["W"] + params["b"]
  z = h @ c.T
  return 0.5 * jnp.mean((z - y) ** 2, axis=0)


def np_jacobian(params, data):
  """(T, P) float64 Jacobian, columns ordered W (row-major) then b."""
  x, c, y = data["x"], data["c"], data["y"]
  r = (x @ params["W"] + params["b"]) @ c.T - y          # (B, T)
  b = x.shape[0]
  jw = np.einsum("bd,bt,tk->tdk", x, r, c) / b           # (T, d, k)
  jb = r.mean(0)[:, None] * c                            # (T, k)
  return np.concatenate([jw.reshape(len(c), -1), jb], 1)


def as_f32(params, data):
  f = lambda a: jnp.asarray(a, jnp.float32)
  return jax.tree.map(f, params), jax.tree.map(f, data)


def flat(tree_stacked, t):
  return np.concatenate([np.asarray(tree_stacked["W"], np.float64).reshape(
      t, -1), np.asarray(tree_stacked["b"], np.float64).reshape(t, -1)], 1)


def np_pcgrad(grads: np.ndarray, order: np.ndarray) -> np.ndarray:
  """Algorithm 1 of Yu et al. (2020), sum reduction, fixed orders."""
  out = np.zeros(grads.shape[1])
  for i in range(len(grads)):
    g = grads[i].copy()
    for j in order[i]:
      sq = grads[j] @ grads[j]
      if j != i and g @ grads[j] < 0 and sq > 0:
        g = g - (g @ grads[j]) / sq * grads[j]
    out += g
  return out


def random_orders(t, seed):
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(t) for _ in range(t)])


# ---------------------------------------------------------------------------
# memory.task_value_and_grad

@pytest.mark.parametrize("chunk", [None, 1, 3, 5, 8])
def test_chunked_task_grads_match_reference(chunk):
  params, data = make_problem(5)
  p32, d32 = as_f32(params, data)
  fn = memory.task_value_and_grad(task_losses, tasks_per_chunk=chunk)
  losses, grads = jax.jit(fn)(p32, **d32)
  jac = np_jacobian(params, data)
  np.testing.assert_allclose(flat(grads, 5), jac, rtol=1e-5, atol=1e-6)
  assert losses.shape == (5,)


def test_chunked_task_grads_bf16_storage_and_f32_gram():
  params, data = make_problem(4, seed=1)
  p32, d32 = as_f32(params, data)
  fn = memory.task_value_and_grad(task_losses, tasks_per_chunk=3,
                                  dtype=jnp.bfloat16)
  _, grads = jax.jit(fn)(p32, **d32)
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  jac = np_jacobian(params, data)
  np.testing.assert_allclose(flat(grads, 4), jac, rtol=1e-2,
                             atol=1e-2 * np.abs(jac).max())
  gram = pcgrad_optax.gram_matrix(grads)
  assert gram.dtype == jnp.float32
  np.testing.assert_allclose(gram, jac @ jac.T, rtol=3e-2,
                             atol=3e-2 * np.abs(jac @ jac.T).max())


def test_chunked_task_grads_argnums_and_aux():
  params, data = make_problem(3, seed=2)
  p32, d32 = as_f32(params, data)

  def losses_aux(x, p):
    return task_losses(p, x, d32["c"], d32["y"]), {"n": 1}

  fn = memory.task_value_and_grad(losses_aux, tasks_per_chunk=2,
                                  argnums=(1,), has_aux=True)
  (losses, aux), (grads,) = jax.jit(fn)(d32["x"], p32)
  assert int(aux["n"]) == 1 and losses.shape == (3,)
  np.testing.assert_allclose(flat(grads, 3), np_jacobian(params, data),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_chunk_size_validation(bad):
  with pytest.raises(ValueError, match="tasks_per_chunk"):
    memory.task_value_and_grad(task_losses, tasks_per_chunk=bad)
  with pytest.raises(ValueError, match="tasks_per_chunk"):
    memory.streaming_aggregate(task_losses, lambda k: k[0],
                               tasks_per_chunk=bad)


def test_losses_must_be_a_vector():
  scalar = lambda p: jnp.sum(p ** 2)
  with pytest.raises(ValueError, match=r"\(T,\) vector"):
    memory.task_value_and_grad(scalar, tasks_per_chunk=2)(jnp.ones(3))
  with pytest.raises(ValueError, match=r"\(T,\) vector"):
    memory.streaming_aggregate(scalar, lambda k: k[0])(jnp.ones(3))


# ---------------------------------------------------------------------------
# memory.streaming_aggregate


def normalized_weights(gram):
  """sum_t g_t / |g_t|, written for jnp and (below) NumPy."""
  return 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 1e-30))


@pytest.mark.parametrize("chunk", [None, 1, 2, 4])
def test_streaming_matches_reference(chunk):
  t = 4
  params, data = make_problem(t, seed=3)
  p32, d32 = as_f32(params, data)
  fn = memory.streaming_aggregate(task_losses, normalized_weights,
                                  tasks_per_chunk=chunk)
  losses, update, gram, weights = jax.jit(fn)(p32, **d32)
  jac = np_jacobian(params, data)
  gram_ref = jac @ jac.T
  np.testing.assert_allclose(gram, gram_ref, rtol=1e-5,
                             atol=1e-6 * np.abs(gram_ref).max())
  w_ref = 1.0 / np.sqrt(np.diag(gram_ref))
  np.testing.assert_allclose(weights, w_ref, rtol=1e-5)
  np.testing.assert_allclose(flat(jax.tree.map(lambda u: u[None], update), 1)
                             [0], w_ref @ jac, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses, np.asarray(task_losses(p32, **d32)),
                             rtol=1e-6)


def test_streaming_pcgrad_matches_algorithm_1():
  t = 5
  params, data = make_problem(t, seed=4)
  p32, d32 = as_f32(params, data)
  order = random_orders(t, 4)
  fn = memory.streaming_aggregate(
      task_losses,
      lambda k: pcgrad_optax.weighting.pcgrad(k, order=jnp.asarray(order)),
      tasks_per_chunk=2)
  _, update, _, _ = jax.jit(fn)(p32, **d32)
  want = np_pcgrad(np_jacobian(params, data), order)
  got = flat(jax.tree.map(lambda u: u[None], update), 1)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_streaming_shared_mask_and_reduction(reduction):
  t = 3
  params, data = make_problem(t, seed=5)
  p32, d32 = as_f32(params, data)
  fn = memory.streaming_aggregate(
      task_losses, normalized_weights, tasks_per_chunk=2,
      shared={"W": True, "b": False}, reduction=reduction)
  _, update, gram, _ = jax.jit(fn)(p32, **d32)
  jac = np_jacobian(params, data)
  nw = params["W"].size
  jw, jb = jac[:, :nw], jac[:, nw:]
  np.testing.assert_allclose(gram, jw @ jw.T, rtol=1e-5, atol=1e-6)
  scale = 1.0 / t if reduction == "mean" else 1.0
  w_ref = 1.0 / np.sqrt(np.diag(jw @ jw.T))
  np.testing.assert_allclose(np.ravel(update["W"]), scale * w_ref @ jw,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(update["b"], scale * jb.sum(0), rtol=1e-5,
                             atol=1e-6)


def test_streaming_equals_stacked_transform():
  """Same update as pcgrad() on task_value_and_grad's stacked gradients."""
  t = 4
  params, data = make_problem(t, seed=6)
  p32, d32 = as_f32(params, data)
  tx = pcgrad_optax.pcgrad(11)
  state = tx.init(p32)
  _, stacked = jax.jit(pcgrad_optax.task_value_and_grad(task_losses))(
      p32, **d32)
  want, _ = jax.jit(tx.update)(stacked, state, p32)
  step_key = jax.random.fold_in(state.key, state.count)
  fn = memory.streaming_aggregate(
      task_losses, lambda k: pcgrad_optax.weighting.pcgrad(k, key=step_key),
      tasks_per_chunk=3)
  _, got, _, _ = jax.jit(fn)(p32, **d32)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_streaming_edge_cases():
  # T = 1: the update is the single task's gradient.
  params, data = make_problem(1, seed=7)
  p32, d32 = as_f32(params, data)
  fn = memory.streaming_aggregate(
      task_losses, lambda k: pcgrad_optax.weighting.pcgrad(
          k, order=jnp.zeros((1, 1), jnp.int32)))
  _, update, _, _ = jax.jit(fn)(p32, **d32)
  np.testing.assert_allclose(flat(jax.tree.map(lambda u: u[None], update), 1)
                             [0], np_jacobian(params, data)[0], rtol=1e-5,
                             atol=1e-6)
  # Zero and opposite gradients stay finite.
  opposite = lambda p: jnp.stack([jnp.sum(p), -jnp.sum(p), 0.0 * p[0]])
  fn = memory.streaming_aggregate(
      opposite, lambda k: pcgrad_optax.weighting.pcgrad(
          k, key=jax.random.key(0)), tasks_per_chunk=2)
  _, update, gram, _ = jax.jit(fn)(jnp.ones(3))
  assert np.all(np.isfinite(update)) and np.all(np.isfinite(gram))
  np.testing.assert_allclose(gram, [[3, -3, 0], [-3, 3, 0], [0, 0, 0]])
  # Huge scale differences between tasks.
  scaled = lambda p: jnp.stack([1e6 * jnp.sum(p ** 2), 1e-6 * jnp.sum(p)])
  _, update, gram, weights = jax.jit(memory.streaming_aggregate(
      scaled, normalized_weights))(jnp.ones(2))
  np.testing.assert_allclose(weights, [1 / (2e6 * np.sqrt(2)),
                                       1 / (1e-6 * np.sqrt(2))], rtol=1e-5)
  np.testing.assert_allclose(update, np.sqrt(2) * np.ones(2), rtol=1e-5)


def test_streaming_bf16_params():
  t = 3
  params, data = make_problem(t, seed=8)
  pb = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  db = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), data)
  _, update, gram, _ = jax.jit(memory.streaming_aggregate(
      task_losses, normalized_weights, tasks_per_chunk=2))(pb, **db)
  assert gram.dtype == jnp.float32
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(update))
  jac = np_jacobian(params, data)
  w_ref = 1.0 / np.sqrt(np.diag(jac @ jac.T))
  got = flat(jax.tree.map(lambda u: u[None], update), 1)[0]
  np.testing.assert_allclose(got, w_ref @ jac, rtol=0.1,
                             atol=0.05 * np.abs(w_ref @ jac).max())


def test_streaming_validation():
  params, data = make_problem(3)
  p32, d32 = as_f32(params, data)
  with pytest.raises(ValueError, match=r"weighting returned shape \(2,\)"):
    memory.streaming_aggregate(task_losses, lambda k: k[0, :2])(p32, **d32)
  with pytest.raises(ValueError, match="argnums"):
    memory.streaming_aggregate(task_losses, normalized_weights,
                               argnums=(0,))
  with pytest.raises(ValueError, match="reduction"):
    memory.streaming_aggregate(task_losses, normalized_weights,
                               reduction="median")
  with pytest.raises(ValueError, match="mask"):
    memory.streaming_aggregate(task_losses, normalized_weights,
                               shared={"W": True})(p32, **d32)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(t=st.integers(1, 6), chunk=st.integers(1, 7),
                  seed=st.integers(0, 2 ** 16))
def test_streaming_gram_property(t, chunk, seed):
  """K = J J^T from VJPs then JVPs, whatever T and the chunking."""
  params, data = make_problem(t, seed=seed)
  p32, d32 = as_f32(params, data)
  _, _, gram, _ = jax.jit(memory.streaming_aggregate(
      task_losses, normalized_weights, tasks_per_chunk=chunk))(p32, **d32)
  jac = np_jacobian(params, data)
  np.testing.assert_allclose(gram, jac @ jac.T, rtol=1e-4,
                             atol=1e-5 * np.abs(jac @ jac.T).max())
  np.testing.assert_array_equal(gram, np.asarray(gram).T)


# ---------------------------------------------------------------------------
# sharding: helpers and validation on one device (the real multi-device
# behaviour is in tests/multidevice).

def test_stacked_sharding():
  mesh = jax.make_mesh((1,), ("model",))
  specs = {"w": P(None, "model"), "b": P()}
  assert sharding.stacked_sharding(specs) == {"w": P(None, None, "model"),
                                              "b": P(None)}
  named = sharding.stacked_sharding(NamedSharding(mesh, P("model")))
  assert named == NamedSharding(mesh, P(None, "model"))
  arr = jax.device_put(jnp.ones(4), NamedSharding(mesh, P("model")))
  assert sharding.stacked_sharding(arr) == NamedSharding(mesh,
                                                         P(None, "model"))
  with pytest.raises(ValueError, match="PartitionSpec"):
    sharding.stacked_sharding({"w": "model"})


def test_sharding_helpers_need_shard_map():
  g = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="not a manual axis"):
    sharding.gram_matrix(g, "model")
  with pytest.raises(ValueError, match="not a manual axis"):
    sharding.aggregate(g, lambda k: jnp.ones(2), "model")
  with pytest.raises(ValueError, match="not a manual axis"):
    sharding.task_value_and_grad(lambda w: jnp.stack([w.sum()]), "data")(
        jnp.ones(3))
  with pytest.raises(ValueError, match="axis_name"):
    sharding.gram_matrix(g, ())


def test_sharding_gram_needs_type_checking():
  mesh = jax.make_mesh((1,), ("model",))
  with jax.set_mesh(mesh):
    fn = jax.shard_map(lambda g: sharding.gram_matrix(g, "model"),
                       in_specs=P(), out_specs=P(), check_vma=False)
    with pytest.raises(ValueError, match="check_vma"):
      fn(jnp.ones((2, 3)))


def test_sharding_aggregate_one_device_mesh():
  """On a 1-device mesh, sharding.aggregate == the reference PCGrad."""
  t = 4
  params, data = make_problem(t, seed=9)
  jac = np_jacobian(params, data)
  order = random_orders(t, 9)
  mesh = jax.make_mesh((1,), ("model",))
  stacked = jax.device_put(jnp.asarray(jac, jnp.float32),
                           NamedSharding(mesh, P(None, "model")))

  def local(g):
    update, gram, weights = sharding.aggregate(
        {"g": g}, lambda k: pcgrad_optax.weighting.pcgrad(
            k, order=jnp.asarray(order)), "model", reduction="mean")
    return update["g"], gram

  with jax.set_mesh(mesh):
    update, gram = jax.shard_map(local, in_specs=P(None, "model"),
                                 out_specs=(P("model"), P()))(stacked)
  np.testing.assert_allclose(gram, jac @ jac.T, rtol=1e-5,
                             atol=1e-6 * np.abs(jac @ jac.T).max())
  np.testing.assert_allclose(update, np_pcgrad(jac, order) / t, rtol=1e-4,
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"weighting returned shape"):
    with jax.set_mesh(mesh):
      jax.shard_map(lambda g: sharding.aggregate(
          {"g": g}, lambda k: jnp.ones(3), "model")[1],
                    in_specs=P(None, "model"), out_specs=P())(stacked)
