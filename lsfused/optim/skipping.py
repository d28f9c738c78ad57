"""``skip_trials``: accept a step's first step size without evaluating its trial when the outcome is predictable.

The rule (state: ``streak``, ``since_test``; constants ``AFTER``, ``MAX_SKIPS``, ``SETTLED_TRIALS``, ``MARGIN``):

- A step whose search runs is *tested* (its trials are evaluated as without the option) unless ``streak >= AFTER``
  and ``since_test < MAX_SKIPS``; then it *skips*: it takes the current step size, held (not grown: a skipped step
  has no test to shrink a grown one), as if its first trial had passed (``outcome="accepted"``, ``trials=0``, one
  closure call for the step: the gradient's).
- A tested step *passes* when its search accepts within ``SETTLED_TRIALS`` trials (the step size is settled: at most
  one backtrack), with the measured decrease at least ``1 + MARGIN`` times what the acceptance test asks,
  ``f0 - f(eta) + offset >= (1 + MARGIN) * k * eta`` (Armijo: ``k = c*s``, ``offset = 0``; SaLSa's smoothed test:
  ``k = c*G/(1-a)``, ``offset = a*D_prev/(1-a)``). A pass adds one to ``streak``; anything else (more backtracks, a
  failure, an unresolvable trial) sets it to 0, so every step is tested again until ``AFTER`` passes in a row.
  One backtrack still passes because the searches of SaLSa (growth 1.1, shrink 0.8) settle that way: a
  first-trial pass skipped 3 steps of 80 on the MiniLM task.
- ``since_test`` counts the skipped steps since the last tested one: at most ``MAX_SKIPS`` steps in a row skip, so
  a wrong guess is seen by a test at most ``MAX_SKIPS`` steps later.

A missed failure (a skipped step whose trial would have been rejected) is not undone: the next step's loss is on
another batch, so it cannot repeat the test, and undoing a step needs the gradient at the point undone to. It is
caught by the next tested step. ``skip_trials="measure"`` evaluates each skipped trial anyway (one more forward)
without acting on it, so the rule's error rate is known: ``StepRecord.skipped_trial_passed``. Its decisions and
trajectory are bit-identical to ``skip_trials=True``.
"""

from __future__ import annotations

import math
from typing import Any

#: tested steps passing in a row before a step may skip its trial
AFTER = 2
#: skipped steps in a row at most
MAX_SKIPS = 3
#: how far above the acceptance threshold a tested step's accepted trial must land to count as a pass
MARGIN = 0.0
#: a tested step passes only when the search accepted within this many trials (the step size is settled)
SETTLED_TRIALS = 2

MODES = (False, True, "measure")


class TrialSkipper:
    """The rule's state and decisions; plain values in, plain values out."""

    def __init__(self) -> None:
        self.streak = 0
        self.since_test = 0

    def plan(self) -> str:
        """``"skip"``, or why the step is tested: ``"unproven"`` (fewer than ``AFTER`` passes in a row) or ``"due"``
        (``MAX_SKIPS`` steps skipped in a row)."""
        if self.streak < AFTER:
            return "unproven"
        return "due" if self.since_test >= MAX_SKIPS else "skip"

    def skipped(self) -> None:
        self.since_test += 1

    def tested(self, passed: bool) -> None:
        self.since_test = 0
        self.streak = self.streak + 1 if passed else 0

    def update(self, event: tuple[str, bool | None] | None) -> None:
        """After a step's search: what its first trial did, ``("skip", _)`` or ``("tested", passed)`` (None: no
        search ran, nothing changes)."""
        if event is not None and event[0] == "skip":
            self.skipped()
        elif event is not None:
            self.tested(bool(event[1]))

    @staticmethod
    def passes(f0: float, ft: float, eta: float, k: float, offset: float, margin: float = MARGIN) -> bool:
        """Whether a tested first trial counts as a pass (see the module's docstring); ``margin=0``: the acceptance
        test itself (a non-finite loss fails it)."""
        return math.isfinite(ft) and f0 - ft + offset >= (1.0 + margin) * k * eta

    def state(self) -> dict[str, int]:
        return {"streak": self.streak, "since_test": self.since_test}

    def load(self, state: dict[str, Any]) -> None:
        self.streak, self.since_test = int(state["streak"]), int(state["since_test"])

    @staticmethod
    def check(state: Any) -> None:
        """Raise ValueError when a saved state cannot apply."""
        ok = isinstance(state, dict) and set(state) == {"streak", "since_test"}
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in state.values()):
            raise ValueError(f"state_dict trial_skipping must be {{'streak': n, 'since_test': n}}, n >= 0: {state!r}")
