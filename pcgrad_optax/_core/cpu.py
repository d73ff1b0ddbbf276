"""The XLA:CPU paths of the core: when they apply, and the tiled Gram.

On GPU/TPU, and for sharded or small leaves, the Gram matrix and the weighted
sum are one ``dot_general`` each (:mod:`pcgrad_optax._core.gram`,
:mod:`pcgrad_optax._core.weighted_sum`). On a single CPU device XLA runs
those contractions several times slower than the same arithmetic fed to it
in cache-sized pieces, so large unsharded leaves take the paths below. Every
figure quoted here is from ``benchmarks/results/cpu_paths.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pcgrad_optax._core.mesh import explicit_spec
from pcgrad_optax._core.stacked import accumulation_dtype

# XLA:CPU computes a (T, P) x (P, T) contraction with small T and large P
# slowly (3M f32 params: ~10x the time of torch's x @ x.T at T=2, 2-4x at
# T=8..128): its matmul kernels repack the whole (T, P) operand and split no
# work over the cores for a tiny (T, T) output. tiled_gram feeds them
# cache-sized slices instead, several independent ones per loop step.
MIN_SIZE = 1 << 15        # smaller leaves: one dot_general is fine
CHUNK_BYTES = 128 * 1024  # one (T, chunk) slice, well inside L2 ...
MIN_CHUNK = 1024          # ... but never narrower than this (large T)
# Independent slice products per loop step. XLA:CPU runs the independent ops
# of a step concurrently on its thread pool only when a step has more than 8
# ops; 16 slices keep both cores (or more) busy.
SLICES_PER_STEP = 16
# Up to this many tasks the weighted sum adds rows instead (see
# pcgrad_optax._core.weighted_sum.leaf_weighted_sum).
MAX_ROW_LOOP_TASKS = 8


def fast_path(x) -> bool:
  """Whether leaf x takes the CPU-only code (big, unsharded, 1 CPU)."""
  return (math.prod(x.shape[1:]) >= MIN_SIZE
          and jax.default_backend() == "cpu" and jax.device_count() == 1
          and explicit_spec(x) is None)


def _slice_gram(flat: jax.Array) -> jax.Array:
  """``flat @ flat.T`` of one unsharded ``(T, n)`` slice (f32+, HIGHEST)."""
  return lax.dot_general(
      flat, flat, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
      preferred_element_type=accumulation_dtype(flat.dtype))


@jax.jit   # one compiled loop when called outside jit too
def tiled_gram(flat: jax.Array) -> jax.Array:
  """``flat @ flat.T`` of a ``(T, P)`` array, fast on XLA:CPU.

  A loop walks the P axis; each step contracts 16 independent
  ``(T, chunk)`` slices with themselves, which XLA:CPU runs concurrently.
  ``chunk`` is about 128 KiB of a slice (so it stays in cache) but at least
  1024 columns (wider slices win for T >= 64), adjusted so that the steps
  tile P up to fewer than ``16 * steps`` columns, which one plain contraction
  adds. Same f32+ accumulation at full precision as the plain contraction,
  summed in a different order; the loop keeps compile time flat in T.
  Measured against one ``dot_general`` (``benchmarks/results/cpu_paths.md``,
  2-core EPYC): 3-4x faster for T <= 32 on 3M f32 params, 1.5x at T=128;
  within 0.75-1.25x of torch's BLAS ``x @ x.T`` from T=8 up, slower at T=2.
  """
  t, p = flat.shape
  acc = accumulation_dtype(flat.dtype)
  slices = SLICES_PER_STEP
  target = max(MIN_CHUNK, CHUNK_BYTES // (t * flat.dtype.itemsize))
  steps = max(1, p // (slices * target))
  chunk = p // (steps * slices)
  block = slices * chunk

  def step(i, gram):
    return gram + sum(
        _slice_gram(lax.dynamic_slice_in_dim(flat, i * block + j * chunk,
                                             chunk, 1))
        for j in range(slices))

  gram = lax.fori_loop(0, steps, step, jnp.zeros((t, t), acc))
  rest = flat[:, steps * block:]
  if rest.shape[1]:
    gram = gram + _slice_gram(rest)
  return gram
