"""task_value_and_grad against jax.jacrev / per-task jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcgrad_optax as po


RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 3)).astype(np.float32)
Y = RNG.standard_normal((16, 3)).astype(np.float32)
PARAMS = {"w": RNG.standard_normal((3, 4)).astype(np.float32),
          "b": RNG.standard_normal(4).astype(np.float32)}
HEAD = RNG.standard_normal((4, 3)).astype(np.float32)


def three_losses(params, head, x, *, temperature=1.0):
  h = jnp.tanh(x @ params["w"] + params["b"]) / temperature
  pred = h @ head
  return jnp.mean((pred - Y) ** 2, axis=0)       # (3,) task losses


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def per_task_grads(fn, argnums, *args, **kwargs):
  """Stacks jax.grad of each task's loss separately."""
  t = fn(*args, **kwargs).shape[0]
  grads = [jax.grad(lambda *a, i=i: fn(*a, **kwargs)[i], argnums=argnums)(
      *args) for i in range(t)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *grads)


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_argnums_int(batched):
  calls = []

  def counted(*args, **kwargs):
    calls.append(None)
    return three_losses(*args, **kwargs)

  @jax.jit
  def everything(params):
    losses, grads = po.task_value_and_grad(counted, batched=batched)(
        params, HEAD, X, temperature=2.0)
    return (losses, grads, three_losses(params, HEAD, X, temperature=2.0),
            jax.jacrev(lambda p: three_losses(p, HEAD, X,
                                              temperature=2.0))(params),
            per_task_grads(three_losses, 0, params, HEAD, X,
                           temperature=2.0))

  losses, grads, direct, jac, per_task = everything(PARAMS)
  assert len(calls) == 1        # one forward pass, shared by the T VJPs
  np.testing.assert_allclose(losses, direct, rtol=1e-6)
  assert_trees_close(grads, jac)
  assert_trees_close(grads, per_task)
  assert grads["w"].shape == (3, 3, 4)


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_argnums_tuple_and_jit(batched):
  @jax.jit
  def everything(params, head, x):
    return (po.task_value_and_grad(three_losses, argnums=(0, 1),
                                   batched=batched)(params, head, x)[1],
            jax.jacrev(three_losses, argnums=(0, 1))(params, head, x),
            per_task_grads(three_losses, (0, 1), params, head, x),
            po.task_value_and_grad(three_losses, argnums=1, batched=batched)(
                params, head, x)[1])

  grads, jac, per_task, head_only = everything(PARAMS, HEAD, X)
  assert isinstance(grads, tuple) and len(grads) == 2
  assert_trees_close(grads, jac)
  assert_trees_close(grads, per_task)
  assert_trees_close(head_only, jac[1])


@pytest.mark.parametrize("batched", [True, False])
def test_task_value_and_grad_has_aux(batched):
  def with_aux(params, head, x):
    losses = three_losses(params, head, x)
    return losses, {"total": jnp.sum(losses)}

  @jax.jit
  def everything(params, head, x):
    return (po.task_value_and_grad(with_aux, has_aux=True, batched=batched)(
        params, head, x),
            jax.jacrev(with_aux, has_aux=True)(params, head, x)[0],
            po.task_value_and_grad(with_aux, argnums=(1,), has_aux=True,
                                   batched=batched)(params, head, x)[1],
            jax.jacrev(with_aux, argnums=(1,), has_aux=True)(
                params, head, x)[0])

  ((losses, aux), grads), jac, grads2, jac2 = everything(PARAMS, HEAD, X)
  np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
  assert_trees_close(grads, jac)
  assert_trees_close(grads2, jac2)


@pytest.mark.parametrize("make_losses", [
    lambda l: jnp.sum(l),          # scalar
    lambda l: l[:, None],          # (T, 1)
    lambda l: jnp.stack([l, l]),   # (2, T)
], ids=["scalar", "column", "matrix"])
def test_task_value_and_grad_rejects_non_vector(make_losses):
  fn = po.task_value_and_grad(lambda p: make_losses(
      three_losses(p, HEAD, X)))
  with pytest.raises(ValueError, match="vector"):
    jax.jit(fn)(PARAMS)
  with pytest.raises(ValueError, match="vector"):
    jax.eval_shape(fn, PARAMS)


def test_task_value_and_grad_bad_argnums():
  with pytest.raises(ValueError, match="argnums"):
    po.task_value_and_grad(three_losses, argnums=3)(PARAMS, HEAD, X)
