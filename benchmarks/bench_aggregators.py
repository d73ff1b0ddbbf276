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

The stateful, loss-based and two-batch methods of issue 13 (ExcessMTL,
MoCo, DB-MTL, GradNorm, SDMGrad, MoDo) are timed too (ours with their
``losses=`` / ``second_grads=`` arguments; torchjd's ExcessMTL, and its
SDMGrad and MoDo weightings on ``J J^T`` applied to ``J``) and stepped side
by side with torchjd and LibMTL over five steps in the cross-check. LibMTL
1.1.5 (PyPI) has only GradNorm of them; ``LIBMTL_SRC=<a LibMTL checkout>``
loads the others from its ``LibMTL/weighting/``.

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
import optax

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
  if "LibMTL" in sys.modules:        # loaded (stubbed) by an earlier call
    root = list(sys.modules["LibMTL"].__path__)[0]
  else:
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
          for name in ("PCGrad", "MGDA", "IMTL", "GradVac", "CAGrad",
                       "GLS", "UW")}


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


# Issue 13's stateful, loss-based and two-batch methods in the timing: name:
# (our factory of T, the extra update arguments from the stacked gradients,
# torchjd's runner on the (T, P) matrix or None, the LibMTL cell's text).
# The second batch is the same arrays (the cost is that of a distinct one);
# their LibMTL versions are cross-checked, not timed.
def stateful_methods(num_tasks: int) -> dict:
  from torchjd import aggregation as jd  # pylint: disable=g-import-not-at-top
  px, t = pcgrad_optax, num_tasks
  losses = np.linspace(0.5, 2.0, t).astype(np.float32)
  not_timed = "cross-checked, not timed"

  def two_batch(weighting):
    return lambda m: weighting(m @ m.T) @ m

  return {
      "excess_mtl": (lambda: px.excess_mtl(num_tasks=t), lambda g: {},
                     jd.ExcessMTL, not_timed),
      "moco": (lambda: px.moco(num_tasks=t), lambda g: {}, None, not_timed),
      "db_mtl": (lambda: px.db_mtl(num_tasks=t),
                 lambda g: {"losses": losses}, None, not_timed),
      "gradnorm": (lambda: px.gradnorm(num_tasks=t),
                   lambda g: {"losses": losses}, None, not_timed),
      "sdmgrad": (lambda: px.sdmgrad(num_tasks=t),
                  lambda g: {"second_grads": g, "third_grads": g},
                  lambda: two_batch(jd.SDMGradWeighting()), not_timed),
      "modo": (lambda: px.modo(num_tasks=t),
               lambda g: {"second_grads": g, "third_grads": g},
               lambda: two_batch(jd.MoDoWeighting()), not_timed),
  }


# Their (T, P) state and its new value, beside the input.
_TEMPORARY_COPIES.update({
    ("ours", "excess_mtl"): 3, ("ours", "moco"): 3, ("ours", "db_mtl"): 3,
    ("torchjd", "excess_mtl"): 3,
})


def mem_available() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable"):
        return float(line.split()[1]) * 1024
  return float("inf")


def block(fn):
  return lambda *a: jax.block_until_ready(fn(*a))


def build(num_tasks, matrix, stacked, libmtl, prev_times, max_call,
          only=None):
  """``({label: (fn, args)}, {label: reason skipped})`` for one cell.

  ``only``: a set of method names to build (all when None); the floor is
  always built.
  """
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
    if only is not None and name not in only:
      continue
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
  for name, (ours, extra, theirs, _) in stateful_methods(num_tasks).items():
    if only is not None and name not in only:
      continue
    tx = ours()
    if fits("ours", name):
      kwargs = extra(grads)
      fns[f"ours {name}"] = (block(jax.jit(
          lambda g, s, kw, tx=tx: tx.update(g, s, params, **kw))),
                             (grads, tx.init(params), kwargs))
    else:
      skipped[f"ours {name}"] = "memory"
    if theirs is None:
      continue
    label = f"torchjd {name}"
    agg = theirs()

    def run_torchjd(m, agg=agg):
      with torch.no_grad():
        return agg(m)

    if not fits("torchjd", name):
      skipped[label] = "memory"
    elif too_slow(label):
      skipped[label] = too_slow(label)
    else:
      fns[label] = (run_torchjd, (tmatrix,))
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
  out.update(stateful_cross_check(libmtl))
  return out


# Loss-level methods (issue 13), on the (T,) loss vector: name -> (our
# LossScalarization, torchjd scalarizer factory, how torchjd steps its state:
# "sgd" (its parameters trained by torch SGD on its loss, as its docs say),
# "famo" (FAMO.update with the next step's losses), "dwa" (DWA.step() after
# every call: one step per epoch), None (stateless), LibMTL class or None).
# Hyper-parameters matched; the preference rays fixed.
LOSS_LEVEL_LR = 0.1
RAY = (0.2, 0.5, 0.3)


def loss_level_methods(num_tasks: int) -> dict:
  from torchjd import scalarization as js  # pylint: disable=g-import-not-at-top
  torch = torch_setup()
  px = pcgrad_optax.scalarization
  t, lr = num_tasks, LOSS_LEVEL_LR
  ray = (np.asarray(RAY[:t]) / np.sum(RAY[:t])).astype(np.float32)
  tray = torch.tensor(ray)
  ideal = np.linspace(0.1, 0.3, t).astype(np.float32)
  return {
      "imtl_l": (px.imtl_l_loss(num_tasks=t, learning_rate=lr),
                 lambda: js.IMTLL(t), "sgd", None),
      "stch": (px.stch_loss(num_tasks=t, warmup_steps=0, mu=0.5,
                            log_losses=False, preference=ray,
                            reference=ideal),
               lambda: js.STCH(0.5, tray, torch.tensor(ideal)), None, None),
      "geometric_mean": (px.geometric_mean_loss(), js.GeometricMean, None,
                         "GLS"),
      "cosmos": (px.cosmos_loss(ray, lambda_=2.0),
                 lambda: js.COSMOS(2.0, tray), None, None),
      "pbi": (px.pbi_loss(ray, theta=5.0, reference=ideal),
              lambda: js.PBI(5.0, tray, torch.tensor(ideal)), None, None),
      # torchjd's UW is the paper's regression form; LibMTL's the same with
      # s starting at -0.5.
      "uncertainty": (px.uncertainty_loss(num_tasks=t, learning_rate=lr,
                                          task_types="regression"),
                      lambda: js.UW(t), "sgd", None),
      "uncertainty (s0 = -0.5)": (
          px.uncertainty_loss(num_tasks=t, learning_rate=lr,
                              task_types="regression", init_log_vars=-0.5),
          None, None, "UW"),
      "dwa": (px.dwa_loss(num_tasks=t), js.DWA, "dwa", None),
      # The authors' code (and torchjd): Adam on the logits, weight decay
      # 1e-3 as torchjd's default.
      "famo": (px.famo_loss(num_tasks=t, weight_decay=1e-3,
                            optimizer=optax.adam(0.025)),
               lambda: js.FAMO(t), "famo", None),
  }


def _libmtl_loss_weighting(cls, num_tasks):
  """LibMTL's loss-level ``cls().backward`` on a loss vector: its weights."""
  torch = torch_setup()
  weighting = cls()
  weighting.task_num, weighting.device, weighting.rep_grad = (
      num_tasks, "cpu", False)
  weighting.init_param()
  params = list(weighting.parameters())      # AbsWeighting is an nn.Module
  opt = torch.optim.SGD(params, lr=LOSS_LEVEL_LR) if params else None

  def step(losses):
    values = torch.tensor(losses, dtype=torch.float32, requires_grad=True)
    if opt is not None:
      opt.zero_grad()
    weighting.backward(values)
    if opt is not None:
      opt.step()
    return values.grad.numpy().copy()

  return step


def cross_check_loss_level(libmtl, num_tasks: int = 3, steps: int = 6,
                           seed: int = 2) -> dict:
  """Max |ours - peer| / max |peer| of the loss-level weights, per step.

  The gradient of each scalarised loss with respect to the loss vector (the
  task weights), stepped side by side over ``steps`` steps of a falling
  loss sequence so that the stateful methods' states evolve (IMTL-L's and
  UW's learned parameters, FAMO's logits, DWA's history).
  """
  torch = torch_setup()
  rng = np.random.default_rng(seed)
  seq = (rng.uniform(0.5, 3.0, num_tasks) * np.exp(-np.outer(
      np.arange(steps), rng.uniform(0.05, 0.4, num_tasks)))).astype(
          np.float32)
  out = {}
  for name, (ours, theirs, mode, lib) in loss_level_methods(
      num_tasks).items():
    peers = {}
    if theirs is not None:
      scalarizer = theirs()
      opt = (torch.optim.SGD(scalarizer.parameters(), lr=LOSS_LEVEL_LR)
             if mode == "sgd" else None)

      def torchjd_step(losses, n, scalarizer=scalarizer, opt=opt,
                       mode=mode):
        if mode == "famo" and n > 0:
          scalarizer.update(torch.tensor(losses))
        values = torch.tensor(losses, requires_grad=True)
        if opt is not None:
          opt.zero_grad()
        scalarizer(values).backward()
        if opt is not None:
          opt.step()
        if mode == "dwa":
          scalarizer.step()
        return values.grad.numpy().copy()

      peers["torchjd"] = torchjd_step
    if lib is not None and libmtl is not None:
      libmtl_step = _libmtl_loss_weighting(libmtl[lib], num_tasks)
      peers["LibMTL"] = lambda losses, n, f=libmtl_step: f(losses)
    state = ours.init()
    weights = jax.jit(ours.weights)
    mine = []
    for losses in seq:
      w, state = weights(jnp.asarray(losses), state)
      mine.append(np.asarray(w))
    for peer, step in peers.items():
      theirs_w = [step(losses, n) for n, losses in enumerate(seq)]
      err = max(float(np.abs(a - b).max() / np.abs(b).max())
                for a, b in zip(mine, theirs_w))
      out[(name, peer)] = err
  return out


# --- Issue 13: the stateful, loss-based and two-batch methods ---------------
# ExcessMTL, MoCo, DB-MTL, GradNorm, SDMGrad and MoDo are stepped side by side
# with the peers over a sequence of steps (new gradients, losses and batches
# each step), at matched hyper-parameters and conventions. LibMTL's PyPI
# release (1.1.5) has GradNorm only; the others are in LibMTL's repository:
# set LIBMTL_SRC to a checkout (the directory holding LibMTL/weighting/) to
# load them from there (their AbsWeighting is the installed one's; every
# gradient and write-back method it has is replaced below anyway).

STATEFUL_LIBMTL = ("ExcessMTL", "MoCo", "DB_MTL", "GradNorm", "SDMGrad",
                   "MoDo")


class _NumpyWithAlltrue(types.ModuleType):
  """numpy for LibMTL's SDMGrad, which calls np.alltrue (gone in numpy 2)."""

  def __getattr__(self, name):
    return np.all if name == "alltrue" else getattr(np, name)


def load_libmtl_stateful(libmtl):
  """``{class name: class}`` for STATEFUL_LIBMTL, installed or LIBMTL_SRC."""
  if libmtl is None:
    return {}
  found = {}
  source = os.environ.get("LIBMTL_SRC")
  for name in STATEFUL_LIBMTL:
    try:
      module = importlib.import_module(f"LibMTL.weighting.{name}")
    except ImportError:
      path = source and os.path.join(source, "LibMTL", "weighting",
                                     f"{name}.py")
      if not path or not os.path.exists(path):
        continue
      spec = importlib.util.spec_from_file_location(
          f"LibMTL.weighting.{name}", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    if name == "SDMGrad" and not hasattr(np, "alltrue"):
      module.np = _NumpyWithAlltrue("numpy")
    found[name] = getattr(module, name)
  return found


def _flat(update) -> np.ndarray:
  return np.concatenate([np.asarray(update[k], np.float64).ravel()
                         for k in sorted(update)])


def _libmtl_stepper(cls, num_tasks, grad_dim):
  """LibMTL's ``cls`` on given per-task matrices: a callable per step.

  ``step(matrices, losses, **kwargs)`` hands ``backward`` the matrices in
  the order it gathers them (one per batch), returns the aggregated vector
  it would write into the shared params' ``.grad`` (or, for the methods
  that backpropagate weighted losses instead, ``weights @ matrix``) and the
  weights it returns.
  """
  torch = torch_setup()

  class OnFixedGradients(cls):

    def __init__(self):
      super().__init__()
      self.task_num, self.device, self.rep_grad = num_tasks, "cpu", False
      self.epoch, self.decoders = 1, {}
      self.encoder = torch.nn.Linear(1, 1)
      self.grad_dim = grad_dim
      self.init_param()
      self.feed, self.aggregated = [], None

    def _compute_grad_dim(self):
      self.grad_dim = grad_dim

    def _compute_grad(self, losses, mode, rep_grad=False):
      del losses, mode, rep_grad
      return self.feed.pop(0).clone()

    def _reset_grad(self, new_grads):
      self.aggregated = new_grads

  weighting = OnFixedGradients()

  def step(matrices, losses, **kwargs):
    weighting.feed = [torch.from_numpy(m) for m in matrices]
    weighting.aggregated = None
    out = weighting.backward(losses, **kwargs)
    return weighting, out

  return weighting, step


def stateful_cross_check(libmtl, num_tasks: int = 4, steps: int = 5,
                         seed: int = 3) -> dict:
  """Max |ours - peer| / max |peer| over a sequence of steps, per method."""
  torch = torch_setup()
  from torchjd import aggregation as jd  # pylint: disable=g-import-not-at-top
  classes = load_libmtl_stateful(libmtl)
  t = num_tasks
  rng = np.random.default_rng(seed)
  data = [[make_data(t, model_leaves(25_000), seed + 100 * k + b)
           for b in range(3)] for k in range(steps)]
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype),
                        data[0][0][1])
  losses = [np.asarray(rng.uniform(0.5, 2.0, t), np.float32)
            for _ in range(steps)]
  p = data[0][0][0].shape[1]
  out = {}

  def record(name, peer, mine, theirs):
    err = float(np.abs(mine - theirs).max() / np.abs(theirs).max())
    out[(name, peer)] = max(out.get((name, peer), 0.0), err)

  def ours(tx, kwargs_of):
    state = tx.init(params)
    update = jax.jit(tx.update)
    results = []
    for k in range(steps):
      u, state = update(data[k][0][1], state, params, **kwargs_of(k))
      results.append(_flat(u))
    return results

  two_batch = lambda k: {"second_grads": data[k][1][1],
                         "third_grads": data[k][2][1]}
  with_losses = lambda k: {"losses": losses[k]}

  # ExcessMTL: torchjd (weights on the simplex; n_warmup_steps=1 is our
  # warmup_steps=1) and LibMTL (weights summing to T: T times our update).
  mine = ours(pcgrad_optax.excess_mtl(num_tasks=t, step_size=0.5),
              lambda k: {})
  agg = jd.ExcessMTL(robust_step_size=0.5, n_warmup_steps=1)
  with torch.no_grad():
    for k in range(steps):
      record("excess_mtl", "torchjd", mine[k],
             agg(torch.from_numpy(data[k][0][0])).numpy())
  if "ExcessMTL" in classes:
    _, step = _libmtl_stepper(classes["ExcessMTL"], t, p)
    for k in range(steps):
      tl = torch.tensor(losses[k], requires_grad=True)
      _, w = step([data[k][0][0]], tl, robust_step_size=0.5)
      record("excess_mtl", "LibMTL", t * mine[k], w @ data[k][0][0])

  # MoCo: LibMTL's convention (softmax weights, loss-scaled unit gradients).
  if "MoCo" in classes:
    mine = ours(pcgrad_optax.moco(num_tasks=t, weight_update="softmax",
                                  normalize=True), with_losses)
    _, step = _libmtl_stepper(classes["MoCo"], t, p)
    for k in range(steps):
      weighting, _ = step([data[k][0][0]], torch.from_numpy(losses[k]),
                          MoCo_beta=0.5, MoCo_beta_sigma=0.5, MoCo_gamma=0.1,
                          MoCo_gamma_sigma=0.5, MoCo_rho=0.0)
      record("moco", "LibMTL", mine[k], weighting.aggregated.numpy())

  # DB-MTL: LibMTL's defaults beta = 0.9, sigma = 0. LibMTL's backward
  # gathers the gradients of log(L + 1e-8): g / (L + 1e-8).
  if "DB_MTL" in classes:
    mine = ours(pcgrad_optax.db_mtl(num_tasks=t), with_losses)
    _, step = _libmtl_stepper(classes["DB_MTL"], t, p)
    for k in range(steps):
      scaled = data[k][0][0] / (losses[k][:, None] + 1e-8)
      weighting, _ = step([scaled.astype(np.float32)],
                          torch.from_numpy(losses[k]), DB_beta=0.9,
                          DB_beta_sigma=0.0)
      record("db_mtl", "LibMTL", mine[k], weighting.aggregated.numpy())

  # GradNorm: LibMTL's T softmax(xi) weights stepped by plain SGD (LibMTL
  # leaves the step to the model's optimiser), L(0) = the first losses.
  if "GradNorm" in classes:
    lr = 0.05
    mine = ours(pcgrad_optax.gradnorm(1.5, num_tasks=t, learning_rate=lr,
                                      parametrization="softmax"),
                with_losses)
    weighting, step = _libmtl_stepper(classes["GradNorm"], t, p)
    weighting.train_loss_buffer = np.asarray(losses[0], np.float64)[:, None]
    for k in range(steps):
      weighting, _ = step([data[k][0][0]], torch.from_numpy(losses[k]),
                          alpha=1.5)
      with torch.no_grad():
        weighting.loss_scale -= lr * weighting.loss_scale.grad
        weighting.loss_scale.grad = None
      record("gradnorm", "LibMTL", mine[k], weighting.aggregated.numpy())

  # SDMGrad: torchjd's weights (lr 10, the authors') on the cross matrix,
  # applied to the third batch; LibMTL hard-codes lr = 5.
  mine = ours(pcgrad_optax.sdmgrad(num_tasks=t), two_batch)
  agg = jd.SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
  with torch.no_grad():
    for k in range(steps):
      j1, j2, j3 = (torch.from_numpy(data[k][b][0]) for b in range(3))
      record("sdmgrad", "torchjd", mine[k], (agg(j1 @ j2.T) @ j3).numpy())
  if "SDMGrad" in classes:
    mine = ours(pcgrad_optax.sdmgrad(num_tasks=t, learning_rate=5.0),
                two_batch)
    _, step = _libmtl_stepper(classes["SDMGrad"], t, p)
    for k in range(steps):
      # LibMTL gathers zeta (the update's batch) first, then xi, xi'.
      weighting, _ = step([data[k][2][0], data[k][0][0], data[k][1][0]],
                          torch.ones(3, t), SDMGrad_lamda=0.3,
                          SDMGrad_niter=20)
      record("sdmgrad", "LibMTL", mine[k], weighting.aggregated.numpy())

  # MoDo: lambda from J1 J2^T, the update on the third batch.
  mine = ours(pcgrad_optax.modo(num_tasks=t, step_size=0.01, rho=0.1),
              two_batch)
  agg = jd.MoDoWeighting(gamma=0.01, rho=0.1)
  with torch.no_grad():
    for k in range(steps):
      j1, j2, j3 = (torch.from_numpy(data[k][b][0]) for b in range(3))
      record("modo", "torchjd", mine[k], (agg(j1 @ j2.T) @ j3).numpy())
  if "MoDo" in classes:
    _, step = _libmtl_stepper(classes["MoDo"], t, p)
    for k in range(steps):
      weighting, _ = step([data[k][b][0] for b in range(3)],
                          torch.ones(3, t), MoDo_gamma=0.01, MoDo_rho=0.1)
      record("modo", "LibMTL", mine[k], weighting.aggregated.numpy())
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
                       args.max_call,
                       None if not args.methods else set(args.methods))
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
  libmtl_entries.update({name: entry[3] for name, entry in
                         stateful_methods(2).items()})
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
        *[f"Rows {', '.join(r['methods'])}: re-run on {r['date']} "
          f"({r['rounds']} rounds, 1-min load {r['load']:.2f} after, floor "
          f"{fmt_ms(r['floor'])} ms in that run)." for r in c.get("reruns",
                                                                 [])],
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
      # Rows re-run with --methods keep the floor of their own run.
      row_floor = c.get("floor_of", {}).get(name, floor)
      over_floor = f"{ours / row_floor:.1f}" if ours else "—"
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


def command_line(argv=None) -> str:
  return "python benchmarks/bench_aggregators.py" + (
      " " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()


# The run that made the committed aggregators.json before runs were
# recorded in it (its results file's header).
_FIRST_RUN = {"date": "2026-11-23", "methods": None, "load_before": 0.63,
              "seconds": 1135.0,
              "command": "python benchmarks/bench_aggregators.py "
                         "--max-wait 60"}


def merge_rows(earlier, cells, names, load_before, seconds, command):
  """The earlier run's cells with ``names``' rows replaced by this run's.

  Returns ``(cells, runs)``. Each merged cell keeps its own floor and load,
  and records the re-run (methods, date, rounds, load, floor) in
  ``reruns``; ``floor_of`` maps a re-run method to its run's floor.
  """
  today = datetime.date.today().isoformat()
  merged = []
  for old in earlier["cells"]:
    new = [c for c in cells if (c["T"], c["P"]) == (old["T"], old["P"])]
    old = json.loads(json.dumps(old))
    if new:
      new = new[0]
      for key in list(old["times"]):
        if key != "floor" and key.split(" ", 1)[1] in names:
          del old["times"][key]
          old["iqr"].pop(key, None)
      for key, value in new["times"].items():
        if key != "floor":
          old["times"][key] = value
          old["iqr"][key] = new["iqr"][key]
      old["skipped"] = {k: v for k, v in old["skipped"].items()
                        if k.split(" ", 1)[1] not in names}
      old["skipped"].update(new["skipped"])
      old.setdefault("floor_of", {}).update(
          {n: new["times"]["floor"] for n in names})
      old["reruns"] = [r for r in old.get("reruns", [])
                       if set(r["methods"]) - set(names)] + [{
                           "methods": list(names), "date": today,
                           "rounds": new["rounds"], "load": new["load"],
                           "floor": new["times"]["floor"]}]
    merged.append(old)
  # A run whose every method is timed again here no longer owns any cell.
  runs = [r for r in earlier.get("runs") or [_FIRST_RUN]
          if r["methods"] is None or set(r["methods"]) - set(names)]
  runs = runs + [{"date": today, "methods": list(names),
                  "load_before": load_before, "seconds": seconds,
                  "command": command}]
  return merged, runs


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
  parser.add_argument("--methods", nargs="+", default=None,
                      help="time only these methods and merge their rows "
                      "into the cells of the existing --json (the other "
                      "rows keep their earlier run; each cell says which "
                      "rows were re-run, when, and under what load)")
  args = parser.parse_args(argv)
  if args.plot_only:
    out = args.out or os.path.join(RESULTS, "aggregators.md")
    with open(args.json or os.path.splitext(out)[0] + ".json") as f:
      cells = json.load(f)["cells"]
    plot(cells, list(methods(2)) + list(stateful_methods(2)),
         os.path.splitext(out)[0] + ".png")
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
  loss_checks = cross_check_loss_level(libmtl)
  for (name, peer), err in loss_checks.items():
    print(f"cross-check (loss level, 6 steps) {name} vs {peer}: {err:.1e}")
  if args.out is None and not args.quick:
    args.out = os.path.join(RESULTS, "aggregators.md")
  if args.json is None and args.out:
    args.json = os.path.splitext(args.out)[0] + ".json"
  done, earlier = [], None
  if args.resume and args.json and os.path.exists(args.json):
    with open(args.json) as f:
      done = json.load(f)["cells"]
  if args.methods and args.json and os.path.exists(args.json):
    with open(args.json) as f:
      earlier = json.load(f)
    args.resume, done = False, []
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
      if earlier is not None:   # written once, merged, at the end
        continue
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"cells": cells, "versions": versions()}, f, indent=1)
      print(f"T={t} P={cell['P']:,}: " + ", ".join(
          f"{k} {v * 1e3:.1f}" for k, v in cell["times"].items())
            + (f"; skipped {cell['skipped']}" if cell["skipped"] else ""),
            flush=True)
  runs = None
  if earlier is not None:
    cells, runs = merge_rows(earlier, cells, args.methods, load_before,
                             time.time() - start, command_line(argv))
    with open(args.json, "w") as f:
      json.dump({"cells": cells, "versions": versions(), "runs": runs}, f,
                indent=1)
  names = list(methods(8)) + list(stateful_methods(2))   # T >= 4 (Krum)
  body = tables(cells, names, libmtl)
  print("\n".join(body))
  if args.out is None:
    return
  command = command_line(argv)
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
      *([] if runs is None else [
          "",
          "The rows come from several runs (each row's times, peers "
          "included, from one run, interleaved; the ratios are within a "
          "run): " + "; ".join(
              f"{r['date']}, `{r['command']}`, "
              + ("every row" if r["methods"] is None else
                 ", ".join(r["methods"]))
              + f", 1-min load {r['load_before']:.2f} at its start, "
              f"{r['seconds']:.0f} s of timing" for r in runs)
          + ". This machine is shared: the later run's absolute times are "
          "noisier than the first's."
          + "".join(
              f" The {r['date']} run started at a 1-min load of "
              f"{r['load_before']:.1f} (other jobs on the box): compare each "
              "cell's floor in the two runs; under such contention XLA:CPU "
              "and torch slow down differently, so those rows' ratios are "
              "not comparable with the quiet run's (re-run them on a quiet "
              "machine before reading them as speed)."
              for r in runs if r["load_before"] > 2)]),
      "",
      "What is timed: one aggregation of the same stacked float32 gradients "
      "(see the script's docstring). Medians of interleaved rounds.",
      "",
      "Cross-check on small data (max |ours - peer| / max |peer|, matched "
      "hyper-parameters; T = 2 and 5): " + ", ".join(
          f"{n} vs {p} {e:.1e}" for (n, p), e in checks.items()) + ".",
      "",
      "Loss-level methods (the weights on the loss vector, 6 steps side by "
      "side with the peers' states; T = 3): " + ", ".join(
          f"{n} vs {p} {e:.1e}" for (n, p), e in loss_checks.items()) + ".",
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
