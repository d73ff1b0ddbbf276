"""One full multi-task training step: every path of ours against torchjd.

Run from the repository root (in a venv with torch and torchjd for the peer
rows, e.g. /work/venv_bench; they are skipped without them)::

    python benchmarks/bench_step.py           # waits for a quiet machine,
                                              # writes benchmarks/results/step.md
    python benchmarks/bench_step.py --quick   # smoke run in seconds, no file

NOT RUN FOR RESULTS YET: the script is ready, ``--quick`` is smoke-tested;
``benchmarks/results/step.md`` does not exist until someone runs it on a
quiet machine.

Models (the same weights, data and Adam on every path): the MLP of issue 15
(trunk 512-1024-1024-512 with ReLU, ``T`` linear heads of 10 classes, batch
256) and the small CNN of ``bench_e2e.py``. For pcgrad, upgrad and mgda at
``T = 2, 8, 32`` one jitted step (forward, the task backward passes, the
aggregation, Adam, apply) is timed on each path, interleaved round by round
in one process, and summarised by its median:

* ``adam``: ``value_and_grad`` of the summed loss + Adam (the floor);
* ``stacked``: ``value_and_aggregate(engine="stacked")`` (one vmapped VJP);
* ``sequential``: ``task_value_and_grad(batched=False)`` + the aggregator;
* ``streaming``: ``memory.streaming_aggregate`` (Gram from JVP-of-VJP);
* ``gram``: ``value_and_aggregate(engine="gram")`` (per-layer Gram engine);
* ``naive`` (pcgrad only): ravelled gradients, a Python loop over tasks in a
  fixed order, the snippet people paste;
* ``torchjd autojac``: ``mtl_backward(losses, features=...)`` +
  ``jac_to_grad(trunk params, Aggregator())`` + ``torch.optim.Adam``;
* ``torchjd autogram``: ``Engine(trunk)``, ``compute_gramian(losses)``, the
  weighting, ``losses.backward(weights)`` + Adam (heads then get
  ``w_t g_t``, as in torchjd's example).

Memory: for the JAX paths, XLA's compiled ``temp_size_in_bytes`` of the
step (peak scratch beyond the arguments and outputs); torch peak memory is
not measured by this version (RSS is process-wide and monotonic). LibMTL is
not included yet.
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


def cnn_setup(num_tasks, batch, width, seed=0):
  from bench_e2e import MultiTaskCNN, shared_mask  # pylint: disable=g-import-not-at-top
  model = MultiTaskCNN(num_tasks=num_tasks, width=width)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)
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


def jax_paths(method, loss_fn, mask, params):
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
  paths["sequential"] = with_adam(sequential)

  streaming = pcgrad_optax.memory.streaming_aggregate(
      loss_fn, weighting(method), shared=mask)

  def stream(params, s, *batch):
    losses, update, _, _ = streaming(params, *batch)
    return losses, update, s
  paths["streaming"] = with_adam(stream)
  if method == "pcgrad":
    def naive(params, s, *batch):
      losses, g = pcgrad_optax.task_value_and_grad(loss_fn)(params, *batch)
      return losses, naive_pcgrad(g), s
    paths["naive"] = with_adam(naive)
  return {name: (fn, init) for name, fn in paths.items()}


# --- torch -------------------------------------------------------------------

def torch_paths(method, widths, num_tasks, classes, params_np, batch_np):
  """torchjd's two paths on the MLP, or {} without torch/torchjd."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchjd import aggregation as tja  # pylint: disable=g-import-not-at-top
    from torchjd.autogram import Engine  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import jac_to_grad, mtl_backward  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count() or 1)
  x = torch.tensor(np.asarray(batch_np[0]))
  y = torch.tensor(np.asarray(batch_np[1]), dtype=torch.long)
  names = {"pcgrad": ("PCGrad", "PCGradWeighting"),
           "upgrad": ("UPGrad", "UPGradWeighting"),
           "mgda": ("MGDA", "MGDAWeighting")}[method]

  def build():
    layers = []
    for layer in params_np["trunk"]:
      lin = torch.nn.Linear(*layer["w"].shape)
      with torch.no_grad():
        lin.weight.copy_(torch.tensor(np.asarray(layer["w"]).T))
        lin.bias.copy_(torch.tensor(np.asarray(layer["b"])))
      layers += [lin, torch.nn.ReLU()]
    trunk = torch.nn.Sequential(*layers)
    heads = torch.nn.ModuleList()
    for head in params_np["heads"]:
      lin = torch.nn.Linear(widths[-1], classes, bias=False)
      with torch.no_grad():
        lin.weight.copy_(torch.tensor(np.asarray(head["w"]).T))
      heads.append(lin)
    opt = torch.optim.Adam(list(trunk.parameters()) + list(heads.parameters()),
                           lr=1e-3)
    return trunk, heads, opt

  def task_losses(heads, feats):
    ce = torch.nn.functional.cross_entropy
    return [ce(h(feats), y[:, t]) for t, h in enumerate(heads)]

  trunk1, heads1, opt1 = build()
  agg = getattr(tja, names[0])()

  def autojac():
    feats = trunk1(x)
    losses = task_losses(heads1, feats)
    mtl_backward(losses, features=feats)
    jac_to_grad(trunk1.parameters(), agg)
    opt1.step()
    opt1.zero_grad()

  trunk2, heads2, opt2 = build()
  engine = Engine(trunk2, batch_dim=None)
  weighting_fn = getattr(tja, names[1])()

  def autogram():
    feats = trunk2(x)
    losses = torch.stack(task_losses(heads2, feats))
    weights = weighting_fn(engine.compute_gramian(losses))
    losses.backward(weights)
    opt2.step()
    opt2.zero_grad()
  return {"torchjd autojac": autojac, "torchjd autogram": autogram}


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
  box = [params, state]

  def run():
    box[0], box[1] = fn(box[0], box[1], *batch)
    jax.block_until_ready(box[0])
  run()   # compile
  return run


def temp_bytes(fn, params, state, batch):
  try:
    stats = fn.lower(params, state, *batch).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)
  except Exception:   # pylint: disable=broad-except
    return None


def bench_one(model, method, t, args):
  """Times every path for one (model, method, T); returns rows."""
  if model == "mlp":
    widths = args.widths
    params = mlp_params(widths, t, 10)
    rng = np.random.default_rng(1)
    batch = (rng.standard_normal((args.batch, widths[0])).astype(np.float32),
             rng.integers(0, 10, (args.batch, t)))
    loss_fn, mask = mlp_losses, mlp_mask
    torch_fns = torch_paths(method, widths, t, 10, params, batch)
  else:
    params, loss_fn, mask, batch = cnn_setup(t, args.batch, args.cnn_width)
    torch_fns = {}
  paths = jax_paths(method, loss_fn, mask, params)
  fns, memory = {}, {}
  for name, (fn, state) in paths.items():
    fns[name] = jax_runner(fn, params, state, batch)
    memory[name] = temp_bytes(fn, params, state, batch)
  for name, fn in torch_fns.items():
    fn()
    fns[name] = fn
  sec = time_interleaved(fns, args.rounds, args.calls)
  return [(model, method, t, name, sec[name], memory.get(name))
          for name in fns]


def format_table(rows):
  lines = ["| model | method | T | path | ms / step | vs adam | "
           "XLA temp MiB |", "|---|---|---|---|---|---|---|"]
  adam = {(m, me, t): s for m, me, t, n, s, _ in rows if n == "adam"}
  for model, method, t, name, sec, mem in rows:
    base = adam.get((model, method, t))
    lines.append(
        f"| {model} | {method} | {t} | {name} | {sec * 1e3:.2f} | "
        f"{sec / base:.2f}x | "
        f"{'' if mem is None else f'{mem / 2**20:.1f}'} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, one round, no results file")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--max-wait", type=float, default=1800)
  args = parser.parse_args(argv)
  args.widths, args.batch, args.cnn_width = [512, 1024, 1024, 512], 256, 32
  if args.quick:
    args.widths, args.batch, args.cnn_width = [16, 32, 16], 8, 4
    args.tasks, args.rounds, args.calls = [2], 1, 1
  else:
    load, waited = wait_for_quiet(args.max_wait)
    print(f"1-min load {load:.2f} after {waited:.0f} s", flush=True)
  rows = []
  for model in args.models:
    for method in args.methods:
      for t in args.tasks:
        rows += bench_one(model, method, t, args)
        print(format_table([r for r in rows if r[:3] == (model, method, t)]),
              flush=True)
  table = format_table(rows)
  if args.quick:
    return rows
  header = (f"# One training step (`benchmarks/bench_step.py`)\n\n"
            f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, "
            f"{platform.python_version()}, jax {jax.__version__}, "
            f"optax {optax.__version__}, load {load1():.2f}.\n\n")
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "step.md"), "w") as f:
    f.write(header + table + "\n")
  return rows


if __name__ == "__main__":
  main()
