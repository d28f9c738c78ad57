"""Backend selection: which implementation of the fused ops an optimizer uses.

``auto`` picks the fastest available backend silently; an explicitly requested backend that is unavailable raises
with the reason. The environment variable ``LSFUSED_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import os
from types import ModuleType

from lsfused import reference

# name -> (module implementing the ops, or None; reason it is unavailable, or None)
_REGISTRY: dict[str, tuple[ModuleType | None, str | None]] = {"torch": (reference, None)}
# Preference order for ``auto``.
_AUTO_ORDER = ("torch",)


def backends() -> dict[str, str | None]:
    """Map each known backend to ``None`` when it is available, else to the reason it is not."""
    return {name: reason for name, (_, reason) in _REGISTRY.items()}


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine."""
    return [name for name, reason in backends().items() if reason is None]


def resolve(name: str) -> tuple[str, ModuleType]:
    """Return ``(name, module)`` for a backend name, resolving ``auto`` (and ``LSFUSED_BACKEND``)."""
    if name == "auto":
        name = os.environ.get("LSFUSED_BACKEND", "auto")
        if name == "auto":
            for candidate in _AUTO_ORDER:
                module, reason = _REGISTRY[candidate]
                if reason is None:
                    return candidate, module
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(['auto', *available_backends()])}")
    module, reason = _REGISTRY[name]
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable: {reason}")
    return name, module
