"""Backend selection: which implementation of the fused ops an optimizer uses.

``auto`` picks the fastest available backend for the parameters' device silently (``LSFUSED_BACKEND`` overrides
it); an explicitly requested backend that is unavailable raises with the reason.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from lsfused import _ops

# Preference order of ``auto`` per device type. Triton on CPU runs only in its (slow) interpreter: never auto there.
# Without the extension (no compiler) and Triton, ``torch-fast``: chunked torch ops, last-bit differences from the
# ``torch`` reference allowed; the reference itself is for checking, never chosen by ``auto``.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "torch-fast"), "cpu": ("cpp", "torch-fast")}


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton cannot be imported ({type(err).__name__}: {err})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run its kernels in the interpreter)"


def _cpp_reason() -> str | None:
    """Builds (first call only, cached) or loads the C++ extension; see ``lsfused.kernels.cpp_ops``."""
    try:
        from lsfused.kernels import cpp_ops
    except Exception as err:  # noqa: BLE001 - the pure-torch backends must keep working
        return f"lsfused.kernels.cpp_ops cannot be imported ({type(err).__name__}: {err})"
    return cpp_ops.load_error()


def _runs_on(name: str, device_type: str) -> bool:
    """Whether an available backend has kernels for ``device_type`` (the extension may be built without CUDA)."""
    if name == "cpp" and device_type == "cuda":
        from lsfused.kernels import cpp_ops

        return cpp_ops.has_cuda()
    return True


def backends() -> dict[str, str | None]:
    """Map each known backend to ``None`` when it is available, else to the reason it is not."""
    return {"torch": None, "torch-fast": None, "triton": _triton_reason(), "cpp": _cpp_reason()}


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine."""
    return [name for name, reason in backends().items() if reason is None]


class Backend:
    """The fused ops bound to one backend (what an optimizer calls).

    Eagerly the ops call the backend's module directly: the ``torch.library`` wrapper (schema defaults, a profiler
    range, redispatch) costs tens of microseconds per call, a fixed cost of every step that matters for small models.
    Under ``torch.compile`` they go through the registered ops (``lsfused._ops``), which the compiler traces.
    """

    def __init__(self, name: str):
        self.name = name
        self._module = None

    def _backend_module(self) -> ModuleType:
        """The backend's module (``_ops.IMPLEMENTATIONS``), imported on first use."""
        if self._module is None:
            self._module = _ops.implementation(self.name)
        return self._module

    def _impl(self) -> ModuleType | None:
        """The backend module for an eager call of a fused op, or None while compiling."""
        if torch.compiler.is_compiling():
            return None
        return self._backend_module()

    def direction_and_norms(
        self,
        g,
        w,
        w0,
        v,
        m,
        ranges: list[int],
        hp: list[float],
        mode: int,
        with_dm: bool = False,
        eta=None,
        trial_dm: bool = False,
        all_sums: bool = True,
    ) -> Tensor:
        """Pass A; with ``eta`` (float64 per range, NaN: no trial there) fused with the first trial; without
        ``all_sums`` the sums no decision uses (``gg``, ``dd``) are skipped (NaN)."""
        impl = self._impl()
        if impl is not None:
            return impl.direction_and_norms(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm, all_sums)
        if eta is None:
            return _ops.direction_and_norms(g, w, w0, v, m, ranges, hp, mode, with_dm, self.name, all_sums)
        return _ops.direction_norms_trial(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm, self.name, all_sums)

    def trial_step(self, w, w0, g, v, m, ranges: list[int], hp: list[float], mode: int, eta, along_dm=False) -> None:
        impl = self._impl()
        if impl is not None:
            return impl.trial_step(w, w0, g, v, m, ranges, hp, mode, eta, along_dm)
        _ops.trial_step(w, w0, g, v, m, ranges, hp, mode, eta, along_dm, self.name)

    def restore(self, w: Tensor, w0: Tensor, ranges: list[int]) -> None:
        impl = self._impl()
        if impl is not None:
            return impl.restore(w, w0, ranges)
        _ops.restore(w, w0, ranges, self.name)

    def grad_check(self, g: Tensor) -> tuple[int, float]:
        """(number of non-finite entries of ``g``, float64 sum of ``g*g``): the non-finite check and the squared
        L2 norm that gradient clipping needs, from one read of ``g`` (see ``reference.grad_check``)."""
        return self._backend_module().grad_check(g)

    def scale_(self, g: Tensor, factor: float) -> None:
        """``g *= factor`` in place (unscaling and clipping the flat gradient before Pass A)."""
        g.mul_(factor)

    def absorbed_counts(self, w, w0, g, v, m, ranges: list[int], hp: list[float], mode: int, along_dm=False) -> Tensor:
        """A companion reduction (see ``reference.absorbed_counts``)."""
        return self._backend_module().absorbed_counts(w, w0, g, v, m, ranges, hp, mode, along_dm)


def resolve(name: str, device: torch.device | None = None) -> Backend:
    """The backend for ``name`` (``auto``: the best available for ``device``, or ``LSFUSED_BACKEND``)."""
    known = backends()
    if name == "auto":
        name = os.environ.get("LSFUSED_BACKEND", "auto")
        if name == "auto":
            device_type = device.type if device is not None else "cpu"
            for candidate in _AUTO_ORDER.get(device_type, ("torch-fast",)):
                if known[candidate] is None and _runs_on(candidate, device_type):
                    return Backend(candidate)
    if name not in known:
        available = ", ".join(["auto", *available_backends()])
        raise ValueError(f"unknown backend {name!r}; available backends: {available}")
    if known[name] is not None:
        raise ValueError(f"backend {name!r} is unavailable: {known[name]}")
    if device is not None and not _runs_on(name, device.type):
        raise ValueError(
            f"backend {name!r} has no kernels for {device.type} here (the extension was built without CUDA)"
        )
    return Backend(name)
