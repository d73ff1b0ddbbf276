"""Helpers for the ValueErrors that bad inputs raise while tracing.

``traced`` traces a function abstractly (nothing runs), ``has_all`` builds a
regex that matches a message containing every given part, and
``pcgrad_update`` makes one pcgrad update on ``stacked_trees.PARAMS``: the
transformation through which the core's checks are exercised.
"""

from __future__ import annotations

import re

import jax

import pcgrad_optax as po
from stacked_trees import PARAMS


def traced(fn, *args):
  """Traces fn abstractly (nothing is run) and returns its output shapes."""
  return jax.eval_shape(fn, *args)


def pcgrad_update(grads, params=None, **kwargs):
  tx = po.pcgrad(**kwargs)
  return tx.update(grads, tx.init(PARAMS), params)


def has_all(*parts):
  return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)
