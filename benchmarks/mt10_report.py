"""Tables and plot for benchmarks/results/mt10.md from the runs' logs.

Reads ``<logs>/<run>/log.jsonl`` (written by ``benchmarks/mt10_sac.py``),
writes ``mt10.png`` and replaces the part of ``mt10.md`` between the
``<!-- tables -->`` and ``<!-- /tables -->`` markers.

  python benchmarks/mt10_report.py [--logs benchmarks/results/mt10_logs]
"""

import argparse
import json
import os

import numpy as np

RUNS = ("mean", "pcgrad", "cagrad", "famo")
LABEL = {"mean": "MT-SAC (mean)", "pcgrad": "PCGrad", "cagrad": "CAGrad",
         "famo": "FAMO (critic; actor mean)"}


def load(logs):
  runs = {}
  for run in RUNS:
    path = os.path.join(logs, run, "log.jsonl")
    if not os.path.exists(path):
      continue
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if recs:
      runs[run] = recs
  return runs


def tasks(logs):
  for run in RUNS:
    path = os.path.join(logs, f"{run}.out")
    if os.path.exists(path):
      for line in open(path):
        if line.startswith("{"):
          return json.loads(line)["tasks"]
  return [f"task{t}" for t in range(10)]


def fmt(x):
  x = np.asarray(x, float)
  if x.size == 1:
    return f"{x.mean():.2f}"
  return f"{x.mean():.2f} ± {x.std(ddof=1):.2f}"


def _evals(recs):
  return [r for r in recs if "success" in r]


def _seeds(recs):
  return len(recs[0]["train_success"])


def _pooled_success(recs):
  """Per seed: the mean over tasks of hits / episodes pooled over recs."""
  hits = sum(np.asarray(x["train_success"]) * np.asarray(x["train_episodes"])
             for x in recs)
  eps = sum(np.asarray(x["train_episodes"]) for x in recs)
  return np.mean(hits / np.maximum(eps, 1), axis=1)


def tables(runs, names, window=2500):
  out = []
  eval_steps = sorted({r["env_steps_per_task"] for recs in runs.values()
                       for r in _evals(recs)})
  out.append("**Evaluation: mean success over the 10 tasks** (deterministic "
             "policy, 1 episode per task and seed; mean ± std over seeds)\n")
  out.append("| env steps per task (total) | " + " | ".join(
      f"{LABEL[k]} (n={_seeds(v)})" for k, v in runs.items()) + " |")
  out.append("|---" * (len(runs) + 1) + "|")
  for s in eval_steps:
    row = [f"{s:,} ({10 * s:,})"]
    for recs in runs.values():
      r = [x for x in _evals(recs) if x["env_steps_per_task"] == s]
      row.append(fmt(r[0]["mean_success_per_seed"]) if r else "not reached")
    out.append("| " + " | ".join(row) + " |")
  out.append("")
  last = max(r["env_steps_per_task"] for recs in runs.values() for r in recs)
  rows = list(range(window, last + 1, window))
  if not rows or rows[-1] != last:
    rows.append(last)
  out.append("**Training episodes: mean success over the 10 tasks** "
             "(stochastic policy, success at any step, the episodes that "
             f"ended in the {window:,} steps up to the row, pooled; mean ± "
             "std over seeds)\n")
  out.append("| env steps per task | " + " | ".join(
      LABEL[k] for k in runs) + " |")
  out.append("|---" * (len(runs) + 1) + "|")
  for s in rows:
    row = [f"{s:,}"]
    for recs in runs.values():
      r = [x for x in recs if s - window < x["env_steps_per_task"] <= s]
      row.append(fmt(_pooled_success(r)) if r else "—")
    out.append("| " + " | ".join(row) + " |")
  out.append("")
  common = max((s for s in eval_steps
                if all(any(x["env_steps_per_task"] == s for x in _evals(v))
                       for v in runs.values())), default=None)
  out.extend(per_task(runs, names, common) if common else [])
  out.extend(cost(runs))
  return "\n".join(out)


def per_task(runs, names, common):
  out = []
  out.append(f"**Per task** (evaluation success at {common:,} env steps per "
             "task, the last evaluation all runs reached, mean over seeds / "
             "training-episode success over all episodes up to that step)\n")
  out.append("| task | " + " | ".join(LABEL[k] for k in runs) + " |")
  out.append("|---" * (len(runs) + 1) + "|")
  for t, name in enumerate(names):
    row = [name]
    for recs in runs.values():
      ev = [x for x in _evals(recs) if x["env_steps_per_task"] == common][0]
      upto = [x for x in recs if x["env_steps_per_task"] <= common]
      hits = sum(np.asarray(x["train_success"])[:, t]
                 * np.asarray(x["train_episodes"])[:, t] for x in upto)
      eps = sum(np.asarray(x["train_episodes"])[:, t] for x in upto)
      row.append(f"{np.asarray(ev['success'])[:, t].mean():.2f} / "
                 f"{hits.sum() / max(eps.sum(), 1):.2f}")
    out.append("| " + " | ".join(row) + " |")
  out.append("")
  return out


def cost(runs):
  out = []
  out.append("**Cost** (per run, all its seeds in one process; wall and CPU "
             "from the start of the loop, so without building the envs)\n")
  out.append("| run | seeds | env steps per task | updates | wall (s) | "
             "CPU (s) | env / train / eval (s, wall) | env steps/s (wall) | "
             "env steps/s (CPU) | 1-min load |")
  out.append("|---" * 10 + "|")
  for k, recs in runs.items():
    r = recs[-1]
    n = _seeds(recs)
    tot = r["env_steps"] * n
    loads = [x["load1"] for x in recs]
    ev = sum(x["eval_s"] for x in _evals(recs))
    out.append(
        f"| {k} | {n} | {r['env_steps_per_task']:,} | {r['updates']:,} | "
        f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
        f"{r['env_s']:.0f} / {r['train_s']:.0f} / {ev:.0f} | "
        f"{tot / r['wall_s']:.0f} | {tot / r['cpu_s']:.0f} | "
        f"{min(loads):.1f}–{max(loads):.1f} |")
  return out


def plot(runs, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(3, 4, figsize=(15, 10), sharex=True)
  axes = axes.ravel()
  for k, recs in runs.items():
    x = np.array([r["env_steps_per_task"] for r in recs])
    tr = np.array([np.mean(r["train_success"], 0) for r in recs])  # (L, T)
    evs = _evals(recs)
    xe = np.array([r["env_steps_per_task"] for r in evs])
    ev = np.array([np.mean(r["success"], 0) for r in evs])        # (E, T)
    per_seed = np.array([r["mean_success_per_seed"] for r in evs]
                        ).reshape(len(evs), _seeds(recs))
    line, = axes[0].plot(xe, per_seed.mean(1), "o-", label=LABEL[k])
    if evs and per_seed.shape[1] > 1:
      axes[0].fill_between(xe, per_seed.min(1), per_seed.max(1),
                           color=line.get_color(), alpha=0.15)
    axes[1].plot(x, tr.mean(1), ".-", color=line.get_color(),
                 label=LABEL[k])
    for t in range(len(names)):
      if evs:
        axes[2 + t].plot(xe, ev[:, t], "o-", color=line.get_color())
      axes[2 + t].plot(x, tr[:, t], ":", color=line.get_color())
  axes[0].set_title("evaluation success, mean of 10 tasks (band: seeds)",
                    fontsize=9)
  axes[1].set_title("training-episode success, mean of 10 tasks",
                    fontsize=9)
  axes[0].legend(fontsize=8)
  for t, name in enumerate(names):
    axes[2 + t].set_title(f"{name} (eval o-, training :)", fontsize=9)
  for ax in axes:
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
  for ax in axes[-4:]:
    ax.set_xlabel("env steps per task")
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--logs", default="benchmarks/results/mt10_logs")
  p.add_argument("--md", default="benchmarks/results/mt10.md")
  p.add_argument("--train-window", type=int, default=2500,
                 help="env steps per task pooled in a training-success row")
  args = p.parse_args()
  runs = load(args.logs)
  names = tasks(args.logs)
  text = tables(runs, names, args.train_window)
  plot(runs, names, os.path.join(os.path.dirname(args.md), "mt10.png"))
  md = open(args.md).read() if os.path.exists(args.md) else (
      "<!-- tables -->\n<!-- /tables -->\n")
  head, rest = md.split("<!-- tables -->", 1)
  _, tail = rest.split("<!-- /tables -->", 1)
  with open(args.md, "w") as f:
    f.write(head + "<!-- tables -->\n" + text + "\n<!-- /tables -->" + tail)
  print(text)


if __name__ == "__main__":
  main()
