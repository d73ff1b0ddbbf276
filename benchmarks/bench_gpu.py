"""The GPU run of the step and aggregation benchmarks (``benchmarks/gpu.sh``).

Three parts, each a subcommand, each writing its Markdown file as it goes
(a row per cell, flushed), so a part stopped at its time limit keeps what it
measured::

    python benchmarks/bench_gpu.py env --out DIR         # DIR/env.md
    python benchmarks/bench_gpu.py aggregate --out FILE  # one aggregation
    python benchmarks/bench_gpu.py step --out FILE       # one training step

``aggregate``: the jitted ``update`` of pcgrad, mgda, upgrad, cagrad and
mean on stacked per-task gradients made on the device (four leaves: two
kernels, two biases; P = 10M and 100M float32 params, T = 2 ... 128), with
``floor`` (one read of the stacked gradients) and the effective bandwidth
of reading them twice (the Gram pass and the weighted sum).

``step``: one jitted training step (forward, task backward passes,
aggregation, Adam, apply) of the shared-trunk MLP of
``benchmarks/bench_step.py`` widened to P = 10M and 100M trunk params
(PCGrad by default; ``--methods pcgrad upgrad mgda`` for more), on
the paths ``adam`` (summed loss, the floor), ``stacked``, ``gram`` and
``streaming`` (``sequential`` up to T = 8), with XLA's temporary memory of
each compiled step. The models and paths are ``bench_step.py``'s own.

Every cell is timed interleaved with the others of its row (medians of
rounds); a cell that fails (out of memory, ...) is a row saying so, and a
part that runs out of its time budget marks the cells it did not reach.
``--smoke`` shrinks every size so that the whole thing runs on a CPU in
seconds (``GPU_SH_SMOKE=1 bash benchmarks/gpu.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

AGG_METHODS = ("pcgrad", "mgda", "upgrad", "cagrad", "mean")
# Trunk widths of the step's MLP by trunk size (weights + biases).
STEP_WIDTHS = {"10M": [1024, 2048, 2048, 1024],      # 8.4M
               "100M": [3584, 7168, 7168, 3584],     # 102.8M
               "smoke": [16, 32, 16]}


def device_line() -> str:
  d = jax.devices()[0]
  return f"{d.device_kind} ({d.platform}, {jax.device_count()} device(s))"


def header(title: str) -> str:
  now = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M")
  return (f"# {title}\n\n{now} UTC, {device_line()}, jax {jax.__version__}, "
          f"optax {optax.__version__}, python "
          f"{platform.python_version()}, pcgrad_optax {git_rev()}.\n\n")


def git_rev() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                          capture_output=True, text=True,
                          timeout=10).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


class Table:
  """A Markdown table written row by row (flushed), so a kill keeps it."""

  def __init__(self, path, title, columns, note=""):
    self.f = open(path, "w")  # pylint: disable=consider-using-with
    self.f.write(header(title) + note)
    self.f.write("| " + " | ".join(columns) + " |\n")
    self.f.write("|" + "---|" * len(columns) + "\n")
    self.f.flush()

  def row(self, *cells):
    line = "| " + " | ".join(str(c) for c in cells) + " |"
    print(line, flush=True)
    self.f.write(line + "\n")
    self.f.flush()

  def close(self, footer=""):
    self.f.write(footer)
    self.f.close()


def median_ms(fns, rounds):
  from bench_step import time_interleaved  # pylint: disable=g-import-not-at-top
  return {k: v * 1e3 for k, v in time_interleaved(fns, rounds, 1).items()}


def error_text(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text[:120]}".replace("|", "/")


def compiled_mib(compiled) -> str:
  try:
    stats = compiled.memory_analysis()
    return f"{stats.temp_size_in_bytes / 2**20:.0f}"
  except Exception:   # pylint: disable=broad-except
    return ""


# --- env ---------------------------------------------------------------------

def cmd_env(args):
  os.makedirs(args.out, exist_ok=True)
  lines = [header("The machine of the GPU run (`benchmarks/gpu.sh`)")]
  for d in jax.devices():
    stats = {}
    try:
      stats = d.memory_stats() or {}
    except Exception:   # pylint: disable=broad-except
      pass
    limit = stats.get("bytes_limit")
    lines.append(f"- device {d.id}: {d.device_kind}, platform {d.platform}"
                 + (f", {limit / 2**30:.1f} GiB for XLA" if limit else "")
                 + "\n")
  versions = {}
  for name in ("jax", "jaxlib", "optax", "flax", "numpy", "torch"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:   # pylint: disable=broad-except
      versions[name] = "not installed"
  lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions.items())
               + "\n")
  lines.append(f"- CPU: {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores\n")
  with open(os.path.join(args.out, "env.md"), "w") as f:
    f.writelines(lines)
  print("".join(lines))


# --- aggregate ---------------------------------------------------------------

def stacked_gradients(p: int, t: int, key):
  """Stacked gradients of a 4-leaf model of p float32 params, on device."""
  sizes = [int(p * 0.6), int(p * 0.3), int(p * 0.05)]
  sizes.append(p - sum(sizes))
  keys = jax.random.split(key, len(sizes))
  make = jax.jit(lambda k, n: jax.random.normal(k, (t, n), jnp.float32),
                 static_argnums=1)
  grads = {f"leaf{i}": make(k, n) for i, (k, n) in enumerate(zip(keys, sizes))}
  params = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)
            for k, v in grads.items()}
  return jax.block_until_ready(grads), params


def aggregator(name):
  return {"pcgrad": lambda: pcgrad_optax.pcgrad(key=0),
          "mgda": pcgrad_optax.mgda, "upgrad": pcgrad_optax.upgrad,
          "cagrad": pcgrad_optax.cagrad, "mean": pcgrad_optax.mean}[name]()


def cmd_aggregate(args):
  deadline = time.monotonic() + args.budget
  table = Table(args.out, "One aggregation step on the GPU "
                "(`benchmarks/bench_gpu.py aggregate`)",
                ["P", "T", "method", "ms", "x floor",
                 "GB/s (2 reads)", "XLA temp MiB"],
                "`floor`: one jitted read of the stacked gradients (their "
                "sum). GB/s: 2 T P 4 bytes (the Gram pass and the weighted "
                "sum each read the stacked gradients once) over the time.\n\n")
  cells = [(p, t) for p in args.params for t in args.tasks]
  for n, (p, t) in enumerate(cells):
    p = int(p)
    if time.monotonic() > deadline:
      for p2, t2 in cells[n:]:
        table.row(f"{p2:.0e}", t2, "-", "not reached (time budget)", "",
                  "", "")
      break
    if t * p * 4 > args.max_bytes:
      table.row(f"{p:.0e}", t, "-", f"skipped: T P 4 bytes > "
                f"{args.max_bytes / 2**30:.0f} GiB", "", "", "")
      continue
    try:
      grads, params = stacked_gradients(p, t, jax.random.key(p + t))
      fns, temp = {}, {}
      floor = jax.jit(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)))
      compiled = floor.lower(grads).compile()
      temp["floor"] = compiled_mib(compiled)
      fns["floor"] = (lambda c=compiled: jax.block_until_ready(c(grads)))
      for name in args.methods:
        tx = aggregator(name)
        state = tx.init(params)
        upd = jax.jit(lambda g, s, tx=tx: tx.update(g, s)[0])
        try:
          c = upd.lower(grads, state).compile()
        except Exception as e:   # pylint: disable=broad-except
          table.row(f"{p:.0e}", t, name, error_text(e), "", "", "")
          continue
        temp[name] = compiled_mib(c)
        fns[name] = (lambda c=c, s=state: jax.block_until_ready(c(grads, s)))
      for fn in fns.values():
        fn()   # warm-up
      ms = median_ms(fns, args.rounds)
      for name, v in ms.items():
        gbs = 2 * t * p * 4 / (v * 1e-3) / 1e9
        table.row(f"{p:.0e}", t, name, f"{v:.3f}",
                  f"{v / ms['floor']:.2f}", f"{gbs:.0f}", temp.get(name, ""))
      del grads, fns
    except Exception as e:   # pylint: disable=broad-except
      table.row(f"{p:.0e}", t, "-", error_text(e), "", "", "")
  table.close()


# --- step --------------------------------------------------------------------

def cmd_step(args):
  from bench_step import (jax_paths, mlp_losses, mlp_mask,  # pylint: disable=g-import-not-at-top
                          mlp_params)
  deadline = time.monotonic() + args.budget
  table = Table(args.out, "One training step on the GPU "
                "(`benchmarks/bench_step.py`'s MLP, `bench_gpu.py step`)",
                ["trunk P", "T", "method", "path", "ms / step", "vs adam",
                 "XLA temp MiB"],
                f"Batch {args.batch}, 10 classes per head, Adam; the paths "
                "of `bench_step.py` (adam: the summed loss).\n\n")
  cells = [(s, t, m) for s in args.sizes for t in args.tasks
           for m in args.methods]
  for n, (size, t, method) in enumerate(cells):
    if time.monotonic() > deadline:
      for s2, t2, m2 in cells[n:]:
        table.row(s2, t2, m2, "-", "not reached (time budget)", "", "")
      break
    widths = STEP_WIDTHS[size]
    try:
      params = jax.device_put(mlp_params(widths, t, 10))
      rng = np.random.default_rng(1)
      batch = (jnp.asarray(rng.standard_normal((args.batch, widths[0])),
                           jnp.float32),
               jnp.asarray(rng.integers(0, 10, (args.batch, t))))
      paths = jax_paths(method, mlp_losses, mlp_mask, params)
      wanted = [p for p in args.paths if p in paths
                and not (p == "sequential" and t > 8)
                and not (p == "streaming" and t > 32)]
      fns, temp = {}, {}
      for name in wanted:
        fn, state = paths[name]
        try:
          compiled = fn.lower(params, state, *batch).compile()
          temp[name] = compiled_mib(compiled)
          box = [params, state]

          def run(c=compiled, box=box):
            box[0], box[1] = c(box[0], box[1], *batch)
            jax.block_until_ready(box[0])
          run()
          fns[name] = run
        except Exception as e:   # pylint: disable=broad-except
          table.row(size, t, method, name, error_text(e), "", "")
      if not fns:
        continue
      ms = median_ms(fns, args.rounds)
      base = ms.get("adam")
      for name, v in ms.items():
        table.row(size, t, method, name, f"{v:.2f}",
                  f"{v / base:.2f}x" if base else "", temp.get(name, ""))
      del fns, paths
    except Exception as e:   # pylint: disable=broad-except
      table.row(size, t, method, "-", error_text(e), "", "")
  table.close()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  env = sub.add_parser("env")
  env.add_argument("--out", required=True)
  agg = sub.add_parser("aggregate")
  agg.add_argument("--out", required=True)
  agg.add_argument("--params", type=float, nargs="+", default=[1e7, 1e8])
  agg.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32, 128])
  agg.add_argument("--methods", nargs="+", default=list(AGG_METHODS))
  agg.add_argument("--rounds", type=int, default=7)
  agg.add_argument("--max-bytes", type=float, default=60 * 2**30)
  agg.add_argument("--budget", type=float, default=200,
                   help="seconds before the remaining cells are skipped")
  step = sub.add_parser("step")
  step.add_argument("--out", required=True)
  step.add_argument("--sizes", nargs="+", default=["10M", "100M"],
                    choices=sorted(STEP_WIDTHS))
  step.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32, 128])
  step.add_argument("--methods", nargs="+", default=["pcgrad"])
  step.add_argument("--paths", nargs="+",
                    default=["adam", "stacked", "gram", "streaming",
                             "sequential"])
  step.add_argument("--batch", type=int, default=512)
  step.add_argument("--rounds", type=int, default=5)
  step.add_argument("--budget", type=float, default=270)
  for p in (agg, step):
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (a CPU smoke test)")
  args = parser.parse_args(argv)
  if getattr(args, "smoke", False):
    args.tasks, args.rounds = [2], 2
    if args.cmd == "aggregate":
      args.params, args.methods = [2e4], ["pcgrad", "upgrad"]
    else:
      args.sizes, args.batch, args.methods = ["smoke"], 8, ["pcgrad"]
      args.paths = ["adam", "stacked", "gram"]
  {"env": cmd_env, "aggregate": cmd_aggregate, "step": cmd_step}[args.cmd](
      args)


if __name__ == "__main__":
  main()
