"""The optimizer's flat buffers and the passes over them: laying the parameters out in buckets, the gradient
check, Pass A (direction, moments and every sum the test needs, optionally writing the first trial), Pass B
(``w = w0 + eta*dir``), the bit-exact restore ``w = w0`` and the absorbed-update count.

Each function takes the buckets and the backend's ops (read from the optimizer at every call, so a wrapped backend
sees every call) and works on param groups by index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable
from typing import Any

import torch
from torch import Tensor

from lsfused.flat import FlatBucket, is_sharded
from lsfused.reference import NORM_COLUMNS, hp_row

#: the per-parameter state that lives in the flat buffers
MOMENTS = ("exp_avg", "exp_avg_sq")


def build_buckets(param_groups: list[dict[str, Any]], needs: tuple[bool, bool, bool]) -> list[FlatBucket]:
    """One bucket per (device, dtype, FSDP2 or not), its parameters laid out group by group; ``needs``: whether the
    second moment, the momentum and the momentum direction buffers exist."""
    by_key: dict[tuple, tuple[list[Tensor], list[int]]] = {}
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            params, owners = by_key.setdefault((p.device, p.dtype, is_sharded(p)), ([], []))
            params.append(p)
            owners.append(gi)
    with torch.no_grad():
        return [FlatBucket(ps, gs, *needs) for ps, gs in by_key.values()]


def moment_views(buckets: list[FlatBucket]) -> dict[Tensor, dict[str, Tensor]]:
    """Per parameter, its moments as views into the flat buffers, named as ``torch.optim.Adam`` names them."""
    views: dict[Tensor, dict[str, Tensor]] = {}
    for b in buckets:
        for i, p in enumerate(b.params):
            st = views[p] = {}
            if b.m is not None:
                st["exp_avg"] = b.views(b.m, i)
            if b.v is not None:
                st["exp_avg_sq"] = b.views(b.v, i)
    return views


def grad_check(buckets: list[FlatBucket], ops: Any) -> tuple[float, float, float, float]:
    """Non-finite entries and the float64 squared norm of the gradients (one read each): of the plain buckets, and
    of the FSDP2 shards (which the caller sums over ranks)."""
    bad, sumsq, bad_sh, sumsq_sh = 0, 0.0, 0.0, 0.0
    for b in buckets:
        count, sq = ops.grad_check(b.g)
        if b.sharded:
            bad_sh, sumsq_sh = bad_sh + count, sumsq_sh + sq
        else:
            bad, sumsq = bad + count, sumsq + sq
    return bad, sumsq, bad_sh, sumsq_sh


def scale_grads(buckets: list[FlatBucket], ops: Any, factor: float) -> None:
    if factor != 1.0:
        for b in buckets:
            ops.scale_(b.g, factor)


def pass_a(
    buckets: list[FlatBucket],
    ops: Any,
    hp: Callable[[FlatBucket], list[float]],
    mode: int,
    plan: tuple[dict[int, float], str] | None,
    all_sums: bool,
) -> list[Tensor]:
    """Pass A on every bucket: the sums per bucket range (see ``reference.NORM_COLUMNS``). With a ``plan`` (step size
    per param group and direction of the first trial) it also writes that trial point. When it raises, the trial
    points it wrote are put back (a bucket's op checks its inputs before it writes anything)."""
    along_dm = plan is not None and plan[1] == "dm"
    done: list[FlatBucket] = []
    parts: list[Tensor] = []
    try:
        for b in buckets:
            eta = None
            if plan is not None and any(gi in plan[0] for gi in b.groups):
                etas = [plan[0].get(gi, math.nan) for gi in b.groups]  # NaN: no trial, w stays as it is
                eta = torch.tensor(etas, dtype=torch.float64, device=b.device)
            b.hp = hp(b)  # kept for the step: its trials recompute the direction with these rows
            args = (b.g, b.w, b.w0, b.v, b.m, b.flat_ranges, b.hp, mode, b.with_momentum_direction, eta, along_dm)
            part = ops.direction_and_norms(*args, all_sums=all_sums)
            done.append(b)
            parts.append(part)
            if eta is not None:
                b.write_back()
    except BaseException:
        if plan is not None:
            for b in done:
                ops.restore(b.w, b.w0, b.flat_ranges)
                b.write_back()
        raise
    return parts


def group_sums(
    buckets: list[FlatBucket], parts: list[Tensor], n_groups: int, reduce: Callable[[list[float]], list[float]]
) -> Tensor:
    """Pass A's sums per bucket range -> per param group, added in bucket order; FSDP2 shards' sums are summed over
    ranks by ``reduce``. ``[n_groups, len(NORM_COLUMNS)]``, float64."""
    if len(parts) == 1 and not buckets[0].sharded and buckets[0].groups == list(range(n_groups)):
        return parts[0].cpu()  # one bucket, one range per group in order (the usual case): nothing to add
    sums = torch.zeros(n_groups, len(NORM_COLUMNS), dtype=torch.float64)
    shard_sums = torch.zeros_like(sums)
    for b, part in zip(buckets, parts, strict=True):
        (shard_sums if b.sharded else sums)[b.groups] += part.cpu()
    if any(b.sharded for b in buckets):
        # FSDP2: each rank holds a disjoint shard, so the decision sums are the sums over ranks.
        sums += torch.tensor(reduce(shard_sums.flatten().tolist()), dtype=torch.float64).view_as(sums)
    return sums


def _rows(b: FlatBucket, sel: list[int]) -> list[float]:
    """Pass A's hyperparameter rows of the bucket ranges ``sel``."""
    return [x for r in sel for x in hp_row(b.hp, r)]


def trial_step(buckets: list[FlatBucket], ops: Any, eta: dict[int, float], direction: str, mode: int) -> None:
    """Pass B: ``w = w0 + eta[g]*dir`` over the param groups listed in ``eta``; others are left as they are. The
    direction is recomputed from the gradient and moments Pass A left (``reference.direction``)."""
    for b in buckets:
        sel = _selected(b, eta)
        if sel:
            etas = torch.tensor([eta[b.groups[r]] for r in sel], dtype=torch.float64).to(b.device, non_blocking=True)
            ops.trial_step(b.w, b.w0, b.g, b.v, b.m, _flat(b, sel), _rows(b, sel), mode, etas, direction == "dm")
            b.write_back()


def _selected(b: FlatBucket, groups: Container[int] | None) -> list[int]:
    """Indices of the bucket ranges of ``groups`` (all when None)."""
    return [r for r, gi in enumerate(b.groups) if groups is None or gi in groups]


def _flat(b: FlatBucket, sel: list[int]) -> list[int]:
    return [x for r in sel for x in b.ranges[r]]


def restore(buckets: list[FlatBucket], ops: Any, groups: Iterable[int] | None) -> None:
    """``w = w0`` bit-exactly over the given param groups (all when None)."""
    wanted = None if groups is None else set(groups)
    for b in buckets:
        sel = _selected(b, wanted)
        if sel:
            ops.restore(b.w, b.w0, _flat(b, sel))
            b.write_back()


def absorbed_fraction(buckets: list[FlatBucket], ops: Any, groups: Iterable[int], direction: str, mode: int) -> float:
    """Fraction of the moving elements (``dir != 0``) of ``groups`` that the current trial left unchanged."""
    wanted, moving, absorbed = set(groups), 0.0, 0.0
    for b in buckets:
        sel = _selected(b, wanted)
        if sel:
            along_dm = direction == "dm"
            counts = ops.absorbed_counts(b.w, b.w0, b.g, b.v, b.m, _flat(b, sel), _rows(b, sel), mode, along_dm)
            counts = counts.sum(0).tolist()
            moving, absorbed = moving + counts[0], absorbed + counts[1]
    return absorbed / moving if moving else 1.0
