"""The package's layers import downward only: applications -> library -> ops -> kernels.

- applications: ``lsfused/apps/``, ``cli.py``, ``__main__.py`` (the demos, ``lsfused diagnose``, ``lsfused bench``);
- library: ``optim/``, ``integrations/``, ``diagnostics.py``, ``components.py``, ``utils.py``, ``flat.py`` and
  ``__init__.py`` (the public API);
- ops: ``backends.py`` and ``_ops.py`` (backend selection and the ``torch.library`` ops);
- kernels: ``kernels/`` and ``reference.py``.

``reference.py`` is a kernel set: the ``torch`` backend, the pure-torch implementation every other backend must
reproduce bit for bit. It also holds the op contract's constants (``NORM_COLUMNS``, ``HP_COLUMNS``, ``MODE_*``) and
helpers (``pairs``, ``mark_skipped_sums``) that the other kernels import, and that the library reads (to index the
sums, pick a mode). So it is the bottom of the kernels layer, below the other kernels: they import it, it imports
no lsfused module. Skipping a layer downward (the library reading ``reference``'s constants) is allowed.

Every ``import lsfused...`` and ``from lsfused... import`` counts, inside functions too (lazy imports are still
arrows), as do relative imports. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lsfused"

# Lowest first; patterns are paths relative to lsfused/.
LAYERS = [
    ("reference", ("reference.py",)),
    ("kernels", ("kernels/*",)),
    ("ops", ("backends.py", "_ops.py")),
    (
        "library",
        (
            "optim/*",
            "integrations/*",
            "diagnostics.py",
            "components.py",
            "utils.py",
            "flat.py",
            "__init__.py",
        ),
    ),
    ("apps", ("apps/*", "cli.py", "__main__.py")),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["lsfused", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    rel = MODULES[module].relative_to(PACKAGE).as_posix()
    return next((name for name, patterns in LAYERS if any(fnmatch(rel, p) for p in patterns)), None)


def _imports(module: str) -> set[str]:
    """The lsfused modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # ``from lsfused import diagnostics`` imports the module lsfused.diagnostics; ``from lsfused.x import f``
            # imports lsfused.x
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {name for name in found if name == "lsfused" or name.startswith("lsfused.")}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_the_walk_sees_lazy_and_from_imports():
    cli = _imports("lsfused.cli")
    assert {"lsfused.apps.diagnose", "lsfused.apps.bench", "lsfused.diagnostics"} <= cli  # inside functions
    assert "lsfused.kernels.cpp_ops" in _imports("lsfused.backends")  # inside a function
    assert "lsfused.reference" in _imports("lsfused.kernels.torch_fast")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    layer = _layer(module)
    assert layer is not None, f"{module} has no layer (add it to LAYERS)"
    upward = sorted(
        f"{target} ({_layer(target)})"
        for target in _imports(module)
        if target in MODULES and RANK.get(_layer(target), -1) > RANK[layer]
    )
    assert upward == [], f"{module} ({_layer(module)}) imports a higher layer"
