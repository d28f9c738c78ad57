"""Flat parameter buffers.

For each (device, dtype) bucket the parameters become views into one contiguous buffer, and ``p.grad`` a view into
one flat grad buffer, so backward writes there and no gather copy is needed. Adam state, the snapshot ``w0`` and the
direction live in matching flat buffers. Param groups are contiguous ranges of each bucket (params are laid out
group by group), so every op works on ``ranges``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the optimizer state and math for parameters of ``dtype`` (fp32 for low precision, else itself)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class FlatBucket:
    """The parameters of one (device, dtype) bucket as views into flat buffers."""

    params: list[Tensor]
    group_of_param: list[int]
    with_second_moment: bool
    with_momentum: bool
    with_momentum_direction: bool
    offsets: list[int] = field(init=False)
    ranges: list[tuple[int, int]] = field(init=False)  # one per group present, in group order
    groups: list[int] = field(init=False)  # group index of each range

    def __post_init__(self) -> None:
        p0 = self.params[0]
        self.device, self.dtype = p0.device, p0.dtype
        sdt = state_dtype(self.dtype)
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        n = self.offsets[-1]
        self.w = torch.empty(n, dtype=self.dtype, device=self.device)
        self.g = torch.zeros(n, dtype=self.dtype, device=self.device)
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:], strict=True):
            self.w[a:b].copy_(p.detach().reshape(-1))
            p.data = self.w[a:b].view(p.shape)
            p.grad = self.g[a:b].view(p.shape)
        self._ptrs = [p.data_ptr() for p in self.params]
        self.w0 = torch.empty(n, dtype=sdt, device=self.device)
        self.d = torch.empty(n, dtype=sdt, device=self.device)
        self.v = torch.zeros(n, dtype=sdt, device=self.device) if self.with_second_moment else None
        self.m = torch.zeros(n, dtype=sdt, device=self.device) if self.with_momentum else None
        self.dm = torch.empty(n, dtype=sdt, device=self.device) if self.with_momentum_direction else None
        self.ranges, self.groups = [], []
        for i, gi in enumerate(self.group_of_param):
            a, b = self.offsets[i], self.offsets[i + 1]
            if self.groups and self.groups[-1] == gi:
                self.ranges[-1] = (self.ranges[-1][0], b)
            else:
                self.groups.append(gi)
                self.ranges.append((a, b))
        self.flat_ranges = [x for rng in self.ranges for x in rng]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def views(self, buf: Tensor, i: int) -> Tensor:
        """The slice of a flat buffer that belongs to parameter ``i``, shaped like it."""
        return buf[self.offsets[i] : self.offsets[i + 1]].view(self.params[i].shape)

    def check_params(self) -> None:
        """Raise if a parameter no longer lives in the flat buffer (``model.to(...)``, ``p.data = ...``)."""
        for p, ptr in zip(self.params, self._ptrs, strict=True):
            if p.data_ptr() != ptr or p.device != self.device or p.dtype != self.dtype:
                raise RuntimeError(
                    "a parameter was moved or replaced after the optimizer was created (for example by "
                    "model.to(...) or p.data = ...); lsfused keeps parameters in flat buffers, so create the "
                    "optimizer after moving the model"
                )

    def check_grads(self) -> None:
        """Validate user-visible grads before anything is copied or changed."""
        for p in self.params:
            gr = p.grad
            if gr is None:
                continue
            if gr.is_sparse or gr.layout != torch.strided:
                raise ValueError("lsfused optimizers do not support sparse gradients")
            if gr.is_complex():
                raise ValueError("lsfused optimizers do not support complex parameters or gradients")
            if gr.shape != p.shape:
                raise ValueError(f"gradient of shape {tuple(gr.shape)} does not match its parameter {tuple(p.shape)}")
            if gr.device != self.device:
                raise ValueError(f"gradient on {gr.device} for a parameter on {self.device}")

    def gather_grads(self) -> None:
        """Make the flat grad buffer current: copy in grads that autograd or the user replaced, zero missing ones.

        Afterwards every ``p.grad`` is again a view into the flat buffer.
        """
        for i, p in enumerate(self.params):
            view = self.views(self.g, i)
            gr = p.grad
            if gr is None:
                view.zero_()
            elif gr.data_ptr() != view.data_ptr() or gr.stride() != view.stride():
                view.copy_(gr)
            else:
                continue
            p.grad = view

    def zero_grad(self) -> None:
        self.g.zero_()
        for i, p in enumerate(self.params):
            p.grad = self.views(self.g, i)
