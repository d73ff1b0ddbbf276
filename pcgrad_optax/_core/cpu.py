"""When the core takes its XLA:CPU paths.

On GPU/TPU, and for sharded or small leaves, the Gram matrix and the weighted
sum are one ``dot_general`` each. On a single CPU device XLA runs those
contractions several times slower than the same arithmetic fed to it in
smaller pieces, so large unsharded leaves take other code:
``pcgrad_optax._core.gram`` tiles the Gram matrix into cache-sized slice
products, and ``pcgrad_optax._core.weighted_sum`` adds rows for few tasks.
Every figure quoted for them is from ``benchmarks/results/cpu_paths.md``.
"""

from __future__ import annotations

import math

import jax

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
