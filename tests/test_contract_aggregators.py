"""The transform contract (tests/contract.py) for the Gram-based aggregators."""

import pytest

import pcgrad_optax
from contract import CONTRACT_CHECKS, Spec

SPECS = [
    Spec("mean", lambda **kw: pcgrad_optax.mean(**kw)),
    Spec("sum", lambda **kw: pcgrad_optax.sum(**kw)),
    Spec("mgda", lambda **kw: pcgrad_optax.mgda(**kw)),
    # One task: CAGrad's update is g0 + c|g0| g/|g| = (1 + c) g.
    Spec("cagrad", lambda **kw: pcgrad_optax.cagrad(**kw),
         identity_at_t1=False),
    Spec("imtl_g", lambda **kw: pcgrad_optax.imtl_g(**kw)),
    Spec("upgrad", lambda **kw: pcgrad_optax.upgrad(**kw)),
    Spec("dualproj", lambda **kw: pcgrad_optax.dualproj(**kw)),
    Spec("aligned_mtl", lambda **kw: pcgrad_optax.aligned_mtl(**kw)),
    Spec("config", lambda **kw: pcgrad_optax.config(**kw)),
    # One task: the paper's Nash-MTL update is the unit gradient g/|g| (the
    # update does not depend on gradient norms), not g.
    Spec("nash_mtl", lambda **kw: pcgrad_optax.nash_mtl(**kw),
         identity_at_t1=False),
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_contract(spec, check):
  check(spec)
