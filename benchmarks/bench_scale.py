"""Scale: compile time, step time and peak memory against the number of tasks.

Run from the repository root::

    python benchmarks/bench_scale.py           # writes benchmarks/results/
                                               # scale.{md,png} (~5 min)
    python benchmarks/bench_scale.py --quick   # smoke run, small sizes

The model: a shared MLP trunk 256 -> 1024 -> 640 -> 128 (1,001,216 params,
the surgery's shared leaves) and one linear head per task on top (129 T
params, plain per-task gradients), a batch of 64 random inputs with one
regression target per task. One training step is::

    task losses -> per-task gradients -> PCGrad (shared trunk) -> Adam -> apply

jitted as one function, in three ways:

* ``stacked``: ``pcgrad_optax.task_value_and_grad`` (one forward pass, T
  backward passes as one vmapped VJP) -> ``pcgrad()``. Holds the ``T x P``
  float32 stacked gradients.
* ``chunked_bf16``: ``pcgrad_optax.memory.task_value_and_grad(
  tasks_per_chunk=16, dtype=bfloat16)`` -> ``pcgrad()``. The backward
  passes run 16 tasks at a time, the stacked gradients are stored in
  bfloat16 (half the bytes); the Gram matrix is still accumulated in f32.
* ``streaming``: ``pcgrad_optax.memory.streaming_aggregate(tasks_per_chunk=16)``
  with the PCGrad weighting: Gram columns from VJPs then JVPs, 16 tasks at a
  time, and the update as one VJP of the weighted loss. Never holds more
  than 16 task gradients.

Part 1 (this process): compile time and step time of ``stacked`` for
T = 1, 2, 4, ..., 256. Part 2 (one fresh subprocess per configuration, so
peaks do not mix): peak memory and time of each mode for T = 16, 64, 256.
Peak memory is measured twice: XLA's own buffer assignment of the compiled
step (``compiled.memory_analysis()``: arguments + outputs + temporaries -
aliased, i.e. the buffers XLA assigns for the step), and the process's
resident set size sampled every millisecond by a thread during the first
execution of the compiled step (peak RSS minus RSS just before; the first
execution is when XLA:CPU allocates the step's buffers, which then stay
resident), plus the process's lifetime peak RSS (``ru_maxrss``, which also
counts compilation and the Python/JAX runtime). JAX exposes no device memory
statistics on CPU (``device.memory_stats()`` is None).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import load1  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
DIMS = (256, 1024, 640, 128)     # trunk: 1,001,216 params
BATCH = 64
CHUNK = 16
MODES = ("stacked", "chunked_bf16", "streaming")


def build(t: int, mode: str, dims=DIMS, batch=BATCH, chunk=CHUNK):
  """(jitted step, args) for T tasks in the given mode."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import pcgrad_optax
  from pcgrad_optax import memory

  rng = np.random.default_rng(0)
  trunk = []
  for d_in, d_out in zip(dims[:-1], dims[1:]):
    trunk.append({"kernel": jnp.asarray(
        rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32),
                  "bias": jnp.zeros(d_out, jnp.float32)})
  params = {"trunk": trunk,
            "heads": {"kernel": jnp.asarray(
                rng.standard_normal((dims[-1], t)) / np.sqrt(dims[-1]),
                jnp.float32), "bias": jnp.zeros(t, jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((batch, dims[0])), jnp.float32)
  y = jnp.asarray(rng.standard_normal((batch, t)), jnp.float32)
  shared = {"trunk": True, "heads": False}

  def task_losses(p, x, y):
    h = x
    for layer in p["trunk"]:
      h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
    z = h @ p["heads"]["kernel"] + p["heads"]["bias"]      # (B, T)
    return jnp.mean((z - y) ** 2, axis=0)

  adam = optax.adam(1e-3)
  if mode == "streaming":
    tx_state = (adam.init(params), jax.random.key(0), jnp.zeros([], jnp.int32))

    def step(p, s, x, y):
      adam_state, key, count = s
      step_key = jax.random.fold_in(key, count)
      _, update, _, _ = memory.streaming_aggregate(
          task_losses,
          lambda k: pcgrad_optax.weighting.pcgrad(k, key=step_key),
          tasks_per_chunk=chunk, shared=shared)(p, x, y)
      update, adam_state = adam.update(update, adam_state, p)
      return optax.apply_updates(p, update), (adam_state, key, count + 1)
  else:
    tx = optax.chain(pcgrad_optax.pcgrad(shared=shared), adam)
    tx_state = tx.init(params)
    if mode == "stacked":
      grad_fn = pcgrad_optax.task_value_and_grad(task_losses)
    elif mode == "chunked_bf16":
      grad_fn = memory.task_value_and_grad(task_losses, tasks_per_chunk=chunk,
                                           dtype=jnp.bfloat16)
    else:
      raise ValueError(mode)

    def step(p, s, x, y):
      _, grads = grad_fn(p, x, y)
      update, s = tx.update(grads, s, p)
      return optax.apply_updates(p, update), s

  n_shared = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trunk))
  return jax.jit(step), (params, tx_state, x, y), n_shared


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Samples the resident set size every millisecond in a thread."""

  def __enter__(self):
    self.before = rss_bytes()
    self.peak = self.before
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def compile_and_time(t: int, mode: str, reps: int, **kw) -> dict:
  import jax
  t0 = time.perf_counter()
  fn, args, n_shared = build(t, mode, **kw)
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  # The first execution allocates XLA's buffers (they stay resident for
  # later calls), so it is the one whose RSS growth shows the step's needs.
  with PeakRSS() as first:
    s = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    first_s = time.perf_counter() - s
  del out
  # Steps of several seconds: the first call's time is as good as any and
  # saves minutes on a shared machine.
  times = [first_s] if first_s > 5.0 else []
  for _ in range(reps if not times else 0):
    s = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - s)
    del out
  xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
              + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {"T": t, "mode": mode, "P": n_shared,
          "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
          "step_s": statistics.median(times), "reps": reps,
          "xla_temp_bytes": mem.temp_size_in_bytes,
          "xla_args_bytes": mem.argument_size_in_bytes,
          "xla_peak_bytes": xla_peak,
          "rss_before_bytes": first.before,
          "rss_step_bytes": first.peak - first.before,
          "maxrss_bytes": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(argv):
  t, mode = int(argv[0]), argv[1]
  kw = json.loads(argv[2]) if len(argv) > 2 else {}
  print(json.dumps(compile_and_time(t, mode, reps=1, **kw)))


def gib(b):
  return b / 2 ** 30


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true",
                      help="small sizes, seconds; writes nothing by default")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  parser.add_argument("--from-json", action="store_true",
                      help="rewrite scale.md/png from the saved scale.json")
  args = parser.parse_args()
  if args.from_json:
    with open(os.path.join(args.out, "scale.json")) as f:
      saved = json.load(f)
    plot(saved["timing"], saved["memory"], os.path.join(args.out, "scale.png"))
    write_md(saved["timing"], saved["memory"],
             os.path.join(args.out, "scale.md"), **saved["run"])
    return

  kw = {}
  if args.quick:
    kw = {"dims": [64, 128, 32], "batch": 16, "chunk": 4}
    time_ts, mem_ts = (1, 4, 16), (4, 16)
  else:
    time_ts, mem_ts = tuple(2 ** i for i in range(9)), (4, 16, 64, 256)
  import jax
  load_start = load1()
  started = time.time()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, 1-min load {load_start:.2f}", flush=True)

  timing = []
  for t in time_ts:
    reps = 5 if t <= 32 else 3 if t <= 64 else 1
    row = compile_and_time(t, "stacked", reps, **kw)
    timing.append(row)
    print(f"[time] T={t:4d} compile {row['compile_s']:.2f} s, trace+lower "
          f"{row['trace_lower_s']:.2f} s, step {row['step_s'] * 1e3:.1f} ms",
          flush=True)

  memrows = []
  for t in mem_ts:
    for mode in MODES:
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--child", str(t), mode,
           json.dumps(kw)], capture_output=True, text=True, check=False,
          env=dict(os.environ, JAX_PLATFORMS="cpu"))
      if proc.returncode != 0:
        raise RuntimeError(f"child T={t} {mode} failed:\n{proc.stderr}")
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      memrows.append(row)
      print(f"[mem] T={t:4d} {mode:13s} T*P*4 {gib(4 * t * row['P']):.3f} "
            f"GiB, XLA peak {gib(row['xla_peak_bytes']):.3f} GiB, RSS step "
            f"{gib(row['rss_step_bytes']):.3f} GiB, step "
            f"{row['step_s']:.2f} s", flush=True)

  elapsed = time.time() - started
  load_end = load1()
  if args.quick:
    print(f"quick run done in {elapsed:.0f} s")
    return
  os.makedirs(args.out, exist_ok=True)
  plot(timing, memrows, os.path.join(args.out, "scale.png"))
  write_md(timing, memrows, os.path.join(args.out, "scale.md"), load_start,
           load_end, elapsed)
  with open(os.path.join(args.out, "scale.json"), "w") as f:
    json.dump({"timing": timing, "memory": memrows,
               "run": {"load_start": load_start, "load_end": load_end,
                       "elapsed": elapsed,
                       "date": str(datetime.date.today())}}, f, indent=1)
  print(f"wrote {args.out}/scale.md, scale.png, scale.json in {elapsed:.0f} s")


def plot(timing, memrows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  ts = [r["T"] for r in timing]
  a.plot(ts, [r["compile_s"] for r in timing], "o-", label="compile, stacked")
  a.plot(ts, [r["step_s"] for r in timing], "s-", label="step, stacked")
  for mode, marker in zip(MODES[1:], "^v"):
    rows = [r for r in memrows if r["mode"] == mode]
    a.plot([r["T"] for r in rows], [r["step_s"] for r in rows],
           marker + ":", label=f"step, {mode}")
  a.set_xscale("log", base=2)
  a.set_yscale("log")
  a.set_xlabel("tasks T")
  a.set_ylabel("seconds")
  a.set_title("PCGrad training step, 1M shared params")
  a.legend()
  a.grid(alpha=0.3)
  for mode, marker in zip(MODES, "os^"):
    rows = [r for r in memrows if r["mode"] == mode]
    tp = [r["T"] * r["P"] for r in rows]
    b.plot(tp, [gib(r["xla_peak_bytes"]) for r in rows], marker + "-",
           label=f"{mode} (XLA peak)")
    b.plot(tp, [gib(r["rss_step_bytes"]) for r in rows], marker + ":",
           alpha=0.6, label=f"{mode} (RSS during step)")
  rows = [r for r in memrows if r["mode"] == MODES[0]]
  tp = [r["T"] * r["P"] for r in rows]
  b.plot(tp, [gib(4 * x) for x in tp], "k--", lw=1, label="T*P*4 bytes")
  b.set_xscale("log")
  b.set_yscale("log")
  b.set_xlabel("T x P (stacked gradient numbers)")
  b.set_ylabel("GiB")
  b.set_title("peak memory of one training step")
  b.legend(fontsize=7)
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_md(timing, memrows, path, load_start, load_end, elapsed,
             date=None):
  import jax
  p = timing[0]["P"]
  lines = [
      "# Scale: many tasks, big models",
      "",
      f"Generated by `python benchmarks/bench_scale.py` on "
      f"{date or datetime.date.today()}: jax {jax.__version__}, CPU "
      f"({platform.processor() or platform.machine()}, {os.cpu_count()} "
      f"cores), 1-min load {load_start:.1f} at start and {load_end:.1f} at "
      f"the end, {elapsed:.0f} s in all."
      + (" **The machine was shared** (1-min load above its 2 cores): "
         "absolute times are inflated and noisy; memory is not affected."
         if max(load_start, load_end or 0) >= 2 else ""),
      "",
      f"Model: shared MLP trunk {' -> '.join(map(str, DIMS))} (P = {p:,} "
      f"shared params) + one linear head per task, batch {BATCH}. Step = "
      "task losses -> per-task gradients -> PCGrad on the trunk -> Adam -> "
      "apply, jitted as one function. See the script's docstring for the "
      "three modes and how memory is measured.",
      "",
      "![compile/step time and peak memory](scale.png)",
      "",
      "## Compile and step time against T (`stacked` mode)",
      "",
      "| T | trace+lower (s) | compile (s) | step (s) | T*P*4 (GiB) |",
      "|---:|---:|---:|---:|---:|",
  ]
  for r in timing:
    lines.append(f"| {r['T']} | {r['trace_lower_s']:.2f} | "
                 f"{r['compile_s']:.2f} | {r['step_s']:.3f} | "
                 f"{gib(4 * r['T'] * r['P']):.3f} |")
  lines += [
      "",
      "## Peak memory and time per mode",
      "",
      "One fresh process per row. *XLA peak*: arguments + outputs + "
      "temporaries - aliased bytes of the compiled step, from "
      "`compiled.memory_analysis()`. *RSS during step*: peak resident set "
      "size, sampled every ms during the first execution of the compiled "
      "step (when XLA:CPU allocates its buffers), minus the RSS just before "
      "it: XLA's temporaries as the OS sees them. The two agree within a "
      "few percent.",
      "",
      "| T | mode | T*P*4 (GiB) | XLA temp (GiB) | XLA peak (GiB) | "
      "RSS during step (GiB) | compile (s) | step (s) |",
      "|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in memrows:
    lines.append(
        f"| {r['T']} | {r['mode']} | {gib(4 * r['T'] * r['P']):.3f} | "
        f"{gib(r['xla_temp_bytes']):.3f} | {gib(r['xla_peak_bytes']):.3f} | "
        f"{gib(r['rss_step_bytes']):.3f} | {r['compile_s']:.2f} | "
        f"{r['step_s']:.2f} |")
  lines += [""] + findings(timing, memrows) + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def span(values) -> str:
  lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
  return lo if lo == hi else f"{lo} to {hi}"


def findings(timing, memrows):
  """The conclusions, with this run's numbers filled in."""
  p = timing[0]["P"]
  comp = [r["compile_s"] for r in timing]
  by = {(r["T"], r["mode"]): r for r in memrows}
  t_max = max(r["T"] for r in memrows)
  st, ch, sm = (by[(t_max, m)] for m in MODES)
  stream_peaks = [gib(r["xla_peak_bytes"]) for r in memrows
                  if r["mode"] == "streaming" and r["T"] >= CHUNK]
  faster = [t for t in sorted({r["T"] for r in memrows})
            if by[(t, "streaming")]["step_s"] < by[(t, "stacked")]["step_s"]]
  slower = [t for t in sorted({r["T"] for r in memrows}) if t not in faster]
  sizes = [a * b for a, b in zip(DIMS[:-1], DIMS[1:])]
  largest_leaf = max(sizes) / p
  big = [r for r in timing if r["T"] >= 64]
  slope = (np.log(big[-1]["step_s"] / big[0]["step_s"])
           / np.log(big[-1]["T"] / big[0]["T"])) if len(big) > 1 else float("nan")
  return [
      "## What the numbers say",
      "",
      f"* **Compile time is nearly flat in T**: {timing[0]['compile_s']:.1f} "
      f"s at T = {timing[0]['T']}, {timing[-1]['compile_s']:.1f} s at T = "
      f"{timing[-1]['T']} (all values {min(comp):.1f} to {max(comp):.1f} s) "
      "while T grows 256x and the step time "
      f"{timing[-1]['step_s'] / timing[0]['step_s']:.0f}x: no Python loop "
      f"over tasks, and T = {timing[-1]['T']} with {p:,} shared params runs "
      "under `jax.jit`.",
      f"* **The stacked step grows like T^{slope:.1f} at large T**: T "
      "backward passes (T x 2BP flops) plus the Gram contraction (T^2 x P) "
      "plus, on XLA:CPU, relayout copies of the stacked gradients between "
      "the backward pass, the Gram and the weighted sum.",
      f"* **Stacked memory is linear in T x P, about "
      f"{st['xla_peak_bytes'] / (4 * t_max * p):.1f}x the T x P x 4 bytes** "
      f"({gib(st['xla_peak_bytes']):.2f} GiB at T = {t_max}): the stacked "
      "gradients themselves plus, on XLA:CPU, relayout copies (the vmapped "
      "backward pass produces a kernel's per-task gradients with the task "
      "axis inside, and XLA transposes them into the stacked layout while "
      "the original is still alive). Plan for that much per device, "
      "sharded like the params.",
      f"* **chunked_bf16 lowers the peak by only "
      f"{100 * (1 - ch['xla_peak_bytes'] / st['xla_peak_bytes']):.0f}% on "
      f"XLA:CPU** ({gib(ch['xla_peak_bytes']):.2f} GiB at T = {t_max}): the "
      "bf16 buffer is half the size, but XLA:CPU's contractions work in "
      "float32, so each bf16 leaf gets a float32 copy before its Gram (one "
      f"leaf at a time, but the largest leaf holds {largest_leaf:.0%} of the "
      "params here). On GPU/TPU, with native bf16 contractions, it should "
      "come close to half the stacked bytes (not measured: no accelerator "
      "on this machine). It is a drop-in for the stacked route; its step "
      f"took {ch['step_s']:.1f} s vs {st['step_s']:.1f} s at T = {t_max} "
      "(the backward passes run 16 tasks at a time).",
      f"* **streaming holds no stacked gradients: its peak is flat in T** "
      f"({span(stream_peaks)} GiB for every T >= tasks_per_chunk = "
      f"{CHUNK}, "
      f"{st['xla_peak_bytes'] / sm['xla_peak_bytes']:.0f}x less than "
      f"stacked at T = {t_max}): 16 task gradients, the linearised forward "
      "pass and the params. Its extra cost is compute: T forward-mode "
      "passes (JVPs) for the Gram columns and one more backward pass for "
      "the update. By flop count a Gram column by JVP costs about one "
      "forward pass (~2BP flops) where the explicit Gram costs 2TP per "
      "column, so streaming should win on time once T exceeds roughly the "
      "batch B and lose for a few tasks on big batches; on this CPU the "
      "stacked path also pays the relayout copies. Measured (B = "
      f"{BATCH}): faster at T = "
      f"{', '.join(map(str, faster)) or 'none'}"
      + (f" and slower at T = {', '.join(map(str, slower))}" if slower else "")
      + f" ({sm['step_s']:.1f} s vs {st['step_s']:.1f} s at T = {t_max}).",
      "",
      "Which path to take:",
      "",
      "* a few tasks, memory to spare: `pcgrad_optax.task_value_and_grad` "
      "-> any transformation (`stacked`), the default;",
      "* stacked gradients that do not fit, or many tasks: "
      "`pcgrad_optax.memory.streaming_aggregate(loss_fn, weighting, "
      "tasks_per_chunk=...)` with a weighting of `pcgrad_optax.weighting`; "
      "raise `tasks_per_chunk` as far as memory allows (fewer, larger "
      "batched passes);",
      "* on accelerators with native bf16: "
      "`pcgrad_optax.memory.task_value_and_grad(..., tasks_per_chunk=..., "
      "dtype=jnp.bfloat16)` keeps the drop-in stacked interface and should "
      "come close to half the bytes (unmeasured);",
      "* more than one device: the same code under `jax.jit` over a sharded "
      "mesh (see `pcgrad_optax.sharding`): every path keeps the params' "
      "sharding, so the stacked gradients on a device are T x its share of "
      "the params (multi-device memory not measured here).",
  ]


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(sys.argv[2:])
  else:
    main()
