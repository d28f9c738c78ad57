"""Build hook for the optional C++/CUDA extension (csrc/); all metadata lives in pyproject.toml.

The extension ``lsfused._C`` (the ``cpp`` backend's kernels) is built when torch is importable here and a C++
compiler works; the CUDA sources are added when nvcc (CUDA_HOME) and a CUDA-enabled torch are present. Nothing here
can fail a pure-Python install: ``LSFUSED_SKIP_EXT=1`` skips the extension, and a missing torch or a failed compile
prints why and installs without it. The backend then builds itself on first use (a cached JIT build, see
lsfused/kernels/cpp_ops.py). pip's default build isolation hides torch from this script, so ``pip install -e .`` (the
Makefile's) relies on that JIT build; ``pip install --no-build-isolation .`` compiles here and stamps the library with
the hash of its sources and the torch version (``_C*.so.sources``), which the loader checks before using it.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _note(message: str) -> None:
    print(f"lsfused: {message}", file=sys.stderr)


def _build_config():
    """lsfused/kernels/_cpp_build.py (sources and flags), loaded by path: lsfused is not importable yet."""
    spec = importlib.util.spec_from_file_location("_cpp_build", ROOT / "lsfused" / "kernels" / "_cpp_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package as lsfused/_csrc, so an installed wheel can JIT-build the extension."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "lsfused" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)  # a file since removed from csrc/ must not ship (nor enter the stamp)
        target.mkdir(parents=True)
        suffixes = _build_config().SOURCE_SUFFIXES
        for src in (ROOT / "csrc").iterdir():
            if src.suffix in suffixes:
                self.copy_file(str(src), str(target / src.name))


def extension_options() -> dict:
    if os.environ.get("LSFUSED_SKIP_EXT") == "1":
        _note("LSFUSED_SKIP_EXT=1: not building the C++ extension (the cpp backend will be unavailable)")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # noqa: BLE001 - any import failure means: no extension now
        _note(
            f"torch is not importable in the build environment ({type(err).__name__}: {err}); not building the C++ "
            "extension now: the cpp backend JIT-compiles it on first use (or install with --no-build-isolation)"
        )
        return {}
    cfg = _build_config()
    sources = [f"csrc/{name}" for name in cfg.CPU_SOURCES]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += [f"csrc/{name}" for name in cfg.CUDA_SOURCES]
    else:
        _note("no nvcc or no CUDA-enabled torch: building the C++ extension with CPU kernels only")
    ext = (CUDAExtension if with_cuda else CppExtension)(
        "lsfused._C",
        sources,
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS},
        extra_link_args=cfg.LD_FLAGS,
        depends=[str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.h"))],  # header edits rebuild
    )

    class OptionalBuildExtension(BuildExtension):
        """A failed compile warns and leaves a pure-Python install."""

        def run(self):
            try:
                super().run()
                # The loader uses the library only next to this stamp of its sources (see cpp_ops._prebuilt).
                stamp = cfg.stamp(ROOT / "csrc", torch.__version__)
                for built in self.extensions:
                    Path(self.get_ext_fullpath(built.name) + ".sources").write_text(stamp + "\n")
            except Exception as err:  # noqa: BLE001
                _note(f"WARNING: the C++ extension failed to build ({type(err).__name__}: {err}); installing pure "
                      "Python, the cpp backend will try a JIT build on first use")  # fmt: skip

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


options = extension_options()
options.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**options)
