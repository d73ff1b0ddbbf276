"""benchmarks/mt10_sac.py: the MT-SAC agent on a fake vector env, and a
Meta-World MT10 smoke run when the ``rl`` extra is installed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def sac():
  return load_benchmark("mt10_sac")


T, OBS, ACT = 3, 5, 2


def _cfg(sac, **kw):
  return sac.Config(num_tasks=T, obs_dim=OBS, act_dim=ACT, hidden=(16,),
                    batch_per_task=8, **kw)


def _transitions(seeds, k, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(seeds, k, T, OBS)),
          rng.uniform(-1, 1, (seeds, k, T, ACT)),
          rng.normal(size=(seeds, k, T)),
          rng.normal(size=(seeds, k, T, OBS)),
          (rng.uniform(size=(seeds, k, T)) < 0.1).astype(np.float32))


@pytest.mark.parametrize("method", ["mean", "pcgrad", "cagrad", "famo"])
def test_update_step_plugs_in_every_kind_of_aggregator(sac, method):
  cfg = _cfg(sac)
  agent = sac.Agent(cfg, method, seeds=[0, 1], capacity=32)
  before = jax.tree.map(np.array, agent.state)   # train() donates the state
  metrics = agent.train(_transitions(2, 12), num_updates=3)
  state = agent.state
  assert int(agent.buffer.size[0]) == 12
  assert np.asarray(state.updates).tolist() == [3, 3]
  for name in ("critic_loss", "actor_loss", "alpha", "entropy"):
    assert metrics[name].shape == (2, T)
    assert np.all(np.isfinite(np.asarray(metrics[name])))
  # Every network moved, in every seed, and the seeds differ.
  for old, new in ((before.actor, state.actor),
                   (before.critic, state.critic)):
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      assert a.shape == b.shape
      assert np.all(np.any(np.asarray(a != b).reshape(2, -1), axis=1))
  assert not np.allclose(state.actor[0]["w"][0], state.actor[0]["w"][1])
  # The targets trail the critics (Polyak, tau = 0.005).
  w, tw, w0 = (state.critic[0]["w"], state.target_critic[0]["w"],
               before.critic[0]["w"])
  assert 0 < float(jnp.max(jnp.abs(tw - w0))) < float(
      jnp.max(jnp.abs(w - w0)))


def test_per_task_temperatures(sac):
  """One log-temperature per task, each moved by its own task's entropy."""
  cfg = _cfg(sac)
  txs = sac.make_txs(cfg, "mean")
  state = sac.init_agent(cfg, jax.random.PRNGKey(0), txs)
  buf = sac.insert(sac.init_buffer(cfg, 16),
                   *(x[0] for x in _transitions(1, 10)))
  assert state.log_alpha.shape == (T,)
  update = jax.jit(lambda s, b: sac.update_step(cfg, txs, s, b))
  new, metrics = update(state, buf)
  step = np.asarray(new.log_alpha - state.log_alpha)
  entropy = np.asarray(metrics["entropy"])
  # Adam's first step: -lr * sign(grad), grad = -(E[log pi] + target H)
  # = entropy - target H per task.
  expected = -cfg.alpha_lr * np.sign(entropy - (-ACT))
  np.testing.assert_allclose(step, expected, rtol=1e-3)
  # The temperature loss is separable: task t's term does not involve the
  # other tasks' log-alphas.
  logp = jnp.asarray(np.random.default_rng(1).normal(size=(T, 8)))
  f = lambda la: jnp.sum(jnp.mean(-la[:, None] * (logp - ACT), 1))
  hess = jax.hessian(f)(jnp.zeros(T))
  np.testing.assert_allclose(hess, 0.0)


def test_grads_engines_agree(sac):
  """vmap over the tasks' batches == task_value_and_grad on the (T,) vector."""
  cfg = _cfg(sac)
  state = sac.init_agent(cfg, jax.random.PRNGKey(3), sac.make_txs(cfg, "mean"))
  rng = np.random.default_rng(2)
  obs = jnp.asarray(rng.normal(size=(T, 8, OBS)), jnp.float32)
  act = jnp.asarray(rng.uniform(-1, 1, (T, 8, ACT)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(T, 8)), jnp.float32)
  onehot = jnp.broadcast_to(jnp.eye(T)[:, None], (T, 8, T))

  def loss(critic, o, a, oh, yy):
    return jnp.sum(jnp.mean((sac.twin_q(critic, o, a, oh) - yy) ** 2, -1))

  out = [sac.stacked_value_and_grad(loss, state.critic, obs, act, onehot, y,
                                    engine=e) for e in ("vmap", "tvg")]
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    assert a.shape[0] == T
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Summed over tasks: the gradient of the summed loss.
  total = jax.grad(lambda c: jnp.sum(jax.vmap(
      loss, in_axes=(None, 0, 0, 0, 0))(c, obs, act, onehot, y)))(
          state.critic)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(total)):
    np.testing.assert_allclose(a.sum(0), b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="grads engine"):
    sac.stacked_value_and_grad(loss, state.critic, obs, act, onehot, y,
                               engine="nope")


def test_buffer_ring_and_sampling(sac):
  cfg = _cfg(sac)
  buf = sac.init_buffer(cfg, 4)
  obs = np.arange(6 * T * OBS, dtype=np.float32).reshape(6, T, OBS)
  z = np.zeros((6, T), np.float32)
  buf = sac.insert(buf, obs, np.zeros((6, T, ACT)), z, obs, z)
  assert int(buf.ptr) == 2 and int(buf.size) == 4
  # Slots 0, 1 were overwritten by steps 4, 5.
  np.testing.assert_array_equal(buf.obs[:, 0], obs[4])
  np.testing.assert_array_equal(buf.obs[:, 2], obs[2])
  o, *_ = sac.sample(buf, jax.random.PRNGKey(0), 50)
  assert o.shape == (T, 50, OBS)
  # Every sample of task t comes from task t's buffer.
  for t in range(T):
    rows = {tuple(r) for r in np.asarray(buf.obs[t])}
    assert all(tuple(r) in rows for r in np.asarray(o[t]))


class FakeVecEnv:
  """T tasks as one vector env: reward = -|a - target_t|, 20-step episodes,
  success when the action is near the task's target; SAME_STEP autoreset
  with ``final_obs``/``final_info`` like gymnasium's."""

  task_names = [f"task{t}" for t in range(T)]

  class _Space:
    shape = (ACT,)

  single_action_space = _Space()

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.targets = np.linspace(-0.5, 0.5, T)[:, None] * np.ones((T, ACT))
    self.t = 0

  def _obs(self):
    return self.rng.normal(size=(T, OBS))

  def reset(self, seed=None):
    if seed is not None:
      self.rng = np.random.default_rng(seed)
    self.t = 0
    return self._obs(), {}

  def step(self, a):
    self.t += 1
    dist = np.abs(a - self.targets).sum(-1)
    success = (dist < 0.5).astype(np.float64)
    obs = self._obs()
    trunc = np.full(T, self.t >= 20)
    info = {"success": success}
    if trunc.all():
      info = {"final_obs": obs, "final_info": {"success": success}}
      obs, _ = self.reset()
    return obs, -dist, np.zeros(T, bool), trunc, info


def test_main_on_a_fake_env_logs_checkpoints_and_resumes(sac, tmp_path):
  args = ["--method", "pcgrad", "--seeds", "0", "1", "--hidden", "16",
          "--batch-per-task", "8", "--random-steps-per-task", "20",
          "--chunk", "10", "--eval-every", "30", "--max-episode-steps", "20",
          "--utd", "1", "--log-every", "20", "--out", str(tmp_path)]
  assert sac.main(args + ["--steps-per-task", "60"], make_env=FakeVecEnv) == 0
  log = tmp_path / "pcgrad" / "log.jsonl"
  recs = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["env_steps_per_task"] for r in recs] == [20, 30, 40, 60]
  evals = [r for r in recs if "success" in r]
  assert [r["env_steps_per_task"] for r in evals] == [30, 60]
  for r in evals:
    assert np.asarray(r["success"]).shape == (2, T)
    assert 0.0 <= r["mean_success"] <= 1.0
  for r in recs:
    assert np.asarray(r["train_success"]).shape == (2, T)
  assert recs[-1]["updates"] == 50   # from step 20 (the random steps in)
  # One 20-step episode per env by step 20, one more by step 40.
  assert [sum(map(sum, r["train_episodes"])) for r in recs] == [6, 0, 6, 6]
  assert (tmp_path / "pcgrad" / "ckpt.msgpack").exists()
  assert sac.main(args + ["--steps-per-task", "90", "--resume"],
                  make_env=FakeVecEnv) == 0
  recs = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["env_steps_per_task"] for r in recs] == [20, 30, 40, 60, 80, 90]
  assert recs[-1]["updates"] == 80


def test_mt10_smoke(sac, tmp_path):
  """A few hundred MT10 env steps and a few updates (needs the rl extra)."""
  pytest.importorskip("metaworld")
  pytest.importorskip("gymnasium")
  args = ["--method", "pcgrad", "--seeds", "0", "--hidden", "32",
          "--batch-per-task", "16", "--steps-per-task", "100",
          "--random-steps-per-task", "60", "--chunk", "20",
          "--eval-every", "100", "--max-episode-steps", "20", "--utd", "0.1",
          "--out", str(tmp_path)]
  assert sac.main(args) == 0
  rec = json.loads((tmp_path / "pcgrad" / "log.jsonl").read_text())
  assert rec["env_steps"] == 1000 and rec["updates"] == 6
  assert np.asarray(rec["success"]).shape == (1, 10)
  assert np.all(np.isfinite(rec["critic_loss"]))
