"""Safeguarded interpolating backtracking (Nocedal & Wright, Numerical Optimization, 2nd ed., Sec. 3.5).

A line search along ``w0 + eta*d`` knows ``phi(0) = f(w0)``, the slope ``phi'(0) = g·d`` (from Pass A's sums) and
the loss ``phi(eta_i)`` at every rejected trial. Instead of ``eta *= beta_b`` it fits ``phi`` and jumps to the
model's minimiser:

- after the first rejection (one trial ``a``, loss ``fa``), the quadratic through ``phi(0)``, ``phi'(0)``,
  ``phi(a)``::

      eta = -phi'(0) a^2 / (2 (fa - phi(0) - phi'(0) a))
          = a * p / (2 (q + p)),   p = -phi'(0) a  (linear prediction),  q = fa - phi(0)

- after later rejections, the cubic ``phi(0) + phi'(0) x + B x^2 + A x^3`` through the last two finite trials
  ``(a0, f0_), (a1, f1_)`` (``a1`` the latest)::

      [A, B] = 1/(a0^2 a1^2 (a1 - a0)) * [[a0^2, -a1^2], [-a0^3, a1^3]] @ [f1_ - phi(0) - phi'(0) a1,
                                                                           f0_ - phi(0) - phi'(0) a0]
      eta = (-B + sqrt(B^2 - 3 A phi'(0))) / (3 A)  =  -phi'(0) / (B + sqrt(B^2 - 3 A phi'(0)))

  computed in units of ``a1`` (so that ``a^5`` cannot underflow for tiny step sizes).

Safeguards: every new step is kept in ``[lo, hi] * eta_last`` (defaults 0.1 and 0.5); when the model cannot be used
(a non-finite latest loss, a slope that is not a finite negative number, a cubic without a real minimiser, or any
non-finite intermediate) the new step is ``hi * eta_last`` (``lo * eta_last`` after a non-finite loss: the trial was
far too long) and the rule is recorded as ``"safeguard"``, as it is when the clamp moved the model's value. So a
rejected trial, whatever its loss (NaN, inf, rising, equal), always yields a finite step in
``[lo, hi] * eta_last``: strictly smaller, never zero or growing (on float64 underflow it is held at the smallest
positive double). Every quantity here is a float64 Python float.
"""

from __future__ import annotations

import math

BACKTRACKING = ("geometric", "interpolate")
#: safeguard interval of the new step as a fraction of the last one
LO, HI = 0.1, 0.5
_TINY = 5e-324  # smallest positive double: a step never becomes 0


def quadratic_step(f0: float, slope: float, a: float, fa: float) -> float:
    """Minimiser of the quadratic with ``q(0) = f0``, ``q'(0) = slope``, ``q(a) = fa`` (nan when it has none)."""
    p = -slope * a
    curv = fa - f0 + p  # (fa - f0 - slope*a): positive when the quadratic opens upwards
    if not (math.isfinite(p) and math.isfinite(curv)) or p <= 0.0 or curv <= 0.0:
        return math.nan
    return a * (p / (2.0 * curv))


def cubic_step(f0: float, slope: float, a0: float, fa0: float, a1: float, fa1: float) -> float:
    """Minimiser of the cubic through ``f0, slope`` at 0 and ``(a0, fa0), (a1, fa1)`` (nan when it has none)."""
    if not (a0 > 0.0 and a1 > 0.0) or a0 == a1:
        return math.nan
    x0, s = a0 / a1, slope * a1  # in units of a1: x1 = 1
    r1 = fa1 - f0 - s
    r0 = fa0 - f0 - s * x0
    den = x0 * x0 * (1.0 - x0)
    A = (x0 * x0 * r1 - r0) / den
    B = (-(x0**3) * r1 + r0) / den
    if not (math.isfinite(A) and math.isfinite(B) and math.isfinite(s)):
        return math.nan
    disc = B * B - 3.0 * A * s
    if not (disc >= 0.0 and math.isfinite(disc)):
        return math.nan
    root = math.sqrt(disc)
    # The same root written two ways, each free of cancellation on its side (the first also covers A == 0).
    if B >= 0.0:
        x = -s / (B + root) if B + root > 0.0 else math.nan
    else:
        x = (-B + root) / (3.0 * A) if A != 0.0 else math.nan
    return x * a1 if math.isfinite(x) and x > 0.0 else math.nan


class Interpolator:
    """The step-size rule of one backtracking search with ``backtracking="interpolate"``.

    Args:
        f0: loss at ``w0``.
        slope: ``phi'(0)``, the directional derivative of the loss along the searched ray per unit of ``eta``
            (``g·d``; negative for a descent direction).
        lo, hi: safeguard interval, as fractions of the last step.
    """

    def __init__(self, f0: float, slope: float, lo: float = LO, hi: float = HI):
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"the safeguard interval must satisfy 0 < lo <= hi < 1, got lo={lo!r}, hi={hi!r}")
        self.f0, self.slope, self.lo, self.hi = float(f0), float(slope), lo, hi
        self._finite: list[tuple[float, float]] = []  # (eta, loss) of the rejected trials with a finite loss

    def next(self, eta: float, ft: float) -> tuple[float, str]:
        """The step after the rejected trial ``(eta, ft)``, and the rule that produced it: ``"quadratic"``,
        ``"cubic"`` or ``"safeguard"``."""
        eta, ft = float(eta), float(ft)
        if not math.isfinite(ft):
            return max(self.lo * eta, _TINY), "safeguard"
        usable = math.isfinite(self.f0) and math.isfinite(self.slope) and self.slope < 0.0
        if usable and self._finite:
            rule = "cubic"
            a0, fa0 = self._finite[-1]
            new = cubic_step(self.f0, self.slope, a0, fa0, eta, ft)
        else:
            rule = "quadratic"
            new = quadratic_step(self.f0, self.slope, eta, ft) if usable else math.nan
        self._finite.append((eta, ft))
        lo, hi = self.lo * eta, self.hi * eta
        if not math.isfinite(new):
            return max(hi, _TINY), "safeguard"
        if new < lo or new > hi:
            return max(min(max(new, lo), hi), _TINY), "safeguard"
        return max(new, _TINY), rule


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
