"""``benchmarks/<name>.py`` as a module, for the tests of the scripts."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          os.pardir, "benchmarks")


def load_benchmark(name: str):
  """Executes ``benchmarks/<name>.py`` as the module ``name``.

  It is registered in ``sys.modules`` before it runs: Flax modules are
  dataclasses, which look their module up there.
  """
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module
