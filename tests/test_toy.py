"""The 2-D toy landscapes (pcgrad_optax.toy) and benchmarks/toy.py's analysis.

The references below are written from the formulas in the papers (see
/work/shared/papers.md), in float64 NumPy, independently of the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from benchmark_scripts import load_benchmark

import pcgrad_optax
from pcgrad_optax import toy

LOWER = 5e-6
# One compilation per shape and dtype instead of op-by-op dispatch.
losses_jit = jax.jit(toy.losses)
paper_losses_jit = jax.jit(toy.pcgrad_paper_losses)
stacked_grads_jit = jax.jit(pcgrad_optax.task_value_and_grad(toy.losses))


def ref_followup_losses(x1, x2):
  """The CAGrad/Nash-MTL toy, written out from the paper's formulas."""
  def log_floor(z):
    return np.log(np.maximum(np.abs(z), LOWER))
  f1 = log_floor(0.5 * (-x1 - 7) - np.tanh(-x2)) + 6
  f2 = log_floor(0.5 * (-x1 + 3) + np.tanh(-x2) + 2) + 6
  c1 = np.maximum(np.tanh(0.5 * x2), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = np.maximum(np.tanh(-0.5 * x2), 0)
  return np.array([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


def ref_pcgrad_paper_losses(t1, t2):
  return np.array([
      20 * np.log(max(abs(0.5 * t1 + np.tanh(t2)), LOWER)),
      25 * np.log(max(abs(0.5 * t1 - np.tanh(t2) + 2), LOWER))])


# Plateau, valley, both sides of x2 = 0, the published starts, the minimum of
# the mean loss, and points near the log terms' kinks.
POINTS = [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (0.0, -8.3551),
          (3.0, 0.5), (-2.0, -0.25), (-5.4, 1.0), (6.0, -9.5),
          (-10.0, 10.0)]


@pytest.mark.parametrize("point", POINTS)
def test_followup_losses_match_reference(point):
  got = np.asarray(losses_jit(jnp.asarray(point, jnp.float32)))
  want = ref_followup_losses(*np.asarray(point, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("point", [(0.5, -3.0), (1.0, 0.0), (-2.0, 3.0),
                                   (4.0, -1.0), (-1.5, 6.0)])
def test_pcgrad_paper_losses_match_reference(point):
  got = np.asarray(paper_losses_jit(jnp.asarray(point, jnp.float32)))
  want = ref_pcgrad_paper_losses(*np.asarray(point, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_log_floor_in_float64():
  # On the floor the log term is log(5e-6) + 6 exactly, and its gradient 0.
  with jax.enable_x64(True):
    x2 = 1.0
    x1 = -7.0 + 2.0 * np.tanh(x2)          # 0.5(-x1 - 7) - tanh(-x2) = 0
    got = np.asarray(toy.losses(jnp.array([x1, x2], jnp.float64)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref_followup_losses(x1, x2), rtol=1e-12)
    np.testing.assert_allclose(got[0], (np.log(LOWER) + 6) * np.tanh(0.5),
                               rtol=1e-12)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    for point in POINTS[:6]:
      x = np.asarray(point, np.float64)
      _, grads = stacked_grads_jit(jnp.asarray(x))
      h = 1e-6
      fd = np.stack([(ref_followup_losses(*(x + h * e)) -
                      ref_followup_losses(*(x - h * e))) / (2 * h)
                     for e in np.eye(2)], axis=1)     # (tasks, coords)
      np.testing.assert_allclose(np.asarray(grads), fd, rtol=1e-5, atol=1e-6)


def test_broadcasts_over_leading_axes_and_rejects_bad_shapes():
  grid = jnp.stack(jnp.meshgrid(jnp.linspace(-9, 9, 4), jnp.linspace(-9, 9, 3)),
                   axis=-1)
  out = losses_jit(grid)
  assert out.shape == (3, 4, 2)
  np.testing.assert_allclose(out[1, 2], losses_jit(grid[1, 2]), rtol=1e-6)
  assert paper_losses_jit(grid).shape == (3, 4, 2)
  assert losses_jit(jnp.array([1, 2])).dtype == jnp.float32   # ints promoted
  with pytest.raises(ValueError, match=r"\(\.\.\., 2\).*\(3,\)"):
    losses_jit(jnp.zeros(3))
  with pytest.raises(ValueError, match="shape"):
    paper_losses_jit(jnp.float32(1.0))


def test_published_constants():
  assert toy.STARTS == ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
  mean = ref_followup_losses(*np.asarray(toy.MEAN_LOSS_ARGMIN)).mean()
  np.testing.assert_allclose(mean, toy.MEAN_LOSS_MIN, atol=1e-4)


def _run(tx, start, steps):
  grad_fn = pcgrad_optax.task_value_and_grad(toy.losses)

  def step(carry, _):
    x, state = carry
    losses, grads = grad_fn(x)
    updates, state = tx.update(grads, state, x)
    return (optax.apply_updates(x, updates), state), losses

  x = jnp.asarray(start, jnp.float32)
  (x, _), losses = jax.jit(
      lambda c: jax.lax.scan(step, c, None, length=steps))((x, tx.init(x)))
  return np.asarray(x), np.asarray(losses)


def test_pcgrad_short_run_goes_downhill_for_both_tasks():
  # For two tasks PCGrad's update never conflicts with either task gradient,
  # so with small plain gradient steps neither task loss goes up.
  start = toy.STARTS[1]
  _, losses = _run(optax.chain(pcgrad_optax.pcgrad(), optax.sgd(1e-3)), start,
                   500)
  assert np.all(np.diff(losses, axis=0) <= 1e-5)
  assert np.all(losses[-1] < losses[0] - 1e-2)
  # The benchmark's setting (Adam, lr 1e-3) also lowers both losses.
  end, losses = _run(optax.chain(pcgrad_optax.pcgrad(), optax.adam(1e-3)),
                     start, 1000)
  assert np.all(losses[-1] < losses[0])
  assert np.linalg.norm(end - np.asarray(start)) > 0.5


def _load_benchmark():
  return load_benchmark("toy")


def test_benchmark_analysis_helpers():
  bench = _load_benchmark()
  # Its analytic float64 gradients agree with autodiff of the library's toy
  # (away from the kink at x2 = 0, where autodiff splits max's tie).
  with jax.enable_x64(True):
    for point in POINTS:
      _, grads = stacked_grads_jit(jnp.asarray(point, jnp.float64))
      np.testing.assert_allclose(bench.toy_grads_f64(np.asarray(point)),
                                 np.asarray(grads), rtol=1e-10, atol=1e-12)
  # Its closed-form min-norm point of conv{g1, g2} agrees with a fine grid.
  rng = np.random.default_rng(0)
  alphas = np.linspace(0, 1, 100_001)[:, None]
  for _ in range(5):
    g1, g2 = rng.standard_normal((2, 3))
    brute = np.min(np.linalg.norm(alphas * g1 + (1 - alphas) * g2, axis=1))
    np.testing.assert_allclose(np.linalg.norm(bench.min_norm_point(g1, g2)),
                               brute, rtol=1e-6)
  np.testing.assert_allclose(bench.min_norm_point([1.0, 0], [-2.0, 0]), 0,
                             atol=1e-15)
  np.testing.assert_allclose(bench.min_norm_point([1.0, 2], [1.0, 2]), [1, 2])
