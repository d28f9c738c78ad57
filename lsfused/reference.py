"""Pure-torch reference implementations of the fused ops (the ``torch`` backend).

Every other backend must match these. All ops work on the flat buffers of one bucket (see ``lsfused.flat``) over
``ranges``, a flat list ``[start0, end0, start1, end1, ...]`` of offsets into the buffers, one pair per param group
present in the bucket. Per-range hyperparameters come as a flat list of ``len(HP_COLUMNS)`` floats per range.

Elementwise math is done in the state dtype (float32 for fp32/bf16/fp16 parameters, float64 for float64 ones),
in this order, each operation rounded on its own (no fused multiply-add), so that every backend can reproduce it
bit for bit; hyperparameters are rounded to the state dtype first (``1-b1`` is computed in float64, then rounded)::

    m     = b1*m + (1-b1)*g                       (only when a momentum buffer exists)
    v     = b2*v + ((1-b2)*g)*g
    denom = sqrt(v)/sqrt(1-b2^k) + eps            (Adam's bias-corrected denominator, as torch.optim.Adam; the
                                                   divisions are true divisions, also on CUDA)
    d     = -g/denom                              (search direction; SGD: d = -g)
    dm    = -(m/(1-b1^k))/denom                   (momentum direction, applied after an accepted search)
    w0    = w*wd_scale                            (snapshot; wd_scale = 1 - weight_decay*eta_prev, usually 1)

No direction is stored: ``d`` and ``dm`` exist only inside the ops. Pass A uses them for its sums and its fused trial;
``trial_step`` and ``absorbed_counts`` recompute them (``direction``) from ``g`` and the moments Pass A left, with the
same operations, so every backend's trials are bit for bit what Pass A summed. The state is Adam's plus the snapshot
``w0``, and ``g`` must not change between Pass A and the end of the step.

With ``eta`` (one float64 entry per range, NaN: none), Pass A also writes the first trial point of a search in the
same pass, ``w = w0 + eta*d`` (``w0 + eta*dm`` with ``trial_dm``), with the op order of ``trial_step``, so the result
is bit-identical to Pass A followed by ``trial_step``; ranges whose entry is NaN leave ``w`` as it is.

The decision scalars are accumulated in float64 from the stored (rounded) values, per range::

    s   = sum(g*g/denom)   (SGD: sum(g*g))       the Armijo decrease term, Eq. 5 of arXiv 2403.18506
    gg  = sum(g*g),  gd = sum(g*d),  dd = sum(d*d),  gdm = sum(g*dm)

No decision uses ``gg`` and ``dd`` (the precision report does): with ``all_sums=False`` a backend may skip them, and
their columns are NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Columns of the partial-sum tensor returned by direction_and_norms; DIAGNOSTIC_COLUMNS: those only all_sums=True
# fills in (no decision uses them).
NORM_COLUMNS = ("s", "gg", "gd", "dd", "gdm")
DIAGNOSTIC_COLUMNS = (1, 3)
# Columns of the per-range hyperparameter tensor passed to direction_and_norms.
HP_COLUMNS = ("b1", "b2", "eps", "bc1", "sqrt_bc2", "wd_scale")

MODE_SGD = 0
MODE_ADAM = 1


def sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded square root, as IEEE 754 and every other backend compute it.

    torch's vectorized CPU sqrt is not (about 1% of results are an ulp off). For fp32, sqrt in float64 then one
    rounding is exact; for fp64 on CPU, numpy's sqrt is the IEEE one (CUDA's fp64 sqrt already is).
    """
    if x.dtype != torch.float64:
        return x.double().sqrt().to(x.dtype)
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return x.sqrt()


def pairs(ranges: list[int]) -> list[tuple[int, int]]:
    """``[a0, b0, a1, b1, ...]`` -> ``[(a0, b0), (a1, b1), ...]``."""
    return list(zip(ranges[0::2], ranges[1::2], strict=True))


def direction(g: Tensor, v: Tensor | None, m: Tensor | None, hp: list[float], mode: int, along_dm: bool) -> Tensor:
    """The search direction ``d`` (``dm`` with ``along_dm``) of one range from the gradient and the moments Pass A
    left, with Pass A's operations: every backend recomputes it where it is read (trials, the absorbed count) from
    the same stored values, so no direction buffer is kept. ``hp``: the range's row of ``HP_COLUMNS``; ``g``: the
    range's gradient in the state dtype."""
    if mode == MODE_SGD:
        if along_dm:
            raise ValueError("SGD has no momentum direction")
        return torch.neg(g)
    _, _, eps, bc1, sqrt_bc2, _ = hp
    denom = (sqrt_rn(v) / _divisor(sqrt_bc2, v)).add_(eps)
    if along_dm:
        src = m if m is not None else g
        return torch.div(src / _divisor(bc1, v), denom).neg_()
    return torch.div(g, denom).neg_()


def _divisor(x: float, like: Tensor) -> Tensor:
    """``x`` as a 0-d tensor on ``like``'s device: CUDA divides by a Python number as a multiply by its reciprocal
    (not correctly rounded); by a device tensor it divides."""
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def hp_row(hp: list[float], r: int) -> list[float]:
    """Range ``r``'s row of a flat per-range hyperparameter list (``HP_COLUMNS``)."""
    width = len(HP_COLUMNS)
    return hp[r * width : (r + 1) * width]


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
    """Pass A: update the moments and write the snapshot; return float64 sums ``[R, 5]`` (``gdm`` only
    ``with_dm``: the optimizer has a momentum direction).

    With ``eta`` (float64, one entry per range), also the first trial ``w = w0 + eta[r]*d`` (``dm`` with
    ``trial_dm``) on every range whose entry is not NaN, exactly as ``trial_step`` writes it. With
    ``all_sums=False`` the ``gg`` and ``dd`` columns are NaN (computed here anyway; fast backends skip them).
    """
    if trial_dm and not with_dm:
        raise ValueError("trial_dm needs with_dm (an optimizer with a momentum direction)")
    spans = pairs(ranges)
    etas = [math.nan] * len(spans) if eta is None else eta.detach().cpu().tolist()
    out = torch.zeros(len(spans), len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
    for r, (a, b) in enumerate(spans):
        row = hp_row(hp, r)
        b1, b2, eps, bc1, sqrt_bc2, wd_scale = row
        gr = g[a:b].to(w0.dtype)
        if wd_scale == 1.0:
            w0[a:b].copy_(w[a:b])
        else:
            w0[a:b].copy_(w[a:b].to(w0.dtype) * wd_scale)
        g64 = gr.double()
        vr = mr = None
        if mode == MODE_SGD:
            s = g64 * g64
        else:
            vr, mr = v[a:b], None if m is None else m[a:b]
            if mr is not None:
                mr.mul_(b1).add_(gr * (1.0 - b1))
            vr.mul_(b2).add_(gr * (1.0 - b2) * gr)
            denom = (sqrt_rn(vr) / _divisor(sqrt_bc2, vr)).add_(eps)
            s = g64 * g64 / denom.double()
        d64 = direction(gr, vr, mr, row, mode, False).double()
        out[r, 0] = s.sum()
        out[r, 1] = (g64 * g64).sum()
        out[r, 2] = (g64 * d64).sum()
        out[r, 3] = (d64 * d64).sum()
        if with_dm:
            out[r, 4] = (g64 * direction(gr, vr, mr, row, mode, True).double()).sum()
        if not math.isnan(etas[r]):
            trial_step(w, w0, g, v, m, [a, b], row, mode, torch.tensor(etas[r : r + 1], dtype=torch.float64), trial_dm)
    if not all_sums:
        mark_skipped_sums(out)
    return out


def mark_skipped_sums(out: Tensor) -> None:
    """Pass A without ``all_sums``: NaN in the ``gg`` and ``dd`` columns of its ``[R, 5]`` sums (not computed)."""
    for c in DIAGNOSTIC_COLUMNS:
        out[:, c] = math.nan


def trial_step(
    w: Tensor,
    w0: Tensor,
    g: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    mode: int,
    eta: Tensor,
    along_dm: bool = False,
) -> None:
    """Pass B: ``w[r] = w0[r] + eta[r]*dir[r]`` for each listed range, in the state dtype, cast on store; ``dir``
    (``d``, or ``dm`` with ``along_dm``) recomputed from ``g`` and the moments (``direction``).

    ``hp`` holds Pass A's rows for the listed ranges; ``eta`` is a float64 tensor on the buffers' device with one
    entry per range, rounded to the state dtype before the multiply.
    """
    eta_s = eta.to(device=w0.device, dtype=w0.dtype)
    for r, (a, b) in enumerate(pairs(ranges)):
        d = direction(g[a:b].to(w0.dtype), _part(v, a, b), _part(m, a, b), hp_row(hp, r), mode, along_dm)
        w[a:b].copy_(w0[a:b] + eta_s[r] * d)


def _part(t: Tensor | None, a: int, b: int) -> Tensor | None:
    return None if t is None else t[a:b]


def restore(w: Tensor, w0: Tensor, ranges: list[int]) -> None:
    """Revert: ``w[r] = w0[r]`` (bit-exact: w0 holds w exactly)."""
    for a, b in pairs(ranges):
        w[a:b].copy_(w0[a:b])


def absorbed_counts(
    w: Tensor,
    w0: Tensor,
    g: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    mode: int,
    along_dm: bool = False,
) -> Tensor:
    """Per range, float64 ``[moving, absorbed]``: elements with ``dir != 0`` (``dir`` as ``trial_step`` computes
    it), and those of them where the trial left the stored parameter unchanged (``|eta*dir|`` below half an ulp of
    ``w0`` in the parameter's dtype)."""
    spans = pairs(ranges)
    out = torch.zeros(len(spans), 2, dtype=torch.float64, device=w.device)
    for r, (a, b) in enumerate(spans):
        d = direction(g[a:b].to(w0.dtype), _part(v, a, b), _part(m, a, b), hp_row(hp, r), mode, along_dm)
        moving = d != 0
        out[r, 0] = moving.sum()
        out[r, 1] = (moving & (w[a:b] == w0[a:b].to(w.dtype))).sum()
    return out


def grad_check(g: Tensor) -> tuple[int, float]:
    """(number of non-finite entries of ``g``, float64 sum of ``g*g``) from one read of ``g``: the non-finite check
    and the squared L2 norm that gradient clipping needs.

    One reduction: NaN and inf propagate into it, so the exact count runs only when the sum is not finite;
    isfinite() on every step costs ~30x more. Finite fp32/fp16/bf16 squares cannot overflow in float64.
    """
    if not g.numel():
        return 0, 0.0
    sumsq = float(torch.linalg.vector_norm(g, dtype=torch.float64).square())
    if math.isfinite(sumsq):
        return 0, sumsq
    return int((~torch.isfinite(g)).sum()), sumsq
