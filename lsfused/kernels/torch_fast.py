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

The trials and the absorbed count recompute ``d`` (``dm``) over the same chunks with the same ops from the g, v, m
Pass A left, so they are bit for bit this backend's Pass A directions.

So the buffers may differ from the reference in the last bits and the sums by about 1e-7 relative (``gdm``, a signed
sum: up to about 2e-5; the decisions agree unless a trial's Armijo test is that close to its threshold); the step is
still a transaction (``w0`` is an exact copy of ``w``; reverting is bit-exact). ``auto`` falls back to this backend
when neither the C++ extension nor Triton can run; ask for ``backend="torch"`` for the reference itself. Measured on
a 2-core Zen 3, an accepted AdamSLS step with ``betas=(0, 0.999)``, interleaved with torch ``Adam(fused=True)``:
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
from lsfused.reference import MODE_SGD, NORM_COLUMNS, hp_row, mark_skipped_sums, pairs

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


def _denominator(v: Tensor, eps: float, sqrt_bc2: float, out: Tensor) -> Tensor:
    """``sqrt_bc2 * denom = sqrt(v) + eps*sqrt_bc2`` into ``out``."""
    return torch.sqrt(v, out=out).add_(eps * sqrt_bc2)


def _along(gc: Tensor, mc: Tensor | None, den: Tensor, row: list[float], along_dm: bool, out: Tensor) -> Tensor:
    """Adam's ``d`` (``dm`` with ``along_dm``) from the chunk's ``_denominator`` into ``out`` (may be ``den``)."""
    _, _, _, bc1, sqrt_bc2, _ = row
    if along_dm:
        return torch.addcdiv(_zero(out), mc if mc is not None else gc, den, value=-sqrt_bc2 / bc1, out=out)
    return torch.addcdiv(_zero(out), gc, den, value=-sqrt_bc2, out=out)


def _direction(gc: Tensor, vc: Tensor | None, mc: Tensor | None, row: list[float], mode: int, along_dm: bool, out):
    """The chunk's direction (``d``, ``dm`` with ``along_dm``) into ``out``, with Pass A's ops (``_denominator``,
    ``_along``): the trials and the absorbed count recompute it from the same g, v, m, so it is bit-identical to what
    Pass A summed."""
    if mode == MODE_SGD:
        if along_dm:
            raise ValueError("SGD has no momentum direction")
        return torch.neg(gc, out=out)
    _, _, eps, _, sqrt_bc2, _ = row
    return _along(gc, mc, _denominator(vc, eps, sqrt_bc2, out), row, along_dm, out)


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _scratch(spans: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> Tensor:
    longest = max((b - a for a, b in spans), default=0)
    return torch.empty(min(CHUNK, longest) if device.type == "cpu" else longest, dtype=dtype, device=device)


def direction_and_norms(
    g: Tensor,
    w: Tensor,
    w0: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    mode: int,
    with_dm: bool = False,
    eta: Tensor | None = None,
    trial_dm: bool = False,
    all_sums: bool = True,
) -> Tensor:
    """Pass A (see the module docstring for how it rounds); with ``eta``, also the first trial on every range
    whose entry is not NaN. ``all_sums=False`` skips the sums ``gg`` and ``dd`` (NaN columns)."""
    if trial_dm and not with_dm:
        raise ValueError("trial_dm needs with_dm (an optimizer with a momentum direction)")
    spans = pairs(ranges)
    etas = [math.nan] * len(spans) if eta is None else eta.detach().cpu().tolist()
    sums: list[list[Tensor]] = []
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    sdt = w0.dtype
    # Two chunk-sized temporaries: g*g (then dm), and the denominator (then d, in place).
    scratch_full, den_full = _scratch(spans, sdt, g.device), _scratch(spans, sdt, g.device)
    for r, (a, b) in enumerate(spans):
        row = hp_row(hp, r)
        b1, b2, eps, _, sqrt_bc2, wd_scale = row
        acc = [zero] * len(NORM_COLUMNS)
        for i, j in _chunks(a, b, g.device):
            scratch, dc = scratch_full[: j - i], den_full[: j - i]
            gc = g[i:j] if g.dtype == sdt else g[i:j].to(sdt)
            wc, w0c = w[i:j], w0[i:j]
            if wd_scale == 1.0:
                w0c.copy_(wc)
            else:
                w0c.copy_(wc.to(sdt) * wd_scale)
            torch.mul(gc, gc, out=scratch)
            dmc = None
            if mode == MODE_SGD:
                gg = scratch.sum().double()
                torch.neg(gc, out=dc)
                part = [gg, gg, -gg, gg, zero]
            else:
                mc = None if m is None else m[i:j]
                if mc is not None:
                    mc.lerp_(gc, 1.0 - b1)  # b1*m + (1-b1)*g
                v[i:j].lerp_(scratch, 1.0 - b2)  # b2*v + (1-b2)*g*g
                gg = scratch.sum().double() if all_sums else zero
                den = _denominator(v[i:j], eps, sqrt_bc2, dc)  # one per chunk: dm reads it, then d overwrites it
                gdm = zero
                if with_dm:
                    dmc = _along(gc, mc, den, row, True, scratch)
                    gdm = _dot(gc, dmc)
                _along(gc, mc, den, row, False, dc)
                gd = _dot(gc, dc)
                part = [-gd, gg, gd, _dot(dc, dc) if all_sums else zero, gdm]
            acc = [x + y for x, y in zip(acc, part, strict=True)]
            if not math.isnan(etas[r]):
                _trial(wc, w0c, dmc if trial_dm else dc, etas[r])
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


def _directions(g, w0, v, m, ranges, hp, mode, along_dm):
    """Per chunk of the listed ranges (Pass A's chunks): ``(r, i, j, direction)``, the direction in a reused
    temporary."""
    spans = pairs(ranges)
    den_full = _scratch(spans, w0.dtype, g.device)
    for r, (a, b) in enumerate(spans):
        row = hp_row(hp, r)
        for i, j in _chunks(a, b, g.device):
            gc = g[i:j] if g.dtype == den_full.dtype else g[i:j].to(den_full.dtype)
            vc, mc = (None if t is None else t[i:j] for t in (v, m))
            yield r, i, j, _direction(gc, vc, mc, row, mode, along_dm, den_full[: j - i])


def trial_step(w, w0, g, v, m, ranges: list[int], hp: list[float], mode: int, eta: Tensor, along_dm=False) -> None:
    """Pass B: ``w = w0 + eta[r]*dir`` (the direction recomputed per chunk; one fused multiply-add per element,
    cast on store)."""
    etas = eta.detach().cpu().tolist()
    for r, i, j, d in _directions(g, w0, v, m, ranges, hp, mode, along_dm):
        _trial(w[i:j], w0[i:j], d, etas[r])


def absorbed_counts(w, w0, g, v, m, ranges: list[int], hp: list[float], mode: int, along_dm=False) -> Tensor:
    """``reference.absorbed_counts`` with this backend's direction."""
    out = torch.zeros(len(ranges) // 2, 2, dtype=torch.float64, device=w.device)
    for r, i, j, d in _directions(g, w0, v, m, ranges, hp, mode, along_dm):
        moving = d != 0
        out[r, 0] += moving.sum()
        out[r, 1] += (moving & (w[i:j] == w0[i:j].to(w.dtype))).sum()
    return out


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
