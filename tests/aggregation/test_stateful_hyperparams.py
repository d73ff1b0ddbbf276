"""ExcessMTL, MoCo, DB-MTL, GradNorm, SDMGrad, MoDo under inject_hyperparams.

Every numeric hyperparameter may be a JAX array, also a traced one: the
factories validate them only when concrete, and the injected transformation
gives the update of the plain one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcgrad_optax as po

G = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)),
                      jnp.float32)}
PARAMS = {"w": jnp.zeros(3)}

CASES = [
    ("modo", dict(step_size=0.1, rho=0.1), {"second_grads": G}),
    ("sdmgrad", dict(lambda_=0.3, learning_rate=1.0, momentum=0.5,
                     num_steps=5), {"second_grads": G}),
    ("moco", dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5,
                  rho=0.1), {}),
    ("db_mtl", dict(beta=0.9, beta_sigma=0.5, eps=1e-8),
     {"losses": jnp.array([1.0, 2.0])}),
    ("excess_mtl", dict(step_size=0.1, warmup_steps=1, eps=1e-7), {}),
    ("gradnorm", dict(alpha=1.5, learning_rate=0.1),
     {"losses": jnp.array([1.0, 2.0])}),
]


@pytest.mark.parametrize("name,hyper,extra", CASES, ids=[c[0] for c in CASES])
def test_injected_hyperparameters_give_the_same_updates(name, hyper, extra):
  factory = getattr(po, name)
  injected = optax.inject_hyperparams(factory, static_args=("num_tasks",))(
      num_tasks=2, **hyper)
  plain = factory(num_tasks=2, **hyper)
  s1, s2 = injected.init(PARAMS), plain.init(PARAMS)
  step = jax.jit(injected.update)
  for _ in range(3):
    u1, s1 = step(G, s1, PARAMS, **extra)
    u2, s2 = plain.update(G, s2, PARAMS, **extra)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=1e-7)
