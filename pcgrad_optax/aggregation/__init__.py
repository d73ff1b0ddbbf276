"""Gradient-level methods: stacked per-task gradients in, one update out.

One method, one module: ``_<method>.py`` holds the method's pure weighting
(where it is a function of the Gram matrix, exported as
``pcgrad_optax.weighting.<method>``), its optax transformation (exported here
and as ``pcgrad_optax.<method>``), its state type and their docstrings. The
small solvers several methods share are in ``_solvers.py``; the Gram-matrix
core they all run on is :mod:`pcgrad_optax._core`.

Every transformation has the interface of :func:`pcgrad_optax.pcgrad`:
stacked gradients in (every leaf ``(T,) + param.shape``), params-shaped
updates out, ``shared=`` and ``reduction=``; PRNG keys live in the state.
The Gram-based ones build the Gram matrix of the shared leaves, ask their
weighting for task weights, combine the shared leaves with them and give
non-shared leaves (task heads) the plain sum (or mean) over the task axis;
the stateless ones among them keep ``optax.EmptyState``, or, built with
``num_tasks``, a :class:`GramState` with the last step's task weights (and
Gram matrix with ``keep_gram=True``) for logging. Those whose state has a
per-task shape (GradVac) take ``num_tasks`` up front, like
:func:`pcgrad_optax.multi_steps`, because ``init`` only sees the params.
Every transformation is an ``optax.experimental.aggregating.Aggregator``.

``reduction="sum"`` applies the method's weights as its paper defines them
(see each weighting); ``reduction="mean"`` divides the whole update, shared
leaves and heads, by ``T``. For the linear baselines that means::

  transformation            shared leaves        heads
  sum()                     sum_t g_t            sum_t g_t
  sum(reduction="mean")     (1/T) sum_t g_t      (1/T) sum_t g_t
  mean()                    (1/T) sum_t g_t      sum_t g_t
  mean(reduction="mean")    (1/T^2) sum_t g_t    (1/T) sum_t g_t

so ``sum(reduction="mean")`` is the gradient of the mean loss, and ``mean()``
averages the shared part while each head keeps its own task's gradient at
full strength.

Conventions shared by the Gram weightings:

* The weights are the method's update as its paper defines it (MGDA: the
  min-norm point of the convex hull, so weights on the simplex; UPGrad: the
  *average* of the projected gradients; CAGrad: around the *mean* gradient;
  Aligned-MTL and ConFIG: around the *sum*).
* Everything works on ``T x T`` numbers only, so the cost does not depend
  on the model size: ``O(T^3)`` for the closed forms, ``O(T^3)`` per
  active-set step (at most ``3T + 10`` steps) for the QPs, ``T`` such QPs
  for UPGrad. All of it is jit-able; iterations run in ``lax.while_loop``
  with caps (never unrolled), so compile time does not grow with ``T``.
* The small problems are solved in the Gram matrix's dtype (float32 for
  float32/bf16/f16 gradients, float64 for float64 ones), or in float64
  whenever ``jax_enable_x64`` is on. In float32 the Gram matrix itself
  carries a relative error of about ``1e-7``, which bounds how well *any*
  Gram-based method can resolve nearly degenerate configurations: updates
  are then accurate to a few ``1e-4`` of the largest gradient norm (about
  ``sqrt(1e-7)``), against ``1e-7`` on well-conditioned problems. Enable
  x64 if you need more.
* Methods that only depend on directions work on the cosine matrix
  ``C_ij = K_ij / (|g_i| |g_j|)``, so gradient norms spanning many orders of
  magnitude do not cost precision. A task with a zero gradient is handled
  explicitly by every method (never ``0/0``).
"""

from pcgrad_optax.aggregation._aligned_mtl import aligned_mtl
from pcgrad_optax.aggregation._cagrad import cagrad
from pcgrad_optax.aggregation._config import config
from pcgrad_optax.aggregation._db_mtl import DBMTLState
from pcgrad_optax.aggregation._db_mtl import db_mtl
from pcgrad_optax.aggregation._dualproj import dualproj
from pcgrad_optax.aggregation._excess_mtl import ExcessMTLState
from pcgrad_optax.aggregation._excess_mtl import excess_mtl
from pcgrad_optax.aggregation._graddrop import GradDropState
from pcgrad_optax.aggregation._graddrop import graddrop
from pcgrad_optax.aggregation._gradnorm import GradNormState
from pcgrad_optax.aggregation._gradnorm import gradnorm
from pcgrad_optax.aggregation._gradvac import GradVacState
from pcgrad_optax.aggregation._gradvac import gradvac
from pcgrad_optax.aggregation._imtl_g import imtl_g
from pcgrad_optax.aggregation._mean import mean
from pcgrad_optax.aggregation._mgda import mgda
from pcgrad_optax.aggregation._moco import MoCoState
from pcgrad_optax.aggregation._moco import moco
from pcgrad_optax.aggregation._modo import MoDoState
from pcgrad_optax.aggregation._modo import modo
from pcgrad_optax.aggregation._nash_mtl import nash_mtl
from pcgrad_optax.aggregation._pcgrad import PCGradState
from pcgrad_optax.aggregation._pcgrad import pcgrad
from pcgrad_optax.aggregation._sdmgrad import SDMGradState
from pcgrad_optax.aggregation._sdmgrad import sdmgrad
from pcgrad_optax.aggregation._sum import sum  # noqa: A004 (the method's name)
from pcgrad_optax.aggregation._upgrad import upgrad
# The state of the stateless Gram-based methods built with num_tasks.
from pcgrad_optax._core.transform import GramState  # noqa: I001
# Issue 13: FairGrad, Krum, trimmed mean, constant weights, CR-MOGM.
from pcgrad_optax.aggregation._constant import constant
from pcgrad_optax.aggregation._cr_mogm import CRMOGMState
from pcgrad_optax.aggregation._cr_mogm import cr_mogm
from pcgrad_optax.aggregation._fairgrad import fairgrad
from pcgrad_optax.aggregation._krum import krum
from pcgrad_optax.aggregation._trimmed_mean import trimmed_mean

__all__ = [
    "DBMTLState",
    "ExcessMTLState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "MoCoState",
    "MoDoState",
    "PCGradState",
    "SDMGradState",
    "aligned_mtl",
    "cagrad",
    "config",
    "db_mtl",
    "dualproj",
    "excess_mtl",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl_g",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pcgrad",
    "sdmgrad",
    "sum",
    "upgrad",
    # Issue 12: the last step's task weights (and Gram matrix) in the state.
    "GramState",
    # Issue 13.
    "CRMOGMState",
    "constant",
    "cr_mogm",
    "fairgrad",
    "krum",
    "trimmed_mean",
]
