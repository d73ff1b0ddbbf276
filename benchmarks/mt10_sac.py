"""Multi-task SAC (MT-SAC) on Meta-World MT10 with any pcgrad_optax aggregator.

The agent is the MT-SAC of the PCGrad paper (Yu et al., NeurIPS 2020,
Section 5.2) as the later Meta-World work runs it: one tanh-Gaussian policy
and twin Q networks, all shared by the ten tasks and conditioned on the
one-hot task id; one entropy temperature per task, tuned to the target
entropy ``-dim(A)``; one replay buffer per task; target critics by Polyak
averaging. The per-task actor and critic losses give stacked gradients
(``(T, ...)`` on every leaf), which any aggregator of the package turns into
one update, chained with Adam:

* ``--method mean``: the MT-SAC baseline (the task gradients averaged);
* ``--method pcgrad`` / ``cagrad`` / any other gradient-level method;
* ``--method famo`` / ``uncertainty`` / ... : the loss-level methods (they
  get ``losses=``). FAMO takes ``log L_t`` and is only defined for positive
  losses: the critics' squared TD errors are, the actor's losses
  (``alpha log pi - Q``) are not, so ``--actor-method`` (default: the same
  as ``--method``, ``mean`` for FAMO) picks the actor's aggregator.

Engineering, for a small CPU box:

* the agent is vmapped over seeds (``--seeds 0 1 2``: one process, 30 envs);
* every ``--chunk`` vector steps, one jitted call inserts the new
  transitions into the replay buffers (preallocated device arrays,
  ``(seeds, T, capacity, ...)``) and runs ``chunk * utd`` gradient updates
  in a ``lax.scan`` (critic, actor, temperatures, targets: the whole update
  step under the same ``jit``); the sampling keys live in the agent state;
* the stacked gradients come from one ``jax.vmap`` of ``jax.value_and_grad``
  over the tasks' own batches (``--grads vmap``, default), or from
  :func:`pcgrad_optax.task_value_and_grad` on the ``(T,)`` loss vector
  (``--grads tvg``). Same numbers (tests/test_mt10_smoke.py checks it); the
  per-task batches are disjoint, so the first costs one backward pass where
  the second pulls T cotangents back through the whole batch.

Evaluation: every ``--eval-every`` env steps per task, ``--eval-episodes``
episodes per task on separate evaluation envs with the deterministic policy
(``tanh`` of the mean); an episode is a success if ``info["success"]`` is
reached at any of its 500 steps (Meta-World's convention; metaworld 3's
MT10 envs truncate at ``max_path_length`` = 500 and do not terminate on
success during training). One JSON line per evaluation goes to
``<out>/<run>/log.jsonl``; ``<out>/<run>/ckpt.msgpack`` holds the agent, the
buffers and the step count, and ``--resume`` continues from it (the
environments restart their episodes).

Run from the repository root (needs ``pip install -e ".[rl]"``)::

  python benchmarks/mt10_sac.py --method pcgrad --seeds 0 1 2 \\
      --steps-per-task 20000 --out benchmarks/results/mt10_logs

A budget of the order of the published runs (millions of env steps per
task: here 2M per task, 20M in all), with wider networks and a larger batch,
for a bigger machine::

  python benchmarks/mt10_sac.py --method pcgrad --seeds 0 1 2 \\
      --steps-per-task 2000000 --hidden 400 400 400 --batch-per-task 128 \\
      --utd 1 --random-steps-per-task 1500 --eval-every 50000 \\
      --eval-episodes 10 --buffer-per-task 1000000 --out runs/mt10
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcgrad_optax

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0   # pytorch_sac's bounds (std 0.22 at init)


# --------------------------------------------------------------------------
# Networks: plain pytrees of dense layers.


def init_mlp(key, sizes):
  """Dense layers ``sizes[0] -> ... -> sizes[-1]`` (LeCun-uniform weights)."""
  layers = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                              zip(sizes[:-1], sizes[1:])):
    lim = 1.0 / np.sqrt(n_in)
    layers.append({
        "w": jax.random.uniform(k, (n_in, n_out), jnp.float32, -lim, lim),
        "b": jnp.zeros((n_out,), jnp.float32)})
  return layers


def mlp(layers, x):
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


def actor_dist(actor, obs, onehot):
  out = mlp(actor, jnp.concatenate([obs, onehot], -1))
  mu, raw = jnp.split(out, 2, axis=-1)
  log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (
      jnp.tanh(raw) + 1.0)
  return mu, log_std


def sample_action(actor, obs, onehot, key):
  """Reparameterised tanh-Gaussian sample and its log-density."""
  mu, log_std = actor_dist(actor, obs, onehot)
  eps = jax.random.normal(key, mu.shape, mu.dtype)
  u = mu + jnp.exp(log_std) * eps
  logp = jnp.sum(-0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
  # log(1 - tanh(u)^2), stably.
  logp -= jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)
  return jnp.tanh(u), logp


def twin_q(critic, obs, act, onehot):
  """``(2, ...)`` Q values of the twin critics (params stacked on axis 0)."""
  x = jnp.concatenate([obs, onehot, act], -1)
  return jax.vmap(lambda p: mlp(p, x)[..., 0])(critic)


# --------------------------------------------------------------------------
# Agent state, replay buffers.


class Config(NamedTuple):
  num_tasks: int
  obs_dim: int
  act_dim: int
  hidden: tuple = (256, 256)
  batch_per_task: int = 64
  gamma: float = 0.99
  tau: float = 0.005
  actor_lr: float = 3e-4
  critic_lr: float = 3e-4
  alpha_lr: float = 3e-4
  init_alpha: float = 1.0
  grads: str = "vmap"          # "vmap" or "tvg" (task_value_and_grad)


class AgentState(NamedTuple):
  actor: Any
  critic: Any
  target_critic: Any
  log_alpha: jax.Array         # (T,)
  actor_opt: Any
  critic_opt: Any
  alpha_opt: Any
  key: jax.Array               # the updates' sampling key
  act_key: jax.Array           # the behaviour policy's key
  updates: jax.Array           # number of gradient updates done


class Buffer(NamedTuple):
  obs: jax.Array               # (T, C, obs_dim)
  act: jax.Array               # (T, C, act_dim)
  rew: jax.Array               # (T, C)
  next_obs: jax.Array          # (T, C, obs_dim)
  term: jax.Array              # (T, C)
  ptr: jax.Array               # () next slot
  size: jax.Array              # () filled slots


def init_buffer(cfg: Config, capacity: int) -> Buffer:
  t = cfg.num_tasks
  z = lambda *s: jnp.zeros((t, capacity) + s, jnp.float32)
  return Buffer(z(cfg.obs_dim), z(cfg.act_dim), z(), z(cfg.obs_dim), z(),
                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def insert(buf: Buffer, obs, act, rew, next_obs, term) -> Buffer:
  """Appends ``K`` vector steps (``(K, T, ...)`` arrays) to each ring."""
  cap = buf.obs.shape[1]
  k = obs.shape[0]
  idx = (buf.ptr + jnp.arange(k)) % cap
  put = lambda a, v: a.at[:, idx].set(jnp.swapaxes(v, 0, 1).astype(a.dtype))
  return Buffer(put(buf.obs, obs), put(buf.act, act), put(buf.rew, rew),
                put(buf.next_obs, next_obs), put(buf.term, term),
                (buf.ptr + k) % cap, jnp.minimum(buf.size + k, cap))


def sample(buf: Buffer, key, batch: int):
  """``batch`` transitions per task, uniformly from that task's buffer."""
  t = buf.obs.shape[0]
  idx = jax.random.randint(key, (t, batch), 0, jnp.maximum(buf.size, 1))
  take = lambda a: jax.vmap(lambda x, i: x[i])(a, idx)
  return take(buf.obs), take(buf.act), take(buf.rew), take(buf.next_obs), \
      take(buf.term)


# --------------------------------------------------------------------------
# Aggregators.


def make_aggregator(method: str, num_tasks: int, key: int = 0, **kwargs):
  """``pcgrad_optax.<method>`` with ``reduction="mean"`` where it has one.

  Loss-level methods whose weights already sum to one (FAMO, ...) keep
  their own default reduction.
  """
  factory = getattr(pcgrad_optax, method)
  params = inspect.signature(factory).parameters
  if "num_tasks" in params:
    kwargs.setdefault("num_tasks", num_tasks)
  if "key" in params:
    kwargs.setdefault("key", key)
  if "reduction" in params and method in GRADIENT_LEVEL_MEAN:
    kwargs.setdefault("reduction", "mean")
  return factory(**kwargs)


# Methods whose update is a (weighted) sum of the task gradients: averaged
# over tasks, so that the learning rate means the same for all of them.
GRADIENT_LEVEL_MEAN = ("pcgrad", "cagrad", "mgda", "upgrad", "imtl_g",
                       "dualproj", "aligned_mtl", "nash_mtl", "graddrop",
                       "gradvac", "rlw", "config", "fairgrad")


def make_txs(cfg: Config, method: str, actor_method: str | None = None,
             key: int = 0, method_kwargs: dict | None = None):
  """(actor_tx, critic_tx, alpha_tx): aggregator -> Adam, and Adam."""
  method_kwargs = method_kwargs or {}
  if actor_method is None:
    actor_method = "mean" if method in POSITIVE_LOSSES_ONLY else method
  actor_kwargs = method_kwargs if actor_method == method else {}
  actor_tx = optax.chain(
      make_aggregator(actor_method, cfg.num_tasks, key, **actor_kwargs),
      optax.adam(cfg.actor_lr))
  critic_tx = optax.chain(
      make_aggregator(method, cfg.num_tasks, key + 1, **method_kwargs),
      optax.adam(cfg.critic_lr))
  return actor_tx, critic_tx, optax.adam(cfg.alpha_lr)


POSITIVE_LOSSES_ONLY = ("famo", "geometric_mean", "imtl_l", "stch",
                        "uncertainty", "dwa")


def init_agent(cfg: Config, key, txs) -> AgentState:
  actor_tx, critic_tx, alpha_tx = txs
  ka, kc, kr, kact = jax.random.split(key, 4)
  t = cfg.num_tasks
  actor = init_mlp(ka, (cfg.obs_dim + t,) + tuple(cfg.hidden)
                   + (2 * cfg.act_dim,))
  critic = jax.vmap(lambda k: init_mlp(
      k, (cfg.obs_dim + t + cfg.act_dim,) + tuple(cfg.hidden) + (1,)))(
          jax.random.split(kc, 2))
  log_alpha = jnp.full((t,), np.log(cfg.init_alpha), jnp.float32)
  return AgentState(actor, critic, critic, log_alpha, actor_tx.init(actor),
                    critic_tx.init(critic), alpha_tx.init(log_alpha), kr,
                    kact, jnp.zeros((), jnp.int32))


def stacked_value_and_grad(per_task_loss, params, *task_args, engine):
  """``(losses (T,), grads with a leading T axis)`` of per-task losses.

  ``per_task_loss(params, *args_t)`` is one task's loss on its own batch;
  ``task_args`` carry the task axis first.
  """
  if engine == "vmap":
    return jax.vmap(jax.value_and_grad(per_task_loss),
                    in_axes=(None,) + (0,) * len(task_args))(params, *task_args)
  if engine == "tvg":
    all_losses = lambda p: jax.vmap(
        per_task_loss, in_axes=(None,) + (0,) * len(task_args))(p, *task_args)
    return pcgrad_optax.task_value_and_grad(all_losses)(params)
  raise ValueError(f"grads engine must be 'vmap' or 'tvg', got {engine!r}")


def update_step(cfg: Config, txs, state: AgentState, buf: Buffer):
  """One MT-SAC update: critics, then actor and temperatures, then targets."""
  actor_tx, critic_tx, alpha_tx = txs
  t, b = cfg.num_tasks, cfg.batch_per_task
  key, k_batch, k_next, k_pi = jax.random.split(state.key, 4)
  obs, act, rew, next_obs, term = sample(buf, k_batch, b)
  onehot = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[:, None, :],
                            (t, b, t))
  alpha = jnp.exp(state.log_alpha)

  # Critic targets (no gradient).
  next_a, next_logp = jax.vmap(sample_action, in_axes=(None, 0, 0, 0))(
      state.actor, next_obs, onehot, jax.random.split(k_next, t))
  next_q = jnp.min(jax.vmap(twin_q, in_axes=(None, 0, 0, 0))(
      state.target_critic, next_obs, next_a, onehot), axis=1)
  target = rew + cfg.gamma * (1.0 - term) * (
      next_q - alpha[:, None] * next_logp)
  target = jax.lax.stop_gradient(target)

  def critic_loss(critic, o, a, oh, y):
    q = twin_q(critic, o, a, oh)
    return jnp.sum(jnp.mean((q - y) ** 2, axis=-1))

  c_losses, c_grads = stacked_value_and_grad(
      critic_loss, state.critic, obs, act, onehot, target, engine=cfg.grads)
  c_upd, critic_opt = critic_tx.update(c_grads, state.critic_opt,
                                       state.critic, losses=c_losses)
  critic = optax.apply_updates(state.critic, c_upd)

  # Actor on the updated critics; temperatures from the same samples.
  def actor_loss(actor, o, oh, k, alpha_t):
    a, logp = sample_action(actor, o, oh, k)
    q = jnp.min(twin_q(critic, o, a, oh), axis=0)
    return jnp.mean(alpha_t * logp - q), logp

  pi_keys = jax.random.split(k_pi, t)

  def actor_loss_only(actor, o, oh, k, alpha_t):
    return actor_loss(actor, o, oh, k, alpha_t)[0]

  a_losses, a_grads = stacked_value_and_grad(
      actor_loss_only, state.actor, obs, onehot, pi_keys, alpha,
      engine=cfg.grads)
  a_upd, actor_opt = actor_tx.update(a_grads, state.actor_opt, state.actor,
                                     losses=a_losses)
  actor = optax.apply_updates(state.actor, a_upd)
  # The same samples again (same keys): the entropy of the pre-update actor.
  _, logp = jax.vmap(sample_action, in_axes=(None, 0, 0, 0))(
      state.actor, obs, onehot, pi_keys)
  logp = jax.lax.stop_gradient(logp)
  target_entropy = -float(cfg.act_dim)

  def alpha_loss(log_alpha):
    return jnp.sum(jnp.mean(-log_alpha[:, None] * (logp + target_entropy),
                            axis=1))

  al_loss, al_grad = jax.value_and_grad(alpha_loss)(state.log_alpha)
  al_upd, alpha_opt = alpha_tx.update(al_grad, state.alpha_opt)
  log_alpha = optax.apply_updates(state.log_alpha, al_upd)

  target_critic = optax.incremental_update(critic, state.target_critic,
                                           cfg.tau)
  new = AgentState(actor, critic, target_critic, log_alpha, actor_opt,
                   critic_opt, alpha_opt, key, state.act_key,
                   state.updates + 1)
  metrics = {"critic_loss": c_losses, "actor_loss": a_losses,
             "alpha": jnp.exp(log_alpha), "entropy": -jnp.mean(logp, 1)}
  return new, metrics


def train_chunk(cfg: Config, txs, num_updates: int, state: AgentState,
                buf: Buffer, transitions):
  """Insert ``K`` vector steps, then ``num_updates`` updates (``lax.scan``)."""
  buf = insert(buf, *transitions)
  if num_updates == 0:
    zeros = jnp.zeros((cfg.num_tasks,), jnp.float32)
    return state, buf, {"critic_loss": zeros, "actor_loss": zeros,
                        "alpha": jnp.exp(state.log_alpha), "entropy": zeros}
  state, metrics = jax.lax.scan(
      lambda s, _: update_step(cfg, txs, s, buf), state, None,
      length=num_updates)
  return state, buf, jax.tree.map(lambda m: jnp.mean(m, 0), metrics)


def act(cfg: Config, actor, key, obs, deterministic: bool):
  """``(key, actions (T, act_dim))`` for one observation per task."""
  onehot = jnp.eye(cfg.num_tasks, dtype=jnp.float32)
  if deterministic:
    mu, _ = actor_dist(actor, obs, onehot)
    return key, jnp.tanh(mu)
  key, sub = jax.random.split(key)
  a, _ = sample_action(actor, obs, onehot, sub)
  return key, a


class Agent:
  """The jitted, seed-vmapped functions for one configuration and method."""

  def __init__(self, cfg: Config, method: str, seeds, capacity: int,
               actor_method: str | None = None,
               method_kwargs: dict | None = None):
    self.cfg, self.method, self.seeds = cfg, method, list(seeds)
    txs_per_seed = [make_txs(cfg, method, actor_method, key=1000 * s,
                             method_kwargs=method_kwargs) for s in seeds]
    self.txs = txs_per_seed[0]   # same update functions, keys in the state
    states = [init_agent(cfg, jax.random.PRNGKey(s), txs)
              for s, txs in zip(seeds, txs_per_seed)]
    self.state = jax.tree.map(lambda *x: jnp.stack(x), *states)
    self.buffer = jax.vmap(lambda _: init_buffer(cfg, capacity))(
        jnp.arange(len(seeds)))
    self._chunk = {}
    self._act = jax.jit(jax.vmap(functools.partial(act, cfg),
                                 in_axes=(0, 0, 0, None)),
                        static_argnums=3)

  def act(self, obs, deterministic=False):
    key, a = self._act(self.state.actor, self.state.act_key,
                       jnp.asarray(obs, jnp.float32), deterministic)
    self.state = self.state._replace(act_key=key)
    return np.asarray(a)

  def train(self, transitions, num_updates):
    """``transitions``: arrays ``(seeds, K, T, ...)``."""
    if num_updates not in self._chunk:
      self._chunk[num_updates] = jax.jit(
          jax.vmap(functools.partial(train_chunk, self.cfg, self.txs,
                                     num_updates)),
          donate_argnums=(0, 1))
    self.state, self.buffer, metrics = self._chunk[num_updates](
        self.state, self.buffer,
        tuple(jnp.asarray(x, jnp.float32) for x in transitions))
    return metrics


# --------------------------------------------------------------------------
# Environments.


def make_mt10(seed: int):
  import gymnasium as gym
  import metaworld  # noqa: F401  (registers the Meta-World envs)
  return gym.make_vec("Meta-World/MT10", vector_strategy="sync", seed=seed)


def task_names(envs):
  if hasattr(envs, "task_names"):
    return list(envs.task_names)
  return [type(e.unwrapped).__name__.replace("Sawyer", "").replace(
      "EnvV3", "") for e in envs.envs]


class SeedVector:
  """One MT10 vector env per seed, stepped together: obs ``(S, T, 39)``."""

  def __init__(self, envs_per_seed, seeds):
    self.envs = envs_per_seed
    self.seeds = list(seeds)

  def reset(self, offset=0):
    return np.stack([e.reset(seed=s + offset)[0]
                     for e, s in zip(self.envs, self.seeds)])

  def step(self, actions):
    outs = [e.step(a) for e, a in zip(self.envs, actions)]
    obs = np.stack([o[0] for o in outs])
    rew = np.stack([o[1] for o in outs])
    term = np.stack([o[2] for o in outs])
    trunc = np.stack([o[3] for o in outs])
    real_next = obs.copy()
    success = np.zeros(rew.shape, np.float32)
    for i, o in enumerate(outs):
      info = o[4]
      if "success" in info:
        success[i] = info["success"]
      done = term[i] | trunc[i]
      if done.any() and "final_obs" in info:
        for j in np.flatnonzero(done):
          real_next[i, j] = info["final_obs"][j]
          fi = info.get("final_info", None)
          if isinstance(fi, dict) and "success" in fi:
            success[i, j] = fi["success"][j]
    return obs, real_next, rew, term, trunc, success


def evaluate(agent: Agent, envs: SeedVector, episodes: int, max_steps: int,
             reset_offset: int):
  """Success rate ``(S, T)`` and mean return: success at any step counts."""
  succ = np.zeros((len(envs.seeds), agent.cfg.num_tasks))
  ret = np.zeros_like(succ)
  for ep in range(episodes):
    obs = envs.reset(offset=reset_offset + ep)
    hit = np.zeros_like(succ, dtype=bool)
    for _ in range(max_steps):
      a = agent.act(obs, deterministic=True)
      obs, _, r, term, trunc, s = envs.step(a)
      hit |= s > 0
      ret += r
      if (term | trunc).all():   # (SAME_STEP autoreset: already reset)
        break
    succ += hit
  return succ / episodes, ret / episodes


# --------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(path, agent: Agent, vec_step: int, extra: dict):
  from flax import serialization
  blob = serialization.to_bytes({"state": agent.state, "buffer": agent.buffer,
                                 "vec_step": vec_step})
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
  with open(path + ".json", "w") as f:
    json.dump(dict(extra, vec_step=vec_step), f)


def load_checkpoint(path, agent: Agent) -> int:
  from flax import serialization
  with open(path, "rb") as f:
    restored = serialization.from_bytes(
        {"state": agent.state, "buffer": agent.buffer, "vec_step": 0},
        f.read())
  agent.state = jax.tree.map(jnp.asarray, restored["state"])
  agent.buffer = jax.tree.map(jnp.asarray, restored["buffer"])
  return int(restored["vec_step"])


# --------------------------------------------------------------------------
# Driver.


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", default="mean")
  p.add_argument("--actor-method", default=None)
  p.add_argument("--cagrad-c", type=float, default=None)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--steps-per-task", type=int, default=20000)
  p.add_argument("--random-steps-per-task", type=int, default=1500)
  p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
  p.add_argument("--batch-per-task", type=int, default=64)
  p.add_argument("--utd", type=float, default=0.5,
                 help="gradient updates per vector step (of T env steps)")
  p.add_argument("--chunk", type=int, default=20,
                 help="vector steps between jitted train calls")
  p.add_argument("--buffer-per-task", type=int, default=1_000_000)
  p.add_argument("--eval-every", type=int, default=5000,
                 help="env steps per task between evaluations")
  p.add_argument("--eval-episodes", type=int, default=1)
  p.add_argument("--log-every", type=int, default=500,
                 help="env steps per task between training-success logs")
  p.add_argument("--grads", choices=("vmap", "tvg"), default="vmap")
  p.add_argument("--out", default="benchmarks/results/mt10_logs")
  p.add_argument("--run", default=None, help="run name (default: method)")
  p.add_argument("--resume", action="store_true")
  p.add_argument("--max-episode-steps", type=int, default=500)
  return p.parse_args(argv)


def main(argv=None, make_env=None):
  """The training run; ``make_env(seed)`` builds one seed's vector env."""
  args = parse_args(argv)
  make_env = make_env or make_mt10
  run = args.run or args.method
  out = os.path.join(args.out, run)
  os.makedirs(out, exist_ok=True)
  ckpt = os.path.join(out, "ckpt.msgpack")
  log_path = os.path.join(out, "log.jsonl")

  t0 = time.time()
  train_envs = SeedVector([make_env(s) for s in args.seeds], args.seeds)
  eval_envs = SeedVector([make_env(10_000 + s) for s in args.seeds],
                         [10_000 + s for s in args.seeds])
  names = task_names(train_envs.envs[0])
  t_build = time.time() - t0
  obs = train_envs.reset()
  s_, t_, obs_dim = obs.shape
  act_dim = train_envs.envs[0].single_action_space.shape[0]
  cfg = Config(num_tasks=t_, obs_dim=obs_dim, act_dim=act_dim,
               hidden=tuple(args.hidden), batch_per_task=args.batch_per_task,
               grads=args.grads)
  capacity = min(args.buffer_per_task, args.steps_per_task)
  kwargs = {"c": args.cagrad_c} if args.cagrad_c is not None else {}
  agent = Agent(cfg, args.method, args.seeds, capacity, args.actor_method,
                kwargs)
  start = 0
  if args.resume and os.path.exists(ckpt):
    start = load_checkpoint(ckpt, agent)
    print(f"resumed at {start} env steps per task", flush=True)
  elif os.path.exists(log_path):
    os.remove(log_path)

  meta = {"method": args.method, "actor_method": args.actor_method,
          "seeds": args.seeds, "tasks": names, "config": cfg._asdict(),
          "args": vars(args), "machine": platform.machine(),
          "cpus": os.cpu_count(), "jax": jax.__version__,
          "build_envs_s": t_build}
  print(json.dumps(meta), flush=True)
  chunk = args.chunk
  if args.eval_every % chunk or args.log_every % chunk:
    raise ValueError(f"--eval-every ({args.eval_every}) and --log-every "
                     f"({args.log_every}) must be multiples of --chunk "
                     f"({chunk}): checkpoints hold no staged steps")
  updates_per_chunk = int(round(chunk * args.utd))
  n_random = args.random_steps_per_task
  rng = np.random.default_rng(args.seeds[0])
  staged = {k: [] for k in ("obs", "act", "rew", "next", "term")}
  prev = (json.load(open(ckpt + ".json")) if args.resume and start
          else {"wall_s": 0.0, "cpu_s": 0.0})
  wall0 = time.time() - prev["wall_s"]
  cpu0 = time.process_time() - prev.get("cpu_s", 0.0)
  env_time = train_time = 0.0
  metrics = None
  step = start
  ep_hit = np.zeros((s_, t_), bool)     # training episodes: success so far
  hits = np.zeros((s_, t_))             # finished training episodes ...
  episodes = np.zeros((s_, t_))         # ... since the last evaluation
  while step < args.steps_per_task:
    te = time.time()
    if step < n_random:
      a = rng.uniform(-1, 1, (s_, t_, act_dim)).astype(np.float32)
    else:
      a = agent.act(obs)
    nobs, real_next, rew, term, trunc, success = train_envs.step(a)
    ep_hit |= success > 0
    done = term | trunc
    hits += ep_hit & done
    episodes += done
    ep_hit &= ~done
    for k, v in zip(staged, (obs, a, rew, real_next, term)):
      staged[k].append(v)
    obs = nobs
    step += 1
    env_time += time.time() - te
    if len(staged["obs"]) == chunk or step == args.steps_per_task:
      tt = time.time()
      trans = tuple(np.stack(staged[k], 1) for k in staged)
      n_upd = updates_per_chunk if step >= n_random else 0
      metrics = agent.train(trans, n_upd)
      jax.block_until_ready(agent.state)
      train_time += time.time() - tt
      staged = {k: [] for k in staged}
    is_eval = step % args.eval_every == 0 or step == args.steps_per_task
    if is_eval or step % args.log_every == 0:
      rec = {"env_steps_per_task": step, "env_steps": step * t_}
      if is_eval:
        tv = time.time()
        succ, ret = evaluate(agent, eval_envs, args.eval_episodes,
                             args.max_episode_steps, reset_offset=step)
        eval_time = time.time() - tv
        rec.update({"success": succ.tolist(), "return": ret.tolist(),
                    "mean_success": float(succ.mean()),
                    "mean_success_per_seed": succ.mean(1).tolist(),
                    "eval_s": eval_time})
      wall = time.time() - wall0
      rec.update({
          "train_success": (hits / np.maximum(episodes, 1)).tolist(),
          "train_episodes": episodes.tolist(),
          "wall_s": wall, "cpu_s": time.process_time() - cpu0,
          "env_s": env_time, "train_s": train_time,
          "load1": os.getloadavg()[0],
          "updates": int(np.asarray(agent.state.updates)[0])})
      if metrics is not None:
        rec.update({k: np.asarray(v).mean(0).tolist()
                    for k, v in metrics.items()})
      with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      tr = np.asarray(rec["train_success"]).mean()
      ev = f" eval success {succ.mean():.3f}" if is_eval else ""
      print(f"[{run}] step/task {step} train success {tr:.3f}{ev} "
            f"wall {wall:.0f}s cpu {rec['cpu_s']:.0f}s (env {env_time:.0f} "
            f"train {train_time:.0f}) load {rec['load1']:.1f}", flush=True)
      hits[:], episodes[:] = 0, 0
      if is_eval:
        # Staged transitions were flushed above (eval_every % chunk == 0).
        save_checkpoint(ckpt, agent, step,
                        {"wall_s": wall, "cpu_s": rec["cpu_s"]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
