import pytest

import pcgrad_optax
from contract import CONTRACT_CHECKS, Spec

SPECS = [Spec("pcgrad", lambda **kw: pcgrad_optax.pcgrad(**kw))]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_contract(spec, check):
  check(spec)
