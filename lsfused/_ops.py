"""The fused ops, declared once with ``torch.library``; each backend supplies one implementation.

``backend`` is an argument of every op, so the same op (and its fake implementation for ``torch.compile`` and
``opcheck``) serves every backend; the registered kernel forwards to that backend's module. Backend modules
implement ``direction_and_norms`` (with its optional ``eta`` and ``trial_dm``: the fused first trial),
``trial_step`` and ``restore`` with the signatures of ``lsfused.reference``, and the companion reductions
``grad_check`` and ``absorbed_counts`` (called eagerly by ``lsfused.backends.Backend``, not registered as ops).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from lsfused.reference import NORM_COLUMNS

# backend name -> module path (imported on first use, so an optional dependency never breaks import)
IMPLEMENTATIONS = {
    "torch": "lsfused.reference",
    "triton": "lsfused.kernels.triton_ops",
    "cpp": "lsfused.kernels.cpp_ops",
    "torch-fast": "lsfused.kernels.torch_fast",
}


def implementation(backend: str) -> ModuleType:
    try:
        return importlib.import_module(IMPLEMENTATIONS[backend])
    except KeyError:
        raise ValueError(f"no implementation of the lsfused ops for backend {backend!r}") from None


@torch.library.custom_op("lsfused::direction_and_norms", mutates_args=("w0", "v", "m"))
def direction_and_norms(
    g: Tensor,
    w: Tensor,
    w0: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    kind: int,
    with_dm: bool,
    backend: str,
    all_sums: bool = True,
) -> Tensor:
    """Pass A over ``ranges``: moments and snapshot; float64 sums per range ``[R, 5]`` (``gdm`` only ``with_dm``).

    ``kind`` is ``reference.MODE_SGD`` or ``reference.MODE_ADAM``; without ``all_sums`` the ``gg`` and ``dd`` columns
    (no decision uses them) are skipped and NaN.
    """
    return implementation(backend).direction_and_norms(g, w, w0, v, m, ranges, hp, kind, with_dm, None, False, all_sums)


@direction_and_norms.register_fake
def _(g, w, w0, v, m, ranges, hp, kind, with_dm, backend, all_sums=True):
    return g.new_empty(len(ranges) // 2, len(NORM_COLUMNS), dtype=torch.float64)


@torch.library.custom_op("lsfused::direction_norms_trial", mutates_args=("w", "w0", "v", "m"))
def direction_norms_trial(
    g: Tensor,
    w: Tensor,
    w0: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    kind: int,
    with_dm: bool,
    eta: Tensor,
    trial_dm: bool,
    backend: str,
    all_sums: bool = True,
) -> Tensor:
    """Pass A fused with the first trial: ``direction_and_norms``, and in the same pass ``w = w0 + eta[r]*d``
    (``dm`` with ``trial_dm``) on every range whose ``eta`` entry (float64, on the buffers' device) is not NaN.

    Bit-identical to ``direction_and_norms`` followed by ``trial_step`` on those ranges; saves the trial's pass.
    """
    return implementation(backend).direction_and_norms(
        g, w, w0, v, m, ranges, hp, kind, with_dm, eta, trial_dm, all_sums
    )


@direction_norms_trial.register_fake
def _(g, w, w0, v, m, ranges, hp, kind, with_dm, eta, trial_dm, backend, all_sums=True):
    return g.new_empty(len(ranges) // 2, len(NORM_COLUMNS), dtype=torch.float64)


@torch.library.custom_op("lsfused::trial_step", mutates_args=("w",))
def trial_step(
    w: Tensor,
    w0: Tensor,
    g: Tensor,
    v: Tensor | None,
    m: Tensor | None,
    ranges: list[int],
    hp: list[float],
    kind: int,
    eta: Tensor,
    along_dm: bool,
    backend: str,
) -> None:
    """Pass B: ``w = w0 + eta[r]*dir`` over each range, ``dir`` (``d``, ``dm`` with ``along_dm``) recomputed from
    ``g`` and the moments with Pass A's operations; ``hp``: Pass A's rows of those ranges; ``eta``: a float64
    device tensor, one entry per range."""
    implementation(backend).trial_step(w, w0, g, v, m, ranges, hp, kind, eta, along_dm)


@trial_step.register_fake
def _(w, w0, g, v, m, ranges, hp, kind, eta, along_dm, backend):
    return None


@torch.library.custom_op("lsfused::restore", mutates_args=("w",))
def restore(w: Tensor, w0: Tensor, ranges: list[int], backend: str) -> None:
    """Revert: ``w = w0`` over each range, bit-exact."""
    implementation(backend).restore(w, w0, ranges)


@restore.register_fake
def _(w, w0, ranges, backend):
    return None
