"""Loss scaling (``loss_scale``) and gradient clipping (``max_grad_norm``): from the gradient check's figures, the
norm to report and the factor to multiply the gradient by, with GradScaler's rule for a dynamic scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: GradScaler's defaults: initial scale, growth and backoff factors, clean steps before growing.
INIT, GROWTH, BACKOFF, INTERVAL = 2.0**16, 2.0, 0.5, 2000
#: added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does
CLIP_EPS = 1e-6


@dataclass
class LossScale:
    """The current loss scale and the clean steps since it last changed (``tracker``)."""

    scale: float = INIT
    tracker: int = 0

    def overflow(self) -> None:
        """Inf or NaN gradients: lower the scale; the step is skipped."""
        self.scale *= BACKOFF
        self.tracker = 0

    def clean(self) -> None:
        """A step without overflow: after ``INTERVAL`` of them in a row the scale grows."""
        self.tracker += 1
        if self.tracker >= INTERVAL:
            self.scale *= GROWTH
            self.tracker = 0


def unscale_and_clip(sumsq: float, scale: float | None, max_norm: float | None) -> tuple[float, float]:
    """The global L2 norm of the gradient (unscaled, before clipping) and the factor that unscales (``scale`` set)
    and clips it to ``max_norm`` (as torch.nn.utils.clip_grad_norm_), from its (scaled) squared norm ``sumsq``."""
    factor = 1.0
    if scale is not None:
        factor = 1.0 / scale
        sumsq *= factor * factor
    norm = math.sqrt(sumsq)
    if max_norm is not None and norm > max_norm:
        factor *= max_norm / (norm + CLIP_EPS)
    return norm, factor


def scaled_gradient_warning(name: str, outcome: str, ratio: float) -> str | None:
    """With ``loss=``, a gradient still multiplied by a loss scale (``scaler.scale(loss).backward()`` without
    unscaling) makes every predicted decrease ``scale`` times too large: the search shrinks the step until it
    fails, while the loss does fall, by a tiny fraction (``ratio``) of the prediction. The warning, or None."""
    if outcome not in ("failed", "unresolvable") or not 0.0 < ratio < 1e-3:
        return None
    return (
        f"{name}: the loss fell along the search direction, but only {ratio:.2g} times the decrease the gradient "
        "predicts, and the search found no step: is the gradient still scaled (AMP GradScaler)? Unscale before "
        "step(loss=...): scaler.step(opt, closure, loss=loss) does, or scaler.unscale_(opt); or use step(closure) "
        "with loss_scale='dynamic'"
    )
