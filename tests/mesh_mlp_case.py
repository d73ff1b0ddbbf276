"""The small MLP that tests/multidevice's value_and_aggregate modules shard."""

import numpy as np

T = 3
MASK = {"w1": True, "b1": True, "w2": True, "heads": False}


def mlp_params(rng: np.random.Generator) -> dict:
  """Two shared layers and T heads, float32, drawn from ``rng``."""
  return {"w1": rng.standard_normal((8, 16)).astype(np.float32) * 0.4,
          "b1": rng.standard_normal(16).astype(np.float32) * 0.1,
          "w2": rng.standard_normal((16, 16)).astype(np.float32) * 0.3,
          "heads": rng.standard_normal((16, T)).astype(np.float32)}
