"""lsfused: fused stochastic line-search optimizers for PyTorch."""

from lsfused import components, utils
from lsfused.backends import available_backends, backends
from lsfused.optim import ALSALS, PLASLS, SGDSLS, AdamSLS, LineSearchOptimizer, SaLSa, StepRecord

__version__ = "0.1.0"

__all__ = [
    "ALSALS",
    "PLASLS",
    "SGDSLS",
    "AdamSLS",
    "LineSearchOptimizer",
    "SaLSa",
    "StepRecord",
    "available_backends",
    "backends",
    "components",
    "utils",
]
