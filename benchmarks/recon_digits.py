"""Recon on real data: layer-wise conflict search, branching and retraining.

The two-task multi-digit set (``pcgrad_optax.datasets.multi_digits``: two of
scikit-learn's bundled 8x8 handwritten digits overlapping on a 12x12 canvas;
task 0 reads the left digit, task 1 the right one) and a Flax Linen MLP whose
shared trunk is four Dense + LayerNorm blocks (eight layers) under two linear
task heads. Following Shi et al., "Recon" (ICLR 2023):

1. search: train joint (equal weights: the sum of the task gradients) with
   ``recon.track_conflicts`` on the shared layers, on a seed of its own, and
   select the top-K layers by S-conflict score;
2. retrain from scratch, over several seeds: joint, PCGrad, every aggregator
   of ``pcgrad_optax`` that exists at run time (by name), three controls (a
   wider joint model with as many parameters as the Recon model, the last K
   layers branched instead of the top K, every layer branched) and Recon
   (the top-K layers branched into one copy per task, copies independently
   initialised as in the official code) + joint and + PCGrad. Every step
   logs the cosine of the two task gradients over the shared parameters and
   per shared layer;
3. write ``benchmarks/results/recon_digits.md`` (tables) and two figures
   (per-layer S-conflict scores; cosine histograms before and after
   branching) next to it.

Usage::

  python benchmarks/recon_digits.py            # full run: a few minutes, CPU
  python benchmarks/recon_digits.py --quick    # smoke test
  python benchmarks/recon_digits.py --methods joint pcgrad   # fewer rows
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax
from pcgrad_optax import datasets
from pcgrad_optax import recon

try:
  from tqdm.auto import tqdm
except ImportError:  # plain prints instead
  tqdm = None

NUM_TASKS = 2
NUM_CLASSES = 10
WIDTHS = (128, 128, 96, 64)
# Aggregators added as rows whenever pcgrad_optax provides them (by name).
CANDIDATE_AGGREGATORS = (
    "mgda", "cagrad", "upgrad", "imtl_g", "nash_mtl", "aligned_mtl",
    "dualproj", "graddrop", "gradvac", "fairgrad", "famo", "dwa", "rlw",
    "uncertainty",
    # Issue 13.
    "config", "constant", "cr_mogm", "excess_mtl", "moco", "db_mtl",
    "gradnorm", "sdmgrad", "modo", "imtl_l", "stch", "geometric_mean",
    "cosmos", "pbi")
# The arguments a factory has no default for (the rest are the library's
# defaults). constant(1, 1) is joint training by another path: the same
# run up to rounding, which 1000 Adam steps amplify (a check of the spread);
# STCH estimates its nadir over the first 100 steps (10 % of the default
# 1000); COSMOS's lambda_ = 1 as in the toy.
AGGREGATOR_KWARGS = {
    "constant": {"weights": (1.0, 1.0)},
    "cr_mogm": {"weighting": pcgrad_optax.weighting.mgda},
    "stch": {"warmup_steps": 100},
    "cosmos": {"lambda_": 1.0},
}
# Methods whose update needs the stacked gradients of a second, independent
# batch (``second_grads=``): each step draws one more batch for them.
SECOND_BATCH = ("sdmgrad", "modo")
# Factories of pcgrad_optax.aggregation/.scalarization that are no rows,
# and why.
NOT_ROWS = {
    "sum": "the `joint` row, equal weights, is the sum",
    "mean": "the sum divided by T = 2: the same Adam run as `joint`",
    "krum": "needs T >= num_byzantine + 3 tasks; this set has T = 2",
    "trimmed_mean": "needs T > 2 trim tasks; T = 2 allows only trim = 0, "
                    "the mean",
    "pcgrad": "a row of its own (always run)",
}
HERE = os.path.dirname(os.path.abspath(__file__))


class TwoTaskMLP(nn.Module):
  """Trunk of Dense -> LayerNorm -> ReLU blocks, one linear head per task.

  The layers are named so that the params' flatten order (which breaks ties
  between equal S-conflict scores) is the network order.
  """
  widths: tuple[int, ...] = WIDTHS

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      h = nn.Dense(width, name=f"L{2 * i}_dense")(h)
      h = nn.LayerNorm(name=f"L{2 * i + 1}_norm")(h)
      h = nn.relu(h)
    return jnp.stack([nn.Dense(NUM_CLASSES, name=f"head_{t}")(h)
                      for t in range(NUM_TASKS)])


class Model:
  """Init, per-task loss and per-task accuracy of one trunk width."""

  def __init__(self, widths):
    self.widths = tuple(widths)
    self.net = TwoTaskMLP(self.widths)
    # compiled once per model (an eager Linen init dispatches op by op)
    self.init = jax.jit(self._init)

  def _init(self, key, x):
    return self.net.init(key, x[:1])["params"]

  def task_loss(self, params, t, x, y):
    logits = self.net.apply({"params": params}, x)[t]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y[:, t]).mean()

  def task_accuracy(self, params, t, x, y):
    logits = self.net.apply({"params": params}, x)[t]
    return jnp.mean(jnp.argmax(logits, -1) == y[:, t])


def heads_mask(params):
  """Trunk leaves True (shared), task heads False."""
  return {name: not name.startswith("head") for name in params}


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def widths_matching(num_params: int, x) -> tuple[int, ...]:
  """Trunk widths, scaled from WIDTHS, whose model has ~num_params params."""
  best = None
  for factor in np.arange(1.0, 3.0, 0.01):
    widths = tuple(int(round(w * factor)) for w in WIDTHS)
    shapes = jax.eval_shape(Model(widths).init, jax.random.key(0), x)
    gap = abs(count_params(shapes) - num_params)
    if best is None or gap < best[0]:
      best = (gap, widths)
  return best[1]


# ----------------------------------------------------------------------------
# Aggregators.


def joint(*, shared=None, reduction="sum"):
  """Equal weights: the sum (or mean) of the task gradients."""
  del shared
  scale = 1.0 if reduction == "sum" else 1.0 / NUM_TASKS

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda g: g.sum(0) * scale, updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def make_aggregator(name: str) -> optax.GradientTransformation:
  if name == "joint":
    return joint(shared=heads_mask)
  factory = getattr(pcgrad_optax, name)
  kwargs = {"shared": heads_mask, **AGGREGATOR_KWARGS.get(name, {})}
  if "num_tasks" in inspect.signature(factory).parameters:
    kwargs["num_tasks"] = NUM_TASKS
  return factory(**kwargs)


def available_aggregators() -> list[str]:
  return [n for n in CANDIDATE_AGGREGATORS
          if callable(getattr(pcgrad_optax, n, None))]


def uncovered_factories() -> list[str]:
  """Public factories that are neither a candidate row nor in NOT_ROWS."""
  from pcgrad_optax import aggregation, scalarization
  names = [n for n in list(aggregation.__all__) + list(scalarization.__all__)
           if n.islower() and not n.endswith("_loss")]  # one-pass forms
  return [n for n in names
          if n not in CANDIDATE_AGGREGATORS and n not in NOT_ROWS]


def needs_second_batch(name: str) -> bool:
  return name in SECOND_BATCH


def show_arg(value) -> str:
  """A weighting by its method's name, anything else as itself."""
  if callable(value):
    return "weighting." + getattr(value, "__name__", "?").removesuffix(
        "_weighting")
  return str(value)


def show_kwargs(kwargs: dict) -> str:
  return ", ".join(f"{k}={show_arg(v)}" for k, v in kwargs.items())


# ----------------------------------------------------------------------------
# Training.


def batch_indices(key, num_examples, steps, batch_size):
  """(steps, batch_size) indices: consecutive shuffled epochs."""
  epochs = -(-steps * batch_size // num_examples)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(
      jax.random.split(key, epochs))
  return perms.reshape(-1)[:steps * batch_size].reshape(steps, batch_size)


def pair_cosine(gram):
  """cos(g_0, g_1) from a 2 x 2 Gram matrix (0 if either is zero)."""
  denom = jnp.sqrt(gram[0, 0] * gram[1, 1])
  return jnp.where(denom > 0, gram[0, 1] / jnp.where(denom > 0, denom, 1), 0)


def conflict_cosines(grads, monitor, all_layers, rest_weights):
  """A step's task cosines: whole shared vector, the rest, each layer.

  From the per-layer Gram matrices of the stacked gradients: the cosine of
  the whole shared gradient, of the layers ``rest_weights`` selects (the
  ones left shared), and of each of ``all_layers`` (NaN where a layer is
  not monitored).
  """
  grams = recon.layer_grams(grads, shared=monitor)
  stacked = jnp.stack([grams.get(n, jnp.zeros((NUM_TASKS, NUM_TASKS)))
                       for n in all_layers])
  whole = pair_cosine(stacked.sum(0))
  rest = pair_cosine(jnp.tensordot(rest_weights, stacked, 1))
  per_layer = jnp.stack([pair_cosine(grams[n]) if n in grams else jnp.nan
                         for n in all_layers])
  return whole, rest, per_layer


def make_train(model: Model, method: str, chosen: list[str],
               all_layers: list[str], example_params, *, steps: int,
               batch_size: int, lr: float, threshold: float):
  """A jitted ``train(params, key, x, y, rest_weights)`` for one row.

  ``chosen`` are the branched layers ([] for an unbranched model). Returns
  the trained params, per-step logs and the S-conflict scores. Logs: task
  losses; the cosine of the two task gradients over every shared parameter
  of this model; over the layers with ``rest_weights`` 1 (a runtime (L,)
  0/1 vector over ``all_layers``: the layers that stay shared after
  branching); and per layer of ``all_layers`` (NaN where branched).
  """
  tx = optax.chain(
      recon.with_branches(
          optax.chain(recon.track_conflicts(threshold, shared=heads_mask),
                      make_aggregator(method)), chosen),
      optax.adam(lr))
  grad_fn = recon.value_and_grad(model.task_loss, chosen, NUM_TASKS)
  # The leaves shared in this model: the trunk minus the branched layers.
  monitor = recon.shared_mask(example_params, chosen, shared=heads_mask)

  second = needs_second_batch(method)

  def train(params, key, x_train, y_train, rest_weights):
    state = tx.init(params)
    idx = batch_indices(key, x_train.shape[0], steps, batch_size)
    if second:   # an independent batch order for the second batch
      idx = jnp.stack([idx, batch_indices(jax.random.fold_in(key, 1),
                                          x_train.shape[0], steps,
                                          batch_size)], axis=1)

    def step(carry, batch_idx):
      params, state = carry
      extra = {}
      if second:
        batch_idx, second_idx = batch_idx[0], batch_idx[1]
        _, extra["second_grads"] = grad_fn(params, x_train[second_idx],
                                           y_train[second_idx])
      losses, grads = grad_fn(params, x_train[batch_idx], y_train[batch_idx])
      whole, rest, per_layer = conflict_cosines(grads, monitor, all_layers,
                                                rest_weights)
      updates, state = tx.update(grads, state, params, losses=losses,
                                 **extra)
      params = optax.apply_updates(params, updates)
      return (params, state), (losses, whole, rest, per_layer)

    (params, state), logs = jax.lax.scan(step, (params, state), idx)
    return params, logs, optax.tree_utils.tree_get(state, "scores")

  return jax.jit(train)


def progress(iterable, total, desc):
  if tqdm is not None:
    return tqdm(iterable, total=total, desc=desc, file=sys.stdout)
  print(desc, flush=True)
  return iterable


# ----------------------------------------------------------------------------
# Report.


def mean_std(values, scale=1.0, digits=2):
  v = np.asarray(values, np.float64) * scale
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def write_figures(out_dir, scores, chosen, histos, threshold):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(scores)
  fig, ax = plt.subplots(figsize=(7, 3.2))
  ax.bar(range(len(names)), [scores[n] for n in names],
         color=["tab:red" if n in chosen else "tab:gray" for n in names])
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel(f"S-conflict score (S = {threshold:g})")
  ax.set_title("Search, joint training: steps with layer cos < S "
               "(red: the branched top-K)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "recon_digits_scores.png"), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharey=True)
  bins = np.linspace(-0.6, 0.6, 61)
  for ax, (before, after) in zip(axes, (("joint", "recon+joint"),
                                        ("pcgrad", "recon+pcgrad"))):
    for name, color, what in ((before, "tab:blue", "before branching"),
                              (after, "tab:orange", "after branching")):
      if name in histos:
        ax.hist(np.clip(histos[name], bins[0], bins[-1]), bins=bins,
                density=True, histtype="step", lw=1.5, color=color,
                label=f"{name} ({what})")
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("cos(g_0, g_1) over the never-branched layers")
    ax.legend(fontsize=7)
  axes[0].set_ylabel("density (all steps, all seeds)")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "recon_digits_cosines.png"), dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny setting for a smoke test")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--threshold", type=float, default=0.0,
                      help="S of the S-conflict score")
  parser.add_argument("--top-k", type=int, default=4,
                      help="number of shared layers to branch")
  parser.add_argument("--severity", type=float, default=-0.02,
                      help="second conflict threshold in the tables")
  parser.add_argument("--methods", nargs="*", default=None,
                      help="base rows (default: joint, pcgrad and every "
                      "available aggregator)")
  parser.add_argument("--no-controls", action="store_true",
                      help="skip the wide-joint and last-K control rows")
  parser.add_argument("--workers", type=int,
                      default=max(1, min(2, os.cpu_count() or 1)),
                      help="rows trained concurrently (threads)")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  parser.add_argument("--merge-into", default=None,
                      help="an earlier recon_digits.md: insert this run's "
                      "rows that it lacks into its tables (written to "
                      "--out/recon_digits.md); this run's joint row must "
                      "reproduce the earlier one exactly")
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds, args.steps = min(args.seeds, 2), 100
  num_train, num_test = (6000, 2000) if not args.quick else (1024, 512)
  t_start, cpu_start = time.time(), time.process_time()

  data = datasets.multi_digits(num_train, num_test, seed=0)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  base_model = Model(WIDTHS)
  params0 = base_model.init(jax.random.key(0), x_train)
  all_layers = recon.layer_names(params0, shared=heads_mask)
  methods = args.methods or (["joint", "pcgrad"] + available_aggregators())
  common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                threshold=args.threshold)
  print(f"{jax.devices()[0].platform}; shared layers {all_layers}; "
        f"methods {methods}", flush=True)
  compiled, evaluators, models = {}, {}, {WIDTHS: base_model}

  def trainer(row, model, method, layers, example):
    if row not in compiled:
      compiled[row] = make_train(model, method, layers, all_layers, example,
                                 **common)
      evaluators[row] = jax.jit(recon.task_losses(model.task_accuracy, layers,
                                                  NUM_TASKS))
    return compiled[row], evaluators[row]

  # 1. Search: joint training on a seed of its own.
  no_rest = jnp.zeros(len(all_layers))
  search, _ = trainer("joint", base_model, "joint", [], params0)
  _, _, scores = search(params0, jax.random.key(1000), x_train, y_train,
                        no_rest)
  scores = {n: int(v) for n, v in scores.items()}
  chosen = recon.select_layers(scores, args.top_k)
  rest = [n for n in all_layers if n not in chosen]
  rest_weights = jnp.asarray([n in rest for n in all_layers], jnp.float32)
  print(f"S-conflict scores {scores}; branched {chosen}", flush=True)

  # 2. The rows: (name, base method, trunk widths, branched layers).
  rows = [(m, m, WIDTHS, []) for m in methods]
  recon_params = count_params(jax.eval_shape(
      lambda k: recon.branch(base_model.init(k, x_train), chosen, NUM_TASKS),
      jax.random.key(0)))
  if not args.no_controls and "joint" in methods:
    rows.append(("joint, wide (params of Recon)", "joint",
                 widths_matching(recon_params, x_train), []))
    rows.append((f"last-{len(chosen)} branched + joint", "joint", WIDTHS,
                 all_layers[-len(chosen):]))
    rows.append(("all branched (one net per task)", "joint", WIDTHS,
                 all_layers))
  rows += [(f"recon+{m}", m, WIDTHS, chosen) for m in ("joint", "pcgrad")
           if m in methods]

  for _, _, widths, _ in rows:
    if widths not in models:
      models[widths] = Model(widths)

  def run_row(row):
    """Compiles one row once and trains it for every seed."""
    name, method, widths, layers = row
    model = models[widths]
    accs, row_logs = [], []
    for seed in range(args.seeds):
      key_init, key_branch, key_data = jax.random.split(jax.random.key(seed),
                                                        3)
      params = model.init(key_init, x_train)
      if layers:
        params = recon.branch(params, layers, NUM_TASKS, key=key_branch,
                              init=lambda k: model.init(k, x_train))
      size = count_params(params)
      train, evaluate = trainer(name, model, method, layers, params)
      params, (losses, whole, rest_cos, layer_cos), _ = train(
          params, key_data, x_train, y_train, rest_weights)
      accs.append(np.asarray(evaluate(params, x_test, y_test)))
      row_logs.append(dict(
          losses=np.asarray(losses), whole=np.asarray(whole),
          rest=np.asarray(rest_cos), layers=np.asarray(layer_cos)))
    return accs, row_logs, size

  # Rows run in threads: XLA compiles and runs outside the GIL, so on a
  # multi-core machine one row compiles while another trains.
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = {pool.submit(run_row, row): row[0] for row in rows}
    results = {}
    for future in progress(concurrent.futures.as_completed(futures),
                           len(futures), "training rows"):
      results[futures[future]] = future.result()
      if tqdm is None:
        accs = np.stack(results[futures[future]][0])
        print(f"  {futures[future]}: mean test accuracy per task "
              f"{np.round(accs.mean(0), 4)}", flush=True)
  acc = {row[0]: results[row[0]][0] for row in rows}
  logs = {row[0]: results[row[0]][1] for row in rows}
  num_params = {row[0]: results[row[0]][2] for row in rows}
  widths_of = {row[0]: row[2] for row in rows}

  elapsed = (time.time() - t_start, time.process_time() - cpu_start)
  os.makedirs(args.out, exist_ok=True)
  histos = {name: np.concatenate([l["rest"] for l in logs[name]])
            for name in logs}
  write_figures(args.out, scores, chosen, histos, args.threshold)
  report = render_report(args, scores, chosen, rest, all_layers, acc, logs,
                         num_params, widths_of, elapsed, num_train, num_test)
  path = os.path.join(args.out, "recon_digits.md")
  if args.merge_into:
    with open(args.merge_into) as f:
      report = merge_reports(f.read(), report, command_line(argv), elapsed)
  with open(path, "w") as f:
    f.write(report)
  print(report)
  print(f"wrote {path} ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU)")


def command_line(argv=None) -> str:
  return "python benchmarks/recon_digits.py" + (
      " " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()


def _table_rows(text: str) -> list[list[str]]:
  """The row lines of each table (after the header and rule) of a report."""
  tables, current = [], None
  for line in text.splitlines():
    if line.startswith("| method |"):
      current = []
      tables.append(current)
    elif current is not None and line.startswith("|") and not line.startswith(
        "|---"):
      current.append(line)
    elif not line.startswith("|"):
      current = None
  return tables


def _row_name(line: str) -> str:
  return line.split("|")[1].strip()


def merge_reports(old: str, new: str, command: str, elapsed) -> str:
  """``old`` with the rows of ``new`` that it lacks inserted into its tables.

  A run with ``--methods joint <new methods> --no-controls`` adds rows to a
  full report without rerunning the others: the rows are inserted after
  the last aggregator row of each table (before the controls), the
  accuracy deltas are appended to the findings, and the header says which
  rows came from which run. The new run's joint rows (and ``recon+joint``)
  must equal the old ones, which holds for the same seeds and settings
  (CPU XLA is deterministic): a ValueError otherwise.
  """
  old_tables, new_tables = _table_rows(old), _table_rows(new)
  if len(old_tables) != len(new_tables):
    raise ValueError("the two reports have different tables")
  for o, n in zip(old_tables, new_tables):
    o_rows = {_row_name(r): r for r in o}
    for r in n:
      if _row_name(r) in o_rows and o_rows[_row_name(r)] != r:
        raise ValueError(f"row {_row_name(r)!r} differs between the runs:\n"
                         f"{o_rows[_row_name(r)]}\n{r}")
  added = [_row_name(r) for r in new_tables[-1]
           if _row_name(r) not in {_row_name(x) for x in old_tables[-1]}]
  lines = old.splitlines()
  for o, n in zip(old_tables, new_tables):
    extra = [r for r in n if _row_name(r) in added]
    # After the last row that is neither a control nor a Recon row.
    anchor = [r for r in o if not (_row_name(r).startswith("recon+") or
                                   "branched" in _row_name(r) or
                                   "wide" in _row_name(r))][-1]
    at = lines.index(anchor) + 1
    lines[at:at] = extra
  text = "\n".join(lines) + "\n"
  mean = lambda row: float(row.split("|")[4].split("±")[0])
  acc_new = {_row_name(r): mean(r) for r in new_tables[-1]}
  deltas = ", ".join(f"{n} {acc_new[n] - acc_new['joint']:+.2f}"
                     for n in added)
  key = "- Mean test accuracy vs joint, in points: "
  start = text.index(key)
  end = text.index(".\n", start)
  text = text[:end] + ", " + deltas + text[end:]
  note = (f"Rows {', '.join(f'`{n}`' for n in added)}: added by `{command}`"
          f" ({elapsed[0]:.0f} s wall, {elapsed[1]:.0f} s CPU time; "
          "same data, seeds and settings), whose `joint` and `recon+joint` "
          "rows reproduce the ones here digit for digit.")
  first = text.index("\n\n", text.index("Generated by")) + 2
  text = text[:first] + note + "\n\n" + text[first:]
  scope_old = text[text.index("Scope: "):].split("\n", 1)[0]
  scope_new = new[new.index("Scope: "):].split("\n", 1)[0]
  return text.replace(scope_old, scope_new)


def render_report(args, scores, chosen, rest, all_layers, acc, logs,
                  num_params, widths_of, elapsed, num_train, num_test) -> str:
  sev = args.severity
  share = lambda key, thr: {n: [np.mean(l[key] < thr) for l in logs[n]]
                            for n in logs}
  whole0, whole_sev = share("whole", 0.0), share("whole", sev)
  rest0, rest_sev = share("rest", 0.0), share("rest", sev)
  rest_mean = {n: [np.mean(l["rest"]) for l in logs[n]] for n in logs}
  fmt_names = lambda names: ", ".join(f"`{n}`" for n in names)
  lines = [
      "# Recon on the two-task multi-digit set",
      "",
      "Generated by `python benchmarks/recon_digits.py"
      f"{' --quick' if args.quick else ''}` ({elapsed[0]:.0f} s wall, "
      f"{elapsed[1]:.0f} s CPU time on {jax.devices()[0].platform.upper()}, "
      f"{os.cpu_count()} cores; jax {jax.__version__}).",
      "",
      "**Setup.** `pcgrad_optax.datasets.multi_digits` (seed 0): two of "
      "scikit-learn's 8x8 handwritten digits on a 12x12 canvas, overlapping "
      "by 4-6 columns, Gaussian pixel noise 0.05; task 0 = left digit, task "
      f"1 = right digit; {num_train} training / {num_test} test images, the "
      "test images made of digits held out of training. Flax Linen MLP: "
      f"{len(WIDTHS)} x (Dense -> LayerNorm -> ReLU) with widths "
      f"{list(WIDTHS)} ({len(all_layers)} shared layers), one linear head per "
      f"task. Adam (lr {args.lr:g}), batch {args.batch_size}, {args.steps} "
      f"steps, cross-entropy per task; {args.seeds} seeds per row "
      "(initialisation and batch order; same data).",
      "",
      "## 1. Search",
      "",
      "Joint training (sum of the task gradients) on its own seed, with "
      f"`recon.track_conflicts({args.threshold:g})` on the trunk: the "
      "S-conflict score of a layer is the number of steps (one task pair) "
      f"whose layer cosine is below S = {args.threshold:g}, out of "
      f"{args.steps}. Branched (top {len(chosen)}): {fmt_names(chosen)}.",
      "",
      "| layer | " + " | ".join(f"`{n}`" for n in scores) + " |",
      "|---|" + "---|" * len(scores),
      "| score | " + " | ".join(str(v) for v in scores.values()) + " |",
      "",
      "![per-layer S-conflict scores](recon_digits_scores.png)",
      "",
      "## 2. Conflicts during training",
      "",
      "Every step of every run logs the cosine of the two task gradients "
      "(a) over all shared parameters of the model being trained and (b) "
      f"over the layers that stay shared after branching ({fmt_names(rest)})"
      ", the same parameters in every row (minus the row's own branched "
      "layers for the last-K control; nothing is shared, and nothing logged, "
      "when every layer is branched). Share of steps below a threshold, "
      "pooled over training, and the mean cosine; mean ± std over seeds. For "
      "Recon rows (a) and (b) coincide.",
      "",
      f"| method | (a) cos < 0 | (a) cos < {sev:g} | (b) cos < 0 | "
      f"(b) cos < {sev:g} | (b) mean cos |",
      "|---|---|---|---|---|---|",
  ]
  for n in logs:
    if np.all(np.isnan(logs[n][0]["layers"])):
      lines.append(f"| {n} | n/a | n/a | n/a | n/a | n/a |")
      continue
    lines.append(
        f"| {n} | {mean_std(whole0[n], 100, 1)} % | "
        f"{mean_std(whole_sev[n], 100, 1)} % | {mean_std(rest0[n], 100, 1)} %"
        f" | {mean_std(rest_sev[n], 100, 1)} % | "
        f"{mean_std(rest_mean[n], 1, 3)} |")
  lines += [
      "",
      "Per shared layer, share of steps with cos < 0 (mean over seeds; `-`: "
      "branched, no longer shared):",
      "",
      "| method | " + " | ".join(f"`{n}`" for n in all_layers) + " |",
      "|---|" + "---|" * len(all_layers),
  ]
  for n in logs:
    per = np.mean([np.mean(l["layers"] < 0, axis=0) for l in logs[n]],
                  axis=0)
    branched = np.all(np.isnan(logs[n][0]["layers"]), axis=0)
    lines.append(f"| {n} | " + " | ".join(
        "-" if b else f"{100 * v:.1f} %" for v, b in zip(per, branched))
        + " |")
  lines += [
      "",
      "![cosine histograms before and after branching]"
      "(recon_digits_cosines.png)",
      "",
      "## 3. Accuracy",
      "",
      f"Test accuracy (%) per task, mean ± std over {args.seeds} seeds. "
      "Parameters include both heads.",
      "",
      "| method | task 0 (left) | task 1 (right) | mean | parameters |",
      "|---|---|---|---|---|",
  ]
  base = num_params.get("joint", min(num_params.values()))
  for n in acc:
    a = np.stack(acc[n])
    extra = num_params[n] / base - 1
    note = f" (+{100 * extra:.1f} %)" if extra > 0.0005 else ""
    if widths_of[n] != WIDTHS:
      note += f", widths {list(widths_of[n])}"
    lines.append(
        f"| {n} | {mean_std(a[:, 0], 100)} | {mean_std(a[:, 1], 100)} | "
        f"{mean_std(a.mean(1), 100)} | {num_params[n]:,}{note} |")
  lines += ["", "## Findings (computed from the tables above)", ""]
  lines += findings(logs, whole0, rest0, rest_sev, rest_mean, acc, sev)
  lines += [
      "",
      "Scope: one data set, one small MLP, one search run, "
      f"{args.seeds} training seeds; the aggregators run with their default "
      "hyperparameters, and where a factory has no default: "
      + "; ".join(f"`{n}({show_kwargs(kw)})`"
                  for n, kw in AGGREGATOR_KWARGS.items()) + ". "
      + ", ".join(f"`{n}`" for n in SECOND_BATCH) + " get the gradients of "
      "a second, independently drawn batch each step (`second_grads=`; one "
      "more backward pass). No rows: " + "; ".join(
          f"`{n}` ({why})" for n, why in NOT_ROWS.items()
          if n != "pcgrad") + ". The controls separate Recon's choice of "
      "layers from its extra parameters: a wider unbranched trunk with "
      "about as many parameters; branching the last K layers instead of "
      "the top-K by S-conflict score; and branching every layer (one "
      "network per task, nothing shared but the input).",
  ]
  return "\n".join(lines) + "\n"


def findings(logs, whole0, rest0, rest_sev, rest_mean, acc, sev):
  pct = lambda v: f"{100 * np.mean(v):.1f} %"
  mean_acc = {n: 100 * np.mean(np.stack(a).mean(1)) for n, a in acc.items()}
  per_layer = {n: np.mean([np.mean(l["layers"] < 0, axis=0) for l in logs[n]],
                          axis=0) for n in logs}
  out = []
  if "joint" in whole0 and "pcgrad" in whole0:
    gap = np.max(np.abs(per_layer["pcgrad"] - per_layer["joint"]))
    out.append(
        "- Surgery vs conflicts: the share of steps whose shared-parameter "
        f"gradients conflict (cos < 0) is {pct(whole0['pcgrad'])} with "
        f"PCGrad and {pct(whole0['joint'])} with joint training; per layer "
        f"the two differ by at most {100 * gap:.1f} points.")
  word = lambda a, b: "higher" if np.mean(a) > np.mean(b) else "lower"
  for base in ("joint", "pcgrad"):
    r = f"recon+{base}"
    if base in rest0 and r in rest0:
      out.append(
          f"- {r} vs {base}, on the never-branched layers: cos < 0 in "
          f"{pct(rest0[r])} vs {pct(rest0[base])} of the steps "
          f"({word(rest0[r], rest0[base])} after branching); cos < {sev:g} "
          f"in {pct(rest_sev[r])} vs {pct(rest_sev[base])} "
          f"({word(rest_sev[r], rest_sev[base])}); mean cosine "
          f"{np.mean(rest_mean[r]):.3f} vs {np.mean(rest_mean[base]):.3f}.")
  if "joint" in acc:
    deltas = ", ".join(f"{n} {mean_acc[n] - mean_acc['joint']:+.2f}"
                       for n in acc if n != "joint")
    out.append(f"- Mean test accuracy vs joint, in points: {deltas}.")
  if "recon+joint" in acc:
    for control in acc:
      if control.startswith(("joint, wide", "last-", "all branched")):
        out.append(
            f"- recon+joint vs the control '{control}': "
            f"{mean_acc['recon+joint'] - mean_acc[control]:+.2f} points of "
            "mean test accuracy.")
  return out


if __name__ == "__main__":
  main()
