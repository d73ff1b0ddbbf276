"""The CPU code paths of the core, before and after a change, side by side.

Run from the repository root::

    python benchmarks/bench_cpu_paths.py --label HEAD
    # the same script against another checkout of the package:
    git worktree add /tmp/old <rev>
    PYTHONPATH=/tmp/old python benchmarks/bench_cpu_paths.py --label <rev>
    # (a checkout from before the package left src/: PYTHONPATH=/tmp/old/src)
    # with glibc allowed to reuse large buffers instead of mapping fresh ones:
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=62914560:glibc.malloc.trim_threshold=268435456 \
        python benchmarks/bench_cpu_paths.py --label "HEAD, glibc tunables"
    python benchmarks/bench_cpu_paths.py --quick   # smoke run, writes nothing

Each run writes ``results/cpu_paths/<label>.json`` and rebuilds
``results/cpu_paths.md`` from every JSON there, one column per label. Only
the public API is timed (``gram_matrix``, ``weighted_sum``, ``graddrop``,
``weighting.*``), so any checkout of the package can be measured; the plain
XLA and torch references are written here. Every function is jitted and warmed
up, then timed interleaved (the order rotating every round); medians in ms.

* Gram matrix of one ``(T, P)`` float32 leaf: ``pcgrad_optax.gram_matrix``,
  one plain ``lax.dot_general``, torch's ``x @ x.T``.
* Weighted sum ``sum_t w_t x_t`` of a ``(T, 19500, 512)`` leaf (10M params):
  ``pcgrad_optax.weighted_sum``, a plain ``dot_general``, torch's ``w @ x``.
* Sum over the task axis of ``(8, 1M)``: ``jnp.sum(x, axis=0)`` against a
  ``fori_loop`` adding rows; and the ``graddrop()`` update, which reduces over
  the task axis, at T = 2 and 8 on 1M params.
* The T x T weightings with an iterative solver (MGDA, UPGrad, CAGrad) at
  T = 8, 32, 128, on a Gram matrix of conflicting gradients.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pcgrad_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name, load1, wait_for_quiet  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plain_gram(x):
  axes = tuple(range(1, x.ndim))
  return lax.dot_general(x, x, ((axes, axes), ((), ())),
                         precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def plain_weighted_sum(x, w):
  return lax.dot_general(w, x, (((0,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def row_loop_sum(x):
  return lax.fori_loop(1, x.shape[0], lambda i, acc: acc + x[i], x[0])


def conflicting(t: int, p: int, seed: int = 0) -> np.ndarray:
  """``(t, p)`` float32 rows ``c_t * common + noise_t`` (cosines of O(1))."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, p), dtype=np.float32)
  x += rng.standard_normal((t, 1)).astype(np.float32) * rng.standard_normal(
      p, dtype=np.float32)
  return x


def timed(fns: dict, rounds: int) -> dict:
  """Median ms per fn over interleaved rounds, after two warm-up calls."""
  for fn in fns.values():
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  names = list(fns)
  samples = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name]())
      samples[name].append((time.perf_counter() - t0) * 1e3)
  return {name: statistics.median(s) for name, s in samples.items()}


def torch_or_none():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  return torch


def sections(quick: bool, rounds: int) -> dict:
  torch = torch_or_none()
  out = {}
  scale = 64 if quick else 1
  # Jitted once: a fresh jax.jit per call would retrace.
  gram_matrix = jax.jit(pcgrad_optax.gram_matrix)
  weighted_sum = jax.jit(pcgrad_optax.weighted_sum)
  plain_gram_j, plain_sum_j = jax.jit(plain_gram), jax.jit(plain_weighted_sum)
  axis_sum, loop_sum = jax.jit(lambda x: jnp.sum(x, 0)), jax.jit(row_loop_sum)

  # Gram matrix of one leaf.
  for t, p in ((2, 3_000_000), (8, 3_000_000), (32, 3_000_000),
               (128, 1_500_000)):
    x = jnp.asarray(conflicting(t, p // scale))
    fns = {"pcgrad_optax.gram_matrix": lambda x=x: gram_matrix({"w": x}),
           "plain dot_general": lambda x=x: plain_gram_j(x)}
    if torch is not None:
      xt = torch.from_numpy(np.array(x))
      fns["torch x @ x.T"] = lambda xt=xt: xt @ xt.T
    out[f"Gram, T={t}, P={p // scale:,}"] = timed(fns, rounds)
    del x

  # Weighted sum of a 10M-param leaf.
  shape = (19_500 // scale, 512)
  for t in (2, 8):
    x = jnp.asarray(conflicting(t, int(np.prod(shape))).reshape((t,) + shape))
    w = jnp.linspace(0.5, 1.5, t, dtype=jnp.float32)
    fns = {"pcgrad_optax.weighted_sum": lambda x=x, w=w: weighted_sum(
               {"w": x}, w),
           "plain dot_general": lambda x=x, w=w: plain_sum_j(x, w)}
    if torch is not None:
      xt = torch.from_numpy(np.array(x).reshape(t, -1))
      wt = torch.from_numpy(np.array(w))
      fns["torch w @ x"] = lambda xt=xt, wt=wt: wt @ xt
    out[f"weighted sum, T={t}, P={int(np.prod(shape)):,}"] = timed(fns, rounds)
    del x

  # Reductions over the task axis.
  p = 1_000_000 // scale
  x = jnp.asarray(conflicting(8, p))
  out[f"sum over the task axis, T=8, P={p:,}"] = timed({
      "jnp.sum(x, axis=0)": lambda: axis_sum(x),
      "fori_loop adding rows": lambda: loop_sum(x)}, rounds)
  for t in (2, 8):
    x = jnp.asarray(conflicting(t, p))
    tx = pcgrad_optax.graddrop(0)
    state, update = tx.init({"w": x[0]}), jax.jit(tx.update)
    out[f"graddrop update, T={t}, P={p:,}"] = timed(
        {"pcgrad_optax.graddrop().update": lambda x=x, s=state, u=update:
         u({"w": x}, s)[0]}, rounds)

  # T x T weightings with a solver.
  for t in (8, 32) if quick else (8, 32, 128):
    g = conflicting(t, 4000, seed=t).astype(np.float64)
    gram = jnp.asarray((g @ g.T).astype(np.float32))
    w = pcgrad_optax.weighting
    out[f"weightings, T={t}"] = timed(
        {f"weighting.{name}": lambda fn=jax.jit(getattr(w, name)): fn(gram)
         for name in ("mgda", "upgrad", "cagrad")}, max(3, rounds // 3))
  return out


def write_markdown(path: str, runs: list) -> None:
  keys = list(dict.fromkeys(k for r in runs for k in r["results"]))
  lines = [
      "# CPU code paths, side by side",
      "",
      "Made by `benchmarks/bench_cpu_paths.py` (see its docstring): one run "
      "per column, each on the package checkout its label names. Medians "
      "of interleaved rounds, in ms.",
      "",
  ]
  for r in runs:
    lines.append(f"- **{r['label']}**: {r['date']}, {r['machine']}; "
                 f"{r['versions']}; 1-min load {r['load']:.2f} at the start; "
                 f"GLIBC_TUNABLES={r['glibc_tunables'] or '(unset)'}; "
                 f"package at `{r['package']}`.")
  for key in keys:
    fns = list(dict.fromkeys(f for r in runs for f in r["results"].get(key,
                                                                       {})))
    lines += ["", f"### {key}", "",
              "| | " + " | ".join(r["label"] for r in runs) + " |",
              "|---|" + "---:|" * len(runs)]
    for fn in fns:
      cells = [r["results"].get(key, {}).get(fn) for r in runs]
      lines.append(f"| {fn} | " + " | ".join(
          "—" if c is None else f"{c:.3g}" if c < 100 else f"{c:,.0f}"
          for c in cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", default="HEAD")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--max-wait", type=float, default=600.0)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.max_wait = 3, 0.0
  load, _ = wait_for_quiet(args.max_wait)
  results = sections(args.quick, args.rounds)
  for key, value in results.items():
    print(key, {k: round(v, 2) for k, v in value.items()}, flush=True)
  if args.quick:
    return
  run = {
      "label": args.label, "results": results, "load": load,
      "date": datetime.date.today().isoformat(),
      "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
      "versions": f"jax {jax.__version__}",
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "package": os.path.dirname(pcgrad_optax.__file__),
  }
  folder = os.path.join(RESULTS, "cpu_paths")
  os.makedirs(folder, exist_ok=True)
  name = "".join(c if c.isalnum() else "_" for c in args.label)
  with open(os.path.join(folder, f"{name}.json"), "w") as f:
    json.dump(run, f, indent=1)
  runs = []
  for path in sorted(glob.glob(os.path.join(folder, "*.json")),
                     key=os.path.getmtime):
    with open(path) as f:
      runs.append(json.load(f))
  write_markdown(os.path.join(RESULTS, "cpu_paths.md"), runs)
  print(f"wrote {os.path.join(RESULTS, 'cpu_paths.md')} ({load1():.2f} load)")


if __name__ == "__main__":
  main()
