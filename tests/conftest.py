import os
import sys

# Make tests/contract.py importable as `contract` from every test module.
sys.path.insert(0, os.path.dirname(__file__))

# The tests check values, shapes and shardings, not speed: XLA skips LLVM's
# expensive optimisations, so the suite's many small programs compile about
# a third faster. Set before JAX starts (this file is imported first), in
# the environment, so the child processes (the multi-device, multi-process
# and fresh-process checks, the notebooks' kernels) compile the same way.
# An --xla_backend_optimization_level already in XLA_FLAGS is kept.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
       "--xla_llvm_disable_expensive_passes=true"]).strip()

# The longest tests run first. pytest-xdist hands the tests out in this
# order, in chunks, to whichever worker is free: started first, the long
# serial ones (each a child process or a module-wide fixture) overlap with
# the many short ones on the other worker instead of ending the run alone.
# Whole modules move together, so a module-scoped fixture is built once.
LONG_FIRST = (
    "tests/test_sharding.py::test_multidevice_checks",
    "tests/test_checkpoint.py::",
    "tests/test_sharding.py::test_two_processes_equal_one",
    "notebooks/",
)


def pytest_collection_modifyitems(config, items):
  del config

  def rank(item):
    return next((i for i, prefix in enumerate(LONG_FIRST)
                 if item.nodeid.startswith(prefix)), len(LONG_FIRST))

  items.sort(key=rank)   # stable: the rest keep their order
