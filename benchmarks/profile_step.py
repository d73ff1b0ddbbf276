"""Where a jitted multi-task step spends its time on XLA:CPU.

Run from the repository root (``/work/venv`` or any venv with jax, optax,
flax and this checkout on ``PYTHONPATH``)::

    python benchmarks/profile_step.py ops     # per-op profile of the step
    python benchmarks/profile_step.py repro   # minimal reproducers, timed
    python benchmarks/profile_step.py compare # before/after the CPU loop
    python benchmarks/profile_step.py gram    # the Gram engine's CPU forms
    python benchmarks/profile_step.py alloc   # cost of fresh big buffers

``ops``: for the MLP and the CNN of ``bench_step.py`` at T = 2, 8, 32, one
jitted step (stacked per-task gradients + ``pcgrad(shared=trunk)`` + Adam)
with the pullbacks as a ``vmap`` and as a ``lax.map``: the compiled HLO's
flops and temp bytes (``cost_analysis``, ``memory_analysis``), the bytes
written by ``transpose``/``copy`` instructions of a ``T x ...`` shape, and
the heaviest ops of two profiled calls (``jax.profiler`` trace read back
with ``jax.profiler.ProfileData``; the op names are the HLO fusions').

``repro``: the claims of ``benchmarks/results/step_profile.md``, each on a
minimal program, the variants timed interleaved in one process (medians).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import pcgrad_optax
from pcgrad_optax._task_value_and_grad import losses_and_vjp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import cnn_setup, mlp_losses, mlp_mask, mlp_params  # pylint: disable=g-import-not-at-top,wrong-import-position


def interleaved(fns, rounds=7, calls=2):
  """Median ms per call of each zero-argument fn, rounds interleaved."""
  for f in fns.values():
    f()
  samples = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(calls):
        f()
      samples[k].append((time.perf_counter() - t0) / calls * 1e3)
  return {k: statistics.median(s) for k, s in samples.items()}


def setup(model, t):
  if model == "mlp":
    params = jax.tree.map(jnp.asarray,
                          mlp_params([512, 1024, 1024, 512], t, 10))
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.standard_normal((256, 512)), jnp.float32),
             jnp.asarray(rng.integers(0, 10, (256, t))))
    return params, mlp_losses, mlp_mask, batch
  return cnn_setup(t, 128, 32)


def step_fn(loss_fn, mask, pull):
  opt = optax.adam(1e-3)
  agg = pcgrad_optax.pcgrad(key=0, shared=mask)

  @jax.jit
  def step(p, s, a, *b):
    losses, vjp_fn, _ = losses_and_vjp(loss_fn, 0, False, (p,) + b, {}, "")
    basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
    (g,) = (jax.vmap(vjp_fn)(basis) if pull == "vmap"
            else lax.map(vjp_fn, basis))
    u, a = agg.update(g, a, p)
    u, s = opt.update(u, s, p)
    return optax.apply_updates(p, u), s, a
  return step, opt, agg


_INSTR = re.compile(r"= (f32|bf16|f16)\[([0-9,]*)\]\{[0-9,]*\} "
                    r"(transpose|copy)\(")


def task_axis_copy_bytes(hlo: str, t: int) -> int:
  """Bytes written by transpose/copy instructions of shape (T, ...) >= 1 MiB."""
  total = 0
  for m in _INSTR.finditer(hlo):
    dims = [int(d) for d in m.group(2).split(",") if d]
    size = int(np.prod(dims)) * 4
    if dims and dims[0] == t and size >= 1 << 20:
      total += size
  return total


def top_ops(fn, args, calls=2, top=6):
  """``(ms per call, [(op, ms per call)])`` from a jax.profiler trace."""
  jax.block_until_ready(fn(*args))
  d = tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(d)
  t0 = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(fn(*args))
  wall = (time.perf_counter() - t0) / calls * 1e3
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for ev in line.events:
        if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          per_op[ev.name] += ev.duration_ns / calls / 1e6
  return wall, per_op.most_common(top)


def ops(args):
  for model in args.models:
    for t in args.tasks:
      params, loss_fn, mask, batch = setup(model, t)
      for pull in ("vmap", "map"):
        if model == "cnn" and pull == "map" and t > 2:
          print(f"\n## {model} T={t} {pull}: skipped (seconds per step, see "
                "T=2)", flush=True)
          continue
        step, opt, agg = step_fn(loss_fn, mask, pull)
        a = (params, opt.init(params), agg.init(params)) + tuple(batch)
        compiled = step.lower(*a).compile()
        hlo = compiled.as_text()
        flops = compiled.cost_analysis()["flops"]
        temp = compiled.memory_analysis().temp_size_in_bytes
        copies = task_axis_copy_bytes(hlo, t)
        wall, top = top_ops(step, a)
        print(f"\n## {model} T={t} {pull}: {wall:.1f} ms/step (profiled), "
              f"{flops / 1e9:.2f} GFLOP, temp {temp / 2**20:.1f} MiB, "
              f"(T, ...) transposes/copies {copies / 2**20:.1f} MiB, "
              f"while loops {hlo.count(' while(')}, load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for name, ms in top:
          instr = re.search(rf"%{re.escape(name)} = ([^\n]*)", hlo)
          text = instr.group(1)[:110] if instr else ""
          print(f"  {ms:9.2f} ms  {name}: {text}", flush=True)


def repro(args):
  del args
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)

  # 1. Dense weight gradients X^T D_t of T cotangents, stacked (T, in, out).
  t, b, cin, cout = 8, 256, 1024, 1024
  x, d = f32(b, cin), f32(t, b, cout)
  one = lambda dt: x.T @ dt
  fns = {
      "vmap": jax.jit(lambda d: jax.vmap(one)(d)),
      "lax.map": jax.jit(lambda d: lax.map(one, d)),
      "python loop": jax.jit(lambda d: jnp.stack([one(d[i])
                                                   for i in range(t)])),
      "one matmul (no task axis)": jax.jit(lambda d: x.T @ d[0]),
  }
  hlo = fns["vmap"].lower(d).compile().as_text()
  print(f"\n### 1. X^T D_t, X {x.shape}, D {d.shape}; vmap's HLO has "
        f"{task_axis_copy_bytes(hlo, t) / 2**20:.0f} MiB of (T, ...) "
        "transposes/copies; load "
        f"{os.getloadavg()[0]:.1f}")
  for k, ms in interleaved({k: (lambda f=f: jax.block_until_ready(f(d)))
                            for k, f in fns.items()}).items():
    print(f"  {k:28s} {ms:8.2f} ms")

  # 2. The same, consumed by a Gram matrix and a weighted sum in one jit.
  def consume(g):
    flat = g.reshape(t, -1)
    k = flat @ flat.T
    w = jnp.linalg.solve(k + jnp.eye(t), jnp.ones(t))
    return jnp.tensordot(w, g, 1)
  fns = {"vmap + Gram + sum": jax.jit(lambda d: consume(jax.vmap(one)(d))),
         "lax.map + Gram + sum": jax.jit(lambda d: consume(lax.map(one, d)))}
  hlo = fns["vmap + Gram + sum"].lower(d).compile().as_text()
  print(f"\n### 2. consumed in the same jit; vmap's HLO has "
        f"{task_axis_copy_bytes(hlo, t) / 2**20:.0f} MiB of (T, ...) "
        "transposes/copies")
  for k, ms in interleaved({k: (lambda f=f: jax.block_until_ready(f(d)))
                            for k, f in fns.items()}).items():
    print(f"  {k:28s} {ms:8.2f} ms")

  # 3. jnp.sum over the task axis fused after the vmapped matmul.
  fns = {"vmap then sum(axis=0)": jax.jit(
      lambda d: jnp.sum(jax.vmap(one)(d), 0)),
         "x^T (sum_t D_t)": jax.jit(lambda d: x.T @ jnp.sum(d, 0))}
  print("\n### 3. sum over the task axis after the vmapped matmul")
  for k, ms in interleaved({k: (lambda f=f: jax.block_until_ready(f(d)))
                            for k, f in fns.items()}).items():
    print(f"  {k:28s} {ms:8.2f} ms")

  # 4. A convolution's kernel gradient inside a loop body.
  t = 2
  xi, kern = f32(128, 12, 12, 32), f32(3, 3, 32, 64)
  conv = lambda k: lax.conv_general_dilated(
      xi, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, pull = jax.vjp(conv, kern)
  dd = f32(t, 128, 12, 12, 64)
  fns = {"vmap": jax.jit(lambda d: jax.vmap(pull)(d)),
         "lax.map": jax.jit(lambda d: lax.map(pull, d)),
         "python loop": jax.jit(lambda d: [pull(d[i]) for i in range(t)])}
  hlo = fns["lax.map"].lower(dd).compile().as_text()
  labels = sorted(set(re.findall(r"dim_labels=(\S+?)[,}]", hlo)))
  print(f"\n### 4. conv kernel gradient, X {xi.shape}, K {kern.shape}, T={t};"
        f" dim_labels in lax.map's HLO: {labels}")
  for k, ms in interleaved({k: (lambda f=f: jax.block_until_ready(f(dd)))
                            for k, f in fns.items()}, rounds=5,
                           calls=1).items():
    print(f"  {k:28s} {ms:8.2f} ms")


def _engine_step(loss_fn, mask, opt, engine):
  """``value_and_aggregate(engine=...)`` + Adam: ``(step, state_fn)``."""
  agg = pcgrad_optax.pcgrad(key=0)
  inner = pcgrad_optax.value_and_aggregate(loss_fn, agg, engine=engine,
                                           shared=mask)

  def step(p, s, *b):
    a, o = s
    _, u, a = inner(p, a, *b)
    u, o = opt.update(u, o, p)
    return optax.apply_updates(p, u), (a, o)
  return step, lambda params: (agg.init(params), opt.init(params))


def _runner(step, params, state, batch, patches=()):
  """``(run, compiled)``: the step compiled with ``patches`` (``(obj,
  name, value)``, undone after tracing) and a zero-argument call of it that
  carries its params and state on."""
  saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
  for obj, name, value in patches:
    setattr(obj, name, value)
  try:
    compiled = jax.jit(step).lower(params, state, *batch).compile()
  finally:
    for obj, name, value in saved:
      setattr(obj, name, value)
  box = [params, state]

  def run():
    box[0], box[1] = compiled(box[0], box[1], *batch)
    jax.block_until_ready(box[0])
  return run, compiled


def compare(args):
  """Before (vmap) / after (the CPU loop) on the stacked and the user path.

  ``stacked``: ``value_and_aggregate(engine="stacked")`` + Adam; ``user``:
  ``task_value_and_grad`` + ``optax.chain(pcgrad(shared=...), adam)``.
  "before" forces the ``vmap`` (``_core.cpu.loop_over_tasks`` patched to
  False while tracing), "after" is this checkout. Interleaved, medians.
  """
  from pcgrad_optax._core import cpu  # pylint: disable=g-import-not-at-top
  for model in args.models:
    for t in args.tasks:
      params, loss_fn, mask, batch = setup(model, t)
      opt = optax.adam(1e-3)
      fns = {}

      def build(kind, vmap):
        if kind == "adam":
          def step(p, s, *b):
            g = jax.grad(lambda q: jnp.sum(loss_fn(q, *b)))(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s
          state = opt.init(params)
        elif kind == "stacked":
          step, state_fn = _engine_step(loss_fn, mask, opt, "stacked")
          state = state_fn(params)
        else:
          chained = optax.chain(pcgrad_optax.pcgrad(key=0, shared=mask), opt)

          def step(p, s, *b):
            _, g = pcgrad_optax.task_value_and_grad(loss_fn)(p, *b)
            u, s = chained.update(g, s, p)
            return optax.apply_updates(p, u), s
          state = chained.init(params)
        patches = [(cpu, "loop_over_tasks", lambda _: False)] if vmap else []
        return _runner(step, params, state, batch, patches)[0]

      fns["adam"] = build("adam", False)
      for kind in ("stacked", "user"):
        for when, vmap in (("before", True), ("after", False)):
          fns[f"{kind} {when}"] = build(kind, vmap)
      load0 = os.getloadavg()[0]
      ms = interleaved(fns, rounds=args.rounds, calls=1)
      print(f"\n{model} T={t} (load {load0:.1f} -> "
            f"{os.getloadavg()[0]:.1f})", flush=True)
      for k, v in ms.items():
        print(f"  {k:16s} {v:9.1f} ms", flush=True)


def gram(args):
  """The Gram engine's CPU forms, before / after (``step_profile.md`` §5).

  MLP, ``value_and_aggregate`` + ``pcgrad`` + Adam. "Gram before" traces
  the Gram engine with its task pullbacks ``vmap``-ed and ``X X^T`` shared
  by the tasks (``_core.cpu.loop_over_tasks`` and ``broadcast_over_tasks``
  patched to False), "Gram after" is this checkout, "stacked" the stacked
  engine. Interleaved, medians, and XLA's temp bytes of each.
  """
  from pcgrad_optax._core import cpu  # pylint: disable=g-import-not-at-top
  before = [(cpu, "loop_over_tasks", lambda _: False),
            (cpu, "broadcast_over_tasks", lambda k, d: False)]
  for t in args.tasks:
    params, loss_fn, mask, batch = setup("mlp", t)
    opt = optax.adam(1e-3)
    fns, temps = {}, {}
    for name, engine, patches in (("Gram before", "gram", before),
                                  ("Gram after", "gram", []),
                                  ("stacked", "stacked", [])):
      step, state_fn = _engine_step(loss_fn, mask, opt, engine)
      fns[name], compiled = _runner(step, params, state_fn(params), batch,
                                    patches)
      temps[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    load0 = os.getloadavg()[0]
    ms = interleaved(fns, rounds=args.rounds, calls=1)
    print(f"\nmlp T={t} (load {load0:.1f} -> {os.getloadavg()[0]:.1f})",
          flush=True)
    for k, v in ms.items():
      print(f"  {k:12s} {v:9.1f} ms   temp {temps[k]:7.1f} MiB", flush=True)


def alloc(args):
  """A jitted ``x * 2`` of a 32 MiB array: the cost of fresh big buffers.

  Run it twice, once with the default allocator and once with
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` in the
  environment, to see what glibc's ``mmap`` of every block above its
  threshold (at most 32 MiB) costs a call (``step_profile.md`` §5).
  """
  x = jnp.ones((8, 1024, 1024), jnp.float32)
  double = jax.jit(lambda x: x * 2.0)
  ms = interleaved({"x * 2": lambda: jax.block_until_ready(double(x))},
                   rounds=args.rounds * 4, calls=1)
  print(f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_')}: "
        f"{ms['x * 2']:.2f} ms per call (load {os.getloadavg()[0]:.1f})")


def main():
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=["ops", "repro", "compare", "gram",
                                       "alloc"])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {os.cpu_count()} cores, 1-min load "
        f"{os.getloadavg()[0]:.1f}")
  {"ops": ops, "repro": repro, "compare": compare, "gram": gram,
   "alloc": alloc}[args.what](args)


if __name__ == "__main__":
  main()
