"""The toy and the Recon table cover every method of the package.

``benchmarks/toy.py`` and ``benchmarks/recon_digits.py`` run every factory
of ``pcgrad_optax.aggregation.__all__`` and ``.scalarization.__all__`` (the
one-pass ``*_loss`` forms aside), or name it with the reason it is not run
(e.g. Krum needs T >= 3 tasks; both have T = 2). A new method fails here
until it is added to one of the two lists.
"""

import importlib.util
import os
import sys

import pytest

_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                      "benchmarks")


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"_bench_{name}", os.path.join(_BENCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses (flax modules) look it up
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("script", ["toy", "recon_digits"])
def test_every_factory_is_run_or_excused(script):
  assert _load(script).uncovered_factories() == []


def test_recon_rows_build():
  # Every candidate row builds with its arguments (T = 2, the heads mask).
  recon = _load("recon_digits")
  for name in recon.available_aggregators():
    recon.make_aggregator(name)
