"""Flat parameter buffers.

For each (device, dtype) bucket the parameters become views into one contiguous buffer, and ``p.grad`` a view into
one flat grad buffer, so backward writes there and no gather copy is needed. Adam state and the snapshot ``w0`` live
in matching flat buffers; the search direction is not stored (every op recomputes it from ``g`` and the moments), so
``g`` must stay as Pass A read it until the step ends. Param groups are contiguous ranges of each bucket (params are
laid out group by group), so every op works on ``ranges``.

Parameters that FSDP2 (``fully_shard``) owns are DTensors whose storage FSDP2 manages: for those the bucket holds
a copy of the local shards, reads the local gradient shards, and writes the weights back after every op that
changes them (``sharded=True``); they are never re-pointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def is_sharded(p: Tensor) -> bool:
    """A DTensor parameter (FSDP2), whose local shard the optimizer updates."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


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
        self.sharded = is_sharded(self.params[0])
        if any(is_sharded(p) != self.sharded for p in self.params):
            raise ValueError("a bucket mixes DTensor (FSDP2) and plain parameters")
        if self.sharded:
            for p in self.params:
                if not all(pl.is_shard() for pl in p.placements):
                    raise ValueError(
                        f"DTensor parameters must be sharded on every mesh dimension (FSDP2's fully_shard); got "
                        f"placements {p.placements} (replicated shards, as in HSDP, are not supported)"
                    )
        locals_ = [local(p.detach()) for p in self.params]
        self.shapes = [t.shape for t in locals_]
        self.device, self.dtype = locals_[0].device, locals_[0].dtype
        sdt = state_dtype(self.dtype)
        self.offsets = [0]
        for t in locals_:
            self.offsets.append(self.offsets[-1] + t.numel())
        n = self.offsets[-1]
        self.w = torch.empty(n, dtype=self.dtype, device=self.device)
        self.g = torch.zeros(n, dtype=self.dtype, device=self.device)
        # The grad views handed out as p.grad, kept so that a step can tell by identity that nothing replaced them.
        self._gviews: list[Tensor] = []
        for p, t, a, b in zip(self.params, locals_, self.offsets[:-1], self.offsets[1:], strict=True):
            self.w[a:b].copy_(t.reshape(-1))
            if not self.sharded:
                existing = p.grad
                p.data = self.w[a:b].view(p.shape)
                self._gviews.append(self.g[a:b].view(p.shape))
                if existing is None or (existing.layout == torch.strided and existing.shape == p.shape):
                    if existing is not None:  # a gradient computed before the optimizer was built is kept
                        self.g[a:b].copy_(existing.reshape(-1))
                    p.grad = self._gviews[-1]
                else:  # kept as it is: check_grads refuses it, with the reason, at the first step
                    p.grad = existing
        self._ptrs = [local(p).data_ptr() for p in self.params]
        self._device_index = self.w.get_device()
        self._grads_are_views = False  # set by check_grads when every p.grad is its view, used by gather_grads
        # No direction buffer: the ops recompute d (dm) from g, v (m) where they read it (lsfused.reference).
        self.w0 = torch.empty(n, dtype=sdt, device=self.device)
        self.v = torch.zeros(n, dtype=sdt, device=self.device) if self.with_second_moment else None
        self.m = torch.zeros(n, dtype=sdt, device=self.device) if self.with_momentum else None
        self.hp: list[float] = []  # the hyperparameter rows of the last Pass A, which its trials recompute d with
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
        """The slice of a flat buffer that belongs to parameter ``i``, shaped like it (its local shard)."""
        return buf[self.offsets[i] : self.offsets[i + 1]].view(self.shapes[i])

    def rebind(self) -> None:
        """Point the parameters and their grads at this bucket's buffers again (after building another bucket over
        them failed half way; the values there are still current)."""
        if not self.sharded:
            for i, p in enumerate(self.params):
                p.data = self.views(self.w, i)
                p.grad = self._gviews[i]

    def read_params(self) -> None:
        """Sharded buckets: refresh the flat copy from FSDP2's local shards (they may have been loaded or changed
        outside the optimizer since the last step)."""
        if self.sharded:
            for i, p in enumerate(self.params):
                self.views(self.w, i).copy_(p.to_local())

    def write_back(self) -> None:
        """Sharded buckets: copy the flat weights into FSDP2's local shards (plain buckets are views already)."""
        if self.sharded:
            for i, p in enumerate(self.params):
                p.to_local().copy_(self.views(self.w, i))

    def check_params(self) -> None:
        """Raise if a parameter no longer lives in the flat buffer (``model.to(...)``, ``p.data = ...``)."""
        if not self.sharded:
            # Every step runs this: one cheap pass over pointer, dtype and device index (no torch.device objects).
            dt, dev = self.dtype, self._device_index
            if all(
                p.data_ptr() == ptr and p.dtype is dt and p.get_device() == dev
                for p, ptr in zip(self.params, self._ptrs, strict=True)
            ):
                return
        for p, ptr in zip(self.params, self._ptrs, strict=True):
            t = local(p)
            if t.data_ptr() != ptr or t.device != self.device or t.dtype != self.dtype:
                raise RuntimeError(
                    "a parameter was moved or replaced after the optimizer was created (for example by "
                    "model.to(...) or p.data = ...); lsfused keeps parameters in flat buffers, so create the "
                    "optimizer after moving the model"
                )

    def check_grads(self) -> None:
        """Validate user-visible grads before anything is copied or changed."""
        # Usual case: backward accumulated into the views handed out, so every p.grad is still its view (identity):
        # valid by construction, and gather_grads has nothing to do.
        self._grads_are_views = not self.sharded and all(
            p.grad is v for p, v in zip(self.params, self._gviews, strict=True)
        )
        if self._grads_are_views:
            return
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
            if local(gr).device != self.device:
                raise ValueError(f"gradient on {local(gr).device} for a parameter on {self.device}")

    def gather_grads(self) -> None:
        """Make the flat grad buffer current: copy in grads that autograd or the user replaced, zero missing ones.

        Afterwards every ``p.grad`` is again a view into the flat buffer.
        """
        if self._grads_are_views:  # check_grads just found every p.grad to be its view
            self._grads_are_views = False
            return
        for i, p in enumerate(self.params):
            view = self.views(self.g, i)
            gr = p.grad
            if gr is None:
                view.zero_()
            elif self.sharded:
                view.copy_(gr.to_local())
                continue
            elif gr is self._gviews[i]:
                continue
            elif gr.data_ptr() != view.data_ptr() or gr.stride() != view.stride():
                view.copy_(gr)
            p.grad = self._gviews[i]

    def zero_grad(self) -> None:
        self.g.zero_()
        if self.sharded:
            for p in self.params:
                p.grad = None
            return
        for p, v in zip(self.params, self._gviews, strict=True):
            if p.grad is not v:
                p.grad = v
