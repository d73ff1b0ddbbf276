"""What a test gives a factory beyond its defaults, to build every method.

The tests that build each factory of ``aggregation.__all__`` and
``scalarization.__all__`` by name (tests/checkpoint_cases.py and
tests/multidevice/test_multidevice.py) take from here the arguments without
defaults and which methods' updates take a second batch, so a new method
that needs either is added in one place.
"""

from __future__ import annotations

import inspect

import numpy as np

import pcgrad_optax as po

# Methods whose update takes a second batch's stacked gradients
# (``second_grads=``; ``third_grads=`` is optional).
SECOND_BATCH = frozenset({"sdmgrad", "modo"})


def required_args(name: str, num_tasks: int) -> dict:
  """The arguments without defaults of ``pcgrad_optax.<name>``.

  The factory's own examples' values; ``<method>_loss`` takes its method's.
  STCH gets one warm-up step, so that a few training steps run both of its
  phases.
  """
  table = {
      "constant": {"weights": np.linspace(0.5, 2.0, num_tasks,
                                          dtype=np.float32)},
      "krum": {"num_byzantine": 0},
      "trimmed_mean": {"trim": 1},
      "cr_mogm": {"weighting": po.weighting.mgda},
      "stch": {"warmup_steps": 1},
      "cosmos": {"lambda_": 1.0},
  }
  return dict(table.get(name.removesuffix("_loss"), {}))


def factory_kwargs(name: str, num_tasks: int, *,
                   always_num_tasks: bool = True) -> dict:
  """:func:`required_args`, plus ``num_tasks`` where the factory takes it.

  ``always_num_tasks=False``: only where it is required (no default).
  """
  kwargs = required_args(name, num_tasks)
  param = inspect.signature(getattr(po, name)).parameters.get("num_tasks")
  if param is not None and (always_num_tasks
                            or param.default is inspect.Parameter.empty):
    kwargs["num_tasks"] = num_tasks
  return kwargs
