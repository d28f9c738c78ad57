"""The ``torch-fast`` backend: the fused ops written with a few in-place torch ops per chunk, for machines where the
C++ extension cannot be built (no compiler) and Triton has no GPU.

The ``torch`` backend (``lsfused.reference``) defines the math bit for bit: every product rounded on its own, a
correctly rounded square root, the decision sums formed from float64 copies of the buffers. That costs many
full-size float64 temporaries per step (80-150x fused Adam on bert-base). This backend computes the same
quantities with vectorized state-dtype ops over chunks of ``CHUNK`` elements, so the temporaries stay in cache:

    v     = lerp(v, g*g, 1-b2)           (v + (1-b2)*(g*g - v): b2*v + (1-b2)*g*g rounded differently)
    m     = lerp(m, g, 1-b1)
    q     = sqrt(v) + eps*sqrt(1-b2^k)   (= sqrt(1-b2^k) * denom; torch's sqrt, maybe an ulp off)
    d     = -sqrt(1-b2^k) * g/q;  dm = -(sqrt(1-b2^k)/(1-b1^k)) * m/q      (one addcdiv each)
    gg = sum(g*g): the state-dtype products summed per chunk (cascaded); dd, gd, gdm: BLAS dots per chunk in
            the state dtype; the chunks' sums in float64 (gg and dd only with all_sums)
    s     = -gd                           (= sum(g*g/denom) up to the rounding of d)

So the buffers may differ from the reference in the last bits and the sums by about 1e-7 relative (``gdm``, a signed
sum: up to about 2e-5; the decisions agree unless a trial's Armijo test is that close to its threshold); the step is
still a transaction (``w0`` is an exact copy of ``w``; reverting is bit-exact). ``auto`` falls back to this backend
when neither the C++ extension nor Triton can run; ask for ``backend="torch"`` for the reference itself. Measured on
a 2-core Zen 1, an accepted AdamSLS step with ``betas=(0, 0.999)``, interleaved with torch ``Adam(fused=True)``:
2.7-3.3x fused Adam on bert-base's parameters and on 1M parameters in 20 tensors (three runs; the op sequence before
the lerp/addcdiv/dot rewrite, with 2^18-element chunks: 3.8-4.7x and 3.7-3.9x; the reference: 80-150x; the C++
backend: 1.4-1.6x).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from lsfused import reference
from lsfused.reference import HP_COLUMNS, MODE_SGD, NORM_COLUMNS, mark_skipped_sums, pairs

#: elements per chunk: a few buffers of this many fp32 elements fit in a CPU's L3 cache together, and each torch op's
#: fixed cost (microseconds) is spread over enough elements (2^19 measured fastest of 2^16..2^22 on bert-base here)
CHUNK = int(os.environ.get("LSFUSED_FAST_CHUNK", 1 << 19))


def _chunks(a: int, b: int, device: torch.device):
    """Cache-sized pieces on a CPU; on a GPU one piece (every op is a kernel launch, and there is no cache to fit)."""
    step = CHUNK if device.type == "cpu" else max(1, b - a)
    for i in range(a, b, step):
        yield i, min(i + step, b)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x*y)`` as a float64 0-d tensor (no host sync): the chunk's BLAS dot in the state dtype, the chunks' sums
    added in float64; half the time of a product and a cascaded sum. Relative error, fp32, 2^19 random terms
    (measured): about 1e-7 when the terms share a sign (``gd``, ``dd``), 1e-6 to 2e-5 of the result for a signed sum
    (``gdm``). A float64 reduction of fp32 data is not vectorized in torch: it costs 20-30x more."""
    return torch.dot(x, y).double()


def direction_and_norms(
    g: Tensor,
    w: Tensor,
    w0: Tensor,
    d: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    dm: Tensor | None,
    ranges: list[int],
    hp: list[float],
    mode: int,
    eta: Tensor | None = None,
    trial_dm: bool = False,
    all_sums: bool = True,
) -> Tensor:
    """Pass A (see the module docstring for how it rounds); with ``eta``, also the first trial on every range
    whose entry is not NaN. ``all_sums=False`` skips the sums ``gg`` and ``dd`` (NaN columns)."""
    if trial_dm and dm is None:
        raise ValueError("trial_dm needs the momentum direction buffer dm")
    spans = pairs(ranges)
    etas = [math.nan] * len(spans) if eta is None else eta.detach().cpu().tolist()
    width = len(HP_COLUMNS)
    sums: list[list[Tensor]] = []
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    zero_s = torch.zeros((), dtype=d.dtype, device=d.device)
    longest = max((b - a for a, b in spans), default=0)
    scratch_full = torch.empty(
        min(CHUNK, longest) if g.device.type == "cpu" else longest, dtype=d.dtype, device=d.device
    )
    for r, (a, b) in enumerate(spans):
        b1, b2, eps, bc1, sqrt_bc2, wd_scale = hp[r * width : (r + 1) * width]
        acc = [zero] * len(NORM_COLUMNS)
        for i, j in _chunks(a, b, g.device):
            scratch = scratch_full[: j - i]
            gc = g[i:j] if g.dtype == d.dtype else g[i:j].to(d.dtype)
            wc, w0c, dc = w[i:j], w0[i:j], d[i:j]
            if wd_scale == 1.0:
                w0c.copy_(wc)
            else:
                w0c.copy_(wc.to(w0.dtype) * wd_scale)
            torch.mul(gc, gc, out=scratch)
            if mode == MODE_SGD:
                gg = scratch.sum().double()
                torch.neg(gc, out=dc)
                part = [gg, gg, -gg, gg, zero]
            else:
                if m is not None:
                    m[i:j].lerp_(gc, 1.0 - b1)  # b1*m + (1-b1)*g
                v[i:j].lerp_(scratch, 1.0 - b2)  # b2*v + (1-b2)*g*g
                # sqrt_bc2 * denom = sqrt(v) + eps*sqrt_bc2, in d for now; d = -g/denom = -sqrt_bc2 * g/(that)
                torch.sqrt(v[i:j], out=dc).add_(eps * sqrt_bc2)
                gdm = zero
                if dm is not None:
                    src = m[i:j] if m is not None else gc
                    torch.addcdiv(zero_s, src, dc, value=-sqrt_bc2 / bc1, out=dm[i:j])
                    gdm = _dot(gc, dm[i:j])
                torch.addcdiv(zero_s, gc, dc, value=-sqrt_bc2, out=dc)
                gd = _dot(gc, dc)
                gg, dd = (scratch.sum().double(), _dot(dc, dc)) if all_sums else (zero, zero)
                part = [-gd, gg, gd, dd, gdm]
            acc = [x + y for x, y in zip(acc, part, strict=True)]
            if not math.isnan(etas[r]):
                step = dm[i:j] if trial_dm else dc
                _trial(wc, w0c, step, etas[r])
        sums.append(acc)
    if not sums:
        return torch.zeros(0, len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
    out = torch.stack([torch.stack(row) for row in sums])
    if not all_sums:
        mark_skipped_sums(out)
    return out


def _trial(w: Tensor, w0: Tensor, d: Tensor, eta: float) -> None:
    if w.dtype == d.dtype:
        torch.add(w0, d, alpha=eta, out=w)
    else:
        w.copy_(torch.add(w0, d, alpha=eta))


def trial_step(w: Tensor, w0: Tensor, d: Tensor, ranges: list[int], eta: Tensor) -> None:
    """Pass B: ``w = w0 + eta[r]*d`` (one fused multiply-add per element, cast on store)."""
    for (a, b), e in zip(pairs(ranges), eta.detach().cpu().tolist(), strict=True):
        _trial(w[a:b], w0[a:b], d[a:b], e)


def grad_check(g: Tensor) -> tuple[int, float]:
    """``reference.grad_check`` with the sum in ``g``'s dtype: torch's float64 reduction of fp32 data is not
    vectorized (4 ns per element). Falls back to the reference's float64 sum when that is not finite (an entry is,
    or the squares overflowed the dtype)."""
    if g.numel() and g.dtype != torch.float64:
        sumsq = float(torch.linalg.vector_norm(g)) ** 2
        if math.isfinite(sumsq):
            return 0, sumsq
    return reference.grad_check(g)


restore = reference.restore
absorbed_counts = reference.absorbed_counts
