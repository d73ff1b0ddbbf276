"""End-to-end training-step cost of PCGrad on a small CNN.

Run from the repository root::

    python benchmarks/bench_e2e.py           # waits for a quiet machine, then
                                             # writes benchmarks/results/e2e.md
    python benchmarks/bench_e2e.py --quick   # smoke run in seconds

A small Flax CNN (shared conv trunk, one linear head per task) on a batch of
multi-digit images (``pcgrad_optax.datasets`` when it provides them, random
inputs of the same shape otherwise; the timings do not depend on the
values). Every function below is jitted and timed in one process,
interleaved round by round, and summarised by its median:

* ``adam step``: ``jax.value_and_grad`` of the mean task loss + Adam + apply:
  the baseline a user has today.
* ``pcgrad step``: ``pcgrad_optax.task_value_and_grad`` (forward + T
  backward passes, one vmapped VJP) + ``pcgrad`` (shared trunk only) + Adam +
  apply.
* the parts: forward + 1 backward (``value_and_grad`` of the mean), forward +
  T backward (``task_value_and_grad``), the surgery alone (``pcgrad`` update
  on fixed stacked gradients), Adam alone (update + apply).
* ``batched=False``: the stacked gradients from
  ``task_value_and_grad(..., batched=False)`` (one forward, T separate VJP
  calls, what a hand-written loop does) instead of one vmapped VJP, and a
  pcgrad step built on them.

* loss-level methods (``--loss-level``, issue 13): for each, a step on the
  stacked path (``task_value_and_grad`` + the transformation, ``shared=None``,
  + Adam) and a step on the one-backward-pass path (``jax.value_and_grad``
  of ``<method>_loss(...).loss`` + Adam). They compute the same update; the
  ratio ``one backward / stacked`` is what the one-pass path saves.

The headline ratio is ``pcgrad step / adam step``. Computing T gradients
instead of one costs what it costs in any library; the overhead that is ours
is ``pcgrad step / (adam step + (forward+T backward) - (forward+1 backward))``,
with a goal of <= 1.15.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name, load1, wait_for_quiet  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class MultiTaskCNN(nn.Module):
  """Shared conv trunk, then one ``Dense(num_classes)`` head per task."""
  num_tasks: int = 2
  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.width, (3, 3), name="conv_0")(x))
    h = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv_1")(h))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv_2")(h))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(128, name="dense_0")(h))
    return jnp.stack([nn.Dense(self.num_classes, name=f"head_{t}")(h)
                      for t in range(self.num_tasks)], axis=1)  # (B, T, C)


def shared_mask(params):
  """True for the trunk, False for the task heads (``head_*``)."""
  return {"params": {name: not name.startswith("head_")
                     for name in params["params"]}}


def make_batch(batch_size: int, num_tasks: int, image_shape, seed: int = 0):
  """``(images, labels)`` with labels ``(B, T)``; see ``load_inputs``."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size,) + tuple(image_shape))
  labels = rng.integers(0, 10, (batch_size, num_tasks))
  return images.astype(np.float32), labels.astype(np.int32)


def load_inputs(batch_size: int, num_tasks: int):
  """A batch of ``pcgrad_optax.datasets.multi_digits`` images.

  Returns ``(images (B, H, W, 1), labels (B, T), description)``. Tasks past
  the two digits get random labels; without the data set module (or
  scikit-learn) the images are random of the same 12 x 12 shape, which times
  the same.
  """
  try:
    from pcgrad_optax import datasets  # pylint: disable=g-import-not-at-top
    data = datasets.multi_digits(batch_size, 1, seed=0)
    images, labels = data.x_train[..., None], data.y_train
    source = "pcgrad_optax.datasets.multi_digits"
  except (ImportError, AttributeError) as e:
    print(f"(no multi-digit data set: {e}; using random inputs)",
          file=sys.stderr)
    images, labels = make_batch(batch_size, 2, (12, 12, 1))
    source = "random inputs"
  if num_tasks != 2:
    extra = make_batch(batch_size, num_tasks, (1,), seed=1)[1]
    labels = np.concatenate([labels, extra], axis=1)[:, :num_tasks]
  return (np.asarray(images, np.float32), np.asarray(labels, np.int32),
          f"{source}, images {tuple(images.shape[1:])}")


def loss_level_pairs(num_tasks: int) -> dict:
  """name -> (transformation factory, loss factory, shared kwargs)."""
  px, sc = pcgrad_optax, pcgrad_optax.scalarization
  t = num_tasks
  return {
      "rlw": (px.rlw, sc.rlw_loss, dict(key=0)),
      "uncertainty": (px.uncertainty, sc.uncertainty_loss, dict(num_tasks=t)),
      "dwa": (px.dwa, sc.dwa_loss, dict(num_tasks=t)),
      "famo": (px.famo, sc.famo_loss, dict(num_tasks=t)),
      "imtl_l": (px.imtl_l, sc.imtl_l_loss, dict(num_tasks=t)),
      "stch": (px.stch, sc.stch_loss, dict(num_tasks=t, warmup_steps=1)),
      "geometric_mean": (px.geometric_mean, sc.geometric_mean_loss, {}),
      "cosmos": (px.cosmos, sc.cosmos_loss, dict(lambda_=1.0)),
      "pbi": (px.pbi, sc.pbi_loss, {}),
  }


def build(num_tasks: int, batch_size: int, width: int,
          loss_level: tuple = ()):
  """The jitted functions to time, and their arguments."""
  model = MultiTaskCNN(num_tasks=num_tasks, width=width)
  images, labels, source = load_inputs(batch_size, num_tasks)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  params = model.init(jax.random.key(0), images[:1])

  def task_losses(params, images, labels):
    logits = model.apply(params, images)                     # (B, T, C)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce.mean(axis=0)                                   # (T,)

  def mean_loss(params, images, labels):
    return task_losses(params, images, labels).mean()

  adam = optax.adam(1e-3)
  surgery = pcgrad_optax.pcgrad(key=0, shared=shared_mask)
  pcgrad_adam = optax.chain(surgery, optax.adam(1e-3))
  stacked_grad_fn = pcgrad_optax.task_value_and_grad(task_losses)

  @jax.jit
  def adam_step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(mean_loss)(params, images, labels)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def pcgrad_step(params, opt_state, images, labels):
    losses, grads = stacked_grad_fn(params, images, labels)
    updates, opt_state = pcgrad_adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  # One forward, then T separate VJP calls, stacked.
  unrolled_grads = pcgrad_optax.task_value_and_grad(task_losses,
                                                    batched=False)

  @jax.jit
  def pcgrad_step_unrolled(params, opt_state, images, labels):
    losses, grads = unrolled_grads(params, images, labels)
    updates, opt_state = pcgrad_adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  grad_mean = jax.jit(jax.value_and_grad(mean_loss))
  grad_stacked = jax.jit(stacked_grad_fn)

  grad_unrolled = jax.jit(unrolled_grads)

  @jax.jit
  def surgery_only(stacked, state, params):
    return surgery.update(stacked, state, params)

  @jax.jit
  def adam_only(grads, opt_state, params):
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  adam_state = adam.init(params)
  pcgrad_state = pcgrad_adam.init(params)
  _, mean_grads = grad_mean(params, images, labels)
  _, stacked = grad_stacked(params, images, labels)
  fns = {
      "adam step": (adam_step, (params, adam_state, images, labels)),
      "pcgrad step": (pcgrad_step, (params, pcgrad_state, images, labels)),
      "pcgrad step, batched=False": (
          pcgrad_step_unrolled, (params, pcgrad_state, images, labels)),
      "forward + 1 backward": (grad_mean, (params, images, labels)),
      f"forward + {num_tasks} backward": (grad_stacked,
                                          (params, images, labels)),
      f"forward + {num_tasks} backward, batched=False": (
          grad_unrolled, (params, images, labels)),
      "surgery (pcgrad)": (surgery_only,
                           (stacked, surgery.init(params), params)),
      "adam update": (adam_only, (mean_grads, adam_state, params)),
  }
  pairs = loss_level_pairs(num_tasks)
  for name in loss_level:
    make_tx, make_loss, kwargs = pairs[name]
    stacked_tx = optax.chain(make_tx(**kwargs), optax.adam(1e-3))
    scal = make_loss(**kwargs)

    @jax.jit
    def stacked_step(params, opt_state, images, labels, tx=stacked_tx):
      losses, grads = stacked_grad_fn(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
      return optax.apply_updates(params, updates), opt_state, losses

    @jax.jit
    def one_pass_step(params, states, images, labels, scal=scal):
      opt_state, loss_state = states

      def objective(p, s):
        return scal.loss(task_losses(p, images, labels), s)

      (loss, loss_state), grads = jax.value_and_grad(
          objective, has_aux=True)(params, loss_state)
      updates, opt_state = adam.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), (opt_state, loss_state),
              loss)

    fns[f"{name} step, stacked"] = (
        stacked_step, (params, stacked_tx.init(params), images, labels))
    fns[f"{name} step, one backward"] = (
        one_pass_step, (params, (adam.init(params), scal.init(params)),
                        images, labels))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_shared = sum(x.size for name, sub in params["params"].items()
                 if not name.startswith("head_") for x in jax.tree.leaves(sub))
  return fns, dict(source=source, n_params=n_params, n_shared=n_shared,
                   image_shape=tuple(images.shape[1:]))


def time_interleaved(fns, rounds: int, calls: int, progress: bool):
  """Seconds per call of each fn, interleaved round by round.

  Returns ``{name: (median, interquartile range, minimum)}`` over the rounds.
  On a shared machine the noise only ever adds time, so the minimum is the
  better estimate of the uncontended cost; the median is the typical one.
  """
  for fn, args in fns.values():                   # compile and warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in fns}
  iterator = range(rounds)
  if progress:
    try:
      from tqdm.auto import tqdm
      iterator = tqdm(iterator, desc="timing rounds")
    except ImportError:
      pass
  names = list(fns)
  for r in iterator:
    # Rotate the order every round so no function always runs first.
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = fns[name]
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / calls)
  return {name: (statistics.median(s), _iqr(s), min(s)) for name, s in
          samples.items()}


def ratios(sec, t):
  """The headline ratios from one statistic (seconds per function)."""
  adam, pc = sec["adam step"], sec["pcgrad step"]
  g1, gt = sec["forward + 1 backward"], sec[f"forward + {t} backward"]
  gu = sec[f"forward + {t} backward, batched=False"]
  pcu = sec["pcgrad step, batched=False"]
  return dict(
      step=pc / adam, extra=gt - g1, fair=pc / (adam + gt - g1),
      extra_unrolled=gu - g1, fair_unrolled=pc / (adam + gu - g1),
      step_unrolled=pcu / adam, fair_step_unrolled=pcu / (adam + gu - g1),
      split=(gt / pc, sec["surgery (pcgrad)"] / pc, sec["adam update"] / pc))


def _iqr(samples):
  q = np.percentile(samples, [25, 75])
  return float(q[1] - q[0])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: tiny model, few rounds, no waiting, "
                      "nothing written")
  parser.add_argument("--tasks", type=int, nargs="+", default=[2])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--calls", type=int, default=5,
                      help="calls per timed sample")
  parser.add_argument("--max-wait", type=float, default=900.0,
                      help="seconds to wait for a 1-min load < 1.0")
  parser.add_argument("--out", default=os.path.join(RESULTS, "e2e.md"))
  parser.add_argument(
      "--loss-level", nargs="*", default=[],
      choices=sorted(loss_level_pairs(2)), metavar="METHOD",
      help="also time these loss-level methods on the stacked and the "
      "one-backward-pass paths (no METHOD after the flag: all of them)")
  args = parser.parse_args(argv)
  if args.loss_level is not None and not args.loss_level and (
      "--loss-level" in (sys.argv if argv is None else argv)):
    args.loss_level = sorted(loss_level_pairs(2))
  if args.quick:
    args.batch, args.width, args.rounds, args.calls = 16, 8, 3, 1
    args.max_wait = 0.0

  print(f"JAX {jax.__version__} on {jax.devices()}")
  load_before, waited = wait_for_quiet(args.max_wait, poll=15)
  print(f"1-min load at start: {load_before:.2f} (waited {waited:.0f} s)")
  tables = []
  for t in args.tasks:
    fns, info = build(t, args.batch, args.width, tuple(args.loss_level))
    print(f"T={t}: {info['n_params']:,} params ({info['n_shared']:,} shared), "
          f"batch {args.batch}, {info['source']}")
    medians = time_interleaved(fns, args.rounds, args.calls, not args.quick)
    tables.append((t, info, medians))
  load_after = load1()

  lines = []
  for t, info, m in tables:
    lines += [
        f"### T = {t} tasks, batch {args.batch}, {info['n_params']:,} "
        f"parameters ({info['n_shared']:,} shared), input "
        f"{info['image_shape']}",
        "",
        "| what | median ms | IQR ms | min ms | median vs adam step |",
        "|---|---:|---:|---:|---:|",
    ]
    adam_median = m["adam step"][0]
    for name, (med, iqr, low) in m.items():
      lines.append(f"| {name} | {med * 1e3:.3f} | {iqr * 1e3:.3f} | "
                   f"{low * 1e3:.3f} | {med / adam_median:.3f} |")
    lines += [""]
    for stat, col in (("medians", 0), ("minima", 2)):
      r = ratios({k: v[col] for k, v in m.items()}, t)
      lines += [
          f"From the {stat}:",
          f"- **pcgrad step / adam step = {r['step']:.3f}**",
          f"- extra cost of the {t} backward passes (forward + {t} backward "
          f"minus forward + 1 backward): {r['extra'] * 1e3:.3f} ms; "
          f"**pcgrad step / (adam step + that) = {r['fair']:.3f}** "
          f"(goal <= 1.15: {'met' if r['fair'] <= 1.15 else 'NOT met'})",
          f"- with `task_value_and_grad(..., batched=False)` ({t} separate "
          f"VJP calls instead of one vmapped VJP): extra cost "
          f"{r['extra_unrolled'] * 1e3:.3f} ms; pcgrad step / (adam step + "
          f"that) = {r['fair_unrolled']:.3f}; a pcgrad step built on "
          f"them: **{r['step_unrolled']:.3f} x the adam step**, "
          f"{r['fair_step_unrolled']:.3f} x (adam step + extra)",
          f"- split of the pcgrad step: forward + {t} backward "
          f"{r['split'][0]:.0%}, surgery {r['split'][1]:.0%}, adam update "
          f"{r['split'][2]:.0%} (parts timed separately)",
          "",
      ]
    if args.loss_level:
      lines += [
          "Loss-level methods, the same update on two paths "
          "(medians; minima in brackets):",
          "",
          "| method | stacked ms | one backward ms | one backward / stacked "
          "| one backward / adam step |",
          "|---|---:|---:|---:|---:|",
      ]
      for name in args.loss_level:
        st, ob = m[f"{name} step, stacked"], m[f"{name} step, one backward"]
        lines.append(
            f"| {name} | {st[0] * 1e3:.2f} | {ob[0] * 1e3:.2f} | "
            f"**{ob[0] / st[0]:.3f}** ({ob[2] / st[2]:.3f}) | "
            f"{ob[0] / m['adam step'][0]:.3f} "
            f"({ob[2] / m['adam step'][2]:.3f}) |")
      lines += [""]

  report = "\n".join(lines)
  print("\n" + report)
  if args.quick:
    return
  header = [
      "# End-to-end step time: PCGrad vs Adam on the mean loss",
      "",
      f"Date: {datetime.date.today().isoformat()}. Command: `python "
      f"benchmarks/bench_e2e.py{_args_str(argv)}`.",
      f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
      f"{platform.system()} {platform.release()}; backend "
      f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}).",
      f"Versions: Python {platform.python_version()}, JAX {jax.__version__}, "
      f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}"
      f", flax {flax.__version__}, optax {optax.__version__}, pcgrad_optax "
      f"{pcgrad_optax.__version__}{_git_rev()}.",
      f"1-min load average: {load_before:.2f} at the start (after waiting "
      f"{waited:.0f} s for < 1.0, at most {args.max_wait:.0f} s), "
      f"{load_after:.2f} at the end." + (
          " **The machine was not quiet**: other processes shared the "
          "cores, so absolute times are inflated and noisy; the ratios, "
          "from interleaved rounds, are the meaningful part."
          if max(load_before, load_after) >= 1.0 else ""),
      f"Method: every function jitted and warmed up, then {args.rounds} "
      f"interleaved rounds of {args.calls} calls each (the order rotating "
      "every round); median, interquartile range and minimum of the "
      "per-call time over the rounds. Contention only adds time, so on a "
      "loaded machine the minima estimate the uncontended costs better.",
      "",
      "Model: Flax CNN, conv 3x3 (w) - conv 3x3 (2w) - avg-pool 2 - "
      f"conv 3x3 (2w) - dense 128 - one dense-10 head per task, w = "
      f"{args.width}; softmax cross-entropy per task. PCGrad runs on the "
      "trunk only (`shared=` mask); the heads get their own task's "
      "gradient." + (
          " The loss-level rows weight the whole model (`shared=None` on "
          "the stacked path), which is what their one-backward-pass path "
          "computes (same update, same state)." if args.loss_level else ""),
      "",
  ]
  with open(args.out, "w") as f:
    f.write("\n".join(header) + "\n" + report)
  print(f"wrote {args.out}")


def _args_str(argv):
  argv = sys.argv[1:] if argv is None else argv
  return (" " + " ".join(argv)) if argv else ""


def _git_rev():
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=5,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return f" (git {rev.stdout.strip()} + working tree)" if rev.stdout else ""
  except Exception:  # pylint: disable=broad-except
    return ""


if __name__ == "__main__":
  main()
