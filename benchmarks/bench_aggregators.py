"""Surgery cost of every aggregator: pcgrad_optax vs torchjd vs LibMTL.

Run from the repository root::

    python benchmarks/bench_aggregators.py          # waits for a quiet
                                                    # machine, ~20 min, writes
                                                    # benchmarks/results/
                                                    # aggregators.{md,png}
    python benchmarks/bench_aggregators.py --quick  # smoke run, ~1 min

Needs the ``benchmark`` extra (torch, torchjd with its solver extras) and,
for the LibMTL columns, ``pip install --no-deps LibMTL==1.1.5`` (its PyPI
release depends on torchvision and imports it at package import; this script
loads only ``LibMTL/weighting/*.py``, so torchvision is never needed).
Without LibMTL its columns read "not installed".

Every implementation gets the same stacked per-task gradients of a 6-leaf
model (conv and dense kernels and biases; P = 1M and 10M float32 params) for
T = 2, 8, 32 and 128 tasks, and computes one aggregated update:

* ``ours``: ``jax.jit(pcgrad_optax.<method>(...).update)`` on the stacked
  pytree (Gram matrix, T x T weighting, weighted sum; GradDrop works per
  coordinate).
* ``torchjd``: ``torchjd.aggregation.<Aggregator>()`` on the same numbers as
  one ``(T, P)`` matrix under ``torch.no_grad()``.
* ``LibMTL``: the method's ``backward`` from ``LibMTL.weighting`` with its
  gradient gathering replaced by the same ``(T, P)`` matrix and its final
  ``param.grad`` write replaced by keeping the aggregated vector: what is
  timed is exactly its surgery. LibMTL has no UPGrad, DualProj, Aligned-MTL,
  ConFIG or Nash-MTL; its CAGrad hard-codes T = 3 (``x.reshape(1, 3)``) and
  its GradDrop works on representation gradients only, so those cells are
  empty.

The concatenation of the leaves into the ``(T, P)`` matrix the peers take is
done once, outside the timing, which favours them. ``floor`` is one jitted
read of the stacked gradients (the sum of all leaves): any method reads them
at least once, and a Gram-based one twice (Gram, then weighted sum).

Timed interleaved: after warm-up, rounds in which every implementation of the
cell runs once, the order rotating; medians reported. Rounds per cell adapt
to the cost (between 3 and ``--rounds``). Calls predicted (from the smaller
T, by T^2) to take over ``--max-call`` seconds are skipped and say so; so is
an implementation whose temporaries would not fit in the free memory.

Before timing, a cross-check on small data: for each method whose peers are
deterministic, the max difference of the updates relative to the peer's
largest entry, with matched hyper-parameters. Differences there are
conventions or solver accuracy, explained in the results file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import pcgrad_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name, load1, wait_for_quiet  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench_pcgrad import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    RESULTS, num_threads, time_interleaved, torch_setup)


def model_leaves(num_params: int) -> dict:
  """A small conv net's leaves, its first dense kernel sized to ~num_params."""
  fixed = {
      "conv_0/kernel": (3, 3, 32, 64),
      "conv_0/bias": (64,),
      "dense_1/kernel": (512, 256),
      "dense_1/bias": (256,),
      "dense_0/bias": (512,),
  }
  rest = num_params - sum(int(np.prod(s)) for s in fixed.values())
  return {**fixed, "dense_0/kernel": (max(1, rest // 512), 512)}


def make_data(num_tasks: int, leaves: dict, seed: int = 0):
  """``(matrix, stacked)``: one ``(T, P)`` float32 array and its leaves.

  Task t's gradient is ``c_t * common + noise_t`` (c_t ~ N(0, 1), unit noise):
  pairs of tasks agree or conflict with cosines of order one. ``matrix`` is
  what the peers take (``torch.from_numpy`` shares its memory);
  ``stacked`` holds the leaves as JAX arrays, in pytree (sorted-key) order
  along the P axis of ``matrix``.
  """
  rng = np.random.default_rng(seed)
  coefs = rng.standard_normal((num_tasks, 1)).astype(np.float32)
  p = sum(int(np.prod(s)) for s in leaves.values())
  matrix = np.empty((num_tasks, p), np.float32)
  for t in range(num_tasks):                     # row by row: little memory
    matrix[t] = rng.standard_normal(p, dtype=np.float32)
  common = rng.standard_normal(p, dtype=np.float32)
  matrix += coefs * common
  del common
  stacked, start = {}, 0
  for name in sorted(leaves):
    size = int(np.prod(leaves[name]))
    stacked[name] = jnp.asarray(
        matrix[:, start:start + size].reshape((num_tasks,) + leaves[name]))
    start += size
  return matrix, stacked


def load_libmtl():
  """``LibMTL.weighting`` modules without running ``LibMTL/__init__.py``.

  That ``__init__`` imports the trainer and the models, which need
  torchvision; the weighting classes need only torch and numpy. Returns None
  when LibMTL is not installed.
  """
  spec = importlib.util.find_spec("LibMTL")
  if spec is None:
    return None
  root = spec.submodule_search_locations[0]
  for name, path in (("LibMTL", root),
                     ("LibMTL.weighting", os.path.join(root, "weighting"))):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [path]
      sys.modules[name] = package
  return {name: getattr(importlib.import_module(f"LibMTL.weighting.{name}"),
                        name)
          for name in ("PCGrad", "MGDA", "IMTL", "GradVac", "CAGrad")}


def libmtl_aggregator(cls, matrix, **kwargs):
  """A function running LibMTL's ``cls().backward`` on a fixed ``(T, P)``.

  The subclass hands ``backward`` the given matrix where LibMTL would
  backpropagate each task loss into the shared parameters, and keeps the
  aggregated vector where LibMTL would write it into ``param.grad``.
  """
  torch = torch_setup()
  num_tasks = matrix.shape[0]

  class OnFixedGradients(cls):

    def __init__(self):
      super().__init__()
      self.task_num, self.device, self.rep_grad = num_tasks, "cpu", False
      self.init_param()
      self.aggregated = None

    def _compute_grad_dim(self):
      self.grad_dim = matrix.shape[1]

    def _compute_grad(self, losses, mode, rep_grad=False):
      del losses, mode, rep_grad
      return matrix

    def _reset_grad(self, new_grads):
      self.aggregated = new_grads

  weighting = OnFixedGradients()
  losses = torch.ones(num_tasks)

  def run():
    with torch.no_grad():
      weighting.backward(losses, **kwargs)
    return weighting.aggregated

  return run


# method: (our factory, torchjd factory or None, LibMTL (class, kwargs) or a
# reason string, cross-check settings). Hyper-parameters matched where the
# libraries share them.
def methods(num_tasks: int) -> dict:
  from torchjd import aggregation as jd  # pylint: disable=g-import-not-at-top
  px = pcgrad_optax
  return {
      "mean": (px.mean, jd.Mean, "loss-level only (EW)"),
      "sum": (px.sum, jd.Sum, "loss-level only (EW)"),
      "pcgrad": (lambda: px.pcgrad(0), jd.PCGrad, ("PCGrad", {})),
      "mgda": (px.mgda, jd.MGDA, ("MGDA", {"mgda_gn": "none"})),
      "cagrad": (lambda: px.cagrad(0.5), lambda: jd.CAGrad(c=0.5),
                 "hard-codes T = 3"),
      "imtl_g": (px.imtl_g, jd.IMTLG, ("IMTL", {})),
      "upgrad": (px.upgrad, jd.UPGrad, "not in LibMTL"),
      "dualproj": (px.dualproj, jd.DualProj, "not in LibMTL"),
      # torchjd's default preference vector is 1/T: our reduction="mean".
      "aligned_mtl": (lambda: px.aligned_mtl(reduction="mean"),
                      jd.AlignedMTL, "not in LibMTL"),
      "config": (px.config, jd.ConFIG, "not in LibMTL"),
      "nash_mtl": (lambda: px.nash_mtl(max_norm=1.0),
                   lambda: jd.NashMTL(n_tasks=num_tasks), "not in LibMTL"),
      "gradvac": (lambda: px.gradvac(0, num_tasks=num_tasks, beta=0.5),
                  lambda: jd.GradVac(beta=0.5),
                  ("GradVac", {"beta": 0.5})),
      "graddrop": (lambda: px.graddrop(0), jd.GradDrop,
                   "representation gradients only"),
      "rlw": (lambda: px.rlw(0), jd.Random, "loss-level only"),
      **issue13_methods(num_tasks),
  }


def issue13_methods(num_tasks: int) -> dict:
  """FairGrad, Krum, the trimmed mean, constant weights, CR-MOGM.

  Matched hyper-parameters: FairGrad alpha = 1 without our ridge (torchjd
  solves the equation with SciPy's least_squares); Krum with f = 1 scoring
  by distances (torchjd's convention; squared distances are the paper's
  and our default); CR-MOGM around UPGrad with beta = torchjd's alpha = 0.9
  (both the decay of the previous weights), stepped side by side in
  ``cross_check``. Krum needs T >= 4 and the trimmed mean T >= 3. None of
  them is in LibMTL 1.1.5.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torchjd import aggregation as jd  # pylint: disable=g-import-not-at-top
  px = pcgrad_optax
  weights = np.linspace(0.5, 1.5, num_tasks).astype(np.float32)
  out = {
      "fairgrad": (lambda: px.fairgrad(1.0, ridge=0.0),
                   lambda: jd.FairGrad(alpha=1.0), "not in LibMTL 1.1.5"),
      "constant": (lambda: px.constant(weights),
                   lambda: jd.Constant(torch.from_numpy(weights)),
                   "loss-level only (EW)"),
      "cr_mogm": (lambda: px.cr_mogm(px.weighting.upgrad, 0.9,
                                     num_tasks=num_tasks),
                  lambda: jd.GramianWeightedAggregator(
                      jd.CRMOGMWeighting(jd.UPGradWeighting(), alpha=0.9)),
                  "not in LibMTL"),
  }
  if num_tasks >= 3:
    out["trimmed_mean"] = (lambda: px.trimmed_mean(1),
                           lambda: jd.TrimmedMean(trim_number=1),
                           "not in LibMTL")
  if num_tasks >= 4:
    out["krum"] = (lambda: px.krum(1, squared=False),
                   lambda: jd.Krum(n_byzantine=1), "not in LibMTL")
  return out


# Extra (T, P) float32 buffers an implementation allocates beyond its input,
# where that is more than one (a guess from reading the code, generous): used
# only to skip a cell that would not fit in memory.
_TEMPORARY_COPIES = {
    ("torchjd", "graddrop"): 6, ("torchjd", "config"): 4,
    ("torchjd", "gradvac"): 1, ("torchjd", "rlw"): 1,
    ("LibMTL", "PCGrad"): 1, ("LibMTL", "GradVac"): 1,
    ("LibMTL", "IMTL"): 4, ("LibMTL", "MGDA"): 1,
}


def mem_available() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable"):
        return float(line.split()[1]) * 1024
  return float("inf")


def block(fn):
  return lambda *a: jax.block_until_ready(fn(*a))


def build(num_tasks, matrix, stacked, libmtl, prev_times, max_call):
  """``({label: (fn, args)}, {label: reason skipped})`` for one cell."""
  torch = torch_setup()
  tmatrix = torch.from_numpy(matrix)
  tp_bytes = matrix.nbytes
  fns, skipped = {}, {}
  grads = stacked
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)
  fns["floor"] = (block(jax.jit(
      lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)))), (grads,))

  def fits(lib, name):
    need = _TEMPORARY_COPIES.get((lib, name), 0) * tp_bytes
    return need < mem_available() - 2 * 2**30

  def too_slow(label):
    # Every method here costs at most ~T^2 P (Gram, pairwise loops): scale
    # the time of the same implementation at the previous (smaller) cell.
    if label not in prev_times:
      return None
    t_prev, prev_t, prev_p = prev_times[label]
    predicted = t_prev * (num_tasks / prev_t)**2 * matrix.shape[1] / prev_p
    return f"~{predicted:.0f} s per call predicted" if (
        predicted > max_call) else None

  for name, (ours, theirs, lib) in methods(num_tasks).items():
    tx = ours()
    state = tx.init(params)
    if fits("ours", name):
      fns[f"ours {name}"] = (block(jax.jit(tx.update)), (grads, state))
    else:
      skipped[f"ours {name}"] = "memory"
    agg = theirs()

    def run_torchjd(m, agg=agg):
      with torch.no_grad():
        return agg(m)

    label = f"torchjd {name}"
    if not fits("torchjd", name):
      skipped[label] = "memory"
    elif too_slow(label):
      skipped[label] = too_slow(label)
    else:
      fns[label] = (run_torchjd, (tmatrix,))
    if isinstance(lib, tuple) and libmtl is not None:
      cls_name, kwargs = lib
      label = f"LibMTL {name}"
      if too_slow(label):
        skipped[label] = too_slow(label)
        continue
      if not fits("LibMTL", cls_name):
        skipped[label] = "memory"
        continue
      fns[label] = (libmtl_aggregator(libmtl[cls_name], tmatrix, **kwargs),
                    ())
  return fns, skipped


def cross_check(libmtl, num_tasks: int = 5, seed: int = 1) -> dict:
  """Max |ours - peer| / max |peer| per deterministic method and peer.

  Small data (T tasks, ~25k params); the stateful GradVac on its first step
  at T = 2 (where its random pair order does not matter).
  """
  torch = torch_setup()
  out = {}
  for t in (2, num_tasks):
    matrix, stacked = make_data(t, model_leaves(25_000), seed)
    tmatrix = torch.from_numpy(matrix)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), stacked)
    for name, (ours, theirs, lib) in methods(t).items():
      if name in ("pcgrad", "graddrop", "rlw") or (name == "gradvac" and t > 2):
        continue        # random: pcgrad is checked by bench_pcgrad.py
      if name == "cr_mogm":   # stateful: three steps side by side
        err = stepped_cross_check(ours, theirs, t, seed, params)
        out[(name, "torchjd")] = max(out.get((name, "torchjd"), 0.0), err)
        continue
      tx = ours()
      update, _ = jax.jit(tx.update)(stacked, tx.init(params))
      mine = np.concatenate([np.asarray(update[k]).ravel()
                             for k in sorted(update)])
      with torch.no_grad():
        peers = {"torchjd": theirs()(tmatrix).numpy()}
        if isinstance(lib, tuple) and libmtl is not None:
          peers["LibMTL"] = libmtl_aggregator(
              libmtl[lib[0]], tmatrix, **lib[1])().numpy()
      for peer, value in peers.items():
        err = float(np.abs(mine - value).max() / np.abs(value).max())
        out[(name, peer)] = max(out.get((name, peer), 0.0), err)
  return out


def stepped_cross_check(ours, theirs, num_tasks, seed, params,
                        steps: int = 3) -> float:
  """Max relative difference over ``steps`` updates of a stateful method.

  Ours and the peer's aggregator (holding its own state) see the same
  sequence of stacked gradients.
  """
  torch = torch_setup()
  tx, agg = ours(), theirs()
  state = tx.init(params)
  step = jax.jit(tx.update)
  worst = 0.0
  for k in range(steps):
    matrix, stacked = make_data(num_tasks, model_leaves(25_000),
                                seed + 100 * k)
    update, state = step(stacked, state)
    mine = np.concatenate([np.asarray(update[key]).ravel()
                           for key in sorted(update)])
    with torch.no_grad():
      value = agg(torch.from_numpy(matrix)).numpy()
    worst = max(worst, float(np.abs(mine - value).max()
                             / np.abs(value).max()))
  return worst


def versions() -> str:
  found = []
  for name in ["jax", "jaxlib", "optax", "torch", "torchjd", "LibMTL",
               "cvxpy", "qpsolvers", "quadprog", "numpy"]:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} (not installed)")
  return f"Python {platform.python_version()}, " + ", ".join(found)


def run_cell(num_tasks, num_params, libmtl, prev_times, args):
  leaves = model_leaves(num_params)
  matrix, stacked = make_data(num_tasks, leaves)
  fns, skipped = build(num_tasks, matrix, stacked, libmtl, prev_times,
                       args.max_call)
  # A first call compiles ours; a second one sizes the number of rounds.
  second = {}
  for label, (fn, fargs) in fns.items():
    fn(*fargs)
    t0 = time.perf_counter()
    fn(*fargs)
    second[label] = time.perf_counter() - t0
  per_round = sum(second.values())
  rounds = int(min(args.rounds, max(3, args.cell_budget // max(per_round,
                                                                1e-9))))
  times = time_interleaved(fns, rounds, warmup=0)
  load = load1()
  p = matrix.shape[1]
  for label, (median, _) in times.items():
    prev_times[label] = (median, num_tasks, p)
  del matrix, stacked, fns
  return {"T": num_tasks, "P": p, "rounds": rounds, "load": load,
          "times": {k: v[0] for k, v in times.items()},
          "iqr": {k: v[1] for k, v in times.items()}, "skipped": skipped}


def fmt_ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fastest_peer(cell, name):
  peers = {lib: cell["times"][f"{lib} {name}"] for lib in ("torchjd", "LibMTL")
           if f"{lib} {name}" in cell["times"]}
  if not peers:
    return None, None
  lib = min(peers, key=peers.get)
  return lib, peers[lib]


def tables(cells, names, libmtl) -> list:
  lines = []
  libmtl_entries = {name: entry[2] for name, entry in methods(8).items()}
  # Summary: ours / fastest peer, one column per cell.
  head = [f"T={c['T']}, P={c['P'] / 1e6:.3g}M" for c in cells]
  lines += ["| method | " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(cells)]
  for name in names:
    row = []
    for c in cells:
      ours = c["times"].get(f"ours {name}")
      lib, peer = fastest_peer(c, name)
      if ours is None or peer is None:
        row.append("—")
      else:
        ratio = ours / peer
        row.append(f"**{ratio:.2f}**" if ratio <= 0.5 else f"{ratio:.2f}")
    lines.append(f"| {name} | " + " | ".join(row) + " |")
  lines += ["", "Bold: at most 0.5, the issue's goal. — : no peer has the "
            "method (or its cells were skipped).", ""]
  for c in cells:
    floor = c["times"]["floor"]
    lines += [
        f"### T = {c['T']}, P = {c['P']:,} ({c['rounds']} rounds, 1-min "
        f"load {c['load']:.2f} after)",
        "",
        f"Floor (one read of the {c['T'] * c['P'] * 4 / 2**30:.2f} GiB of "
        f"stacked gradients): {fmt_ms(floor)} ms.",
        "",
        "| method | ours (ms) | torchjd (ms) | LibMTL (ms) | ours / fastest "
        "peer | ours / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
      cols = []
      for lib in ("ours", "torchjd", "LibMTL"):
        label = f"{lib} {name}"
        if label in c["times"]:
          cols.append(fmt_ms(c["times"][label]))
        elif label in c["skipped"]:
          cols.append(f"skipped ({c['skipped'][label]})")
        elif lib == "LibMTL":
          lib_entry = libmtl_entries[name]
          cols.append("not installed" if libmtl is None and
                      isinstance(lib_entry, tuple) else
                      (lib_entry if isinstance(lib_entry, str) else "—"))
        else:
          cols.append("—")
      ours = c["times"].get(f"ours {name}")
      _, peer = fastest_peer(c, name)
      ratio = f"{ours / peer:.2f}" if ours and peer else "—"
      over_floor = f"{ours / floor:.1f}" if ours else "—"
      lines.append(f"| {name} | " + " | ".join(cols)
                   + f" | {ratio} | {over_floor} |")
    lines.append("")
  return lines


def plot(cells, names, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = sorted({c["P"] for c in cells})
  fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.6),
                           squeeze=False, sharey=True)
  for ax, p in zip(axes[0], sizes):
    sub = [c for c in cells if c["P"] == p]
    ts = [c["T"] for c in sub]
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
      ratios = [c["times"][f"ours {name}"] / fastest_peer(c, name)[1]
                if f"ours {name}" in c["times"] and fastest_peer(c, name)[1]
                else np.nan for c in sub]
      ax.plot(ts, ratios, "-", marker="osD^v<>ph*XP8d"[i % 14],
              color=colors[i % len(colors)], label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="tasks T",
           title=f"P = {p / 1e6:.3g}M float32 params")
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()
  axes[0][0].set_ylabel("ours / fastest peer (time)")
  axes[0][-1].legend(fontsize=7, ncol=2)
  fig.suptitle("Aggregation step on CPU: pcgrad_optax vs the faster of "
               "torchjd and LibMTL (below 1: we are faster; dashed: 0.5)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small sizes, few rounds, no waiting")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32, 128])
  parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--cell-budget", type=float, default=60.0,
                      help="seconds of timed rounds per (T, P) cell, roughly")
  parser.add_argument("--max-call", type=float, default=30.0,
                      help="skip a peer call predicted to take longer")
  parser.add_argument("--max-wait", type=float, default=1200.0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--json", default=None,
                      help="cells are saved here as they finish (default "
                      "next to --out); with --resume, cells already in it "
                      "are not run again")
  parser.add_argument("--resume", action="store_true")
  parser.add_argument("--plot-only", action="store_true",
                      help="redraw the PNG from the JSON of a finished run")
  args = parser.parse_args(argv)
  if args.plot_only:
    out = args.out or os.path.join(RESULTS, "aggregators.md")
    with open(args.json or os.path.splitext(out)[0] + ".json") as f:
      cells = json.load(f)["cells"]
    plot(cells, list(methods(2)), os.path.splitext(out)[0] + ".png")
    return
  if args.quick:
    args.tasks, args.params, args.rounds = [2, 8], [2e4], 3
    args.cell_budget, args.max_wait = 5.0, 0.0

  libmtl = load_libmtl()
  print(f"{versions()}; JAX devices {jax.devices()}; torch threads "
        f"{num_threads()}", flush=True)
  checks = cross_check(libmtl)
  for (name, peer), err in checks.items():
    print(f"cross-check {name} vs {peer}: {err:.1e}")
  if args.out is None and not args.quick:
    args.out = os.path.join(RESULTS, "aggregators.md")
  if args.json is None and args.out:
    args.json = os.path.splitext(args.out)[0] + ".json"
  done = []
  if args.resume and args.json and os.path.exists(args.json):
    with open(args.json) as f:
      done = json.load(f)["cells"]
  load_before, waited = wait_for_quiet(args.max_wait)
  start = time.time()
  cells, prev_times = [], {}
  for p in args.params:
    for t in args.tasks:
      old = [c for c in done if c["T"] == t and c["P"] == sum(
          int(np.prod(s)) for s in model_leaves(int(p)).values())]
      if old:
        cell = old[0]
        for label, median in cell["times"].items():
          prev_times[label] = (median, t, cell["P"])
        cells.append(cell)
        continue
      cell = run_cell(t, int(p), libmtl, prev_times, args)
      cells.append(cell)
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"cells": cells, "versions": versions()}, f, indent=1)
      print(f"T={t} P={cell['P']:,}: " + ", ".join(
          f"{k} {v * 1e3:.1f}" for k, v in cell["times"].items())
            + (f"; skipped {cell['skipped']}" if cell["skipped"] else ""),
            flush=True)
  names = list(methods(8))   # T >= 4: every method (Krum needs 4)
  body = tables(cells, names, libmtl)
  print("\n".join(body))
  if args.out is None:
    return
  command = "python benchmarks/bench_aggregators.py" + (
      " " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
  png = os.path.splitext(args.out)[0] + ".png"
  plot(cells, names, png)
  header = [
      "# Aggregation step: pcgrad_optax vs torchjd vs LibMTL on CPU",
      "",
      f"Date: {datetime.date.today().isoformat()}. Command: `{command}` "
      f"(from the repository root); {time.time() - start:.0f} s of timing.",
      f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
      f"{platform.system()} {platform.release()}; JAX backend "
      f"{jax.default_backend()}; torch.set_num_threads({num_threads()}).",
      f"Versions: {versions()}, pcgrad_optax {pcgrad_optax.__version__}.",
      f"1-min load average {load_before:.2f} at the start (after waiting "
      f"{waited:.0f} s); after each cell in the tables (those readings "
      "include this benchmark's own threads).",
      "",
      "What is timed: one aggregation of the same stacked float32 gradients "
      "(see the script's docstring). Medians of interleaved rounds.",
      "",
      "Cross-check on small data (max |ours - peer| / max |peer|, matched "
      "hyper-parameters; T = 2 and 5): " + ", ".join(
          f"{n} vs {p} {e:.1e}" for (n, p), e in checks.items()) + ".",
      "",
      f"![ratios]({os.path.basename(png)})",
      "",
      "## ours / fastest peer",
      "",
  ]
  with open(args.out, "w") as f:
    f.write("\n".join(header + body) + "\n")
  print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
  main()
