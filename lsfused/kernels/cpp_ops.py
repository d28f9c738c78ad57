"""The ``cpp`` backend: the fused ops as C++ (CPU) and CUDA kernels, ``torch.ops.lsfused_cpp`` (sources in ``csrc/``).

The extension is loaded on first use (``lsfused.backends()`` probes it): a library built by ``setup.py``
(``lsfused/_C*.so``) when one is present, built from the sources beside it, and loads (one built against another
torch does not), else a JIT build with ``torch.utils.cpp_extension.load`` (ninja), cached in ``LSFUSED_BUILD_DIR`` or in
``~/.cache/lsfused/<python>-<torch>-<hash of the sources and flags>``, so only the first use compiles (and says so in
one line on stderr). CUDA kernels are JIT-built only when torch has CUDA and sees a GPU. The outcome (``None`` or
the reason it failed) is kept for the process; ``LSFUSED_SKIP_EXT=1`` turns the backend off. Importing this module
never compiles or raises.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from lsfused import reference
from lsfused.kernels import _cpp_build as build

_lock = threading.Lock()
_outcome: list[str | None] = []  # [] until tried, then [None] (loaded) or [reason]


def load_error() -> str | None:
    """``None`` once the extension is loaded (building it on the first call), else why it cannot be."""
    if os.environ.get("LSFUSED_SKIP_EXT") == "1":
        return "LSFUSED_SKIP_EXT=1 is set: the C++ extension is neither built nor loaded"
    with _lock:
        if not _outcome:
            _outcome.append(_load())
    return _outcome[0]


def has_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels."""
    return load_error() is None and _registered("CUDA")


def _registered(key: str = "CPU") -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lsfused_cpp::restore", key)
    except RuntimeError:  # the op does not exist (yet)
        return False


def _prebuilt() -> Path | None:
    """The library ``setup.py`` built into the package, if its stamp (``<library>.sources``: the hash of the sources
    and the torch version it was built from) matches the sources beside it and this torch; else None, and a JIT
    build (sources edited since, in a checkout; torch upgraded since). File times cannot tell: installing a wheel
    gives every file a new one. ``LSFUSED_EXT_SOURCE_DIR`` (a build from other sources) skips it."""
    found = sorted(Path(__file__).resolve().parents[1].glob("_C*.so"))
    if not found or os.environ.get("LSFUSED_EXT_SOURCE_DIR"):
        return None
    lib = found[0]
    if not build.CSRC.is_dir():
        return lib  # no sources to compare with (nor to JIT-build from)
    stamp = lib.with_name(lib.name + ".sources")
    if not stamp.is_file() or stamp.read_text().strip() != build.stamp(build.CSRC, torch.__version__):
        return None
    return lib


def _build_dir(with_cuda: bool, src: Path, names: tuple[str, ...]) -> Path:
    if os.environ.get("LSFUSED_BUILD_DIR"):
        return Path(os.environ["LSFUSED_BUILD_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
    return cache / "lsfused" / f"{tag}-{build.source_hash(src, names)}".replace("+", "_")


def _jit() -> None:
    from torch.utils import cpp_extension

    src = build.source_dir()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()
    names = build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else ())
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources {missing} not found in {src} (a source checkout is needed to JIT-build)")
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():  # pip's ninja in an unactivated venv
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    build_dir = _build_dir(with_cuda, src, names)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{build.NAME}.so").exists():
        print(
            f"lsfused: compiling the C++ backend once ({'CPU and CUDA' if with_cuda else 'CPU'} kernels, about a "
            f"minute; LSFUSED_SKIP_EXT=1 skips it), cached in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    cpp_extension.load(
        name=build.NAME,
        sources=[str(src / n) for n in names],
        extra_cflags=build.CXX_FLAGS,
        extra_ldflags=build.LD_FLAGS,
        extra_cuda_cflags=build.NVCC_FLAGS,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("LSFUSED_EXT_VERBOSE") == "1",
    )


def _summary(err: BaseException) -> str:
    """The first line of a build error plus the compiler's error lines, short enough for a reason string."""
    lines = str(err).splitlines() or [type(err).__name__]
    head = re.sub(r": \[\d+/\d+\] .*", "", lines[0]).strip()  # drop ninja's echo of the compile command
    errors = [ln.strip() for ln in lines[1:] if "error" in ln.lower() and not ln.lstrip().startswith(("[", "FAILED"))]
    text = "; ".join([head, *errors[:4]])
    return f"the C++ extension could not be built or loaded ({type(err).__name__}: {text[:1500]})"


def _load() -> str | None:
    try:
        if not _registered():
            lib = _prebuilt()
            if lib is not None:
                try:
                    torch.ops.load_library(str(lib))
                except (OSError, RuntimeError) as err:  # e.g. a broken or foreign library: use our own build
                    print(
                        f"lsfused: the installed C++ extension does not load ({err}); using a JIT build",
                        file=sys.stderr,
                    )
                    lib = None
            if lib is None:
                _jit()
        if not _registered():
            return "the C++ extension loaded but registered no lsfused_cpp kernels"
        return None
    except Exception as err:  # noqa: BLE001 - any failure leaves the other backends working
        return _summary(err)


_overloads: dict[str, object] = {}


def _lib():
    reason = load_error()
    if reason is not None:
        raise RuntimeError(f"the cpp backend is unavailable: {reason}")
    return torch.ops.lsfused_cpp


def _op(name: str):
    """The op's overload, looked up once: a call through ``torch.ops``' packet resolves the overload every time, a
    fixed cost of every step that matters for small models."""
    op = _overloads.get(name)
    if op is None:
        op = _overloads[name] = getattr(_lib(), name).default
    return op


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
    if eta is not None:
        eta = eta.to(device=w.device, dtype=torch.float64)
    return _op("direction_and_norms")(
        g, w, w0, v, m, list(ranges), _floats(hp), int(mode), bool(with_dm), eta, bool(trial_dm), bool(all_sums)
    )


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
    eta = eta.to(device=w.device, dtype=torch.float64)
    _op("trial_step")(w, w0, g, v, m, list(ranges), _floats(hp), int(mode), eta, bool(along_dm))


def restore(w: Tensor, w0: Tensor, ranges: list[int]) -> None:
    _op("restore")(w, w0, list(ranges))


def _floats(hp: list[float]) -> list[float]:
    return [float(x) for x in hp]


def _has_cpu_kernel(t: Tensor) -> bool:
    """Whether the extension's companion kernels (CPU only, contiguous) apply; elsewhere the reference's run."""
    return t.device.type == "cpu" and t.is_contiguous()


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
    """``reference.absorbed_counts`` in one read-only pass that recomputes the direction (contiguous CPU ``w``;
    elsewhere the reference's)."""
    if not _has_cpu_kernel(w):
        return reference.absorbed_counts(w, w0, g, v, m, ranges, hp, mode, along_dm)
    return _op("absorbed_counts")(w, w0, g, v, m, list(ranges), _floats(hp), int(mode), bool(along_dm))


def grad_check(g: Tensor) -> tuple[int, float]:
    """(number of inf/NaN entries, float64 sum of ``g*g``) in one read-only pass, no temporaries (a contiguous CPU
    tensor; elsewhere ``reference.grad_check``). The sum is accumulated in fixed-size chunks added in order, so it
    does not depend on the thread count."""
    if not _has_cpu_kernel(g):
        return reference.grad_check(g)
    count, sumsq = _op("grad_check")(g)
    return int(count), float(sumsq)


def cpu_isa() -> str:
    """Which copy of the CPU kernels runs here: ``"avx2"`` or ``"baseline"``."""
    return _lib().cpu_isa()
