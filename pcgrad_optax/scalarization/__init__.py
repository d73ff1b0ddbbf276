"""Loss-level methods: task weights that do not look at the gradients.

Random weights (RLW), learnable log-variances (uncertainty weighting), loss
descent rates (DWA), learned logits (FAMO), learned loss scales (IMTL-L),
the geometric mean (GLS), smooth Tchebycheff (STCH) and the preference-ray
scalarisations COSMOS and PBI. One method, one module:
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

One backward pass. Since ``sum_t w_t grad L_t = grad sum_t w_t L_t``, none
of these methods needs the per-task gradients: each also has a
``<method>_loss(...)`` factory (same hyperparameters, no ``shared``) giving a
:class:`LossScalarization` whose ``loss(losses, state)`` is a scalar to
differentiate with ``jax.value_and_grad(..., has_aux=True)``, and whose
``weights(losses, state)`` are the cotangent for one VJP. Both paths are
built from the same step function (``_scalarized.py``), so the state
sequence is the same and the gradient is the transformation's update with
``shared=None``. What the one-pass path cannot do is a ``shared`` mask (the
heads would need their own cotangent, i.e. a second backward pass): it
weights the whole model, task heads included, as weighting the loss does in
the papers. The learnable parameters of uncertainty weighting and IMTL-L
(log-variances, loss scales) have a gradient that needs only the losses, so
they live in the state on both paths, updated by their own optimiser.
"""

from pcgrad_optax.scalarization._dwa import DWAState
from pcgrad_optax.scalarization._dwa import dwa
from pcgrad_optax.scalarization._famo import FAMOState
from pcgrad_optax.scalarization._famo import famo
from pcgrad_optax.scalarization._rlw import RLWState
from pcgrad_optax.scalarization._rlw import rlw
from pcgrad_optax.scalarization._uncertainty import UncertaintyState
from pcgrad_optax.scalarization._uncertainty import uncertainty
# Issue 13: the new loss-level methods, and every method's one-backward-pass
# form (`<method>_loss`, a LossScalarization).
from pcgrad_optax.scalarization._cosmos import cosmos
from pcgrad_optax.scalarization._cosmos import cosmos_loss
from pcgrad_optax.scalarization._dwa import dwa_loss
from pcgrad_optax.scalarization._famo import famo_loss
from pcgrad_optax.scalarization._geometric_mean import geometric_mean
from pcgrad_optax.scalarization._geometric_mean import geometric_mean_loss
from pcgrad_optax.scalarization._imtl_l import IMTLLState
from pcgrad_optax.scalarization._imtl_l import imtl_l
from pcgrad_optax.scalarization._imtl_l import imtl_l_loss
from pcgrad_optax.scalarization._pbi import pbi
from pcgrad_optax.scalarization._pbi import pbi_loss
from pcgrad_optax.scalarization._rlw import rlw_loss
from pcgrad_optax.scalarization._scalarized import LossScalarization
from pcgrad_optax.scalarization._stch import STCHState
from pcgrad_optax.scalarization._stch import stch
from pcgrad_optax.scalarization._stch import stch_loss
from pcgrad_optax.scalarization._uncertainty import uncertainty_loss

__all__ = [
    "DWAState",
    "FAMOState",
    "RLWState",
    "UncertaintyState",
    "dwa",
    "famo",
    "rlw",
    "uncertainty",
    # Issue 13 (loss level).
    "IMTLLState",
    "LossScalarization",
    "STCHState",
    "cosmos",
    "cosmos_loss",
    "dwa_loss",
    "famo_loss",
    "geometric_mean",
    "geometric_mean_loss",
    "imtl_l",
    "imtl_l_loss",
    "pbi",
    "pbi_loss",
    "rlw_loss",
    "stch",
    "stch_loss",
    "uncertainty_loss",
]
