"""What a step decided, as ``opt.last_step`` and the recorder see it."""

from __future__ import annotations

from dataclasses import dataclass

OUTCOMES = ("accepted", "failed", "skipped", "unresolvable", "interrupted")


@dataclass(frozen=True)
class StepRecord:
    """What one ``step()`` decided. ``opt.last_step`` holds the latest one.

    Attributes:
        step: 1-based index of the step.
        loss: float64 copy of the loss at the starting point ``w0``.
        trial_loss: loss at the last trial evaluated (the accepted one when ``outcome == "accepted"``; a skipped trial
            evaluated by ``skip_trials="measure"``), or None.
        step_sizes: step size of every param group after the step (PLASLS: merged components share one value).
        searched: indices of the param groups whose step size was line-searched in this step.
        trials: number of trial points evaluated.
        outcome: ``"accepted"``, ``"failed"`` (no trial passed within ``max_backtracks``), ``"skipped"``
            (no line search ran: zero decrease term, or a SaLSa speed-up step) or ``"unresolvable"`` (noise-aware
            test: the trial could not be judged, see ``reason``) or ``"interrupted"`` (an exception ended the step
            after it started changing state; see ``step()``).
        closure_calls: closure evaluations in this step (the gradient evaluation, an optional noise estimate and
            the trials).
        merged: for PLASLS, the pair of component indices merged after this step, else None.
        reason: for ``"unresolvable"``: ``"noise"`` (predicted decrease and measured difference both below the
            rounding bound) or ``"absorbed"`` (the update is absorbed by rounding); ``"joint"`` for a PLASLS step
            whose joint check failed; for ``"interrupted"`` the exception's type name; for ``"skipped"``:
            ``"overflow"`` (dynamic loss scaling found inf/NaN gradients: nothing changed but the scale) or ``"cap"``
            (a step-size cap of 0, e.g. a warm-up's first step); else None.
        grad_norm: global L2 norm of the gradient (float64, unscaled, before clipping), or None.
        trial_skipped: ``skip_trials``: the search accepted its first step size without evaluating the trial.
        skip_rule: ``skip_trials``, on a step whose search ran: ``"skip"`` (skipped), or why its trials were
            evaluated: ``"unproven"`` (fewer tested steps passing in a row than the rule asks) or ``"due"`` (the
            most steps in a row have skipped); None otherwise (see ``lsfused.optim.skipping``).
        skipped_trial_passed: ``skip_trials="measure"``: whether the skipped trial, evaluated anyway, passes the
            acceptance test (False: the rule missed a failure), else None.
    """

    step: int
    loss: float
    trial_loss: float | None
    step_sizes: tuple[float, ...]
    searched: tuple[int, ...]
    trials: int
    outcome: str
    closure_calls: int
    merged: tuple[int, int] | None = None
    reason: str | None = None
    grad_norm: float | None = None
    trial_skipped: bool = False
    skip_rule: str | None = None
    skipped_trial_passed: bool | None = None
