"""pcgrad_optax: multi-task gradient surgery for JAX and Optax."""

from pcgrad_optax import _aggregators
from pcgrad_optax import _stateful
from pcgrad_optax import diagnostics
from pcgrad_optax import memory
from pcgrad_optax import recon
from pcgrad_optax import sharding
from pcgrad_optax import weighting
from pcgrad_optax._core import gram_matrix
from pcgrad_optax._core import weighted_sum
from pcgrad_optax._grad import task_value_and_grad
from pcgrad_optax._transforms import MultiStepsState
from pcgrad_optax._transforms import PCGradState
from pcgrad_optax._transforms import multi_steps
from pcgrad_optax._transforms import pcgrad

# Transformations of the aggregator family (each module lists its names in
# __all__).
from pcgrad_optax._aggregators import *  # noqa: E402,F401,F403
from pcgrad_optax._stateful import *  # noqa: E402,F401,F403

__version__ = "0.1.0"

__all__ = (
    "MultiStepsState",
    "PCGradState",
    "diagnostics",
    "gram_matrix",
    "memory",
    "multi_steps",
    "pcgrad",
    "recon",
    "sharding",
    "task_value_and_grad",
    "weighted_sum",
    "weighting",
) + tuple(_aggregators.__all__) + tuple(_stateful.__all__)
