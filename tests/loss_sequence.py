"""Five steps of three task losses, and the loop feeding them to a transform.

``LOSS_SEQUENCE`` is a (5, 3) array of positive losses (step, task) that fall
at different rates (the second task's rises again at the last step).
``run_transform(tx, grads_seq, losses_seq, extra_seq)`` runs the jitted
``tx.update`` step by step on ``to_tree`` gradients over ``PARAMS``, passing
each step's ``losses=`` (and any extra keyword arguments), and returns the
flat updates and the states. Used by the uncertainty, DWA and FAMO tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stacked_trees import PARAMS, flat, to_tree


LOSS_SEQUENCE = np.array([[2.0, 1.0, 4.0],
                          [1.5, 0.9, 3.0],
                          [1.2, 0.85, 1.5],
                          [1.1, 0.8, 1.2],
                          [0.9, 0.82, 1.0]])


def run_transform(tx, grads_seq, losses_seq, extra_seq=None):
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  outs, states = [], []
  for n, (g, losses) in enumerate(zip(grads_seq, losses_seq)):
    extra = {} if extra_seq is None else extra_seq[n]
    out, state = update(to_tree(g), state, PARAMS,
                        losses=jnp.asarray(losses, jnp.float32), **extra)
    outs.append(flat(out))
    states.append(state)
  return outs, states
