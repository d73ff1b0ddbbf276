"""pcgrad_optax: multi-task gradient surgery for JAX and Optax.

Every name of the public API is importable from here. The code lives in:

* :mod:`pcgrad_optax.aggregation` — gradient-level methods (PCGrad, MGDA,
  CAGrad, UPGrad, ...), one module each;
* :mod:`pcgrad_optax.scalarization` — loss-level methods (RLW, uncertainty
  weighting, DWA, FAMO), one module each;
* :mod:`pcgrad_optax.weighting` — the pure weightings of all of them;
* ``pcgrad_optax._core`` — the Gram-matrix core they share;
* :mod:`pcgrad_optax.recon`, :mod:`pcgrad_optax.memory`,
  :mod:`pcgrad_optax.sharding`, :mod:`pcgrad_optax.diagnostics`.
"""

from pcgrad_optax import aggregation
from pcgrad_optax import diagnostics
from pcgrad_optax import memory
from pcgrad_optax import recon
from pcgrad_optax import scalarization
from pcgrad_optax import sharding
from pcgrad_optax import weighting
from pcgrad_optax._apply_if_finite import ApplyIfFiniteState
from pcgrad_optax._apply_if_finite import DroppedTasksState
from pcgrad_optax._apply_if_finite import apply_if_finite
from pcgrad_optax._core.gram import gram_matrix
from pcgrad_optax._core.weighted_sum import weighted_sum
from pcgrad_optax._multi_steps import MultiStepsState
from pcgrad_optax._multi_steps import multi_steps
from pcgrad_optax._task_value_and_grad import task_value_and_grad
from pcgrad_optax._value_and_aggregate import value_and_aggregate
# Every method's transformation and state type, under its own name (each
# subpackage lists them in __all__).
from pcgrad_optax.aggregation import *  # noqa: F401,F403
from pcgrad_optax.scalarization import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = (
    "ApplyIfFiniteState",
    "DroppedTasksState",
    "apply_if_finite",
    "MultiStepsState",
    "aggregation",
    "diagnostics",
    "gram_matrix",
    "memory",
    "multi_steps",
    "recon",
    "scalarization",
    "sharding",
    "task_value_and_grad",
    "value_and_aggregate",
    "weighted_sum",
    "weighting",
) + tuple(aggregation.__all__) + tuple(scalarization.__all__)
