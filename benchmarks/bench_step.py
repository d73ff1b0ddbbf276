"""One full multi-task training step: every path of ours against the peers.

Run from the repository root in a venv with torch, torchjd and LibMTL
(``--no-deps``) for the peer rows, e.g. ``/work/venv_bench``; peers that are
missing are skipped::

    PYTHONPATH=. /work/venv_bench/bin/python benchmarks/bench_step.py
        # ~12 min on a quiet 2-core machine (estimated); writes
        # benchmarks/results/step.md (after every configuration) and step.png
    PYTHONPATH=. /work/venv_bench/bin/python benchmarks/bench_step.py --quick
        # smoke run, tiny sizes, no file

Models (the same weights, data and Adam(1e-3) on every path): the MLP of
issue 15 (trunk 512-1024-1024-512 with ReLU, ``T`` linear heads of 10
classes, batch 256) and the small CNN of ``bench_e2e.py`` (batch 128, 12x12
inputs, width 32). For pcgrad, upgrad and mgda at ``T = 2, 8, 32`` one
training step (forward, the task backward passes, the aggregation, Adam,
apply; one ``jax.jit`` for the JAX paths) is timed on each path, interleaved
round by round in one process, and summarised by its median:

* ``adam``: ``value_and_grad`` of the summed loss + Adam (the floor);
* ``stacked``: ``value_and_aggregate(engine="stacked")``;
* ``gram``: ``value_and_aggregate(engine="gram")`` (per-layer Gram engine);
* ``sequential``: ``task_value_and_grad(batched=False)`` + the aggregator
  (only up to ``--max-sequential`` tasks: its program grows with T);
* ``tvg + chain``: ``task_value_and_grad`` + ``optax.chain(method(shared=
  trunk), adam)``, the default user path;
* ``streaming``: ``memory.streaming_aggregate`` (Gram from JVP-of-VJP);
* ``naive python loop`` / ``naive lax loop`` (pcgrad only): ``jax.jacrev``,
  the gradients ravelled, PCGrad's projections in a fixed order in a Python
  loop or in ``lax.fori_loop`` s, over all parameters: the snippet people
  paste;
* ``torchjd autojac``: ``mtl_backward(losses, features=...)`` +
  ``jac_to_grad(trunk params, Aggregator())`` + ``torch.optim.Adam``;
* ``torchjd autogram``: ``Engine(trunk)``, ``compute_gramian(losses)``, the
  weighting, ``losses.backward(weights)`` + Adam (heads then get
  ``w_t g_t``, as in torchjd's example);
* ``LibMTL`` (pcgrad, mgda; it has no UPGrad): its weighting class's
  ``backward`` (T ``backward`` calls, the flattened ``(T, P)`` gradients,
  its surgery, written into ``.grad``) on our trunk + Adam; MGDA with
  ``mgda_gn="none"``.

Memory column: for the JAX paths XLA's ``memory_analysis`` of the compiled
step, ``temp`` (scratch beyond arguments and outputs) and ``total`` (temp
+ arguments + outputs - aliased: parameters, optimizer state and batch
included; XLA:CPU's own ``peak_memory_in_bytes`` leaves temp out); for
torch, in a child process per path (pcgrad only), the peak RSS during three
steps minus the RSS before them (after a warm-up step): what a step adds
beyond the model and Adam's state, comparable to XLA's ``temp``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

import pcgrad_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name, load1, wait_for_quiet  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("pcgrad", "upgrad", "mgda")


# --- the models (JAX) ----------------------------------------------------------

def mlp_params(widths, num_tasks, classes, seed=0):
  rng = np.random.default_rng(seed)
  trunk = [{"w": rng.standard_normal((a, b)).astype(np.float32)
                 / np.sqrt(a), "b": np.zeros(b, np.float32)}
           for a, b in zip(widths[:-1], widths[1:])]
  heads = rng.standard_normal((num_tasks, widths[-1], classes)).astype(
      np.float32) / np.sqrt(widths[-1])
  return {"trunk": trunk, "heads": [{"w": h} for h in heads]}


def mlp_losses(params, x, labels):
  h = x
  for layer in params["trunk"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = jnp.stack([h @ head["w"] for head in params["heads"]], axis=1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, labels), axis=0)                       # (T,)


def mlp_mask(params):
  return {"trunk": True, "heads": False}


def cnn_setup(num_tasks, batch, width, image=12, seed=0):
  from bench_e2e import MultiTaskCNN, shared_mask  # pylint: disable=g-import-not-at-top
  model = MultiTaskCNN(num_tasks=num_tasks, width=width)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, image, image, 1)).astype(np.float32)
  y = rng.integers(0, 10, (batch, num_tasks))
  params = model.init(jax.random.key(seed), x)

  def losses(p, x, labels):
    logits = model.apply(p, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, labels), axis=0)
  return params, losses, shared_mask, (x, y)


def aggregator(method):
  return {"pcgrad": lambda: pcgrad_optax.pcgrad(key=0),
          "upgrad": pcgrad_optax.upgrad, "mgda": pcgrad_optax.mgda}[method]()


def weighting(method):
  key = jax.random.key(0)
  return {"pcgrad": lambda k: pcgrad_optax.weighting.pcgrad(k, key=key),
          "upgrad": pcgrad_optax.weighting.upgrad,
          "mgda": pcgrad_optax.weighting.mgda}[method]


def naive_pcgrad(stacked):
  """The pasted snippet: ravel, fixed order, a Python loop over tasks."""
  flat = jnp.stack([ravel_pytree(jax.tree.map(lambda g, t=t: g[t], stacked))[0]
                    for t in range(jax.tree.leaves(stacked)[0].shape[0])])
  unravel = ravel_pytree(jax.tree.map(lambda g: g[0], stacked))[1]
  out = []
  for i in range(flat.shape[0]):
    g = flat[i]
    for j in range(flat.shape[0]):
      if j != i:
        dot = g @ flat[j]
        g = g - jnp.minimum(dot, 0.0) / (flat[j] @ flat[j] + 1e-12) * flat[j]
    out.append(g)
  return unravel(sum(out))


def naive_pcgrad_lax(stacked):
  """The same snippet with ``lax.fori_loop`` loops (fixed order)."""
  flat = jax.vmap(lambda g: ravel_pytree(g)[0])(stacked)
  unravel = ravel_pytree(jax.tree.map(lambda g: g[0], stacked))[1]
  t = flat.shape[0]

  def project(i, total):
    def against(j, g):
      dot = g @ flat[j]
      coef = jnp.where((j != i) & (dot < 0),
                       dot / (flat[j] @ flat[j] + 1e-12), 0.0)
      return g - coef * flat[j]
    return total + lax.fori_loop(0, t, against, flat[i])
  return unravel(lax.fori_loop(0, t, project, jnp.zeros_like(flat[0])))


def jax_paths(method, loss_fn, mask, params, sequential_ok=True):
  """``{name: (jitted step, its state)}`` for the JAX paths."""
  opt = optax.adam(1e-3)
  agg = aggregator(method)
  paths = {}

  def with_adam(update_fn):
    def step(params, states, *batch):
      agg_state, opt_state = states
      losses, update, agg_state = update_fn(params, agg_state, *batch)
      updates, opt_state = opt.update(update, opt_state, params)
      return optax.apply_updates(params, updates), (agg_state, opt_state)
    return jax.jit(step)

  init = (agg.init(params), opt.init(params))

  def adam_fn(params, s, *batch):
    loss, g = jax.value_and_grad(lambda p: jnp.sum(loss_fn(p, *batch)))(
        params)
    return loss, g, s
  paths["adam"] = with_adam(adam_fn)
  for engine in ("stacked", "gram"):
    paths[engine] = with_adam(pcgrad_optax.value_and_aggregate(
        loss_fn, agg, engine=engine, shared=mask))

  ref_agg = {"pcgrad": lambda: pcgrad_optax.pcgrad(key=0, shared=mask),
             "upgrad": lambda: pcgrad_optax.upgrad(shared=mask),
             "mgda": lambda: pcgrad_optax.mgda(shared=mask)}[method]()

  def sequential(params, s, *batch):
    losses, g = pcgrad_optax.task_value_and_grad(loss_fn, batched=False)(
        params, *batch)
    update, s = ref_agg.update(g, s, params)
    return losses, update, s
  if sequential_ok:
    paths["sequential"] = with_adam(sequential)

  # The default user path: task_value_and_grad + optax.chain(method, adam).
  chained = optax.chain(ref_agg, opt)

  def user(params, state, *batch):
    _, g = pcgrad_optax.task_value_and_grad(loss_fn)(params, *batch)
    updates, state = chained.update(g, state, params)
    return optax.apply_updates(params, updates), state
  paths["tvg + chain"] = (jax.jit(user), chained.init(params))

  streaming = pcgrad_optax.memory.streaming_aggregate(
      loss_fn, weighting(method), shared=mask)

  def stream(params, s, *batch):
    losses, update, _, _ = streaming(params, *batch)
    return losses, update, s
  paths["streaming"] = with_adam(stream)
  if method == "pcgrad":
    for name, surgery in (("naive python loop", naive_pcgrad),
                          ("naive lax loop", naive_pcgrad_lax)):
      def naive(params, s, *batch, surgery=surgery):
        losses = loss_fn(params, *batch)
        g = jax.jacrev(loss_fn)(params, *batch)   # what people write
        return losses, surgery(g), s
      paths[name] = with_adam(naive)
  return {name: (fn, init) if not isinstance(fn, tuple) else fn
          for name, fn in paths.items()}


# --- torch -------------------------------------------------------------------

def torch_modules(model, params, classes=10):
  """``(trunk, heads)`` in torch with the JAX model's weights."""
  import torch  # pylint: disable=g-import-not-at-top
  tensor = lambda a: torch.tensor(np.array(a))

  def linear(kernel, bias=None):
    lin = torch.nn.Linear(*kernel.shape, bias=bias is not None)
    with torch.no_grad():
      lin.weight.copy_(tensor(kernel).T)
      if bias is not None:
        lin.bias.copy_(tensor(bias))
    return lin

  if model == "mlp":
    layers = []
    for layer in params["trunk"]:
      layers += [linear(layer["w"], layer["b"]), torch.nn.ReLU()]
    heads = [linear(h["w"]) for h in params["heads"]]
    return torch.nn.Sequential(*layers), torch.nn.ModuleList(heads)
  p = params["params"]

  def conv(name):
    k = np.asarray(p[name]["kernel"])                 # HWIO
    c = torch.nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding=1)
    with torch.no_grad():
      c.weight.copy_(tensor(k.transpose(3, 2, 0, 1)))
      c.bias.copy_(tensor(p[name]["bias"]))
    return c

  class NHWCFlatten(torch.nn.Module):   # flatten in Flax's NHWC order
    def forward(self, h):
      return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)

  trunk = torch.nn.Sequential(
      conv("conv_0"), torch.nn.ReLU(), conv("conv_1"), torch.nn.ReLU(),
      torch.nn.AvgPool2d(2), conv("conv_2"), torch.nn.ReLU(), NHWCFlatten(),
      linear(p["dense_0"]["kernel"], p["dense_0"]["bias"]), torch.nn.ReLU())
  heads = [linear(p[f"head_{t}"]["kernel"], p[f"head_{t}"]["bias"])
           for t in range(sum(k.startswith("head_") for k in p))]
  return trunk, torch.nn.ModuleList(heads)


TORCH_PATHS = ("torchjd autojac", "torchjd autogram", "LibMTL")


def torch_step(path, method, model, params, batch_np):
  """One torch training step as a zero-argument function, or None.

  None when torch/torchjd (LibMTL) is missing or the library has no such
  method (LibMTL has no UPGrad).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchjd import aggregation as tja  # pylint: disable=g-import-not-at-top
    from torchjd.autogram import Engine  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import jac_to_grad, mtl_backward  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  x = torch.tensor(np.asarray(batch_np[0]))
  if model == "cnn":
    x = x.permute(0, 3, 1, 2).contiguous()             # NHWC -> NCHW
  y = torch.tensor(np.asarray(batch_np[1]), dtype=torch.long)
  trunk, heads = torch_modules(model, params)
  opt = torch.optim.Adam(list(trunk.parameters()) + list(heads.parameters()),
                         lr=1e-3)
  ce = torch.nn.functional.cross_entropy

  def task_losses(feats):
    return [ce(h(feats), y[:, t]) for t, h in enumerate(heads)]

  if path == "torchjd autojac":
    agg = getattr(tja, {"pcgrad": "PCGrad", "upgrad": "UPGrad",
                        "mgda": "MGDA"}[method])()

    def step():
      feats = trunk(x)
      mtl_backward(task_losses(feats), features=feats)
      jac_to_grad(trunk.parameters(), agg)
      opt.step()
      opt.zero_grad()
    return step
  if path == "torchjd autogram":
    engine = Engine(trunk, batch_dim=None)
    weighting_fn = getattr(tja, {"pcgrad": "PCGradWeighting",
                                 "upgrad": "UPGradWeighting",
                                 "mgda": "MGDAWeighting"}[method])()

    def step():
      losses = torch.stack(task_losses(trunk(x)))
      losses.backward(weighting_fn(engine.compute_gramian(losses)))
      opt.step()
      opt.zero_grad()
    return step
  from bench_aggregators import load_libmtl  # pylint: disable=g-import-not-at-top
  classes = load_libmtl()
  if classes is None or method not in ("pcgrad", "mgda"):
    return None
  base = classes["PCGrad" if method == "pcgrad" else "MGDA"]

  class OnTrunk(base):
    """LibMTL's weighting on our trunk (its trainer is not used)."""

    def __init__(self):
      super().__init__()
      self.task_num, self.device, self.rep_grad = len(heads), "cpu", False

    def get_share_params(self):
      return trunk.parameters()

    def zero_grad_share_params(self):
      trunk.zero_grad(set_to_none=False)

  weighting_obj = OnTrunk()
  kwargs = {} if method == "pcgrad" else {"mgda_gn": "none"}

  def step():
    weighting_obj.backward(task_losses(trunk(x)), **kwargs)
    opt.step()
    opt.zero_grad(set_to_none=False)
  return step


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def torch_child(args):
  """``--torch-child``: one torch path's peak RSS growth in a step, MiB.

  Run in a fresh process per path. One warm-up step first (it allocates
  Adam's moments and torch's lazily created buffers), then the peak RSS
  (``VmHWM``) is reset to the current RSS through ``/proc/self/clear_refs``
  and three steps run: the peak minus the RSS before them is what a step
  adds (autograd graph, per-task gradients, the Jacobian or Gramian).
  Prints one number (or "none").
  """
  import gc  # pylint: disable=g-import-not-at-top
  model, method, t, path = args.torch_child
  params, _, _, batch = setup(model, int(t), args)
  step = torch_step(path, method, model, params, batch)
  if step is None:
    print("none")
    return
  step()
  gc.collect()
  before = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  for _ in range(3):
    step()
  print(f"{(_status_kib('VmHWM') - before) / 1024:.1f}")


def torch_memory(model, method, t, path, args):
  """Peak RSS growth of one torch path (a child process), MiB, or None."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, os.path.abspath(__file__), "--torch-child", model,
         method, str(t), path, "--batch", str(args.batch)]
  if args.quick:
    cmd.append("--quick")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=600).stdout.split()[-1]
    return None if out == "none" else float(out)
  except Exception as e:   # pylint: disable=broad-except
    print(f"  (torch memory of {path}: {e})", file=sys.stderr)
    return None


# --- timing -------------------------------------------------------------------

def time_interleaved(fns, rounds, calls):
  """Median seconds per call of each fn, rounds interleaved."""
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(calls):
        fn()
      samples[name].append((time.perf_counter() - t0) / calls)
  return {name: statistics.median(s) for name, s in samples.items()}


def jax_runner(fn, params, state, batch):
  """``(run, (temp, peak) bytes)``: one compile serves both."""
  compiled = fn.lower(params, state, *batch).compile()
  box = [params, state]

  def run():
    box[0], box[1] = compiled(box[0], box[1], *batch)
    jax.block_until_ready(box[0])
  run()   # warm up
  try:
    stats = compiled.memory_analysis()
    temp = int(stats.temp_size_in_bytes)
    # peak_memory_in_bytes of XLA:CPU leaves temp out (it reads the same
    # for every path), so the total is summed here.
    memory = (temp, temp + int(stats.argument_size_in_bytes)
              + int(stats.output_size_in_bytes)
              - int(stats.alias_size_in_bytes))
  except Exception:   # pylint: disable=broad-except
    memory = (None, None)
  return run, memory


def setup(model, t, args):
  """``(params, loss_fn, shared mask, batch)`` as NumPy/JAX values."""
  if model == "mlp":
    params = mlp_params(args.widths, t, 10)
    rng = np.random.default_rng(1)
    batch = (rng.standard_normal((args.batch, args.widths[0])).astype(
        np.float32), rng.integers(0, 10, (args.batch, t)))
    return params, mlp_losses, mlp_mask, batch
  return cnn_setup(t, args.batch, args.cnn_width, args.image)


def bench_one(model, method, t, args):
  """Times every path for one (model, method, T); returns rows."""
  params, loss_fn, mask, batch = setup(model, t, args)
  paths = jax_paths(method, loss_fn, mask, params,
                    sequential_ok=t <= args.max_sequential)
  fns, memory = {}, {}
  for name, (fn, state) in paths.items():
    fns[name], memory[name] = jax_runner(fn, params, state, batch)
  for name in TORCH_PATHS:
    fn = torch_step(name, method, model, params, batch)
    if fn is None:
      continue
    fn()
    fns[name] = fn
    if method == args.methods[0]:   # one child process per path and T
      memory[name] = (None, torch_memory(model, method, t, name, args))
  sec = time_interleaved(fns, args.rounds, args.calls)
  return [(model, method, t, name, sec[name], memory.get(name))
          for name in fns]


def format_table(rows):
  lines = ["| model | method | T | path | ms / step | vs adam | "
           "vs torch's faster | memory MiB |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  adam = {r[:3]: r[4] for r in rows if r[3] == "adam"}
  torch_best = {}
  for r in rows:
    if r[3].startswith("torchjd"):
      torch_best[r[:3]] = min(torch_best.get(r[:3], np.inf), r[4])
  for model, method, t, name, sec, mem in rows:
    base = adam.get((model, method, t))
    best = torch_best.get((model, method, t))
    if mem is None or mem == (None, None):
      mem_s = ""
    elif name in TORCH_PATHS:
      mem_s = "" if mem[1] is None else f"RSS +{mem[1]:.1f}"
    else:
      mem_s = f"temp {mem[0] / 2**20:.1f}, total {mem[1] / 2**20:.1f}"
    lines.append(
        f"| {model} | {method} | {t} | {name} | {sec * 1e3:.1f} | "
        f"{sec / base:.2f}x | "
        f"{'' if best is None else f'{sec / best:.2f}x'} | {mem_s} |")
  return "\n".join(lines)


def plot(rows, path):
  """ms per step against T, one panel per (model, method), log scales."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  panels = sorted({r[:2] for r in rows}, key=lambda k: (
      k[0] != "mlp", METHODS.index(k[1]) if k[1] in METHODS else 9))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4),
                           squeeze=False)
  names = list(dict.fromkeys(r[3] for r in rows))
  for ax, (model, method) in zip(axes[0], panels):
    for name in names:
      pts = sorted((r[2], r[4] * 1e3) for r in rows
                   if r[:2] == (model, method) and r[3] == name)
      if pts:
        style = "--" if name in TORCH_PATHS else "-"
        ax.plot(*zip(*pts), style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"{model}, {method}")
    ax.set_xlabel("tasks T")
    ax.set_ylabel("ms / step")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_results(rows, args, command, load_start, t_start, final=False):
  """Writes ``args.out`` (and the plot, at the end) from the rows so far."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  versions = [f"jax {jax.__version__}", f"optax {optax.__version__}"]
  for dist in ("flax", "torch", "torchjd", "LibMTL"):
    try:
      versions.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      pass
  header = (
      f"# One training step (`benchmarks/bench_step.py`)\n\n"
      f"Command: `{command}`.\n\n"
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
      f"{cpu_name()}, {os.cpu_count()} cores, Python "
      f"{platform.python_version()}, {', '.join(versions)}. 1-min load "
      f"{load_start:.2f} at the start, {load1():.2f} now; "
      f"{time.time() - t_start:.0f} s so far"
      f"{'' if final else ' (run not finished)'}.\n\n")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  png = plot(rows, os.path.splitext(args.out)[0] + ".png") if final else None
  with open(args.out, "w") as f:
    f.write(header + format_table(rows) + "\n")
    if png:
      f.write(f"\n![ms per step]({os.path.basename(png)})\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, one round, no results file")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--calls", type=int, default=1)
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size (MLP 256, CNN 128 by default)")
  parser.add_argument("--max-sequential", type=int, default=8,
                      help="largest T with the sequential path (its "
                      "program, and compile time, grow with T)")
  parser.add_argument("--max-wait", type=float, default=0)
  parser.add_argument("--out", default=os.path.join(RESULTS, "step.md"))
  parser.add_argument("--torch-child", nargs=4, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.widths, args.cnn_width, args.image = [512, 1024, 1024, 512], 32, 12
  if args.quick:
    args.widths, args.cnn_width, args.image = [16, 32, 16], 4, 6
    args.tasks, args.rounds, args.calls = [2], 1, 1
  if args.torch_child:
    args.batch = args.batch or 8
    return torch_child(args)
  t_start = time.time()
  load_start = load1()
  if not args.quick and args.max_wait > 0:
    load_start, waited = wait_for_quiet(args.max_wait)
    print(f"1-min load {load_start:.2f} after {waited:.0f} s", flush=True)
  command = (f"cd <repository root> && PYTHONPATH=. nice -n 0 "
             f"{sys.executable} benchmarks/bench_step.py " + " ".join(
                 sys.argv[1:] if argv is None else argv)).strip()
  rows = []
  for model in args.models:
    batch_arg = args.batch
    if args.batch is None:
      args.batch = 8 if args.quick else {"mlp": 256, "cnn": 128}[model]
    for method in args.methods:
      for t in args.tasks:
        rows += bench_one(model, method, t, args)
        print(format_table([r for r in rows if r[:3] == (model, method, t)]),
              f"\n(load {load1():.2f}, {time.time() - t_start:.0f} s)",
              flush=True)
        if not args.quick:   # rewritten after every configuration
          write_results(rows, args, command, load_start, t_start)
    args.batch = batch_arg
  if not args.quick:
    write_results(rows, args, command, load_start, t_start, final=True)
  return rows


if __name__ == "__main__":
  main()
