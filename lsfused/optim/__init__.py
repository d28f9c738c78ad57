"""The lsfused optimizers."""

from lsfused.optim.base import LineSearchOptimizer, StepRecord
from lsfused.optim.salsa import ALSALS, SaLSa
from lsfused.optim.sls import PLASLS, SGDSLS, AdamSLS

__all__ = ["ALSALS", "PLASLS", "SGDSLS", "AdamSLS", "LineSearchOptimizer", "SaLSa", "StepRecord"]
