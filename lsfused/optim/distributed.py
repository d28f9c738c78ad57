"""What the ranks of a ``torch.distributed`` run share: the process group decisions are made over, float64 sums
and means of the scalars that decide acceptance, and the check that every rank built the same optimizer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active_group(process_group: Any) -> Any:
    """The process group decisions are shared over (``process_group``, else the world), or None when this process
    decides alone (no process group initialized, or one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def world_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(values: list[float], group: Any, device: torch.device, average: bool = True) -> list[float]:
    """Float64 scalars reduced over ``group`` in one packed tensor: the mean over ranks, or the sum. NCCL reduces on
    ``device`` (the parameters' GPU), other backends on the CPU."""
    if group is None:
        return values
    device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if average:
        t /= dist.get_world_size(group)
    return t.tolist()


def agreed_seed(signature: str, seed: int, group: Any) -> int:
    """Check that every rank's ``signature`` (parameter layout and hyperparameters) is this rank's, and return the
    closure seed every rank adopts: rank 0's, as a state_dict holds one (a resumed run then draws the same random
    numbers on every rank as the run that saved it, whatever seeds the ranks started from)."""
    if group is None:
        return seed
    everyone: list[tuple[str, int]] = [("", 0)] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (signature, seed), group=group)
    if any(sig != signature for sig, _ in everyone):
        raise ValueError(
            "ranks disagree on the optimizer's parameter layout or hyperparameters; every rank must build the "
            f"same optimizer over the same model (this rank: {signature})"
        )
    return everyone[0][1]
