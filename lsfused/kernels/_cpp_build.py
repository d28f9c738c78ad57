"""Where the C++/CUDA extension's sources are and how to compile them: shared by ``setup.py`` (which loads this file
by path, before lsfused is installed) and the JIT build of ``lsfused.kernels.cpp_ops``. Imports nothing but the
standard library at module level."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

NAME = "lsfused_cpp"
# A source checkout (editable install) compiles the repository's csrc/; a wheel carries a copy as lsfused/_csrc
# (setup.py puts it there) so that the JIT build also works where the wheel was built without torch.
_PACKAGED = Path(__file__).resolve().parents[1] / "_csrc"
CSRC = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("ops.cpp", "cpu_kernels_base.cpp", "cpu_kernels_avx2.cpp")
CUDA_SOURCES = ("cuda_kernels.cu",)
SOURCE_SUFFIXES = (".cpp", ".cu", ".h")  # what a wheel carries (lsfused/_csrc) and the hash below covers
# Portable flags (no -march=native: cpu_kernels_avx2.cpp adds AVX2 for its own functions and ops.cpp picks it at
# run time). -ffp-contract=off / --fmad=false: no FMA contraction, every operation rounded on its own, as in
# lsfused/reference.py. -fno-math-errno only drops errno handling; sqrt stays the IEEE instruction.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]  # at::parallel_for's OpenMP region is compiled into the extension
NVCC_FLAGS = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]


def source_dir() -> Path:
    """``LSFUSED_EXT_SOURCE_DIR`` (tests point it at a broken copy) or the checkout's ``csrc/``."""
    return Path(os.environ.get("LSFUSED_EXT_SOURCE_DIR") or CSRC)


def source_hash(src: Path, names: tuple[str, ...]) -> str:
    """A short hash of the sources (the C++/CUDA files in ``src``, headers included), the compile flags and the compiled
    ``names``: a JIT cache directory is keyed on it (two checkouts or versions never reuse or rebuild each other's
    library), and ``setup.py`` stamps its library with it."""
    digest = hashlib.sha256(repr((CXX_FLAGS, LD_FLAGS, NVCC_FLAGS, names)).encode())
    for path in sorted(p for p in src.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def stamp(src: Path, torch_version: str) -> str:
    """What ``setup.py`` writes beside the library it builds (``<library>.sources``) and what the loader expects to
    find there before using it: the hash of the sources and the torch version the library was compiled against."""
    return f"{source_hash(src, CPU_SOURCES)} torch {torch_version}"
