r"""Recon: find the layers whose task gradients conflict, and branch them.

Shi et al. (ICLR 2023) observe that gradient surgery (PCGrad, CAGrad, MGDA,
...) changes the update but not how often the task gradients *conflict*
(cosine below zero): the conflicts come from the shared layers themselves.
Recon removes them at the root, in four steps:

1. **Search.** Train the original network with a base method and record,
   every step, the cosine of every pair of task gradients w.r.t. every shared
   *layer* (a module: its kernel and bias gradients concatenated):
   :func:`pairwise_cosines`, accumulated by :func:`track_conflicts`.
2. **Score.** The S-conflict score of a layer is the number of
   (step, task pair) entries whose cosine is strictly below ``S``.
3. **Branch.** Turn the top-K layers (:func:`select_layers`) into
   task-specific layers, one copy per task (:func:`branch`): every leaf of a
   branched layer gets a leading task axis of size ``T``. Downstream of the
   first branched layer the activations are per task; shared layers are
   applied to each task's activations; head ``t`` reads branch ``t``.
4. **Retrain** the branched network with any base method (:func:`pcgrad_optax.pcgrad`
   or another aggregator).

Training a branched model
-------------------------
Write the loss of ONE task on an ordinary (unbranched) params pytree,
``task_loss(params, t, *args) -> scalar`` (``t`` is a traced int: index with
it, e.g. ``jnp.stack(logits)[t]``, never ``list[t]``). :func:`task_losses`
vmaps it over the tasks with the branched leaves mapped (``in_axes=0``) and
the shared leaves broadcast (``in_axes=None``); operations that only touch
shared leaves before the first branched layer are not batched by ``vmap``, so
they run once. :func:`task_params` is the per-task view used inside.

The per-task gradient of a branched leaf ``w`` (shape ``(T, ...)``) is, for
task ``s``, nonzero only in row ``s``: the standard stacked layout is a
``(T, T, ...)`` array with only its diagonal nonzero, and the update every
aggregator in this package gives a non-shared leaf, the plain sum over the
task axis, is exactly that diagonal: copy ``t`` moves along task ``t``'s own
gradient. Two ways to train, with identical updates:

* simple: ``pcgrad_optax.task_value_and_grad(task_losses(...))`` gives the
  standard layout and ``pcgrad(shared=shared_mask(...))`` treats the branched
  leaves as task-specific. It stores and computes the ``T x T`` blocks.
* lean: :func:`value_and_grad` differentiates per task with
  ``vmap(value_and_grad)`` and returns every branched leaf's gradient in the
  *diagonal* layout (the param's own shape ``(T, ...)``, row ``t`` = task
  ``t``'s gradient on copy ``t``); :func:`with_branches` wraps any aggregator
  to take that layout. No ``T x T x P`` array is ever built.

Layers
------
By default a layer is the pytree node that directly holds parameter leaves
(``Dense_0/kernel`` and ``Dense_0/bias`` form layer ``"Dense_0"``; a
``LayerNorm``'s scale and bias form one layer), named by its '/'-joined path
(``"encoder/Conv_1"``); leaves at the top level of the params form the layer
``"<root>"`` (so the params of a single Dense module are one layer). The
``.value`` attribute of Flax NNX variables is not part of a name,
so ``nnx.split`` states and Linen param dicts name their layers alike.
``layers="leaf"`` makes every leaf its own layer; a callable
``leaf_name -> layer_name | None`` or a mapping ``{leaf_name: layer_name}``
groups differently (``None`` drops a leaf). Leaves with zero elements hold no
gradient and are not part of any layer.

Flax NNX: work on the ``nnx.Param`` state (``graphdef, state =
nnx.split(model, nnx.Param)``), write ``task_loss`` with
``nnx.merge(graphdef, state)``, and give ``shared=`` masks as ``nnx.State``
prefixes, plain nested dicts with the same keys, or callables returning
either.

Model state (BatchNorm)
-----------------------
BatchNorm's running statistics live outside the params (the Linen
``"batch_stats"`` collection, NNX ``nnx.BatchStat``) under the same module
names. Branch them with the same layer names (:func:`branch_state`: a
branched normalisation layer gets one set of statistics per task; branched
layers without state are skipped), take task ``t``'s view inside its loss
(:func:`task_state`), return the new statistics as aux, and fold the tasks'
updates back with :func:`merge_task_states` (per task for branched layers,
the mean over tasks for shared ones):

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from pcgrad_optax import recon
  >>> class BNNet(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, train=True):
  ...     h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
  ...     h = nn.relu(h)
  ...     return jnp.stack([nn.Dense(1, name=f"head_{t}")(h)[:, 0]
  ...                       for t in range(2)])
  >>> x = jax.random.normal(jax.random.key(0), (16, 3))
  >>> y = jnp.stack([x[:, 0], x[:, 1]])
  >>> bn_net = BNNet()
  >>> v = bn_net.init(jax.random.key(2), x)
  >>> chosen = ["BatchNorm_0"]
  >>> params = recon.branch(v["params"], chosen, 2)
  >>> stats = recon.branch_state(v["batch_stats"], chosen, 2)
  >>> def bn_loss(p, t, stats, x, y):
  ...   out, new = bn_net.apply(
  ...       {"params": p, "batch_stats": recon.task_state(stats, chosen, t)},
  ...       x, mutable=["batch_stats"])
  ...   return jnp.mean((out[t] - y[t]) ** 2), new["batch_stats"]
  >>> grad_fn = recon.value_and_grad(bn_loss, chosen, 2, has_aux=True)
  >>> (losses, new_stats), grads = grad_fn(params, stats, x, y)
  >>> stats = recon.merge_task_states(new_stats, chosen)
  >>> stats["BatchNorm_0"]["mean"].shape           # one set per task
  (2, 8)

Example (Flax Linen: search, branch, retrain):

  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
  >>> import pcgrad_optax
  >>> from pcgrad_optax import recon
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = nn.relu(nn.Dense(8)(x))
  ...     h = nn.relu(nn.Dense(8)(h))
  ...     return jnp.stack([nn.Dense(1, name="head_0")(h)[:, 0],
  ...                       nn.Dense(1, name="head_1")(h)[:, 0]])
  >>> x = jax.random.normal(jax.random.key(0), (16, 3))
  >>> y = jnp.stack([x[:, 0], -x[:, 0] + x[:, 1]])        # two targets
  >>> net = Net()
  >>> params = net.init(jax.random.key(1), x)["params"]
  >>> heads = lambda p: {k: not k.startswith("head") for k in p}
  >>> def task_loss(p, t, x, y):                           # ONE task's loss
  ...   return jnp.mean((net.apply({"params": p}, x)[t] - y[t]) ** 2)
  >>> def train(params, grad_fn, tx, steps=20):
  ...   @jax.jit
  ...   def step(params, state):
  ...     losses, grads = grad_fn(params, x, y)
  ...     updates, state = tx.update(grads, state, params)
  ...     return optax.apply_updates(params, updates), state, losses
  ...   state = tx.init(params)
  ...   for _ in range(steps):
  ...     params, state, losses = step(params, state)
  ...   return params, state, losses
  >>> # 1-2. search: joint training, S-conflict scores of the shared layers
  >>> tx = optax.chain(recon.track_conflicts(0.0, shared=heads),
  ...                  pcgrad_optax.pcgrad(shared=heads), optax.adam(1e-2))
  >>> grad_fn = recon.value_and_grad(task_loss, [], num_tasks=2)
  >>> params, state, _ = train(params, grad_fn, tx)
  >>> list(state[0].scores)                                # network order
  ['Dense_0', 'Dense_1']
  >>> # 3. branch the most conflicting layer (one copy per task)
  >>> chosen = recon.select_layers(state[0].scores, 1)
  >>> branched = recon.branch(params, chosen, 2)
  >>> branched[chosen[0]]["kernel"].shape[0]
  2
  >>> # 4. retrain: branched leaves take their own task's gradient
  >>> grad_fn = recon.value_and_grad(task_loss, chosen, num_tasks=2)
  >>> tx = optax.chain(recon.with_branches(pcgrad_optax.pcgrad(shared=heads),
  ...                                      chosen), optax.adam(1e-2))
  >>> branched, _, losses = train(branched, grad_fn, tx)
  >>> bool(jnp.all(jnp.isfinite(losses)))
  True

References:
  Shi, Li, Zhang, Chen, Wu, `Recon: Reducing Conflicting Gradients from the
  Root for Multi-Task Learning <https://arxiv.org/abs/2302.11289>`_,
  ICLR 2023.
"""

from pcgrad_optax.recon._branching import branch
from pcgrad_optax.recon._branching import shared_mask
from pcgrad_optax.recon._branching import task_params
from pcgrad_optax.recon._layers import layer_names
from pcgrad_optax.recon._retraining import task_losses
from pcgrad_optax.recon._retraining import value_and_grad
from pcgrad_optax.recon._retraining import with_branches
from pcgrad_optax.recon._search import ConflictState
from pcgrad_optax.recon._search import layer_grams
from pcgrad_optax.recon._search import pairwise_cosines
from pcgrad_optax.recon._search import select_layers
from pcgrad_optax.recon._search import track_conflicts
from pcgrad_optax.recon._state import branch_state
from pcgrad_optax.recon._state import merge_task_states
from pcgrad_optax.recon._state import task_state

__all__ = (
    "ConflictState",
    "branch",
    "branch_state",
    "layer_grams",
    "layer_names",
    "merge_task_states",
    "pairwise_cosines",
    "select_layers",
    "shared_mask",
    "task_losses",
    "task_params",
    "task_state",
    "track_conflicts",
    "value_and_grad",
    "with_branches",
)
