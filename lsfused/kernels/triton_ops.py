"""Triton kernels and launchers of the fused ops (the ``triton`` backend).

The math and its order are those of ``lsfused.reference`` (fp32 math for fp32/bf16/fp16 parameters, fp64 for fp64
ones, cast on store), every operation rounded on its own: launches pass ``enable_fp_fusion=False`` (no FMA), and
``_direction`` uses the correctly rounded sqrt and division (Triton's fp32 ``/`` is ``div.full``, up to 2 ulp off).
No direction buffer is stored: Pass A, the trials and the absorbed count all compute ``d`` / ``dm`` from g, v, m
with ``_direction``, so they agree bit for bit. Per-trial scalars (eta) and the step's hyperparameters are read from
device tensors, never ``tl.constexpr``, so a new trial neither recompiles nor syncs. Sums are float64 per-block
partials reduced in a second pass (no atomics), so they are deterministic. One launch per range (param group).

On CPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lsfused import reference
from lsfused.reference import HP_COLUMNS, MODE_ADAM, MODE_SGD, NORM_COLUMNS, mark_skipped_sums, pairs

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs programs one after another: fewer, larger blocks are much faster there.
BLOCK = 8192 if _INTERPRET else 1024
NUM_WARPS = 4
_WIDTH = len(HP_COLUMNS)


@triton.jit
def _direction(x, v, hp_ptr, ADAM: tl.constexpr, ALONG_DM: tl.constexpr, IS_F64: tl.constexpr):
    """(direction, Adam's denominator) in the state dtype, with ``reference.direction``'s operations. ``x``: the
    numerator, g for d, for dm the momentum m (g without one); ``v``: the second moment (unused for SGD)."""
    if ADAM:
        cdt = v.dtype
        eps = tl.load(hp_ptr + 2).to(cdt)
        sqrt_bc2 = tl.load(hp_ptr + 4).to(cdt)
        if ALONG_DM:
            x = _div_rn(x, tl.load(hp_ptr + 3).to(cdt), IS_F64)
        denom = _div_rn(_sqrt_rn(v, IS_F64), sqrt_bc2, IS_F64) + eps
        out = -_div_rn(x, denom, IS_F64)
    else:
        denom = x
        out = -x
    return out, denom


@triton.jit
def _div_rn(a, b, IS_F64: tl.constexpr):
    """Correctly rounded ``a / b``: Triton's fp32 ``/`` is ``div.full.f32`` (up to 2 ulp off); fp64's is IEEE."""
    if IS_F64:  # noqa: SIM108 - a compile-time branch: div_rn takes fp32 only
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def _sqrt_rn(x, IS_F64: tl.constexpr):
    """Correctly rounded square root."""
    if IS_F64:  # noqa: SIM108 - a compile-time branch: sqrt_rn takes fp32 only
        r = tl.sqrt(x)  # fp64 sqrt is IEEE
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _direction_and_norms_kernel(
    g_ptr,
    w_ptr,
    w0_ptr,
    v_ptr,
    m_ptr,
    hp_ptr,
    eta_ptr,
    part_ptr,
    start,
    n,
    TRIAL: tl.constexpr,
    ADAM: tl.constexpr,
    HAS_M: tl.constexpr,
    WITH_DM: tl.constexpr,
    HAS_WD: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Pass A: v = b2 v + (1-b2) g², m = b1 m + (1-b1) g, w0 = w*wd_scale, float64 partial sums of d (and dm).

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
    if ADAM:
        b1 = tl.load(hp_ptr + 0)
        b2 = tl.load(hp_ptr + 1)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        v = v * b2.to(cdt) + (g * (1.0 - b2).to(cdt)) * g
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_M:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            m = m * b1.to(cdt) + g * (1.0 - b1).to(cdt)
            tl.store(m_ptr + offs, m, mask=mask)
        else:
            m = g
        d, denom = _direction(g, v, hp_ptr, ADAM, False, IS_F64)
        s = tl.where(mask, g64 * g64 / denom.to(tl.float64), 0.0)
    else:
        m = g
        v = g
        d, _ = _direction(g, v, hp_ptr, ADAM, False, IS_F64)
        s = g64 * g64
    d = tl.where(mask, d, 0.0)
    if WITH_DM:
        dm, _ = _direction(m, v, hp_ptr, ADAM, True, IS_F64)
        dm = tl.where(mask, dm, 0.0)
        gdm = g64 * dm.to(tl.float64)
    else:
        gdm = tl.zeros_like(s)
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
def _load_direction(
    g_ptr,
    v_ptr,
    m_ptr,
    hp_ptr,
    offs,
    mask,
    cdt: tl.constexpr,
    ADAM: tl.constexpr,
    ALONG_DM: tl.constexpr,
    HAS_M: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """The direction at ``offs`` from the buffers Pass A left: reads g, v (Adam), or m and v (along dm with m)."""
    if ALONG_DM and HAS_M:
        x = tl.load(m_ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(g_ptr + offs, mask=mask, other=0.0).to(cdt)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0) if ADAM else x
    out, _ = _direction(x, v, hp_ptr, ADAM, ALONG_DM, IS_F64)
    return out


@triton.jit
def _trial_step_kernel(
    w_ptr,
    w0_ptr,
    g_ptr,
    v_ptr,
    m_ptr,
    hp_ptr,
    eta_ptr,
    start,
    n,
    ADAM: tl.constexpr,
    ALONG_DM: tl.constexpr,
    HAS_M: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Pass B: w = w0 + eta*dir (eta read from device memory), cast on store."""
    pid = tl.program_id(0)
    local = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = local < n
    offs = start + local
    cdt = w0_ptr.dtype.element_ty
    step = _load_direction(g_ptr, v_ptr, m_ptr, hp_ptr, offs, mask, cdt, ADAM, ALONG_DM, HAS_M, IS_F64)
    eta = tl.load(eta_ptr).to(cdt)
    w0 = tl.load(w0_ptr + offs, mask=mask)
    tl.store(w_ptr + offs, (w0 + eta * step).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _absorbed_counts_kernel(
    w_ptr,
    w0_ptr,
    g_ptr,
    v_ptr,
    m_ptr,
    hp_ptr,
    part_ptr,
    start,
    n,
    ADAM: tl.constexpr,
    ALONG_DM: tl.constexpr,
    HAS_M: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    """Per block: [count(dir != 0), count(dir != 0 and w == w0 in the parameter's dtype)]."""
    pid = tl.program_id(0)
    local = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = local < n
    offs = start + local
    cdt = w0_ptr.dtype.element_ty
    step = _load_direction(g_ptr, v_ptr, m_ptr, hp_ptr, offs, mask, cdt, ADAM, ALONG_DM, HAS_M, IS_F64)
    moving = mask & (step != 0)
    w = tl.load(w_ptr + offs, mask=mask)
    w0 = tl.load(w0_ptr + offs, mask=mask).to(w_ptr.dtype.element_ty)
    tl.store(part_ptr + pid * 2, tl.sum(moving.to(tl.int64), axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum((moving & (w == w0)).to(tl.int64), axis=0))


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


def _hp(hp: list[float], device: torch.device) -> Tensor:
    return torch.tensor(hp, dtype=torch.float64).to(device, non_blocking=True)


def _direction_flags(w0: Tensor, m: Tensor | None, mode: int, along_dm: bool) -> dict:
    """The compile-time flags of a kernel that recomputes the direction (``reference.direction``'s error for SGD)."""
    if along_dm and mode == MODE_SGD:
        raise ValueError("SGD has no momentum direction")
    return {
        "ADAM": mode == MODE_ADAM,
        "ALONG_DM": along_dm,
        "HAS_M": m is not None,
        "IS_F64": w0.dtype == torch.float64,
    }


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
    if trial_dm and not with_dm:
        raise ValueError("trial_dm needs with_dm (an optimizer with a momentum direction)")
    flags = _direction_flags(w0, m, mode, with_dm)
    spans = pairs(ranges)
    if eta is not None:
        eta = eta.to(device=g.device, dtype=torch.float64)
    hp_dev = _hp(hp, g.device)
    out = torch.zeros(len(spans), len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
    for r, (a, b) in enumerate(spans):
        if b == a:
            continue
        nblocks = triton.cdiv(b - a, BLOCK)
        part = torch.empty(nblocks, len(NORM_COLUMNS), dtype=torch.float64, device=g.device)
        _direction_and_norms_kernel[(nblocks,)](
            g,
            w,
            w0,
            w0 if v is None else v,
            w0 if m is None else m,
            hp_dev[r * _WIDTH :],
            hp_dev if eta is None else eta[r:],
            part,
            a,
            b - a,
            TRIAL=0 if eta is None else (2 if trial_dm else 1),
            ADAM=flags["ADAM"],
            HAS_M=flags["HAS_M"],
            WITH_DM=with_dm,
            HAS_WD=hp[r * _WIDTH + 5] != 1.0,
            IS_F64=flags["IS_F64"],
            BLOCK_=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        out[r] = part.sum(0)
    if not all_sums:  # memory-bound on a GPU: the sums are computed anyway
        mark_skipped_sums(out)
    return out


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
    flags = _direction_flags(w0, m, mode, along_dm)
    eta = eta.to(device=w.device, dtype=torch.float64)
    hp_dev = _hp(hp, w.device)
    for r, (a, b) in enumerate(pairs(ranges)):
        if b > a:
            _trial_step_kernel[_grid(b - a)](
                w,
                w0,
                g,
                w0 if v is None else v,
                w0 if m is None else m,
                hp_dev[r * _WIDTH :],
                eta[r:],
                a,
                b - a,
                **flags,
                BLOCK_=BLOCK,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


def restore(w: Tensor, w0: Tensor, ranges: list[int]) -> None:
    for a, b in pairs(ranges):
        if b > a:
            _restore_kernel[_grid(b - a)](w, w0, a, b - a, BLOCK_=BLOCK, num_warps=NUM_WARPS)


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
    # One read pass; the reference's torch ops (which the cpp backend uses off the CPU) cost several.
    flags = _direction_flags(w0, m, mode, along_dm)
    spans = pairs(ranges)
    hp_dev = _hp(hp, w.device)
    out = torch.zeros(len(spans), 2, dtype=torch.float64, device=w.device)
    for r, (a, b) in enumerate(spans):
        if b == a:
            continue
        nblocks = triton.cdiv(b - a, BLOCK)
        part = torch.empty(nblocks, 2, dtype=torch.int64, device=w.device)
        _absorbed_counts_kernel[(nblocks,)](
            w,
            w0,
            g,
            w0 if v is None else v,
            w0 if m is None else m,
            hp_dev[r * _WIDTH :],
            part,
            a,
            b - a,
            **flags,
            BLOCK_=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        out[r] = part.sum(0).double()
    return out


# No Triton kernel for the gradient check: the reference's single torch reduction runs it.
grad_check = reference.grad_check
