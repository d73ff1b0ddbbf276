"""Weightings: pure functions from a task Gram matrix to task weights.

A weighting maps the ``(T, T)`` Gram matrix ``K = G G^T`` of the task
gradients to ``(T,)`` weights ``w``; the aggregated update is
``pcgrad_optax.weighted_sum(stacked, w) = w^T G``. Weightings never touch the
gradients themselves, so they cost ``O(T^3)`` at most, whatever the model
size, and can be tested, composed and logged on their own. The weightings of
the stateful and loss-level methods take what they need besides (EMA
targets, a PRNG key, loss histories, log-variances, logits).

This module is the public namespace of every weighting; each is defined next
to its transformation, in ``pcgrad_optax/aggregation/_<method>.py`` or
``pcgrad_optax/scalarization/_<method>.py``.
"""

from pcgrad_optax._core.gram import check_gram
from pcgrad_optax.aggregation._aligned_mtl import (
    aligned_mtl_weighting as aligned_mtl)
from pcgrad_optax.aggregation._cagrad import cagrad_weighting as cagrad
from pcgrad_optax.aggregation._config import config_weighting as config
from pcgrad_optax.aggregation._db_mtl import db_mtl_weighting as db_mtl
from pcgrad_optax.aggregation._dualproj import dualproj_weighting as dualproj
from pcgrad_optax.aggregation._excess_mtl import (
    excess_mtl_weighting as excess_mtl)
from pcgrad_optax.aggregation._gradnorm import gradnorm_weighting as gradnorm
from pcgrad_optax.aggregation._gradvac import gradvac_weighting as gradvac
from pcgrad_optax.aggregation._imtl_g import imtl_g_weighting as imtl_g
from pcgrad_optax.aggregation._mean import mean_weighting as mean
from pcgrad_optax.aggregation._mgda import mgda_weighting as mgda
from pcgrad_optax.aggregation._moco import moco_weighting as moco
from pcgrad_optax.aggregation._modo import modo_weighting as modo
from pcgrad_optax.aggregation._nash_mtl import nash_mtl_weighting as nash_mtl
from pcgrad_optax.aggregation._pcgrad import pcgrad_weighting as pcgrad
from pcgrad_optax.aggregation._pcgrad import random_orders
from pcgrad_optax.aggregation._sdmgrad import sdmgrad_weighting as sdmgrad
from pcgrad_optax.aggregation._sum import sum_weighting as sum  # noqa: A004
from pcgrad_optax.aggregation._upgrad import upgrad_weighting as upgrad
from pcgrad_optax.scalarization._dwa import dwa_weighting as dwa
# Issue 13: FairGrad, Krum, constant weights, CR-MOGM.
from pcgrad_optax.aggregation._constant import constant_weighting as constant
from pcgrad_optax.aggregation._cr_mogm import cr_mogm_weighting as cr_mogm
from pcgrad_optax.aggregation._fairgrad import fairgrad_weighting as fairgrad
from pcgrad_optax.aggregation._krum import krum_weighting as krum
from pcgrad_optax.scalarization._famo import famo_weighting as famo
from pcgrad_optax.scalarization._rlw import rlw_weighting as rlw
from pcgrad_optax.scalarization._uncertainty import (
    uncertainty_weighting as uncertainty)
# Issue 13 (loss level).
from pcgrad_optax.scalarization._cosmos import cosmos_weighting as cosmos
from pcgrad_optax.scalarization._geometric_mean import (
    geometric_mean_weighting as geometric_mean)
from pcgrad_optax.scalarization._imtl_l import imtl_l_weighting as imtl_l
from pcgrad_optax.scalarization._pbi import pbi_weighting as pbi
from pcgrad_optax.scalarization._stch import stch_weighting as stch

__all__ = [
    "aligned_mtl",
    "cagrad",
    "check_gram",
    "config",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "famo",
    "gradnorm",
    "gradvac",
    "imtl_g",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pcgrad",
    "random_orders",
    "rlw",
    "sdmgrad",
    "sum",
    "uncertainty",
    "upgrad",
    # Issue 13 (loss level).
    "cosmos",
    "geometric_mean",
    "imtl_l",
    "pbi",
    "stch",
    # Issue 13.
    "constant",
    "cr_mogm",
    "fairgrad",
    "krum",
]
