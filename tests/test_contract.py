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
from contract import CONTRACT_CHECKS, OPTAX_T, Spec, stacked_grads

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


def with_args(factory, **fixed):
  """``factory`` with fixed keyword arguments, as a Spec's ``make``.

  ``make.factory``/``make.kwargs`` let the optax checks wrap the factory
  itself in ``optax.inject_hyperparams``.
  """

  def make(**kwargs):
    return factory(**fixed, **kwargs)

  make.factory = factory
  make.kwargs = fixed
  return make


def pcgrad_if_finite(max_consecutive_errors, *, num_tasks=None,
                     reduction="sum", shared=None):
  """``apply_if_finite`` around PCGrad as one factory, for the optax checks.

  ``inject_hyperparams`` then injects ``max_consecutive_errors`` and
  ``num_tasks``.
  """
  return pcgrad_optax.apply_if_finite(
      pcgrad_optax.pcgrad(num_tasks=num_tasks, reduction=reduction,
                          shared=shared),
      max_consecutive_errors)


def _constant_weights(t):
  return np.linspace(0.5, 1.0, t) if t > 1 else np.ones(1)


def constant_per_task_count():
  """Constant weights of length T, one transform per task count."""
  make = per_task_count(lambda num_tasks, **kw: pcgrad_optax.constant(
      _constant_weights(num_tasks), num_tasks=num_tasks, **kw))
  # The optax checks (OPTAX_T tasks) build the factory itself.
  make.factory = pcgrad_optax.constant
  make.kwargs = {"weights": _constant_weights(OPTAX_T)}
  return make


def task_losses(t):
  # Positive, distinct losses so every loss-based weighting is exercised.
  return {"losses": np.linspace(0.5, 2.0, t).astype(np.float32)}


def second_batch(t):
  # SDMGrad and MoDo take a second batch's stacked gradients. The checks
  # with expectations on the update (heads = their plain sum, identity at
  # T = 1) build their gradients from seed 0, so this is the same batch and
  # the update (the mean of the two batches) keeps them. The other checks
  # (other seeds, bf16/f16/f64 gradients, per-task clipping inside
  # aggregating.process, which does not touch extra arguments) compare the
  # transformation with itself, fed this same f32 batch: any fixed second
  # batch serves them. Independent batches, and a second batch clipped by
  # the caller in process, are tested in tests/aggregation/.
  return {"second_grads": stacked_grads(t)}


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
    # Issue 13's stateful and two-batch methods. ExcessMTL's first step only
    # records its baseline (weights 1/T: the identity at T = 1), GradNorm's
    # weights sum to T = 1, MoDo's and SDMGrad's lie on the simplex of one
    # task and their update is the mean of the two batches, equal here
    # (second_batch gives the same gradients): identities. MoCo's and
    # DB-MTL's first updates are beta (resp. (1 - beta) / L) times the
    # gradient: not.
    Spec("excess_mtl", per_task_count(pcgrad_optax.excess_mtl)),
    Spec("moco", per_task_count(pcgrad_optax.moco), identity_at_t1=False),
    Spec("moco_libmtl", per_task_count(pcgrad_optax.moco,
                                       weight_update="softmax",
                                       normalize=True),
         extra_args=task_losses, identity_at_t1=False),
    Spec("db_mtl", per_task_count(pcgrad_optax.db_mtl),
         extra_args=task_losses, identity_at_t1=False),
    Spec("gradnorm", per_task_count(pcgrad_optax.gradnorm),
         extra_args=task_losses),
    Spec("gradnorm_softmax", per_task_count(pcgrad_optax.gradnorm,
                                            parametrization="softmax"),
         extra_args=task_losses),
    Spec("sdmgrad", per_task_count(pcgrad_optax.sdmgrad),
         extra_args=second_batch),
    Spec("modo", per_task_count(pcgrad_optax.modo), extra_args=second_batch),
    Spec("rlw", pcgrad_optax.rlw),
    Spec("uncertainty", per_task_count(pcgrad_optax.uncertainty),
         extra_args=task_losses),
    Spec("dwa", per_task_count(pcgrad_optax.dwa), extra_args=task_losses),
    Spec("famo", per_task_count(pcgrad_optax.famo), extra_args=task_losses),
    # Issue 13, loss level. One task: IMTL-L's weight is exp(0) = 1, the
    # geometric mean's G / L = 1, COSMOS's r - lambda * 0 = 1 and PBI's unit
    # ray 1; STCH's is 1 / L (the gradient of log L in the warm-up, and
    # T softmax / L after it), not 1. STCH with one warm-up step runs both
    # phases in the multi-step checks.
    Spec("imtl_l", per_task_count(pcgrad_optax.imtl_l),
         extra_args=task_losses),
    Spec("stch", per_task_count(pcgrad_optax.stch, warmup_steps=1),
         extra_args=task_losses, identity_at_t1=False),
    Spec("geometric_mean", pcgrad_optax.geometric_mean,
         extra_args=task_losses),
    Spec("cosmos", with_args(pcgrad_optax.cosmos, lambda_=1.0),
         extra_args=task_losses),
    Spec("pbi", pcgrad_optax.pbi, extra_args=task_losses),
    # apply_if_finite around an aggregator passes the contract too.
    Spec("apply_if_finite",
         with_args(pcgrad_if_finite, max_consecutive_errors=3)),
    # Issue 13. FairGrad's update for one task is |g|^(-2a/(a+1)) g (the
    # unit gradient at alpha = 1); Krum and the trimmed mean (trim=1) need
    # three tasks; constant weights and CR-MOGM's state have length T.
    Spec("fairgrad", pcgrad_optax.fairgrad, identity_at_t1=False),
    Spec("krum", with_args(pcgrad_optax.krum, num_byzantine=0),
         min_tasks=3),
    Spec("trimmed_mean", with_args(pcgrad_optax.trimmed_mean, trim=1),
         min_tasks=3),
    Spec("constant", constant_per_task_count()),
    Spec("cr_mogm", per_task_count(pcgrad_optax.cr_mogm,
                                   weighting=pcgrad_optax.weighting.mgda,
                                   beta=0.5),
         static_args=("weighting",)),
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_contract(spec, check):
  check(spec)
