"""When the core takes its XLA:CPU paths.

On GPU/TPU, and for sharded or small leaves, the Gram matrix and the weighted
sum are one ``dot_general`` each. On a single CPU device XLA runs those
contractions several times slower than the same arithmetic fed to it in
smaller pieces, so large unsharded leaves take other code:
``pcgrad_optax._core.gram`` tiles the Gram matrix into cache-sized slice
products, and ``pcgrad_optax._core.weighted_sum`` adds rows for few tasks.
Every figure quoted for them is from ``benchmarks/results/cpu_paths.md``.

The per-task pullbacks of :func:`pcgrad_optax.task_value_and_grad` are a
``vmap`` on GPU/TPU and, unless they hold a convolution, a loop on CPU
(:func:`loop_over_tasks`; figures in
``benchmarks/results/step_profile.md``), and the Gram engine's ``(X X^T) D_t``
is a batched matmul there (:func:`broadcast_over_tasks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

from pcgrad_optax._core.mesh import explicit_spec

MIN_SIZE = 1 << 15        # smaller leaves: one dot_general is fine
# Up to this many tasks the weighted sum adds rows instead (see
# pcgrad_optax._core.weighted_sum.leaf_weighted_sum).
MAX_ROW_LOOP_TASKS = 8


def fast_path(x) -> bool:
  """Whether leaf x takes the CPU-only code (big, unsharded, 1 CPU)."""
  return (math.prod(x.shape[1:]) >= MIN_SIZE
          and jax.default_backend() == "cpu" and jax.device_count() == 1
          and explicit_spec(x) is None)


def loop_over_tasks(pullback_jaxpr: Callable[[], Any]) -> bool:
  """Whether the T pullbacks of one VJP run as a loop, not a ``vmap``.

  On XLA:CPU a ``vmap``-ed pullback computes each dense weight gradient of
  all tasks as one matmul whose output has the task axis inside (``(T *
  out, in)``), then transposes the ``T x P`` result into the stacked
  ``(T, in, out)`` layout, once per consumer: those transposing copies cost
  more than the matmuls. A ``lax.map`` over the tasks computes every
  per-task gradient in its own layout, in place, with a program that does
  not grow with T. But inside a loop body XLA:CPU leaves the kernel
  gradient of a convolution in a form its Eigen convolution does not take
  and runs it through its generic loop code, tens of times slower, so a
  pullback with a convolution keeps the ``vmap``, as GPU/TPU always do.
  Figures: ``benchmarks/results/step_profile.md``.

  Args:
    pullback_jaxpr: returns the jaxpr of one task's pullback (called only
      on CPU).
  """
  if jax.default_backend() != "cpu":
    return False
  return not _has_primitive(pullback_jaxpr(), _LOOP_AVERSE)


def broadcast_over_tasks(k, d) -> bool:
  """Whether ``K D_t`` (``K`` shared, ``D`` stacked) broadcasts ``K`` first.

  XLA:CPU computes ``einsum("bnm,tbmf->tbnf", K, D)`` as one matmul over
  ``(m, t f)``: it transposes ``D`` into that layout, and the transposing
  copies cost more than the matmul. With ``K`` broadcast to ``(T, B, N,
  N)`` (behind an optimisation barrier, so that the simplifier does not
  fold the broadcast back) it is a batched matmul on ``D``'s own layout.
  Taken on CPU when the broadcast is no bigger than ``D`` (``N <= F``) and
  no explicit mesh axis shards either. Figures:
  ``benchmarks/results/step_profile.md``.

  Args:
    k: ``(B, N, N)``.
    d: ``(T, B, N, F)``.
  """
  return (jax.default_backend() == "cpu" and k.shape[-1] <= d.shape[-1]
          and explicit_spec(k) is None and explicit_spec(d) is None)


# Primitives XLA:CPU runs far slower inside a while loop's body.
_LOOP_AVERSE = frozenset({"conv_general_dilated"})


def _has_primitive(jaxpr, names) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in it uses a primitive in names."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      return True
    if any(_has_primitive(sub, names)
           for sub in jcore.jaxprs_in_params(eqn.params)):
      return True
  return False
