"""The acceptance test: backtracking until a trial passes, the noise floor below which a loss difference is
rounding, and the rule that ends a search whose trials cannot be judged.

The functions here take values and callables (move to a trial point and evaluate it; judge a rejection; observe
a trial) and return a decision: the optimizer supplies the kernels, the closure and the recorder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsfused.optim.interpolation import Interpolator

ARMIJO_TESTS = ("noise_aware", "classic")
#: absorbed fraction at or above which smaller steps cannot change the network
ABSORBED_STOP = 0.999


@dataclass
class SearchResult:
    """What a search decided: ``outcome`` (see ``StepRecord``), the step size, the trials it evaluated, the loss at
    the last one, and why for an ``"unresolvable"`` or ``"skipped"`` outcome."""

    outcome: str
    eta: float
    trials: int
    trial_loss: float | None
    reason: str | None = None


def settled_step_size(eta_prev: float, start: float, uncapped: float, result: SearchResult) -> float:
    """The search's own step size after a search that started at ``start = min(uncapped, cap)``.

    When the cap (not a rejection) limited an accepted first trial, the search's step size is not shrunk to the cap
    (it would never grow back under a warm-up): it stays ``max(eta_prev, start)``. Otherwise it is what the search
    found (``result.eta``)."""
    if start < uncapped and result.outcome == "accepted" and result.trials <= 1:  # 0: a skipped first trial
        return max(eta_prev, start)
    return result.eta


def loss_ulp(value: float, dtype: torch.dtype) -> float:
    """One ulp of ``value`` in ``dtype`` (the spacing of representable losses there)."""
    if not dtype.is_floating_point:
        return 0.0
    t = torch.tensor(abs(value), dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)) - t)


def rounding_bound(f0: float, ft: float, dtype: torch.dtype, noise: float) -> float:
    """The smallest loss difference a step can resolve: one ulp of the larger loss in the closure's ``dtype``, or
    the measured evaluation ``noise`` when that is larger."""
    scale = max(abs(f0), abs(ft)) if math.isfinite(ft) else abs(f0)
    return max(loss_ulp(scale, dtype), noise)


def unresolvable(
    f0: float, ft: float, predicted: float, bound: float, unchanged_twice: bool, absorbed: Callable[[], float]
) -> str | None:
    """Why a rejected trial cannot be judged, or None when the rejection is real.

    ``"noise"``: the predicted decrease ``c*eta*s`` and the measured ``|f(trial) - f(w0)|`` are both within the
    rounding ``bound``, so the comparison is decided by rounding, not by the loss; or two trials in a row (at
    different step sizes) left the loss exactly unchanged: the weights moved but the loss did not register it, so it
    is quantized coarser than the change (cancellation inside the loss computation, e.g. a cross-entropy of 1e-6
    computed from logits of size 40, whose ulp is 4e-6) and smaller steps cannot register either (one exact tie can
    be a genuine crossing, twice cannot). ``"absorbed"``: (nearly) every element's update is absorbed by rounding
    (``absorbed()``, the fraction, is only asked for then), so smaller steps cannot change the network.
    """
    if not math.isfinite(ft):
        return None
    if unchanged_twice or (predicted <= bound and abs(ft - f0) <= bound):
        return "noise"
    if absorbed() >= ABSORBED_STOP:
        return "absorbed"
    return None


def backtrack(
    trial: Callable[[float], float],
    f0: float,
    eta0: float,
    decrease: Callable[[float, float], bool],
    predicted: Callable[[float], float],
    shrink: float,
    max_trials: int,
    judge: Callable[[float, float, bool], str | None] | None,
    observe: Callable[[int, float, float, bool, str], None],
    interp: Interpolator | None = None,
    first_rule: str = "grow",
) -> SearchResult:
    """Trial ``eta0``, then smaller step sizes, until ``decrease(eta, f_trial)`` holds.

    ``trial(eta)`` moves to the trial point and returns its loss; a non-finite loss is a rejected trial. After a
    rejection the next eta is ``eta*shrink``, or ``interp``'s choice (``backtracking="interpolate"``). ``judge(ft,
    predicted, unchanged_twice)`` (the noise-aware test; None: the classic one) names why a rejected trial cannot be
    judged; the search then ends without shrinking further, keeping the step size where a run of unchanged losses
    began (shrinking on a tie is no evidence). ``observe(t, eta, ft, ok, rule)`` sees every trial; ``rule`` names
    where its step size came from (``first_rule`` for ``eta0``). On failure ``eta`` is the last value tried.
    """
    eta, ft, unchanged, first_unchanged_eta, rule = eta0, None, 0, eta0, first_rule
    for t in range(1, max_trials + 1):
        ft = trial(eta)
        ok = math.isfinite(ft) and decrease(eta, ft)
        if ft == f0:
            unchanged += 1
            first_unchanged_eta = eta if unchanged == 1 else first_unchanged_eta
        else:
            unchanged = 0
        reason = None
        if not ok and judge is not None:
            reason = judge(ft, predicted(eta), unchanged >= 2)
        observe(t, eta, ft, ok, rule)
        if ok:
            return SearchResult("accepted", eta, t, ft)
        if reason is not None:
            kept = first_unchanged_eta if unchanged >= 2 else eta
            return SearchResult("unresolvable", kept, t, ft, reason)
        if t < max_trials:
            if interp is None:
                eta *= shrink
                rule = "geometric"
            else:
                eta, rule = interp.next(eta, ft)
    return SearchResult("failed", eta, max_trials, ft)
