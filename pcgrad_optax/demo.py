"""Demo: a shared-trunk multi-task MLP trained with and without PCGrad.

Run with ``python -m pcgrad_optax.demo``. The data are made here (no
download): three regression tasks read the same 16-d inputs through a shared
trunk. Task 0 has targets 30x larger than the others (a *dominating*
gradient) and task 1 wants the opposite of part of what task 0 wants (a
*conflicting* gradient): two legs of PCGrad's "tragic triad". Each method
trains the same initial model with Adam; the script prints per-task test
errors relative to the variance of each task's targets.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax

NUM_TASKS = 3
TASK_SCALES = (30.0, 1.0, 1.0)


def make_data(seed: int, n: int, dim: int = 16):
  """Inputs ``(n, dim)`` and targets ``(n, NUM_TASKS)`` of three tasks."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
  u, v, w = basis[:, 0], basis[:, 1], basis[:, 2]
  x = rng.standard_normal((n, dim)).astype(np.float32)
  s, t, r = x @ u, x @ v, x @ w
  targets = np.stack([
      np.tanh(s + 0.5 * t),          # dominant task
      np.tanh(-s + 0.5 * r),          # conflicts with task 0 along u
      np.sin(t) * np.cos(r),          # mostly orthogonal
  ], axis=1) * np.asarray(TASK_SCALES)
  noise = 0.05 * rng.standard_normal(targets.shape) * np.asarray(TASK_SCALES)
  return x, (targets + noise).astype(np.float32)


def init_params(key, dim=16, width=32):
  k1, k2, k3 = jax.random.split(key, 3)
  dense = lambda k, i, o: {
      "kernel": jax.random.normal(k, (i, o)) * jnp.sqrt(1.0 / i),
      "bias": jnp.zeros((o,))}
  return {
      "trunk": {"layer_0": dense(k1, dim, width),
                "layer_1": dense(k2, width, width)},
      # One linear head per task, stacked: heads[t] is task t's head.
      "heads": {"kernel": jax.random.normal(k3, (NUM_TASKS, width, 1))
                          * jnp.sqrt(1.0 / width),
                "bias": jnp.zeros((NUM_TASKS, 1))},
  }


def predict(params, x):
  h = x
  for layer in params["trunk"].values():
    h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
  out = jnp.einsum("nw,two->nt", h, params["heads"]["kernel"])
  return out + params["heads"]["bias"][:, 0]


def task_losses(params, x, y):
  """Per-task mean squared errors, a (T,) vector."""
  return jnp.mean((predict(params, x) - y) ** 2, axis=0)


# PCGrad's surgery is for the shared trunk; each task's head keeps its own
# gradient (it is stacked on a task axis and no other task touches it).
SHARED = {"trunk": True, "heads": False}

METHODS = {
    "adam (sum of losses)": lambda: optax.adam(1e-3),
    "pcgrad + adam": lambda: optax.chain(
        pcgrad_optax.pcgrad(key=0, shared=SHARED), optax.adam(1e-3)),
}


def train(method: str, steps: int, seed: int, x, y, report_every: int | None):
  """Trains one method from seed ``seed``; returns the trained params.

  Prints the per-task training losses (relative to each task's target
  variance) every ``report_every`` steps, or not at all when None.
  """
  params = init_params(jax.random.key(seed))
  tx = METHODS[method]()
  stacked = method != "adam (sum of losses)"
  grad_fn = pcgrad_optax.task_value_and_grad(task_losses)

  def step(carry, batch_idx):
    params, opt_state = carry
    xb, yb = x[batch_idx], y[batch_idx]
    if stacked:
      losses, grads = grad_fn(params, xb, yb)
    else:
      losses, grads = jax.value_and_grad(
          lambda p: jnp.sum(task_losses(p, xb, yb)))(params)
      losses = task_losses(params, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), losses

  @jax.jit
  def run_chunk(carry, idx):
    return jax.lax.scan(step, carry, idx)

  carry = (params, tx.init(params))
  rng = np.random.default_rng(seed)
  chunk = report_every or steps
  var = np.asarray(y).var(axis=0)
  for start in range(0, steps, chunk):
    idx = rng.integers(0, x.shape[0], (min(chunk, steps - start), 64))
    carry, losses = run_chunk(carry, jnp.asarray(idx))
    if report_every:
      rel = np.asarray(losses).mean(0) / var
      print(f"  [{method}] step {start + len(idx):5d}/{steps}  train loss / "
            "variance: " + "  ".join(f"task {t} {m:.4f}"
                                     for t, m in enumerate(rel)), flush=True)
  return carry[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args(argv)

  x, y = make_data(0, 4096)
  x_test, y_test = make_data(0, 2048 + 4096)
  x_test, y_test = x_test[4096:], y_test[4096:]
  var = y_test.var(axis=0)
  print(f"pcgrad_optax {pcgrad_optax.__version__} on {jax.devices()[0]}; "
        f"{NUM_TASKS} tasks, task scales {TASK_SCALES}, {args.steps} steps, "
        f"{args.seeds} seeds")
  results = {m: [] for m in METHODS}
  for method in METHODS:
    start = time.perf_counter()
    for seed in range(args.seeds):
      params = train(method, args.steps, seed, jnp.asarray(x), jnp.asarray(y),
                     report_every=max(args.steps // 5, 1) if seed == 0 else None)
      errors = np.asarray(task_losses(params, x_test, y_test)) / var
      results[method].append(errors)
    print(f"  {method}: {time.perf_counter() - start:.1f} s")

  print("\nTest error / target variance (lower is better), "
        f"mean ± std over {args.seeds} seeds:")
  header = f"{'method':<24}" + "".join(f"{f'task {t}':>18}"
                                        for t in range(NUM_TASKS))
  print(header + f"{'mean':>10}")
  for method, errs in results.items():
    errs = np.stack(errs)
    cells = "".join(f"{m:>10.4f} ± {s:<5.3f}"
                    for m, s in zip(errs.mean(0), errs.std(0)))
    print(f"{method:<24}{cells}{errs.mean():>10.4f}")


if __name__ == "__main__":
  main()
