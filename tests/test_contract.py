"""The transform contract of tests/contract.py for every method, in one list.

One ``Spec`` per method, each named as its method (the test ids are
``test_contract[<check>-<name>]``): PCGrad, the Gram-based aggregators, and
the stateful and loss-based methods (GradVac, GradDrop, RLW, uncertainty,
DWA, FAMO). The methods that allocate per-task state at init take
``num_tasks`` up front; ``per_task_count`` wraps them so one Spec serves
every task count the checks use, and ``task_losses`` gives the loss-based
ones their ``losses=``.
"""

import jax
import numpy as np
import optax
import pytest

import pcgrad_optax
from contract import CONTRACT_CHECKS, Spec

# The task counts the contract's checks use. gradvac, uncertainty, dwa and
# famo allocate per-task state at init (where only params are seen), so they
# take num_tasks up front; one Spec must serve every T the checks feed it
# (the same tx sees T=3 and T=2 in check_zero_and_opposite).
CONTRACT_TASK_COUNTS = (1, 2, 3, 4)


def per_task_count(factory, **fixed):
  """A Spec factory that holds one real transform per task count.

  ``init`` initialises all of them; ``update`` dispatches on the leading axis
  of the first stacked leaf, so every check runs the real transform for its
  T (validation included: bad inputs still reach the transform's own
  checks). ``fixed`` are arguments every transform gets; ``make.factory``
  and ``make.kwargs`` let the optax checks build the factory itself.
  """

  def make(**kwargs):
    txs = {t: factory(num_tasks=t, **fixed, **kwargs)
           for t in CONTRACT_TASK_COUNTS}

    def init_fn(params):
      return {t: tx.init(params) for t, tx in txs.items()}

    def update_fn(updates, state, params=None, **extra_args):
      t = jax.tree.leaves(updates)[0].shape[0]
      t = t if t in txs else CONTRACT_TASK_COUNTS[-1]
      out, new = txs[t].update(updates, state[t], params, **extra_args)
      return out, {**state, t: new}

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  make.factory = factory
  make.kwargs = fixed
  return make


def task_losses(t):
  # Positive, distinct losses so every loss-based weighting is exercised.
  return {"losses": np.linspace(0.5, 2.0, t).astype(np.float32)}


SPECS = [
    # PCGrad.
    Spec("pcgrad", pcgrad_optax.pcgrad),
    # The Gram-based aggregators.
    Spec("mean", pcgrad_optax.mean),
    Spec("sum", pcgrad_optax.sum),
    Spec("mgda", pcgrad_optax.mgda),
    # One task: CAGrad's update is g0 + c|g0| g/|g| = (1 + c) g.
    Spec("cagrad", pcgrad_optax.cagrad,
         identity_at_t1=False),
    Spec("imtl_g", pcgrad_optax.imtl_g),
    Spec("upgrad", pcgrad_optax.upgrad),
    Spec("dualproj", pcgrad_optax.dualproj),
    Spec("aligned_mtl", pcgrad_optax.aligned_mtl),
    Spec("config", pcgrad_optax.config),
    # One task: the paper's Nash-MTL update is the unit gradient g/|g| (the
    # update does not depend on gradient norms), not g.
    Spec("nash_mtl", pcgrad_optax.nash_mtl,
         identity_at_t1=False),
    # The stateful and loss-based methods. Every one is the identity for one
    # task at its first step: GradVac and GradDrop have no pair to correct and
    # P is 0 or 1; RLW's softmax of one draw is 1; uncertainty's weight is
    # exp(-0) = 1, DWA's first weights are 1 and FAMO's weights sum to 1. So
    # identity_at_t1 stays True for all of them.
    Spec("gradvac", per_task_count(pcgrad_optax.gradvac, beta=0.5)),
    Spec("graddrop", pcgrad_optax.graddrop),
    Spec("rlw", pcgrad_optax.rlw),
    Spec("uncertainty", per_task_count(pcgrad_optax.uncertainty),
         extra_args=task_losses),
    Spec("dwa", per_task_count(pcgrad_optax.dwa), extra_args=task_losses),
    Spec("famo", per_task_count(pcgrad_optax.famo), extra_args=task_losses),
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_contract(spec, check):
  check(spec)
