"""Speed of the jitted ``pcgrad()`` update against torchjd's ``PCGrad``.

Run from the repository root::

    python benchmarks/bench_pcgrad.py           # waits for a quiet machine,
                                                # writes benchmarks/results/
                                                # pcgrad_vs_torchjd.{md,png}
    python benchmarks/bench_pcgrad.py --quick   # smoke run in seconds

Both libraries get the same stacked per-task gradients of an 8-leaf model
(conv and dense kernels and biases, 3,025,920 float32 parameters), for
T = 2, 8 and 32 tasks. Timed, interleaved round by round in one process
(the order of the methods rotates every round), medians reported:

* ``ours``: ``jax.jit(pcgrad().update)`` on the stacked pytree: the Gram
  matrix, the ``T x T`` surgery, the weighted sum of the task gradients.
* ``torchjd``: ``torchjd.aggregation.PCGrad()`` on the same numbers as one
  ``(T, P)`` torch matrix. The concatenation of the leaves into that matrix
  is done once, outside the timing, which favours torchjd (a real training
  loop pays for it, or for flattening a Jacobian).
* ``floor``: one jitted plain read of the stacked gradients (the sum of all
  leaves), the memory-bandwidth floor of any method that reads them once;
  PCGrad must read them twice (Gram, then weighted sum).
* the Gram matrix alone, ours (``pcgrad_optax.gram_matrix``) and torch's
  ``x @ x.T``, to show where the time goes.

Then the compile time of the update against T (2 ... 128, same model),
and a correctness check: our update equals torchjd's on the same data
(PCGrad's random orders taken from torch's generator and handed to
``pcgrad_optax.weighting.pcgrad(order=...)``; at T = 2 the order does not
matter and the ``pcgrad()`` transformation itself is compared).

torch runs with as many threads as XLA's CPU client uses (every core this
process may run on).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pcgrad_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name, load1, wait_for_quiet  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# 8 leaves, 3,025,920 parameters: a small conv net's kernels and biases.
LEAVES = {
    "conv_0/kernel": (3, 3, 3, 64),
    "conv_0/bias": (64,),
    "conv_1/kernel": (3, 3, 64, 128),
    "conv_1/bias": (128,),
    "dense_0/kernel": (4096, 640),
    "dense_0/bias": (640,),
    "dense_1/kernel": (640, 512),
    "dense_1/bias": (512,),
}
# --quick and the correctness check: same 8 leaves, ~1/60 of the size.
SMALL_LEAVES = {
    "conv_0/kernel": (3, 3, 3, 16),
    "conv_0/bias": (16,),
    "conv_1/kernel": (3, 3, 16, 32),
    "conv_1/bias": (32,),
    "dense_0/kernel": (512, 80),
    "dense_0/bias": (80,),
    "dense_1/kernel": (80, 64),
    "dense_1/bias": (64,),
}


def num_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def make_stacked(num_tasks: int, leaves: dict, seed: int = 0) -> dict:
  """Stacked float32 gradients ``{name: (T,) + shape}`` with real conflicts.

  Task ``t``'s gradient is ``c_t * common + noise_t`` with ``c_t ~ N(0, 1)``
  (so pairs of tasks agree or conflict with cosines of order one) and unit
  Gaussian noise: PCGrad's projections actually happen, and no inner
  product sits near the ``< 0`` test, where float rounding could flip it.
  """
  rng = np.random.default_rng(seed)
  coefs = rng.standard_normal(num_tasks).astype(np.float32)
  out = {}
  for name, shape in leaves.items():
    common = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal((num_tasks,) + shape, dtype=np.float32)
    noise += coefs.reshape((-1,) + (1,) * len(shape)) * common
    out[name] = noise
  return out


def as_matrix(stacked: dict) -> np.ndarray:
  """The ``(T, P)`` matrix torchjd takes: leaves flattened, concatenated."""
  t = next(iter(stacked.values())).shape[0]
  return np.concatenate([np.asarray(stacked[k]).reshape(t, -1)
                         for k in sorted(stacked)], axis=1)   # pytree order


def torch_setup():
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(num_threads())
  return torch


def check_against_torchjd(num_tasks: int, leaves: dict = SMALL_LEAVES,
                          seed: int = 0) -> float:
  """Max relative difference between our PCGrad update and torchjd's.

  Relative to the largest entry of torchjd's update. For T > 2 PCGrad's
  random orders are drawn from torch's generator the way torchjd draws
  them (one ``randperm(T)`` per task, in task order) and handed to
  ``pcgrad_optax.weighting.pcgrad(order=...)``; at T = 2 the order does not
  matter, and the ``pcgrad()`` transformation itself is compared as well.
  """
  torch = torch_setup()
  from torchjd.aggregation import PCGrad  # pylint: disable=g-import-not-at-top

  stacked = make_stacked(num_tasks, leaves, seed)
  matrix = torch.from_numpy(as_matrix(stacked))
  torch.manual_seed(seed)
  orders = np.stack([torch.randperm(num_tasks).numpy()
                     for _ in range(num_tasks)])
  torch.manual_seed(seed)
  with torch.no_grad():
    expected = PCGrad()(matrix).numpy()

  grads = jax.tree.map(jnp.asarray, stacked)

  @jax.jit
  def ours_with_orders(grads, orders):
    gram = pcgrad_optax.gram_matrix(grads)
    weights = pcgrad_optax.weighting.pcgrad(gram, order=orders)
    return pcgrad_optax.weighted_sum(grads, weights)

  candidates = [ours_with_orders(grads, jnp.asarray(orders))]
  if num_tasks == 2:
    tx = pcgrad_optax.pcgrad(seed)
    params = jax.tree.map(lambda x: x[0], grads)
    candidates.append(jax.jit(tx.update)(grads, tx.init(params))[0])
  scale = np.abs(expected).max()
  return max(float(np.abs(as_matrix(jax.tree.map(lambda x: x[None], c))[0]
                          - expected).max() / scale) for c in candidates)


def build(num_tasks: int, leaves: dict):
  """``{name: (fn, args)}`` to time; every fn blocks until its result."""
  torch = torch_setup()
  from torchjd.aggregation import PCGrad  # pylint: disable=g-import-not-at-top

  stacked = make_stacked(num_tasks, leaves)
  grads = jax.tree.map(jnp.asarray, stacked)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)
  tx = pcgrad_optax.pcgrad(0)
  state = tx.init(params)
  ours = jax.jit(tx.update)
  gram = jax.jit(pcgrad_optax.gram_matrix)
  floor = jax.jit(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)))
  matrix = torch.from_numpy(as_matrix(stacked))   # outside the timing
  aggregator = PCGrad()

  def torchjd_pcgrad(m):
    with torch.no_grad():
      return aggregator(m)

  def torch_gram(m):
    with torch.no_grad():
      return m @ m.T

  def block(fn):
    return lambda *a: jax.block_until_ready(fn(*a))

  return {
      "ours: pcgrad().update": (block(ours), (grads, state)),
      "torchjd: PCGrad()": (torchjd_pcgrad, (matrix,)),
      "floor: one read": (block(floor), (grads,)),
      "ours: Gram only": (block(gram), (grads,)),
      "torch: Gram x @ x.T": (torch_gram, (matrix,)),
  }


def time_interleaved(fns: dict, rounds: int, warmup: int = 2) -> dict:
  """Median and IQR (seconds) per fn; round-robin, rotating the order."""
  for fn, args in fns.values():              # compile and warm up
    for _ in range(warmup):
      fn(*args)
  names = list(fns)
  samples = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = fns[name]
      t0 = time.perf_counter()
      fn(*args)
      samples[name].append(time.perf_counter() - t0)
  out = {}
  for name, s in samples.items():
    q1, q3 = np.percentile(s, [25, 75])
    out[name] = (statistics.median(s), float(q3 - q1))
  return out


def compile_times(task_counts, leaves: dict, repeats: int = 3) -> dict:
  """Seconds to trace, lower and compile a fresh ``jit(pcgrad().update)``.

  Compiled for shapes only (no gradients are made), so large T costs no
  memory.
  """
  out = {}
  for t in task_counts:
    grads = {name: jax.ShapeDtypeStruct((t,) + shape, jnp.float32)
             for name, shape in leaves.items()}
    tx = pcgrad_optax.pcgrad(0)
    state = tx.init(None)
    samples = []
    for _ in range(repeats):
      fn = jax.jit(lambda g, s, tx=tx: tx.update(g, s))  # fresh: no cache
      t0 = time.perf_counter()
      fn.lower(grads, state).compile()
      samples.append(time.perf_counter() - t0)
    out[t] = min(samples)
  return out


def versions() -> str:
  names = ["jax", "jaxlib", "optax", "torch", "torchjd", "numpy"]
  found = []
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} (not installed)")
  return f"Python {platform.python_version()}, " + ", ".join(found)


def plot(results: dict, compile_s: dict, n_params: int, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
  ts = sorted(results)
  styles = {"ours: pcgrad().update": "o-", "torchjd: PCGrad()": "s-",
            "floor: one read": "k--", "ours: Gram only": "o:",
            "torch: Gram x @ x.T": "s:"}
  for name, style in styles.items():
    ax.plot(ts, [results[t][name][0] * 1e3 for t in ts], style, label=name)
  ax.plot(ts, [results[t]["torchjd: PCGrad()"][0] * 1e3 / 2 for t in ts],
          color="grey", lw=0.8, label="target: torchjd / 2")
  ax.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="ms (median)",
         title=f"PCGrad, {n_params / 1e6:.2f}M float32 params in 8 leaves")
  ax.set_xticks(ts, [str(t) for t in ts])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.legend(fontsize=8)
  cts = sorted(compile_s)
  bx.plot(cts, [compile_s[t] for t in cts], "o-")
  bx.set(xscale="log", xlabel="tasks T", ylabel="seconds",
         title="compile time of jit(pcgrad().update)", ylim=(0, None))
  bx.set_xticks(cts, [str(t) for t in cts])
  bx.xaxis.set_minor_locator(ticker.NullLocator())
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small model, few rounds, no waiting")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
  parser.add_argument("--compile-tasks", type=int, nargs="+",
                      default=[2, 8, 32, 64, 128])
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--max-wait", type=float, default=1200.0,
                      help="seconds to wait for a 1-min load < 1.0")
  parser.add_argument("--out", default=None,
                      help="markdown file to write (the PNG goes next to it); "
                      "default benchmarks/results/pcgrad_vs_torchjd.md, "
                      "nothing with --quick")
  args = parser.parse_args(argv)
  leaves = LEAVES
  if args.quick:
    leaves, args.rounds, args.max_wait = SMALL_LEAVES, 5, 0.0
    args.compile_tasks = [2, 32]

  print(f"{versions()}; JAX devices {jax.devices()}; "
        f"torch threads {num_threads()}")
  errors = {t: check_against_torchjd(t) for t in sorted(set(args.tasks))}
  for t, err in errors.items():
    print(f"T={t}: max |ours - torchjd| / max |torchjd| = {err:.2e}")
    if err > 1e-4:
      raise SystemExit(f"Our PCGrad update differs from torchjd's at T={t}.")

  load_before, waited = wait_for_quiet(args.max_wait)
  print(f"1-min load at start: {load_before:.2f} (waited {waited:.0f} s)")
  n_params = sum(int(np.prod(s)) for s in leaves.values())
  results, loads = {}, []
  for t in args.tasks:
    fns = build(t, leaves)
    loads.append(load1())
    results[t] = time_interleaved(fns, args.rounds)
    print(f"T={t}: " + ", ".join(f"{k} {v[0] * 1e3:.2f} ms"
                                 for k, v in results[t].items()), flush=True)
  compile_s = compile_times(args.compile_tasks, leaves,
                            repeats=1 if args.quick else 3)
  load_after = load1()

  ratios = {t: r["ours: pcgrad().update"][0] / r["torchjd: PCGrad()"][0]
            for t, r in results.items()}
  lines = [
      "| T | ours: pcgrad().update | torchjd: PCGrad() | floor: one read "
      "| ours / torchjd | ours / floor | ours: Gram only | torch: x @ x.T |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for t, r in results.items():
    ms = {k: v[0] * 1e3 for k, v in r.items()}
    ours, theirs = ms["ours: pcgrad().update"], ms["torchjd: PCGrad()"]
    floor = ms["floor: one read"]
    lines.append(
        f"| {t} | {ours:.2f} | {theirs:.2f} | {floor:.2f} | "
        f"**{ours / theirs:.2f}** | {ours / floor:.1f} | "
        f"{ms['ours: Gram only']:.2f} | {ms['torch: Gram x @ x.T']:.2f} |")
  lines += [
      "",
      "Interquartile ranges (ms): " + "; ".join(
          f"T={t}: " + ", ".join(f"{k.split(':')[0]} {v[1] * 1e3:.2f}"
                                 for k, v in list(r.items())[:3])
          for t, r in results.items()) + ".",
      "",
      "Target (issue): ours / torchjd <= 0.5 at every T: " + ", ".join(
          f"T={t} {ratio:.2f} ({'met' if ratio <= 0.5 else 'NOT met'})"
          for t, ratio in ratios.items()) + ".",
      "",
      "## Compile time",
      "",
      "Compile time of a fresh `jax.jit(pcgrad().update)` (trace + lower + "
      f"compile, best of {1 if args.quick else 3}, for the {n_params:,}"
      "-parameter model above, shapes only):",
      "",
      "| T | " + " | ".join(str(t) for t in compile_s) + " |",
      "|---|" + "---:|" * len(compile_s),
      "| seconds | " + " | ".join(f"{s:.2f}" for s in compile_s.values())
      + " |",
  ]
  table = "\n".join(lines)
  print("\n" + table)
  if args.out is None:
    if args.quick:
      return
    args.out = os.path.join(RESULTS, "pcgrad_vs_torchjd.md")
  command = "python benchmarks/bench_pcgrad.py" + (
      " " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
  busy = load_before >= 1.0   # later readings include this process itself
  header = [
      "# PCGrad: pcgrad_optax vs torchjd on CPU",
      "",
      f"Date: {datetime.date.today().isoformat()}. Command: `{command}` "
      "(from the repository root).",
      f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
      f"{platform.system()} {platform.release()}; JAX backend "
      f"{jax.default_backend()} ({len(jax.devices())} device); XLA uses its "
      f"default thread pool (all cores), torch.set_num_threads"
      f"({num_threads()}).",
      f"Versions: {versions()}, pcgrad_optax {pcgrad_optax.__version__}.",
      f"1-min load average: {load_before:.2f} at the start (after waiting "
      f"{waited:.0f} s for < 1.0, at most {args.max_wait:.0f} s), "
      + ", ".join(f"{l:.2f}" for l in loads) + " before each T, "
      f"{load_after:.2f} at the end (these include this benchmark's own "
      "threads)." + (
          " **The machine was not quiet**: other processes shared the two "
          "cores, so absolute times are inflated and noisy; the ratios, "
          "from interleaved rounds, are the more meaningful part."
          if busy else ""),
      "",
      f"Data: {len(leaves)} leaves, {n_params:,} float32 parameters "
      f"({', '.join(f'{k} {v}' for k, v in leaves.items())}), stacked for "
      "T tasks (task t: `c_t * common + noise_t`, so tasks conflict). "
      f"Method: every function warmed up, then {args.rounds} rounds; in each "
      "round every method runs once, the order rotating from round to round; "
      "median per method. `ours` is `jax.jit(pcgrad_optax.pcgrad(0).update)` "
      "on the stacked pytree (Gram matrix, T x T surgery, weighted sum). "
      "`torchjd` is `torchjd.aggregation.PCGrad()` under `torch.no_grad()` on "
      "the same numbers as one (T, P) matrix; **the concatenation into that "
      "matrix is done once outside the timing, which favours torchjd**. "
      "`floor` is one jitted read of the stacked gradients (sum of all "
      "leaves); PCGrad needs two reads (Gram, weighted sum) plus the write "
      "of the update.",
      "",
      "Correctness on the same data (small model): max |ours - torchjd| / "
      "max |torchjd| = " + ", ".join(f"{e:.1e} (T={t})"
                                      for t, e in errors.items())
      + "; PCGrad's random orders drawn from torch's generator as torchjd "
      "draws them and passed to `weighting.pcgrad(order=...)`; at T = 2 the "
      "`pcgrad()` transformation itself.",
      "",
      "On a single-device CPU, `pcgrad_optax` computes the Gram matrix of a "
      "large leaf with `_core.gram._tiled_gram` (a loop over the flattened "
      "leaf whose every step contracts 16 independent cache-sized `(T, chunk)` "
      "slices, which XLA:CPU runs concurrently), because XLA:CPU's single "
      "`dot_general` over the whole `(T, P)` leaf is 1.5-4x slower; GPU and "
      "TPU use that "
      "single `dot_general`.",
      "",
      "## Results (ms, median)",
      "",
  ]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  png = os.path.splitext(args.out)[0] + ".png"
  plot(results, compile_s, n_params, png)
  with open(args.out, "w") as f:
    f.write("\n".join(header) + "\n" + table
            + f"\n\n![plot]({os.path.basename(png)})\n")
  print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
  main()
