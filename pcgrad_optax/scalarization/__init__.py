"""Loss-level methods: task weights that do not look at the gradients.

Random weights (RLW), learnable log-variances (uncertainty weighting), loss
descent rates (DWA) and learned logits (FAMO). One method, one module:
``_<method>.py`` holds the method's pure weighting (its inputs, a PRNG key,
loss histories, log-variances or logits, to ``(T,)`` task weights, exported
as ``pcgrad_optax.weighting.<method>``), its optax transformation (exported
here and as ``pcgrad_optax.<method>``), its state type and their
docstrings.

The transformations have the interface of :func:`pcgrad_optax.pcgrad`:
``update`` takes stacked per-task gradients (every leaf of shape
``(T,) + param.shape``) and returns params-shaped updates; ``shared``
selects the leaves that are weighted, every other leaf (a task head) gets
the plain sum (or mean) over its task axis; ``reduction`` is ``"sum"`` or
``"mean"``; PRNG keys live in the state. The loss-based ones take the
per-task losses as an extra argument, ``tx.update(grads, state, params,
losses=losses)``, which ``optax.chain`` passes through. Those whose state
has a per-task shape need ``num_tasks`` up front, like
:func:`pcgrad_optax.multi_steps`, because ``init`` only sees the params.
"""

from pcgrad_optax.scalarization._dwa import DWAState
from pcgrad_optax.scalarization._dwa import dwa
from pcgrad_optax.scalarization._famo import FAMOState
from pcgrad_optax.scalarization._famo import famo
from pcgrad_optax.scalarization._rlw import RLWState
from pcgrad_optax.scalarization._rlw import rlw
from pcgrad_optax.scalarization._uncertainty import UncertaintyState
from pcgrad_optax.scalarization._uncertainty import uncertainty

__all__ = [
    "DWAState",
    "FAMOState",
    "RLWState",
    "UncertaintyState",
    "dwa",
    "famo",
    "rlw",
    "uncertainty",
]
