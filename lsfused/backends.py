"""Backend selection: which implementation of the fused ops an optimizer uses.

``auto`` picks the fastest available backend for the parameters' device silently (``LSFUSED_BACKEND`` overrides
it); an explicitly requested backend that is unavailable raises with the reason.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lsfused import _ops, reference

# Preference order of ``auto`` per device type. Triton on CPU runs only in its (slow) interpreter: never auto there.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton cannot be imported ({type(err).__name__}: {err})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run its kernels in the interpreter)"


def backends() -> dict[str, str | None]:
    """Map each known backend to ``None`` when it is available, else to the reason it is not."""
    return {"torch": None, "triton": _triton_reason()}


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine."""
    return [name for name, reason in backends().items() if reason is None]


class Backend:
    """The fused ops bound to one backend (what an optimizer calls)."""

    def __init__(self, name: str):
        self.name = name

    def direction_and_norms(self, g, w, w0, d, v, m, dm, ranges: list[int], hp: list[float], mode: int) -> Tensor:
        return _ops.direction_and_norms(g, w, w0, d, v, m, dm, ranges, hp, mode, self.name)

    def trial_step(self, w: Tensor, w0: Tensor, d: Tensor, ranges: list[int], eta: Tensor) -> None:
        _ops.trial_step(w, w0, d, ranges, eta, self.name)

    def restore(self, w: Tensor, w0: Tensor, ranges: list[int]) -> None:
        _ops.restore(w, w0, ranges, self.name)

    @staticmethod
    def nonfinite_count(g: Tensor) -> int:
        return int((~torch.isfinite(g)).sum())

    @staticmethod
    def absorbed_counts(w: Tensor, w0: Tensor, d: Tensor, ranges: list[int]) -> Tensor:
        """A companion reduction shared by every backend: see ``reference.absorbed_counts``."""
        return reference.absorbed_counts(w, w0, d, ranges)


def resolve(name: str, device: torch.device | None = None) -> Backend:
    """The backend for ``name`` (``auto``: the best available for ``device``, or ``LSFUSED_BACKEND``)."""
    known = backends()
    if name == "auto":
        name = os.environ.get("LSFUSED_BACKEND", "auto")
        if name == "auto":
            device_type = device.type if device is not None else "cpu"
            for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
                if known[candidate] is None:
                    return Backend(candidate)
    if name not in known:
        available = ", ".join(["auto", *available_backends()])
        raise ValueError(f"unknown backend {name!r}; available backends: {available}")
    if known[name] is not None:
        raise ValueError(f"backend {name!r} is unavailable: {known[name]}")
    return Backend(name)
