"""Reproduces the 2-D two-task toy of the gradient-surgery papers.

Run from the repository root::

    python benchmarks/toy.py            # full run (100k steps, plus the
                                        # PCGrad paper's 500k-step toy)
    python benchmarks/toy.py --quick    # smoke run in seconds

Part 1, the toy of the follow-up papers (CAGrad, Nash-MTL; see
``pcgrad_optax.toy.losses``): from each of the three published starts, Adam
(lr 1e-3, 100,000 steps) on the mean loss, and Adam after every aggregator
``pcgrad_optax`` provides at run time (PCGrad, and MGDA, CAGrad, ... when they
exist). Each method is one jitted ``lax.scan``, vmapped over the starts.
Writes ``benchmarks/results/toy.png`` (trajectories of Adam, PCGrad, MGDA
and CAGrad over the contours of the mean loss),
``benchmarks/results/toy_all_methods.png`` (every method, and the contours
of L1, L2 and their mean) and ``benchmarks/results/toy.md``
(the end points: losses, and whether each is Pareto-stationary, i.e. whether
the min-norm point of the convex hull of the two task gradients is ~0,
computed in closed form in float64).

Part 2, the PCGrad paper's own toy (Fig. 1 / App. D; see
``pcgrad_optax.toy.pcgrad_paper_losses``): Adam (lr 1e-3, 500,000 steps) on
L1 + L2 and with PCGrad, from (0.5, -3). Writes
``benchmarks/results/toy_pcgrad_paper.png`` and a section of ``toy.md``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax
from pcgrad_optax import toy

try:
  from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
  tqdm = None

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR = 1e-3
# ||min-norm point of conv{g1, g2}|| below this (float64) counts as
# Pareto-stationary. Adam's steps (~lr) keep the iterate jittering around the
# Pareto set, so the exact zero is never reached; values at the plateau or on
# the way down are orders of magnitude larger (see the table).
PARETO_TOL = 1e-3
# The follow-up toy's losses are negative near the valley (down to -20, their
# infimum). Loss-based methods (FAMO, uncertainty weighting, DWA) assume
# positive losses (FAMO takes logs, uncertainty weighting's optimal
# log-variance is log L), so their `losses=` argument is L - L* with
# L* = -20; the Gram-based methods ignore it.
TOY_LOSS_INFIMUM = -20.0

# Aggregators we know of and the arguments the papers' toy runs use. Missing
# names are skipped, so the script grows as the library does; any other
# public transformation that builds with no arguments is picked up too.
KNOWN_AGGREGATORS = (
    ("pcgrad", {}),
    ("mgda", {}),
    ("cagrad", {"c": 0.5}),
    ("upgrad", {}),
    ("dualproj", {}),
    ("imtl_g", {}),
    ("aligned_mtl", {}),
    ("config", {}),
    ("nash_mtl", {}),
    ("gradvac", {}),
    ("graddrop", {}),
    ("rlw", {}),
    ("famo", {}),
    ("dwa", {}),
    ("uncertainty", {}),
    # Issue 13, loss level (imtl_l, geometric_mean and pbi build with no
    # arguments and are picked up by name anyway).
    ("imtl_l", {}),
    ("stch", {"warmup_steps": 100}),
    ("geometric_mean", {}),
    ("cosmos", {"lambda_": 1.0}),
    ("pbi", {}),
    # Issue 13: FairGrad (alpha = 1), CR-MOGM around MGDA, constant(1, 1)
    # (the linear baseline through the stacked path: Adam is invariant to
    # the loss scale, so it follows `adam (mean loss)` up to rounding,
    # which the steep crease where both stall amplifies), and the stateful
    # and two-batch methods with their defaults.
    ("fairgrad", {}),
    ("cr_mogm", {"weighting": pcgrad_optax.weighting.mgda}),
    ("constant", {"weights": (1.0, 1.0)}),
    ("excess_mtl", {}),
    ("moco", {}),
    ("db_mtl", {}),
    ("gradnorm", {}),
    ("sdmgrad", {}),
    ("modo", {}),
)
# Methods whose update takes a second, independent batch's gradients
# (`second_grads=`). The toy is deterministic: every "batch" gives the same
# gradients, so the second batch is the first.
SECOND_BATCH = ("sdmgrad", "modo")
# Public names that are not aggregators, and factories of
# pcgrad_optax.aggregation / .scalarization the toy does not run, with the
# reason (see `uncovered_factories`, which keeps this list complete).
NOT_AGGREGATORS = {"gram_matrix", "weighted_sum", "task_value_and_grad",
                   "multi_steps", "apply_if_finite", "value_and_aggregate"}
EXCLUDED = {
    "sum": "linear scalarisation: Adam is invariant to the loss scale up to "
           "its epsilon, so this is the `adam (mean loss)` run; "
           "`constant(weights=(1.0, 1.0))` is the same through the stacked "
           "gradients, and stalls where Adam does, within 0.02 of its end "
           "points",
    "mean": "the same as `sum` up to the factor 1/T, which Adam removes",
    "krum": "needs T >= num_byzantine + 3 tasks; the toy has T = 2",
    "trimmed_mean": "needs T > 2 trim tasks; with T = 2 only trim = 0 (the "
                    "mean) is allowed",
}


def uncovered_factories() -> list[str]:
  """Factories of aggregation/scalarization.__all__ neither run nor excused.

  The one-pass ``*_loss`` forms are the same methods (same update and
  state sequence, tested in tests/scalarization); the capitalised names are
  state types.
  """
  from pcgrad_optax import aggregation, scalarization
  known = {n for n, _ in KNOWN_AGGREGATORS}
  return [n for n in list(aggregation.__all__) + list(scalarization.__all__)
          if n.islower() and not n.endswith("_loss")
          and n not in known and n not in EXCLUDED]


def with_second_batch(tx):
  """``tx`` with ``second_grads`` defaulting to the step's own gradients."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    extra_args.setdefault("second_grads", updates)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def build(name, kwargs):
  tx = getattr(pcgrad_optax, name)(**kwargs)
  return with_second_batch(tx) if name in SECOND_BATCH else tx


def label(name: str, kwargs: dict) -> str:
  def show(v):   # a weighting by its method's name
    return v.__name__.removesuffix("_weighting") if callable(v) else v
  args = ", ".join(f"{k}={show(v)}" for k, v in kwargs.items())
  return f"{name}({args})" if args else name


def try_build(name, kwargs):
  """The transformation ``pcgrad_optax.<name>(**kwargs)``, or None.

  Also runs one init/update on stacked (2, 2) gradients so that a
  transformation needing arguments we do not know about is skipped here
  rather than failing mid-run.
  """
  factory = getattr(pcgrad_optax, name, None)
  if factory is None or not callable(factory) or inspect.isclass(factory):
    return None
  try:
    try:
      tx = build(name, kwargs)
    except TypeError:
      # Transformations with per-task state need T up front.
      if "num_tasks" not in inspect.signature(factory).parameters:
        raise
      kwargs.update(num_tasks=2)
      tx = build(name, kwargs)
    if not isinstance(tx, optax.GradientTransformation):
      return None
    params = jnp.zeros(2)
    state = tx.init(params)
    update = optax.with_extra_args_support(tx).update
    out, _ = update(jnp.array([[1.0, -1.0], [-1.0, 0.5]]), state, params,
                    losses=jnp.ones(2))
    if jnp.shape(out) != (2,):
      return None
  except Exception as e:  # pylint: disable=broad-except
    print(f"  skipping {label(name, kwargs)}: {type(e).__name__}: {e}",
          file=sys.stderr)
    return None
  return tx


def discover_methods():
  """``{label: (transformation factory, takes stacked gradients)}``."""
  methods = {"adam (mean loss)": (lambda: optax.adam(LR), False)}
  seen = set()
  candidates = list(KNOWN_AGGREGATORS)
  known = {n for n, _ in KNOWN_AGGREGATORS}
  for name in sorted(dir(pcgrad_optax)):
    if (name.startswith("_") or name in known or name in NOT_AGGREGATORS
        or name in EXCLUDED or not name.islower()
        or name.endswith("_loss")):  # one-pass forms
      continue
    if inspect.isfunction(getattr(pcgrad_optax, name)):
      candidates.append((name, {}))
  for name, kwargs in candidates:
    kwargs = dict(kwargs)
    if name in seen or try_build(name, kwargs) is None:
      continue
    seen.add(name)
    shown = {k: v for k, v in kwargs.items() if k != "num_tasks"}
    methods[label(name, shown)] = (
        lambda name=name, kwargs=kwargs: optax.chain(
            build(name, kwargs), optax.adam(LR)), True)
  return methods


def make_runner(loss_fn, make_tx, stacked: bool, chunk: int, record: int,
                loss_infimum: float = 0.0):
  """Jitted ``(carry) -> (carry, trajectory)`` doing ``chunk`` Adam steps.

  ``carry`` holds the points and optimiser states of all starts (vmapped);
  the trajectory keeps every ``record``-th point and the task losses there.
  """
  tx = optax.with_extra_args_support(make_tx())
  task_grads = pcgrad_optax.task_value_and_grad(loss_fn)

  def step(carry, _):
    x, state = carry
    if stacked:
      losses, grads = task_grads(x)          # grads: (2 tasks, 2)
    else:
      losses = loss_fn(x)
      grads = jax.grad(lambda y: jnp.mean(loss_fn(y)))(x)
    updates, state = tx.update(grads, state, x,
                               losses=losses - loss_infimum)
    return (optax.apply_updates(x, updates), state), None

  def recorded(carry, _):
    carry, _ = jax.lax.scan(step, carry, None, length=record)
    return carry, (carry[0], loss_fn(carry[0]))

  def run_one(carry):
    return jax.lax.scan(recorded, carry, None, length=chunk // record)

  def init_one(x):
    return (x, tx.init(x))

  return jax.jit(jax.vmap(init_one)), jax.jit(jax.vmap(run_one))


def optimise(loss_fn, make_tx, stacked, starts, steps, record, desc, bar,
             loss_infimum=0.0):
  """Runs one method from every start; returns (trajectories, losses).

  Shapes: ``(starts, steps // record + 1, 2)`` each (the start included).
  """
  chunks = 10 if steps >= 10 * record and steps % (10 * record) == 0 else 1
  init, run = make_runner(loss_fn, make_tx, stacked, steps // chunks, record,
                          loss_infimum)
  carry = init(jnp.asarray(starts, jnp.float32))
  xs = [np.asarray(starts, np.float32)[:, None]]
  ls = [np.asarray(jax.vmap(loss_fn)(jnp.asarray(starts, jnp.float32)))[:,
                                                                       None]]
  for _ in range(chunks):
    carry, (x, l) = run(carry)
    xs.append(np.asarray(x))
    ls.append(np.asarray(l))
    if bar is not None:
      bar.set_postfix_str(desc)
      bar.update(steps // chunks)
  return np.concatenate(xs, axis=1), np.concatenate(ls, axis=1)


# -- float64 analysis of the end points --------------------------------------

def toy_grads_f64(x: np.ndarray) -> np.ndarray:
  """Analytic ``(2 tasks, 2)`` gradients of ``toy.losses`` in float64."""
  x1, x2 = np.float64(x[0]), np.float64(x[1])
  th = np.tanh(-x2)
  u1 = 0.5 * (-x1 - 7.0) - th
  u2 = 0.5 * (-x1 + 3.0) + th + 2.0
  lo = toy.LOWER
  f1 = np.log(max(abs(u1), lo)) + 6.0
  f2 = np.log(max(abs(u2), lo)) + 6.0
  # d/dx of log|u| is u'/u where |u| > LOWER, 0 on the floor.
  df1 = np.array([-0.5, 1.0 - th ** 2]) / u1 if abs(u1) > lo else np.zeros(2)
  df2 = np.array([-0.5, -(1.0 - th ** 2)]) / u2 if abs(u2) > lo else np.zeros(2)
  v = 0.1 * (x2 + 8.0) ** 2
  s1 = ((7.0 - x1) ** 2 + v) / 10.0 - 20.0
  s2 = ((x1 + 7.0) ** 2 + v) / 10.0 - 20.0
  ds1 = np.array([(x1 - 7.0) / 5.0, 0.02 * (x2 + 8.0)])
  ds2 = np.array([(x1 + 7.0) / 5.0, 0.02 * (x2 + 8.0)])
  th_half = np.tanh(0.5 * x2)
  c1, c2 = max(th_half, 0.0), max(-th_half, 0.0)
  dsech = 0.5 * (1.0 - th_half ** 2)
  dc1 = np.array([0.0, dsech if x2 > 0 else 0.0])
  dc2 = np.array([0.0, -dsech if x2 < 0 else 0.0])
  g1 = df1 * c1 + f1 * dc1 + ds1 * c2 + s1 * dc2
  g2 = df2 * c1 + f2 * dc1 + ds2 * c2 + s2 * dc2
  return np.stack([g1, g2])


def min_norm_point(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
  """Min-norm point of the segment conv{g1, g2}, in closed form (float64).

  ``min_a ||a g1 + (1 - a) g2||`` over ``a in [0, 1]``:
  ``a* = clip(g2 . (g2 - g1) / ||g1 - g2||^2, 0, 1)``.
  """
  g1, g2 = np.asarray(g1, np.float64), np.asarray(g2, np.float64)
  diff = g1 - g2
  denom = diff @ diff
  a = 0.5 if denom == 0 else float(np.clip(g2 @ (g2 - g1) / denom, 0.0, 1.0))
  return a * g1 + (1.0 - a) * g2


def pareto_set(num: int = 57) -> np.ndarray:
  """Points of the toy's Pareto set, ``(num, 2)``, float64.

  For each x1 in [-7, 7] (where the two tasks' x1-gradients have opposite
  signs), the x2 in the valley where ||d*|| vanishes, found by a bounded
  scalar minimisation.
  """
  from scipy.optimize import minimize_scalar
  points = []
  for x1 in np.linspace(-7.0, 7.0, num):
    res = minimize_scalar(
        lambda x2: np.linalg.norm(min_norm_point(*toy_grads_f64(
            np.array([x1, x2])))), bounds=(-10.0, -6.0), method="bounded",
        options={"xatol": 1e-9})
    points.append((x1, res.x))
  return np.array(points)


def toy_losses_f64(x):
  with jax.enable_x64(True):
    return np.asarray(toy.losses(jnp.asarray(x, jnp.float64)))


# -- plotting -----------------------------------------------------------------

# The headline figure (toy.png): the baseline and the methods the papers
# discuss, those that exist; toy_all_methods.png has every method.
HEADLINE = ("adam (mean loss)", "pcgrad", "mgda", "cagrad(c=0.5)")


def plot_toy(results, path, with_surfaces=True, dpi=110):
  """Trajectories over the mean loss's contours, one panel per method.

  With ``with_surfaces`` the first three panels show L1, L2 and the mean.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n1 = np.linspace(-10, 10, 401)
  g1, g2 = np.meshgrid(n1, n1)
  grid = np.stack([g1, g2], -1).astype(np.float32)
  surf = np.asarray(toy.losses(jnp.asarray(grid)))
  surfaces = [("$L_1$", surf[..., 0]), ("$L_2$", surf[..., 1]),
              ("mean loss $(L_1+L_2)/2$", surf.mean(-1))]
  mean_surface = surfaces[-1][1]
  if not with_surfaces:
    surfaces = []
  n_panels = len(surfaces) + len(results)
  ncols = min(n_panels, 4 if n_panels <= 12 else 5)
  nrows = -(-n_panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.8 * nrows),
                           squeeze=False)
  colours = ["tab:red", "tab:orange", "tab:cyan"]
  pareto = pareto_set()
  panels = ([(t, s, None) for t, s in surfaces]
            + [(m, mean_surface, r) for m, r in results.items()])
  for ax, (title, z, res) in zip(axes.flat, panels):
    ax.contourf(g1, g2, z, levels=30, cmap="viridis", alpha=0.85)
    ax.contour(g1, g2, z, levels=15, colors="k", linewidths=0.3, alpha=0.5)
    ax.plot(pareto[:, 0], pareto[:, 1], color="white", lw=1.2, ls="--")
    ax.plot(*toy.MEAN_LOSS_ARGMIN, marker="*", color="white", ms=12,
            mec="k", zorder=5)
    if res is not None:
      traj = res["traj"]
      for s in range(traj.shape[0]):
        ax.plot(traj[s, :, 0], traj[s, :, 1], color=colours[s], lw=2)
        ax.plot(traj[s, 0, 0], traj[s, 0, 1], "o", color=colours[s], ms=6,
                mec="k")
        end = traj[s, -1]
        ax.plot(end[0], end[1], "X" if res["stationary"][s] else "s",
                color=colours[s], ms=8, mec="k", zorder=6)
    ax.set_title(title, fontsize=11)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_aspect("equal")
  for ax in list(axes.flat)[n_panels:]:
    ax.axis("off")
  fig.suptitle(
      "Two-task toy (CAGrad/Nash-MTL form), contours of the mean loss: Adam "
      f"lr 1e-3, {results[next(iter(results))]['steps']:,} steps from 3 "
      "starts (o);\nX = Pareto-stationary end, square = not; "
      "dashed = Pareto set, * = minimum of the mean loss",
      fontsize=12)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.8 * nrows)))
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def plot_paper_toy(runs, record, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.6))
  n1 = np.linspace(-3.0, 5.0, 401)
  n2 = np.linspace(-4.0, 7.0, 401)
  g1, g2 = np.meshgrid(n1, n2)
  grid = np.stack([g1, g2], -1).astype(np.float32)
  z = np.asarray(toy.pcgrad_paper_losses(jnp.asarray(grid))).sum(-1)
  ax0.contourf(g1, g2, np.maximum(z, -150), levels=30, cmap="viridis")
  ax0.contour(g1, g2, np.maximum(z, -150), levels=15, colors="k",
              linewidths=0.3, alpha=0.5)
  for (name, res), c in zip(runs.items(), ["tab:red", "tab:cyan"]):
    ax0.plot(res["traj"][:, 0], res["traj"][:, 1], color=c, lw=2, label=name)
    steps = np.arange(res["losses"].shape[0]) * record
    ax1.plot(steps, res["losses"][:, 0], color=c, ls="--", lw=0.8,
             label=f"{name}: L1")
    ax1.plot(steps, res["losses"][:, 1], color=c, ls="-", lw=1.5,
             label=f"{name}: L2")
  ax0.plot(*toy.PCGRAD_PAPER_START, "o", color="white", mec="k")
  ax0.set_title("PCGrad paper toy: $L_1+L_2$ (clipped at -150) and paths")
  ax0.set_xlabel(r"$\theta_1$")
  ax0.set_ylabel(r"$\theta_2$")
  ax0.legend(loc="upper right")
  ax1.set_xlabel("Adam step")
  ax1.set_ylabel("task loss")
  ax1.set_title("Task losses, Adam lr 1e-3")
  ax1.axhline(0.0, color="gray", lw=0.5)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# -- main ---------------------------------------------------------------------

def run_followup_toy(methods, steps, record, bar):
  results = {}
  for name, (make_tx, stacked) in methods.items():
    t0 = time.perf_counter()
    traj, losses = optimise(toy.losses, make_tx, stacked, toy.STARTS, steps,
                            record, name, bar, TOY_LOSS_INFIMUM)
    seconds = time.perf_counter() - t0
    ends = traj[:, -1].astype(np.float64)
    rows = []
    for s, end in enumerate(ends):
      g = toy_grads_f64(end)
      d = min_norm_point(g[0], g[1])
      l64 = toy_losses_f64(end)
      rows.append(dict(
          start=toy.STARTS[s], end=end, losses=l64, mean=l64.mean(),
          min_norm=float(np.linalg.norm(d)),
          grad_norms=np.linalg.norm(g, axis=1),
          cos=float(g[0] @ g[1] / max(np.linalg.norm(g[0]) *
                                      np.linalg.norm(g[1]), 1e-300))))
    results[name] = dict(traj=traj, losses=losses, rows=rows, seconds=seconds,
                         steps=steps,
                         stationary=[r["min_norm"] < PARETO_TOL for r in rows])
  return results


def run_paper_toy(steps, record, bar):
  runs = {}
  methods = {"adam (L1 + L2)": (lambda: optax.adam(LR), False),
             "pcgrad + adam": (lambda: optax.chain(pcgrad_optax.pcgrad(),
                                                   optax.adam(LR)), True)}

  def sum_loss_fn(x):
    return toy.pcgrad_paper_losses(x)

  for name, (make_tx, stacked) in methods.items():
    t0 = time.perf_counter()
    if stacked:
      traj, losses = optimise(sum_loss_fn, make_tx, True,
                              [toy.PCGRAD_PAPER_START], steps, record, name,
                              bar)
    else:
      # Adam on the SUM (the paper); the runner's default is the mean, which
      # Adam does not tell apart beyond its epsilon, but keep it exact.
      traj, losses = optimise(lambda x: 2.0 * sum_loss_fn(x), make_tx, False,
                              [toy.PCGRAD_PAPER_START], steps, record, name,
                              bar)
      losses = losses / 2.0
    below = np.nonzero((losses[0] < 0).all(axis=1))[0]
    runs[name] = dict(traj=traj[0], losses=losses[0],
                      seconds=time.perf_counter() - t0,
                      both_negative_at=(int(below[0]) * record
                                        if below.size else None))
  return runs


def fmt_point(p):
  return f"({p[0]:+.4f}, {p[1]:+.4f})"


def write_markdown(path, results, paper, args, total_seconds, record):
  lines = [
      "# 2-D two-task toy: paper reproduction",
      "",
      f"Command: `python benchmarks/toy.py{' --quick' if args.quick else ''}`"
      f" ({total_seconds:.0f} s in all on this machine; 1-min load average "
      f"{args.load[0]:.2f} at the start, {args.load[1]:.2f} at the end: the "
      "times below are that machine's, the end points do not depend on "
      "them).",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, JAX "
      f"{jax.__version__} on {jax.devices()[0].platform}, optax "
      f"{optax.__version__}, pcgrad_optax {pcgrad_optax.__version__}; float32 "
      "runs, end points analysed in float64.",
      "",
      "## The follow-ups' toy (CAGrad / Nash-MTL form)",
      "",
      f"Adam, lr {LR:g}, {args.steps:,} steps, from the three published "
      "starts; every method is one `lax.scan` vmapped over the starts. "
      "Stacked per-task gradients from `pcgrad_optax.task_value_and_grad`; "
      "`adam (mean loss)` is Adam on the gradient of (L1 + L2)/2; every "
      "other method is `optax.chain(<method>, optax.adam(1e-3))` with the "
      "library's defaults (CAGrad with c = 0.5, as in the papers; the "
      "arguments a factory has no default for are in the method's name). "
      "The loss-based methods get L - L* with L* = -20 (the toy's infimum) "
      "as their `losses=` argument, since they assume positive losses. "
      "The toy is deterministic, so the two-batch methods ("
      + ", ".join(f"`{n}`" for n in SECOND_BATCH) + ") get the step's own "
      "gradients as their second batch. Not run: " + "; ".join(
          f"`{n}` ({why})" for n, why in EXCLUDED.items()) + ".",
      "",
      "![toy trajectories](toy.png)",
      "",
      "Every method, and the contours of L1 and L2: "
      "[toy_all_methods.png](toy_all_methods.png).",
      "",
      "*Pareto-stationary*: the min-norm point d* of the convex hull of the "
      "two task gradients (closed form for two tasks, float64) has "
      f"||d*|| < {PARETO_TOL:g}. The minimum of the mean loss is "
      f"{toy.MEAN_LOSS_MIN} at {toy.MEAN_LOSS_ARGMIN}.",
      "",
      "| method | start | end point | L1 | L2 | mean loss | ‖g1‖, ‖g2‖ | "
      "cos(g1,g2) | ‖d*‖ | Pareto-stationary | time (s) |",
      "|---|---|---|---:|---:|---:|---|---:|---:|:---:|---:|",
  ]
  for name, res in results.items():
    for i, r in enumerate(res["rows"]):
      seconds = f"{res['seconds']:.1f}" if i == 0 else ""
      lines.append(
          f"| {name if i == 0 else ''} | {tuple(r['start'])} | "
          f"{fmt_point(r['end'])} | {r['losses'][0]:.4f} | "
          f"{r['losses'][1]:.4f} | {r['mean']:.4f} | "
          f"{r['grad_norms'][0]:.3g}, {r['grad_norms'][1]:.3g} | "
          f"{r['cos']:+.3f} | {r['min_norm']:.2e} | "
          f"{'yes' if res['stationary'][i] else '**no**'} | {seconds} |")
  lines += ["", "Summary (stationary starts / 3, best and worst mean loss):",
            ""]
  for name, res in results.items():
    means = [r["mean"] for r in res["rows"]]
    lines.append(f"- `{name}`: {sum(res['stationary'])}/3 Pareto-stationary; "
                 f"mean loss {min(means):.4f} .. {max(means):.4f}")
  if paper:
    lines += [
        "",
        "## The PCGrad paper's own toy (Fig. 1 / Appendix D)",
        "",
        f"From {toy.PCGRAD_PAPER_START}, Adam lr {LR:g}, "
        f"{args.paper_steps:,} steps; losses recorded every {record} steps.",
        "",
        "![PCGrad paper toy](toy_pcgrad_paper.png)",
        "",
        "| method | end point | L1 | L2 | first step with L1 < 0 and L2 < 0 "
        "| time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in paper.items():
      at = r["both_negative_at"]
      lines.append(
          f"| {name} | {fmt_point(r['traj'][-1])} | {r['losses'][-1, 0]:.2f} "
          f"| {r['losses'][-1, 1]:.2f} | "
          f"{'never' if at is None else f'{at:,}'} | {r['seconds']:.1f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2,000 steps, 4,000 on the paper toy")
  parser.add_argument("--steps", type=int, default=100_000)
  parser.add_argument("--paper-steps", type=int, default=500_000)
  parser.add_argument("--no-paper-toy", action="store_true")
  parser.add_argument("--out", default=None,
                      help="output folder (default benchmarks/results; with "
                      "--quick a temporary folder)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.paper_steps = 2_000, 4_000
  if args.out is None:
    args.out = (os.path.join(tempfile.gettempdir(), "pcgrad_optax_bench_quick")
                if args.quick else RESULTS)
  record = 100 if args.steps >= 10_000 else 10
  paper_record = 1_000 if args.paper_steps >= 100_000 else 10
  os.makedirs(args.out, exist_ok=True)

  missing = uncovered_factories()
  if missing:
    raise SystemExit(
        f"benchmarks/toy.py: {missing} are neither in KNOWN_AGGREGATORS nor "
        "in EXCLUDED (with the reason): add them to one of the two.")
  methods = discover_methods()
  print(f"JAX {jax.__version__} on {jax.devices()}; methods: "
        f"{', '.join(methods)}")
  total = args.steps * len(methods) + (0 if args.no_paper_toy
                                       else 2 * args.paper_steps)
  bar = tqdm(total=total, unit="step", unit_scale=True) if tqdm else None
  t0 = time.perf_counter()
  load_start = os.getloadavg()[0]
  results = run_followup_toy(methods, args.steps, record, bar)
  paper = (None if args.no_paper_toy else
           run_paper_toy(args.paper_steps, paper_record, bar))
  if bar is not None:
    bar.close()
  total_seconds = time.perf_counter() - t0
  args.load = (load_start, os.getloadavg()[0])

  plot_toy({k: v for k, v in results.items() if k in HEADLINE},
           os.path.join(args.out, "toy.png"), with_surfaces=False)
  plot_toy(results, os.path.join(args.out, "toy_all_methods.png"), dpi=75)
  if paper:
    plot_paper_toy(paper, paper_record,
                   os.path.join(args.out, f"toy_pcgrad_paper.png"))
  md = os.path.join(args.out, f"toy.md")
  write_markdown(md, results, paper, args, total_seconds, paper_record)

  print(f"\n{'method':<24}{'start':>16}{'end point':>22}{'mean loss':>11}"
        f"{'|d*|':>10}  stationary")
  for name, res in results.items():
    for i, r in enumerate(res["rows"]):
      print(f"{name if i == 0 else '':<24}{str(tuple(r['start'])):>16}"
            f"{fmt_point(r['end']):>22}{r['mean']:>11.4f}"
            f"{r['min_norm']:>10.2e}  {res['stationary'][i]}")
  if paper:
    print("\nPCGrad paper toy:")
    for name, r in paper.items():
      print(f"  {name:<18} end {fmt_point(r['traj'][-1])}  L1 "
            f"{r['losses'][-1, 0]:.2f}  L2 {r['losses'][-1, 1]:.2f}  both < 0 "
            f"from step {r['both_negative_at']}")
  print(f"\nwrote {md} ({total_seconds:.0f} s)")


if __name__ == "__main__":
  main()
