"""The lsfused optimizers, and the modules their step is built from.

- ``sls`` (SGDSLS, AdamSLS), ``plasls`` (PLASLS), ``salsa`` (SaLSa): the searches, each a ``_search`` method;
- ``base``: ``LineSearchOptimizer``, the step as a pipeline (check, Pass A, search, settle) over what follows;
- ``flat_optimizer``: the parameters in flat buffers and torch's optimizer contract over them (param groups,
  ``"lr"``, the passes, state_dict, copy and pickle), which ``LineSearchOptimizer`` extends;
- ``validation``: hyperparameters, param groups and what a closure returns;
- ``passes``: the flat buffers and the passes of the backend's kernels over them;
- ``scaling``: loss scaling and gradient clipping;
- ``distributed``: the process group, the float64 reduce and the ranks' agreement;
- ``acceptance``: backtracking, the noise floor and the unresolvable rule; ``interpolation`` and ``skipping``: the
  options that cut its trials;
- ``transaction``: the closure runner, one evaluation every rank ends alike, Ctrl-C held back;
- ``rng``: the random state of a step's closure calls and ``watch()``;
- ``checkpoint``: the state_dict format, packed and validated; ``record``: ``StepRecord``.

Each module takes values and returns values; none imports ``base``.
"""

from lsfused.optim.base import LineSearchOptimizer, StepRecord
from lsfused.optim.plasls import PLASLS
from lsfused.optim.salsa import ALSALS, SaLSa
from lsfused.optim.sls import SGDSLS, AdamSLS

__all__ = ["ALSALS", "PLASLS", "SGDSLS", "AdamSLS", "LineSearchOptimizer", "SaLSa", "StepRecord"]
