"""Triton kernels and launchers of the fused ops (the ``triton`` backend).

The math and its order are those of ``lsfused.reference`` (fp32 math for fp32/bf16/fp16 parameters, fp64 for fp64
ones, cast on store). Per-trial scalars (eta) and the step's hyperparameters are read from device tensors, never
``tl.constexpr``, so a new trial neither recompiles nor syncs. Sums are float64 per-block partials reduced in a second
pass (no atomics), so they are deterministic. One launch per range (param group) of a bucket.

On CPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lsfused import reference
from lsfused.reference import HP_COLUMNS, MODE_ADAM, NORM_COLUMNS, mark_skipped_sums, pairs

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs programs one after another: fewer, larger blocks are much faster there.
# enable_fp_fusion=False: no FMA contraction, so results match the reference's separately rounded ops bit for bit.
BLOCK = 8192 if _INTERPRET else 1024
NUM_WARPS = 4


@triton.jit
def _direction_and_norms_kernel(
    g_ptr,
    w_ptr,
    w0_ptr,
    d_ptr,
    v_ptr,
    m_ptr,
    dm_ptr,
    hp_ptr,
    eta_ptr,
    part_ptr,
    start,
    n,
    TRIAL: tl.constexpr,
    MODE_ADAM_: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_DM: tl.constexpr,
    HAS_WD: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Pass A: v = b2 v + (1-b2) g², d = -g/(sqrt(v)/sqrt(1-b2^k) + eps), w0 = w, float64 partial sums.

    TRIAL 1 (2): also the first trial w = w0 + eta*d (eta*dm), unless the range's eta is NaN."""
    pid = tl.program_id(0)
    local = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = local < n
    offs = start + local
    cdt = w0_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(cdt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(cdt)
    if HAS_WD:
        w = w * tl.load(hp_ptr + 5).to(cdt)
    tl.store(w0_ptr + offs, w, mask=mask)
    g64 = g.to(tl.float64)
    if MODE_ADAM_:
        b1 = tl.load(hp_ptr + 0)
        b2 = tl.load(hp_ptr + 1)
        eps = tl.load(hp_ptr + 2).to(cdt)
        bc1 = tl.load(hp_ptr + 3).to(cdt)
        sqrt_bc2 = tl.load(hp_ptr + 4).to(cdt)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        v = v * b2.to(cdt) + (g * (1.0 - b2).to(cdt)) * g
        tl.store(v_ptr + offs, v, mask=mask)
        if IS_F64:  # noqa: SIM108 - a compile-time branch: sqrt_rn takes fp32 only
            root = tl.sqrt(v)  # fp64 sqrt is IEEE (correctly rounded)
        else:
            root = tl.sqrt_rn(v)  # correctly rounded, as the reference's
        denom = root / sqrt_bc2 + eps
        d = -(g / denom)
        s = tl.where(mask, g64 * g64 / denom.to(tl.float64), 0.0)
        gdm = tl.zeros_like(s)
        if HAS_M:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            m = m * b1.to(cdt) + g * (1.0 - b1).to(cdt)
            tl.store(m_ptr + offs, m, mask=mask)
        else:
            m = g
        if HAS_DM:
            dm = -((m / bc1) / denom)
            tl.store(dm_ptr + offs, dm, mask=mask)
            gdm = tl.where(mask, g64 * dm.to(tl.float64), 0.0)
    else:
        d = -g
        s = g64 * g64
        gdm = tl.zeros_like(s)
    d = tl.where(mask, d, 0.0)
    tl.store(d_ptr + offs, d, mask=mask)
    if TRIAL != 0:
        eta64 = tl.load(eta_ptr)
        eta = eta64.to(cdt)
        step = dm if TRIAL == 2 else d
        live = local < tl.where(eta64 == eta64, n, 0)  # a NaN eta: no trial on this range
        tl.store(w_ptr + offs, (w + eta * step).to(w_ptr.dtype.element_ty), mask=live)
    d64 = d.to(tl.float64)
    base = part_ptr + pid * 5
    tl.store(base + 0, tl.sum(s, axis=0))
    tl.store(base + 1, tl.sum(g64 * g64, axis=0))
    tl.store(base + 2, tl.sum(g64 * d64, axis=0))
    tl.store(base + 3, tl.sum(d64 * d64, axis=0))
    tl.store(base + 4, tl.sum(gdm, axis=0))


@triton.jit
def _trial_step_kernel(w_ptr, w0_ptr, d_ptr, eta_ptr, start, n, BLOCK_: tl.constexpr):
    """Pass B: w = w0 + eta*d (eta read from device memory), cast on store."""
    pid = tl.program_id(0)
    local = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = local < n
    offs = start + local
    cdt = w0_ptr.dtype.element_ty
    eta = tl.load(eta_ptr).to(cdt)
    w0 = tl.load(w0_ptr + offs, mask=mask)
    d = tl.load(d_ptr + offs, mask=mask)
    tl.store(w_ptr + offs, (w0 + eta * d).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _restore_kernel(w_ptr, w0_ptr, start, n, BLOCK_: tl.constexpr):
    """Revert: w = w0 (exact: w0 holds w's values)."""
    pid = tl.program_id(0)
    local = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = local < n
    offs = start + local
    tl.store(w_ptr + offs, tl.load(w0_ptr + offs, mask=mask).to(w_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


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
    if trial_dm and (dm is None or mode != MODE_ADAM):
        raise ValueError("trial_dm needs the momentum direction buffer dm")
    spans = pairs(ranges)
    if eta is not None:
        eta = eta.to(device=g.device, dtype=torch.float64)
    width = len(HP_COLUMNS)
    hp_dev = torch.tensor(hp, dtype=torch.float64).to(g.device, non_blocking=True)
    adam = mode == MODE_ADAM
    out = torch.zeros(len(spans), len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
    for r, (a, b) in enumerate(spans):
        n = b - a
        if n == 0:
            continue
        nblocks = triton.cdiv(n, BLOCK)
        part = torch.empty(nblocks, len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
        _direction_and_norms_kernel[(nblocks,)](
            g,
            w,
            w0,
            d,
            v if adam else d,
            m if (adam and m is not None) else d,
            dm if (adam and dm is not None) else d,
            hp_dev[r * width :],
            eta[r:] if eta is not None else hp_dev,
            part,
            a,
            n,
            TRIAL=0 if eta is None else (2 if trial_dm else 1),
            MODE_ADAM_=adam,
            HAS_M=adam and m is not None,
            HAS_DM=adam and dm is not None,
            HAS_WD=hp[r * width + 5] != 1.0,
            IS_F64=w0.dtype == torch.float64,
            BLOCK_=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        out[r] = part.sum(0)
    if not all_sums:  # memory-bound on a GPU: the sums are computed anyway
        mark_skipped_sums(out)
    return out


def trial_step(w: Tensor, w0: Tensor, d: Tensor, ranges: list[int], eta: Tensor) -> None:
    eta = eta.to(device=w.device, dtype=torch.float64)
    for r, (a, b) in enumerate(pairs(ranges)):
        if b > a:
            _trial_step_kernel[_grid(b - a)](
                w, w0, d, eta[r:], a, b - a, BLOCK_=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False
            )


def restore(w: Tensor, w0: Tensor, ranges: list[int]) -> None:
    for a, b in pairs(ranges):
        if b > a:
            _restore_kernel[_grid(b - a)](w, w0, a, b - a, BLOCK_=BLOCK, num_warps=NUM_WARPS)


# No Triton kernels for the companion reductions: the reference's torch code runs them.
grad_check = reference.grad_check
absorbed_counts = reference.absorbed_counts
