"""The toy and the Recon table cover every method of the package.

``benchmarks/toy.py`` and ``benchmarks/recon_digits.py`` run every factory
of ``pcgrad_optax.aggregation.__all__`` and ``.scalarization.__all__`` (the
one-pass ``*_loss`` forms aside), or name it with the reason it is not run
(e.g. Krum needs T >= 3 tasks; both have T = 2). A new method fails here
until it is added to one of the two lists.
"""

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.parametrize("script", ["toy", "recon_digits"])
def test_every_factory_is_run_or_excused(script):
  assert load_benchmark(script).uncovered_factories() == []


def test_recon_rows_build():
  # Every candidate row builds with its arguments (T = 2, the heads mask).
  recon = load_benchmark("recon_digits")
  for name in recon.available_aggregators():
    recon.make_aggregator(name)
