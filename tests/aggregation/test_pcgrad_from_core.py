"""PCGrad's weighting: its order and key inputs, and its random orders.

Moved here from tests/test_core.py, which held these tests of
``weighting.pcgrad`` and ``weighting.random_orders`` next to the core's; the
owner of tests/aggregation/test_pcgrad.py will merge this file into that one.

Every bad input must be a ValueError raised while tracing (checked with
``jax.eval_shape``, where nothing runs) that names the offending argument and
its shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po
from trace_errors import has_all, traced


@pytest.mark.parametrize("order", [np.zeros((3, 2), np.int32),
                                   np.zeros((3,), np.int32),
                                   np.zeros((2, 3), np.int32),
                                   np.zeros((3, 3), np.float32)],
                         ids=["3x2", "3", "2x3", "float"])
def test_order_wrong_shape(order):
  gram = jnp.eye(3)
  with pytest.raises(ValueError, match=has_all("order", "(3, 3)",
                                               str(order.shape))):
    traced(lambda k: po.weighting.pcgrad(k, order=jnp.asarray(order)), gram)


def test_weighting_needs_key_or_order():
  with pytest.raises(ValueError, match="key"):
    po.weighting.pcgrad(jnp.eye(2))


def test_random_orders_are_uniform_permutations():
  # 2000 draws of T = 4: every row a permutation of range(4), and each task
  # in each position with frequency 1/4 (binomial sd ~0.0097; 5 sd bound).
  keys = jax.random.split(jax.random.key(0), 500)
  orders = np.asarray(jax.vmap(
      lambda k: po.weighting.random_orders(k, 4))(keys)).reshape(-1, 4)
  np.testing.assert_array_equal(np.sort(orders, axis=1),
                                np.tile(np.arange(4), (len(orders), 1)))
  freq = np.stack([(orders == v).mean(0) for v in range(4)])
  np.testing.assert_allclose(freq, 0.25, atol=0.05)
