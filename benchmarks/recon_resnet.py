"""Recon on a small ResNet with BatchNorm: the paper's procedure and metric.

Shi et al., "Recon" (ICLR 2023) make their main claim on a ResNet18 with
BatchNorm (Multi-Fashion+MNIST): branching the top 25 of its 41 layers by
S-conflict score (S = -0.1; BatchNorm layers dominate the top) costs +1.45 %
parameters and cuts the share of whole-shared-vector task-gradient cosines
below -0.01 by 67-80 % against joint training. This script redoes that
experiment on the two-task multi-digit set
(``pcgrad_optax.datasets.multi_digits``) with a ResNet-style CNN (a stem
conv-BN, one basic residual block per stage, conv-BN-ReLU-conv-BN plus a
1x1 conv-BN shortcut where the shape changes, global average pooling, a
shared fc layer and one linear head per task, as the official
``MnistResNet_recon``), and, for comparison, with the LayerNorm MLP of
``benchmarks/recon_digits.py`` under the same procedure:

1. search: joint training (the sum of the task gradients) with
   ``recon.track_conflicts(S)`` on every shared layer (a conv, a BatchNorm's
   scale and bias, the fc layer: the paper's layers), on a seed of its own;
   the top K = round(L * 25 / 41) layers by score are branched;
2. retrain from scratch, 3 seeds each: joint, PCGrad, Recon + joint,
   Recon + PCGrad, the controls (K random layers, the first K, the last K,
   a wider joint model with Recon's parameter count) and single-task
   learning (every layer branched: one network per task, the baseline of the
   paper's Δm). Branched copies are independently initialised (the official
   code); branched BatchNorm layers get their own running statistics
   (``recon.branch_state`` / ``task_state`` / ``merge_task_states``);
3. log every step the cosine of the two task gradients over (a) every shared
   parameter of the model being trained and (b) the layers Recon keeps
   shared, and report the paper's "reduction %" (the relative drop, against
   joint training, of the share of steps with cosine below -0.01), test
   accuracy per task, Δm and parameters in
   ``benchmarks/results/recon_resnet.md`` with a figure of the scores.

Usage::

  python benchmarks/recon_resnet.py              # full run (~11 min CPU time)
  python benchmarks/recon_resnet.py --quick --out /tmp/r   # smoke run
  python benchmarks/recon_resnet.py --models resnet --methods joint
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import pickle
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcgrad_optax import datasets
from pcgrad_optax import recon

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# pylint: disable=g-import-not-at-top,wrong-import-position
import recon_digits as rd  # noqa: E402
from recon_digits import (NUM_CLASSES, NUM_TASKS, count_params,  # noqa: E402
                          heads_mask, make_aggregator, mean_std)

# The paper: ResNet18 on Multi-Fashion+MNIST, top 25 of its 41 layers.
PAPER_SHARE = 25 / 41
RESNET_WIDTHS = (16, 32, 64)
RESNET_FC = 64
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResNet(nn.Module):
  """Stem conv-BN-ReLU, one basic block per stage, pool, fc, two heads.

  Convolutions have no bias (BatchNorm follows), Kaiming fan-out init, as in
  torchvision's ResNet. Layers are named ``Lnn_<block>_<kind>`` so that the
  params' flatten order (which breaks ties between equal scores, and defines
  "first K" and "last K") is the network order of the official code
  (conv1, bn1, conv2, bn2, then the shortcut).
  """
  widths: tuple[int, ...] = RESNET_WIDTHS
  fc: int = RESNET_FC

  @nn.compact
  def __call__(self, x, train: bool = True):
    index = itertools.count()

    def conv_bn(h, features, kernel, stride, name):
      pad = kernel // 2
      h = nn.Conv(features, (kernel, kernel), (stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=_CONV_INIT,
                  name=f"L{next(index):02d}_{name}_conv")(h)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                          epsilon=1e-5,
                          name=f"L{next(index):02d}_{name}_bn")(h)

    h = nn.relu(conv_bn(x[..., None], self.widths[0], 3, 1, "stem"))
    channels = self.widths[0]
    for i, width in enumerate(self.widths):
      stride = 1 if i == 0 else 2
      out = nn.relu(conv_bn(h, width, 3, stride, f"b{i}a"))
      out = conv_bn(out, width, 3, 1, f"b{i}b")
      if stride != 1 or channels != width:
        h = conv_bn(h, width, 1, stride, f"b{i}down")
      h = nn.relu(out + h)
      channels = width
    h = jnp.mean(h, axis=(1, 2))
    h = nn.relu(nn.Dense(self.fc, name=f"L{next(index):02d}_fc")(h))
    return jnp.stack([nn.Dense(NUM_CLASSES, name=f"head_{t}")(h)
                      for t in range(NUM_TASKS)])


class Model:
  """One architecture at one width: init, per-task loss and accuracy.

  ``init(key, x) -> (params, state)``; the state is the Linen
  ``batch_stats`` collection (``{}`` for the MLP). The task functions take
  the (branched) state and the branched layer names and use task ``t``'s
  view of it.
  """

  def __init__(self, kind: str, widths):
    self.kind, self.widths = kind, tuple(widths)
    if kind == "resnet":
      self.net = ResNet(self.widths[:-1], self.widths[-1])
    else:
      self.net = rd.TwoTaskMLP(self.widths)
    # separate VJPs per task: a vmapped pullback through convolutions is
    # several times slower on XLA:CPU (recon.value_and_grad's docstring)
    self.batched = kind != "resnet"
    self.init = jax.jit(self._init)

  def _init(self, key, x):
    variables = self.net.init(key, x[:1], train=False) \
        if self.kind == "resnet" else self.net.init(key, x[:1])
    return variables["params"], variables.get("batch_stats", {})

  def _apply(self, params, state, x, train):
    if self.kind != "resnet":
      return self.net.apply({"params": params}, x), state
    if train:
      out, new = self.net.apply({"params": params, "batch_stats": state}, x,
                                train=True, mutable=["batch_stats"])
      return out, new["batch_stats"]
    return self.net.apply({"params": params, "batch_stats": state}, x,
                          train=False), state

  def task_loss(self, layers):
    def loss(params, t, state, x, y):
      logits, new = self._apply(params, recon.task_state(state, layers, t),
                                x, True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits[t], y[:, t]).mean(), new
    return loss

  def task_accuracy(self, layers):
    def accuracy(params, t, state, x, y):
      logits, _ = self._apply(params, recon.task_state(state, layers, t), x,
                              False)
      return jnp.mean(jnp.argmax(logits[t], -1) == y[:, t])
    return accuracy


def base_widths(kind: str) -> tuple[int, ...]:
  return RESNET_WIDTHS + (RESNET_FC,) if kind == "resnet" else rd.WIDTHS


def widths_matching(kind: str, base, num_params: int, x) -> tuple[int, ...]:
  """Widths, scaled from ``base``, whose model has ~num_params params."""
  best = None
  for factor in np.arange(1.0, 2.0, 0.005):
    widths = tuple(int(round(w * factor)) for w in base)
    shapes = jax.eval_shape(Model(kind, widths).init, jax.random.key(0), x)
    gap = abs(count_params(shapes[0]) - num_params)
    if best is None or gap < best[0]:
      best = (gap, widths)
  return best[1]


def layer_kind(name: str) -> str:
  for kind in ("conv", "bn", "fc", "dense", "norm"):
    if name.endswith(kind):
      return {"dense": "Dense", "norm": "LayerNorm", "bn": "BatchNorm",
              "conv": "conv", "fc": "fc"}[kind]
  return "other"


# ----------------------------------------------------------------------------
# Training.


def make_train(model: Model, method: str, chosen: list[str],
               all_layers: list[str], example_params, *, steps: int,
               batch_size: int, lr: float, threshold: float,
               state_layers: list[str] | None = None):
  """``train(params, state, key, data, rest_weights)`` for one row.

  ``state_layers``: the layers whose BatchNorm statistics are per task
  (default: the branched ones, ``chosen``; all layers keeps every BN's
  running statistics per task).

  ``data`` is ``(x_train, y_train, x_test, y_test)``. Returns the test
  accuracy per task, the per-step logs (task losses; the cosine of the two
  task gradients over every shared parameter of this model; over the layers
  with ``rest_weights`` 1; per layer of ``all_layers``, NaN where branched)
  and the S-conflict scores.

  The steps run as a Python loop over one jitted step: on XLA:CPU a
  ``lax.scan`` over this step ran about 18x slower (CPU time) than the loop,
  the convolutions inside the loop body being much slower.
  """
  tx = optax.chain(
      recon.with_branches(
          optax.chain(recon.track_conflicts(threshold, shared=heads_mask),
                      make_aggregator(method)), chosen),
      optax.adam(lr))
  state_layers = chosen if state_layers is None else state_layers
  grad_fn = recon.value_and_grad(model.task_loss(state_layers), chosen,
                                 NUM_TASKS, has_aux=True,
                                 batched=model.batched)
  monitor = recon.shared_mask(example_params, chosen, shared=heads_mask)
  evaluate = jax.jit(recon.task_losses(model.task_accuracy(state_layers),
                                       chosen, NUM_TASKS,
                                       batched=model.batched))

  @jax.jit
  def step(params, state, opt_state, x_train, y_train, batch_idx,
           rest_weights):
    (losses, new_states), grads = grad_fn(
        params, state, x_train[batch_idx], y_train[batch_idx])
    state = recon.merge_task_states(new_states, state_layers)
    whole, rest, per_layer = rd.conflict_cosines(grads, monitor, all_layers,
                                                 rest_weights)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    params = optax.apply_updates(params, updates)
    return params, state, opt_state, (losses, whole, rest, per_layer)

  def train(params, state, key, data, rest_weights):
    x_train, y_train, x_test, y_test = data
    opt_state = jax.jit(tx.init)(params)
    idx = rd.batch_indices(key, x_train.shape[0], steps, batch_size)
    logs = []
    for i in range(steps):
      params, state, opt_state, out = step(params, state, opt_state, x_train,
                                           y_train, idx[i], rest_weights)
      logs.append(out)
    logs = jax.tree.map(lambda *r: np.stack(r), *logs)
    accuracy = evaluate(params, state, x_test, y_test)
    return accuracy, logs, optax.tree_utils.tree_get(opt_state, "scores")

  return train


def fresh_copies(model: Model, params, layers, key, x):
  """``recon.branch`` with independently initialised copies (the official
  code), copy ``t`` = ``model.init(split(key, T)[t])``: the model's compiled
  init called T times (a vmapped init compiles slowly on a busy XLA:CPU)."""
  keys = jax.random.split(key, NUM_TASKS)
  fresh = jax.tree.map(lambda *c: jnp.stack(c),
                       *[model.init(k, x)[0] for k in keys])
  copies = recon.branch(params, layers, NUM_TASKS)
  shared = recon.shared_mask(copies, layers)
  return jax.tree.map(lambda c, f, keep: c if keep else f, copies, fresh,
                      shared)


def run_model(kind: str, args, data, log=print):
  """Search, branch and retrain every row for one architecture."""
  x_train = data[0]
  x1 = x_train[:1]
  base = Model(kind, args.resnet_widths if kind == "resnet"
               else base_widths(kind))
  params0, state0 = base.init(jax.random.key(0), x1)
  all_layers = recon.layer_names(params0, shared=heads_mask)
  k = args.top_k or max(1, int(round(PAPER_SHARE * len(all_layers))))
  common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                threshold=args.threshold)
  models = {base.widths: base}
  trainers = {}

  def trainer(model, method, layers, example):
    key = (model.widths, method, tuple(layers))
    if key not in trainers:
      trainers[key] = make_train(model, method, layers, all_layers, example,
                                 **common)
    return trainers[key]

  # 1. Search: joint training on a seed of its own (the joint row's
  # program).
  _, _, scores = trainer(base, "joint", [], params0)(
      params0, state0, jax.random.key(1000), data,
      jnp.zeros(len(all_layers)))
  scores = {n: int(v) for n, v in scores.items()}
  chosen = recon.select_layers(scores, k)
  rest = [n for n in all_layers if n not in chosen]
  rest_weights = jnp.asarray([n in rest for n in all_layers], jnp.float32)
  log(f"[{kind}] S-conflict scores {scores}; top-{k} {chosen} "
      f"({time.strftime('%H:%M:%S')})")

  # 2. Rows: (name, base method, widths, branched layers).
  rng = np.random.default_rng(args.random_seed)
  random_k = [all_layers[i] for i in sorted(
      rng.choice(len(all_layers), size=k, replace=False))]
  recon_params = count_params(recon.branch(params0, chosen, NUM_TASKS))
  rows = [(m, m, base.widths, []) for m in args.methods]
  if "joint" in args.methods and not args.no_controls:
    rows += [
        (f"random {k} + joint", "joint", base.widths, random_k),
        (f"first {k} + joint", "joint", base.widths, all_layers[:k]),
        (f"last {k} + joint", "joint", base.widths, all_layers[-k:]),
        ("joint, wide (params of Recon)", "joint",
         widths_matching(kind, base.widths, recon_params, x1), []),
        ("single-task (all branched)", "joint", base.widths, all_layers)]
  rows += [(f"recon+{m}", m, base.widths, chosen)
           for m in args.methods if m in ("joint", "pcgrad")]
  for _, _, widths, _ in rows:
    if widths not in models:
      models[widths] = Model(kind, widths)

  def run_row(row):
    name, method, widths, layers = row
    model = models[widths]
    accs, logs = [], []
    for seed in range(args.seeds):
      key_init, key_branch, key_data = jax.random.split(
          jax.random.key(seed), 3)
      params, state = model.init(key_init, x1)
      if layers:
        params = fresh_copies(model, params, layers, key_branch, x1)
        state = recon.branch_state(state, layers, NUM_TASKS)
      acc, (losses, whole, rest_cos, per_layer), _ = trainer(
          model, method, layers, params)(params, state, key_data, data,
                                         rest_weights)
      accs.append(np.asarray(acc))
      logs.append(dict(losses=np.asarray(losses), whole=np.asarray(whole),
                       rest=np.asarray(rest_cos),
                       layers=np.asarray(per_layer)))
    return dict(acc=np.stack(accs), logs=logs,
                params=count_params(params), widths=widths, layers=layers)

  results = {}
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = {pool.submit(run_row, row): row[0] for row in rows}
    for future in concurrent.futures.as_completed(futures):
      name = futures[future]
      results[name] = future.result()
      log(f"[{kind}] {name}: test accuracy per task "
          f"{np.round(results[name]['acc'].mean(0), 4)} "
          f"({time.strftime('%H:%M:%S')})")
  results = {row[0]: results[row[0]] for row in rows}
  return dict(kind=kind, all_layers=all_layers, scores=scores, chosen=chosen,
              rest=rest, k=k, random_k=random_k, results=results,
              base_widths=base.widths)


# ----------------------------------------------------------------------------
# Metrics and report.


def conflict_share(logs, key, threshold):
  """Per seed: the share of steps whose cosine is below ``threshold``."""
  return np.asarray([np.mean(l[key] < threshold) for l in logs])


def reduction(share, joint_share):
  """The paper's reduction %: relative drop of the share against joint."""
  return 100 * (1 - share / joint_share) if joint_share > 0 else np.nan


def delta_m(acc, base_acc):
  """Recon's Δm (%): mean over tasks of (M_t - M_base,t) / M_base,t.

  Accuracy is higher-is-better, so no sign flip; one metric per task, so the
  within-task average is the metric itself.
  """
  return 100 * np.mean((acc - base_acc) / base_acc, axis=-1)


def write_figure(path, run, threshold):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names, scores = list(run["scores"]), run["scores"]
  colors = {"BatchNorm": "tab:orange", "conv": "tab:blue", "fc": "tab:green",
            "Dense": "tab:blue", "LayerNorm": "tab:orange"}
  fig, ax = plt.subplots(figsize=(9, 3.4))
  for i, n in enumerate(names):
    ax.bar(i, scores[n], color=colors.get(layer_kind(n), "tab:gray"),
           edgecolor="k" if n in run["chosen"] else "none", linewidth=1.5,
           hatch="//" if n in run["chosen"] else None)
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right",
                fontsize=7)
  ax.set_ylabel(f"S-conflict score (S = {threshold:g})")
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in
             ("BatchNorm", "conv", "fc")]
  handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white",
                               edgecolor="k", hatch="//"))
  ax.legend(handles, ["BatchNorm", "conv", "fc",
                      f"branched (top {run['k']})"], fontsize=7)
  ax.set_title(f"Search ({run['kind']}, joint training): steps with layer "
               f"cosine < {threshold:g}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def model_tables(run, args) -> tuple[list[str], dict]:
  """The conflict and accuracy tables of one architecture, and key figures."""
  res, sev = run["results"], args.severity
  joint = res.get("joint")
  stl = res.get("single-task (all branched)")
  base_params = joint["params"] if joint else min(r["params"]
                                                  for r in res.values())
  own = {n: conflict_share(r["logs"], "whole", sev) for n, r in res.items()}
  kept = {n: conflict_share(r["logs"], "rest", sev) for n, r in res.items()}
  kept0 = {n: conflict_share(r["logs"], "rest", 0.0) for n, r in res.items()}
  kept_mean = {n: np.asarray([np.mean(l["rest"]) for l in r["logs"]])
               for n, r in res.items()}
  lines = [
      f"| method | (a) cos < {sev:g}, own shared params | reduction vs "
      f"joint | (b) cos < {sev:g}, layers Recon keeps shared | reduction "
      "vs joint | (b) cos < 0 | (b) mean cos |",
      "|---|---|---|---|---|---|---|"]
  summary = {}
  for n, r in res.items():
    if np.all(np.isnan(r["logs"][0]["layers"])):
      lines.append(f"| {n} | n/a | n/a | n/a | n/a | n/a | n/a |")
      continue
    red_a = reduction(own[n], own["joint"].mean()) if joint else None
    red_b = reduction(kept[n], kept["joint"].mean()) if joint else None
    summary[n] = dict(red_a=red_a, red_b=red_b, own=own[n], kept=kept[n],
                      kept0=kept0[n], kept_mean=kept_mean[n])
    fmt = lambda v: "n/a" if v is None else f"{mean_std(v, 1, 1)} %"
    lines.append(
        f"| {n} | {mean_std(own[n], 100, 1)} % | {fmt(red_a)} | "
        f"{mean_std(kept[n], 100, 1)} % | {fmt(red_b)} | "
        f"{mean_std(kept0[n], 100, 1)} % | "
        f"{mean_std(kept_mean[n], 1, 3)} |")
  lines += [
      "",
      "Per shared layer, share of steps with layer cosine < 0 (mean over "
      "seeds; `-`: branched):",
      "",
      "| method | " + " | ".join(f"`{n}`" for n in run["all_layers"]) + " |",
      "|---|" + "---|" * len(run["all_layers"])]
  for n, r in res.items():
    per = np.mean([np.mean(l["layers"] < 0, axis=0) for l in r["logs"]], 0)
    gone = np.all(np.isnan(r["logs"][0]["layers"]), axis=0)
    lines.append(f"| {n} | " + " | ".join(
        "-" if g else f"{100 * v:.0f}" for v, g in zip(per, gone)) + " |")
  lines += [
      "",
      f"Test accuracy (%), mean ± std over {args.seeds} seeds. Δm (Recon's "
      "convention): the mean over the two tasks of (acc_t - acc_base,t) / "
      "acc_base,t x 100 %, positive = better, against single-task learning "
      "(the paper's baseline; here every layer branched) and against joint "
      "training. Parameters include both heads.",
      "",
      "| method | task 0 (left) | task 1 (right) | mean | Δm vs single-task "
      "| Δm vs joint | parameters |",
      "|---|---|---|---|---|---|---|"]
  for n, r in res.items():
    a = r["acc"]
    dm_stl = mean_std(delta_m(a, stl["acc"].mean(0)), 1, 2) if stl else "n/a"
    dm_joint = mean_std(delta_m(a, joint["acc"].mean(0)), 1, 2) \
        if joint else "n/a"
    extra = r["params"] / base_params - 1
    note = f" ({100 * extra:+.2f} %)" if abs(extra) > 5e-5 else ""
    if r["widths"] != run["base_widths"]:
      note += f", widths {list(r['widths'])}"
    lines.append(
        f"| {n} | {mean_std(a[:, 0], 100)} | {mean_std(a[:, 1], 100)} | "
        f"{mean_std(a.mean(1), 100)} | {dm_stl} | {dm_joint} | "
        f"{r['params']:,}{note} |")
    if n in summary:
      summary[n]["acc"] = a
    else:
      summary[n] = dict(acc=a)
    summary[n]["params"] = r["params"]
    summary[n]["dm_stl"] = delta_m(a, stl["acc"].mean(0)) if stl else None
  return lines, summary


def search_lines(run, args) -> list[str]:
  scores, chosen = run["scores"], run["chosen"]
  ranked = sorted(scores, key=lambda n: -scores[n])
  kinds = [layer_kind(n) for n in chosen]
  count = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
  total = {k: [layer_kind(n) for n in scores].count(k) for k in count}
  return [
      f"{len(scores)} shared layers; K = {run['k']} (round({len(scores)} x "
      "25/41), the paper's share). Score: the number of the "
      f"{args.steps} search steps whose layer cosine is below S = "
      f"{args.threshold:g} (one task pair).",
      "",
      "| rank | " + " | ".join(str(i + 1) for i in range(len(ranked))) + " |",
      "|---|" + "---|" * len(ranked),
      "| layer | " + " | ".join(
          f"`{n}`{' *' if n in chosen else ''}" for n in ranked) + " |",
      "| score | " + " | ".join(str(scores[n]) for n in ranked) + " |",
      "",
      "`*`: branched by Recon. Kinds in the top K: " + ", ".join(
          f"{c} of the {total[k]} {k}" for k, c in count.items()) + ".",
      f"Random-K control (seed {args.random_seed}): "
      + ", ".join(f"`{n}`" for n in run["random_k"]) + "."]


def render(args, runs, elapsed, load) -> str:
  lines = [
      "# Recon on a small ResNet with BatchNorm (multi-digit set)",
      "",
      "Generated by `python benchmarks/recon_resnet.py"
      f"{' ' + ' '.join(args.argv) if args.argv else ''}` "
      f"({elapsed[0] / 60:.1f} min wall, {elapsed[1] / 60:.1f} min CPU "
      f"time on {jax.devices()[0].platform.upper()}, {os.cpu_count()} cores "
      f"shared with other jobs, 1-min load {load[0]:.1f} at the start and "
      f"{load[1]:.1f} at the end; jax {jax.__version__}).",
      "",
      "**What is tested.** Recon's main claim (Shi et al., ICLR 2023, "
      "Table 1 and Fig. 1): on "
      "a ResNet18 with BatchNorm (Multi-Fashion+MNIST), branching the top 25 "
      "of 41 layers by S-conflict score (S = -0.1; BatchNorm layers dominate "
      "the top) costs +1.45 % parameters, cuts the share of whole-shared-"
      "vector task-gradient cosines below -0.01 by 67-80 % against joint "
      "training (joint: 12.56 %), and improves accuracy (joint 97.42 / "
      "88.82 -> Recon 98.13 / 89.26); branching random, first or last K "
      "layers does clearly worse.",
      "",
      "**Setup.** `pcgrad_optax.datasets.multi_digits` (seed 0): two 8x8 "
      "digits on a 12x12 canvas overlapping by 4-6 columns, noise 0.05; task "
      "0 = left digit, task 1 = right digit; "
      f"{args.num_train} training / {args.num_test} test images (test "
      "images made of held-out digits). Adam (lr "
      f"{args.lr:g}), batch {args.batch_size}, {args.steps} steps, "
      f"cross-entropy per task; {args.seeds} seeds per row (initialisation "
      "and batch order). The search is joint training on its own seed with "
      f"`recon.track_conflicts({args.threshold:g})`; branched copies are "
      "independently initialised (official code). The conflict metric is "
      "logged at every step of the retraining runs: the cosine of the two "
      "task gradients over (a) every parameter the model being trained "
      "shares (the paper's measurement) and (b) the layers Recon keeps "
      "shared (the same parameters in every row, minus a control's own "
      "branched layers). 'reduction' = 1 - share / share(joint), in %, per "
      "seed against joint's mean share.",
  ]
  summaries = {}
  for run in runs:
    kind = run["kind"]
    title = {"resnet": "ResNet with BatchNorm", "mlp": "MLP with LayerNorm "
             "(recon_digits.py's model) under the same procedure"}[kind]
    if kind == "resnet":
      desc = (
          "ResNet-style CNN: stem 3x3 conv-BN-ReLU, one basic block per "
          f"stage with widths {list(run['base_widths'][:-1])} (conv3x3-BN-"
          "ReLU-conv3x3-BN, a 1x1 conv-BN shortcut where the shape changes, "
          "stride 2 from the second stage), global average pooling, a "
          f"shared fc layer ({run['base_widths'][-1]}) + ReLU, one linear "
          "head per task (as the official `MnistResNet_recon`). Convs have no "
          "bias; a BatchNorm layer is its scale and bias (momentum 0.9, "
          "running statistics per task once branched, the mean of the "
          "tasks' updates while shared); the per-task gradients come from "
          "`recon.value_and_grad(..., batched=False)`.")
    else:
      desc = (f"Flax MLP: {len(run['base_widths'])} x (Dense -> LayerNorm "
              f"-> ReLU), widths {list(run['base_widths'])}, two heads. The "
              "same search, K share, rows and metric as the ResNet "
              "(`recon_digits.md` used S = 0 and K = 4 instead).")
    lines += ["", f"## {title}", "", desc, "", "### Search", ""]
    lines += search_lines(run, args)
    figure = "recon_resnet_scores.png" if kind == "resnet" else \
        f"recon_resnet_{kind}_scores.png"
    lines += ["", f"![per-layer S-conflict scores]({figure})"]
    table, summary = model_tables(run, args)
    summaries[kind] = summary
    lines += ["", "### Conflicts during training", "", *table[:2]]
    lines += table[2:]
  lines += ["", "## Findings (computed from the tables above)", ""]
  lines += findings(runs, summaries, args)
  return "\n".join(lines) + "\n"


def findings(runs, summaries, args) -> list[str]:
  out, sev = [], args.severity
  pct = lambda v: f"{100 * np.mean(v):.1f} %"
  for run in runs:
    kind, s = run["kind"], summaries[run["kind"]]
    res = run["results"]
    if "joint" not in s:
      continue
    base = res["joint"]["params"]
    if "recon+joint" in s:
      r = s["recon+joint"]
      extra = 100 * (r["params"] / base - 1)
      out.append(
          f"- {kind}: Recon branches {run['k']} of {len(run['scores'])} "
          f"layers for {extra:+.2f} % parameters (paper: +1.45 %). Share of "
          f"steps with cosine < {sev:g} over the shared parameters: "
          f"{pct(r['own'])} vs joint {pct(s['joint']['own'])}, a reduction "
          f"of {np.mean(r['red_a']):.1f} % (paper: 67-80 %); over the layers "
          f"Recon keeps shared, joint has {pct(s['joint']['kept'])}, so the "
          f"reduction there is {np.mean(r['red_b']):.1f} %.")
    for name in ("pcgrad", "recon+pcgrad"):
      if name in s and s[name].get("red_a") is not None:
        out.append(
            f"- {kind}: {name} reduces the share below {sev:g} by "
            f"{np.mean(s[name]['red_a']):.1f} % (own shared params) against "
            "joint (paper: PCGrad 3.74 %).")
    controls = [n for n in s if n.startswith(("random", "first", "last",
                                              "joint, wide"))]
    if "recon+joint" in s and controls:
      out.append(
          f"- {kind}, reduction % (own shared params) of the controls: "
          + ", ".join(f"{n} {np.mean(s[n]['red_a']):.1f}"
                      for n in controls if s[n].get('red_a') is not None)
          + f"; recon+joint {np.mean(s['recon+joint']['red_a']):.1f}.")
    mean_acc = {n: 100 * v["acc"].mean() for n, v in s.items()}
    out.append(
        f"- {kind}, mean test accuracy vs joint ({mean_acc['joint']:.2f} %), "
        "in points: " + ", ".join(
            f"{n} {mean_acc[n] - mean_acc['joint']:+.2f}"
            for n in s if n != "joint") + ".")
    if s["joint"].get("dm_stl") is not None:
      out.append(
          f"- {kind}, Δm vs single-task learning: " + ", ".join(
              f"{n} {np.mean(v['dm_stl']):+.2f} %" for n, v in s.items()
              if v.get("dm_stl") is not None) + ".")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny setting for a smoke test")
  parser.add_argument("--models", nargs="*", default=["resnet", "mlp"],
                      choices=["resnet", "mlp"])
  parser.add_argument("--resnet-widths", default="16,32,64,64",
                      help="the ResNet's stage widths, then the fc width")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--threshold", type=float, default=-0.1,
                      help="S of the S-conflict score (the paper: -0.1)")
  parser.add_argument("--severity", type=float, default=-0.01,
                      help="threshold of the conflict share (paper: -0.01)")
  parser.add_argument("--top-k", type=int, default=None,
                      help="layers to branch (default: round(L * 25 / 41))")
  parser.add_argument("--random-seed", type=int, default=0,
                      help="seed of the random-K control's draw")
  parser.add_argument("--methods", nargs="*", default=["joint", "pcgrad"])
  parser.add_argument("--no-controls", action="store_true")
  parser.add_argument("--workers", type=int,
                      default=max(1, min(2, os.cpu_count() or 1)))
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  parser.add_argument("--raw", default=None,
                      help="where to pickle the raw logs (default: "
                      "$TMPDIR/recon_resnet_raw.pkl)")
  parser.add_argument("--from-raw", default=None,
                      help="re-render the report from a raw pickle")
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  for flag in ("--from-raw", "--raw"):   # not part of how the run was made
    if flag in args.argv:
      i = args.argv.index(flag)
      del args.argv[i:i + 2]
  args.num_train, args.num_test = 6000, 2000
  if args.quick:
    args.seeds, args.steps, args.batch_size = 1, 3, 8
    args.num_train, args.num_test = 64, 32
    args.resnet_widths = "4,8,8"
  args.resnet_widths = tuple(int(w) for w in args.resnet_widths.split(","))
  t0, c0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
  os.makedirs(args.out, exist_ok=True)
  raw = args.raw or os.path.join(tempfile.gettempdir(),
                                 "recon_resnet_raw.pkl")
  if args.from_raw:
    with open(args.from_raw, "rb") as f:
      saved = pickle.load(f)
    runs, elapsed, load0 = saved["runs"], saved["elapsed"], saved["load0"]
  else:
    data = datasets.multi_digits(args.num_train, args.num_test, seed=0)
    data = tuple(jnp.asarray(a) for a in data)
    print(f"{jax.devices()[0].platform}; models {args.models}; methods "
          f"{args.methods}; 1-min load {load0:.1f}", flush=True)
    runs = [run_model(kind, args, data, log=lambda m: print(m, flush=True))
            for kind in args.models]
    elapsed = (time.time() - t0, time.process_time() - c0)
    with open(raw, "wb") as f:   # re-render with --from-raw
      pickle.dump(dict(runs=runs, elapsed=elapsed, load0=load0), f)
  for run in runs:
    name = "recon_resnet_scores.png" if run["kind"] == "resnet" else \
        f"recon_resnet_{run['kind']}_scores.png"
    write_figure(os.path.join(args.out, name), run, args.threshold)
  report = render(args, runs, elapsed, (load0, os.getloadavg()[0]))
  path = os.path.join(args.out, "recon_resnet.md")
  with open(path, "w") as f:
    f.write(report)
  print(report)
  print(f"wrote {path} ({elapsed[0]:.0f} s wall)")
  return runs


if __name__ == "__main__":
  main()
