"""Safeguarded interpolating backtracking, aimed at the Armijo boundary of a model of the loss.

A line search along ``w0 + eta*d`` knows ``phi(0) = f(w0)``, the slope ``phi'(0) = g·d`` (from Pass A's sums) and
the loss ``phi(a)`` at every rejected trial ``a``. Instead of ``eta *= beta_b`` it fits the quadratic through
``phi(0)``, ``phi'(0)`` and the latest rejected trial ``(a, fa)`` (Nocedal & Wright, Numerical Optimization, 2nd
ed., Sec. 3.5) and jumps to the largest step that this model says the acceptance test passes.

The acceptance tests are all of the form ``f(w0) - phi(eta) >= k*eta - offset``: the Armijo test has ``k = c*s``
and ``offset = 0``; SaLSa's smoothed test ``a*D_prev + (1-a)*(f(w0) - phi(eta)) >= c*eta*G`` has
``k = c*G/(1-a)`` and ``offset = a*D_prev/(1-a)``. In units of the trial, ``x = eta/a``, with ``p = -phi'(0)*a``
(the linear prediction of the decrease) and ``curv = fa - phi(0) + p`` (positive when the model opens upwards)::

    model:     phi(x*a) = phi(0) - p*x + curv*x^2
    boundary:  curv*x^2 - (p - k*a)*x - offset = 0,  the larger root
               x = (b + r) / (2*curv) = 2*offset / (r - b),  b = p - k*a,  r = sqrt(b^2 + 4*curv*offset)

(the second form where ``b < 0``, free of cancellation). For the Armijo test that is ``x = (1-c)*p / curv``, which
on a quadratic loss is ``2*(1-c)`` times the model's minimiser (N&W's target). The new step is ``AIM = 0.95`` times
the boundary: on an exact model the boundary itself is decided by rounding. Aiming at the boundary rather than the
minimiser keeps the accepted steps as large as geometric backtracking's: the step size grows back only by
``gamma**(1/n_batches_per_epoch)`` per step, so every step lost to a cautious search stays lost for the rest of a
run (``docs/backtracking.md`` has the measurements of both aims).

Safeguards: every new step is kept in ``[LO, HI] * eta_last`` (0.1 and 0.9; HI lowered to the optimizer's
geometric factor where that is smaller: a rejection shrinks the step at least as much as geometric backtracking
would, and by at most a factor 10 per trial unless that factor is smaller still). After a far miss (the trial's
decrease is less than ``NEAR = 0.5`` of what the test asks for, or the loss rose) the upper bound is
``HI_FAR = 0.5``, N&W's: such a trial lies beyond the valley, where the quadratic extrapolates badly (a loss that
flattens out along the ray, as a transformer's does at the first steps, makes the boundary look close to the trial
and the search would creep down by 10% per trial).
When the model cannot be used (a non-finite latest loss, a slope that is not a finite negative number, a model
without a boundary, or any non-finite intermediate) the new step is the upper bound times ``eta_last`` (``LO *
eta_last`` after a non-finite loss: the trial was far too long) and the rule is recorded as ``"safeguard"``, as it is
when the clamp moved the model's value. So a rejected trial, whatever its loss (NaN, inf, rising, equal), always
yields a finite step in ``[LO, HI] * eta_last``: strictly smaller, never zero or growing (on float64 underflow it is
held at the smallest positive double). Every quantity here is a float64 Python float.
"""

from __future__ import annotations

import math

BACKTRACKING = ("geometric", "interpolate")
#: safeguard interval of the new step as a fraction of the last one
LO, HI = 0.1, 0.9
#: fraction of the model's boundary aimed at
AIM = 0.95
#: a rejected trial is a near miss when its decrease is at least NEAR of what the test asks; else the upper
#: safeguard is HI_FAR (Nocedal & Wright's 0.5)
NEAR, HI_FAR = 0.5, 0.5
_TINY = 5e-324  # smallest positive double: a step never becomes 0


def boundary_step(f0: float, slope: float, a: float, fa: float, k: float, offset: float = 0.0) -> float:
    """The largest ``eta`` with ``f0 - q(eta) >= k*eta - offset`` on the quadratic ``q`` with ``q(0) = f0``,
    ``q'(0) = slope``, ``q(a) = fa``: the acceptance test's boundary on the model (nan when there is none)."""
    p = -slope * a
    curv = fa - f0 + p
    b = p - k * a
    if not all(map(math.isfinite, (p, curv, b, offset))) or p <= 0.0 or curv <= 0.0:
        return math.nan
    if offset == 0.0:
        x = b / curv
    else:
        # r = sqrt(b^2 + 4*curv*offset) without squaring b (no overflow or underflow at any scale)
        t = 2.0 * math.sqrt(curv * abs(offset))
        if offset > 0.0:
            r = math.hypot(b, t)
        elif abs(b) >= t:
            r = math.sqrt((abs(b) - t) * (abs(b) + t))
        else:
            return math.nan
        x = (b + r) / (2.0 * curv) if b >= 0.0 else 2.0 * offset / (r - b)
    return a * x if math.isfinite(x) and x > 0.0 else math.nan


class Interpolator:
    """The step-size rule of one backtracking search with ``backtracking="interpolate"``.

    Args:
        f0: loss at ``w0``.
        slope: ``phi'(0)``, the directional derivative of the loss along the searched ray per unit of ``eta``
            (``g·d``; negative for a descent direction).
        k, offset: the acceptance test, ``f0 - f(trial) >= k*eta - offset``.
        shrink: the optimizer's geometric factor (``beta_b``, SaLSa's ``shrink``): the upper safeguard is
            ``min(HI, shrink)``, so a rejection never shrinks the step less than geometric backtracking would (and
            the lower one ``min(LO, shrink)``).
    """

    def __init__(self, f0: float, slope: float, k: float, offset: float = 0.0, shrink: float = HI):
        self.f0, self.slope, self.k, self.offset = float(f0), float(slope), float(k), float(offset)
        self.hi = min(HI, float(shrink))
        self.lo = min(LO, self.hi)

    def next(self, eta: float, ft: float) -> tuple[float, str]:
        """The step after the rejected trial ``(eta, ft)``, and the rule that produced it: ``"quadratic"`` or
        ``"safeguard"``."""
        eta, ft = float(eta), float(ft)
        if not math.isfinite(ft):
            return max(self.lo * eta, _TINY), "safeguard"
        # nan when f0 or the slope is unusable (non-finite, or not a descent): boundary_step checks them
        new = AIM * boundary_step(self.f0, self.slope, eta, ft, self.k, self.offset)
        # A far miss (less than NEAR of the decrease the test asks for, or a loss that rose) lies beyond the valley:
        # the quadratic extrapolates badly from there (a loss that flattens out makes its boundary look close to the
        # trial), so N&W's upper safeguard holds. A near miss is where the model is good: aim at its boundary.
        far = not self.f0 - ft >= NEAR * (self.k * eta - self.offset)
        lo, hi = self.lo * eta, (min(self.hi, HI_FAR) if far else self.hi) * eta
        if not math.isfinite(new):
            return max(hi, _TINY), "safeguard"
        if new < lo or new > hi:
            return max(min(max(new, lo), hi), _TINY), "safeguard"
        return max(new, _TINY), "quadratic"


def auto_start(f0: float, c: float, s: float) -> float | None:
    """``init_step_size="auto"``: the largest step size the first Armijo test can accept when the loss is >= 0.

    ``f(w0 + eta*d) <= f(w0) - c*eta*s`` needs ``f(w0) - c*eta*s >= 0``, i.e. ``eta <= f(w0) / (c*s)``; every trial
    above that is rejected whatever the loss does, so the first search starts there instead of at an arbitrary
    constant. (SaLSa's smoothed test gives the same bound with ``f(w0)`` and ``s`` replaced by their smoothed
    counterparts.) None when the bound does not exist (``f0 <= 0``, ``s <= 0`` or a non-finite result).
    """
    if not (f0 > 0.0 and s > 0.0 and c > 0.0):
        return None
    eta = f0 / (c * s)
    return eta if math.isfinite(eta) and eta > 0.0 else None


def validate(group: dict) -> None:
    """ValueError unless ``group`` has a valid ``backtracking`` and ``init_step_size`` (a positive number or
    ``"auto"``)."""
    rule = group.get("backtracking", "geometric")
    if not isinstance(rule, str) or rule not in BACKTRACKING:
        raise ValueError(f"backtracking must be one of {BACKTRACKING}, got {rule!r}")
    init = group["init_step_size"]
    if isinstance(init, str) and init == "auto":
        return
    number = isinstance(init, (int, float)) and not isinstance(init, bool)
    if not (number and math.isfinite(init) and init > 0):
        raise ValueError(f"init_step_size must be a positive finite number, got {init!r} (or 'auto')")
