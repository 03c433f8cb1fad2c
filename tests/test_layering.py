"""Who may import whom: the layering of ``qiao.compiler``, ``qiao.backends`` and ``qiao.models``.

Every ``import`` in compiler/, backends/ and models/ is read from the source (module-level,
function-level and ``TYPE_CHECKING`` imports alike: a lazy import is still a dependency) and checked
against the layers, lowest first:

``errors``
    ``qiao.compiler.errors``: the exception classes; imports nothing of qiao.
``models``
    ``qiao.models``: PyTorch modules; imports ``errors`` only (never the compiler: a torch layer
    that export recognises, such as the MoE block, lives in models/).
``library``
    The lowering library (``frontend``, ``passes``, ``kernels``, ``schedules``, ``pipeline``,
    ``options``, ``moe_op``, ``quantize``, ``tvmscript``) and the artifact format (``artifact``:
    manifest, hashes, params, which backends read their weights through). Knows TVM and ONNX,
    knows no backend: imports ``errors`` and itself, never ``qiao.backends``, ``qiao.models`` or
    the front.
``backends``
    ``qiao.backends``: may import ``errors``, the library and each other, never the front.
``front``
    Everything else in ``qiao.compiler`` (``driver``, ``export``, ``export_moe``, ``validate``,
    ``bench``, ``report``, ``rpc``, ``fingerprint``, ``testing``, ``cli/``, the package's
    ``__init__``): may import every layer, but backends only through their public API, the
    ``qiao.backends`` package and its ``registry``.

A new file in compiler/ is front unless listed in ``LIBRARY``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"compiler": "qiao.compiler", "backends": "qiao.backends", "models": "qiao.models"}

ERRORS = "qiao.compiler.errors"
LIBRARY = (
    "qiao.compiler.frontend",
    "qiao.compiler.passes",
    "qiao.compiler.kernels",
    "qiao.compiler.schedules",
    "qiao.compiler.pipeline",
    "qiao.compiler.options",
    "qiao.compiler.moe_op",
    "qiao.compiler.quantize",  # an ONNX-to-ONNX rewrite the options parse schemes with
    "qiao.compiler.artifact",
    "qiao.compiler.tvmscript",  # how TVM's script parser walks the stack (kernels, GPU rules)
)
BACKENDS_PUBLIC = ("qiao.backends", "qiao.backends.registry")

ALLOWED = {
    "errors": {"errors"},
    "models": {"errors", "models"},
    "library": {"errors", "library"},
    "backends": {"errors", "library", "backends"},
    "front": {"errors", "models", "library", "backends", "front"},
}

# Edges another piece of work is removing, as (importer, imported) -> why it is still here. Each
# entry must still occur (test_known_pending_entries_still_occur): delete it once its fix lands.
KNOWN_PENDING: dict[tuple[str, str], str] = {}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    """The layer of a qiao module, ``None`` for a module outside qiao."""
    if module == ERRORS:
        return "errors"
    if _within(module, "qiao.models"):
        return "models"
    if _within(module, "qiao.backends"):
        return "backends"
    if any(_within(module, p) for p in LIBRARY):
        return "library"
    if _within(module, "qiao.compiler"):
        return "front"
    return None


@dataclass(frozen=True)
class Violation:
    """One import that points up a layer (or past the backends' public API)."""

    path: str
    line: int
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported} ({self.rule})"


def rule_broken(importer: str, imported: str) -> str | None:
    """What is wrong with ``importer`` importing ``imported``; ``None`` when it is allowed."""
    src, dst = layer_of(importer), layer_of(imported)
    if src is None or dst is None:
        return None
    if dst not in ALLOWED[src]:
        below = ", ".join(sorted(ALLOWED[src]))
        return f"{src} may import only {below}; {imported} is {dst}"
    if src == "front" and dst == "backends" and imported not in BACKENDS_PUBLIC:
        return (
            "the compiler front reaches backends only through qiao.backends or "
            "qiao.backends.registry"
        )
    return None


def imported_modules(
    source: str, module: str, is_package: bool, known: set[str]
) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source`` (module ``module``), at any depth.

    ``from P import N`` names the module ``P.N`` when that is a module (``known``), else ``P``;
    relative imports are resolved against ``module``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in known else base


def violations_in(
    source: str, module: str, path: str, known: set[str], is_package: bool = False
) -> list[Violation]:
    """The layering violations of one source file."""
    out = []
    for line, imported in imported_modules(source, module, is_package, known):
        rule = rule_broken(module, imported)
        if rule:
            out.append(Violation(path, line, module, imported, rule))
    return out


def source_modules(root: Path = ROOT) -> list[tuple[Path, str, bool]]:
    """``(path, module name, is package)`` of every Python file of the three packages."""
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            parts = rel[:-1] if is_package else rel
            found.append((path, ".".join((package, *parts)), is_package))
    return found


def scan(root: Path = ROOT) -> list[Violation]:
    """Every layering violation under ``root``."""
    modules = source_modules(root)
    known = {name for _, name, _ in modules}
    out = []
    for path, name, is_package in modules:
        source = path.read_text(encoding="utf-8")
        out += violations_in(source, name, str(path.relative_to(root)), known, is_package)
    return out


def test_imports_follow_the_layers():
    found = [v for v in scan() if (v.importer, v.imported) not in KNOWN_PENDING]
    assert not found, "imports pointing up a layer:\n" + "\n".join(map(str, found))


def test_known_pending_entries_still_occur():
    seen = {(v.importer, v.imported) for v in scan()}
    fixed = [pair for pair in KNOWN_PENDING if pair not in seen]
    assert not fixed, f"fixed, remove from KNOWN_PENDING: {fixed}"


def test_every_package_file_is_scanned():
    modules = {name for _, name, _ in source_modules()}
    # one module of each layer, so a change to the folder mapping cannot silently scan nothing
    for name in (
        ERRORS,
        "qiao.models",
        "qiao.compiler.pipeline",
        "qiao.compiler.kernels.group_gemm",
        "qiao.backends.base",
        "qiao.compiler.driver",
        "qiao.compiler.cli.compile",
    ):
        assert name in modules, name
    assert {layer_of(m) for m in modules} == set(ALLOWED)


KNOWN = {
    "qiao.compiler",
    ERRORS,
    "qiao.compiler.driver",
    "qiao.compiler.pipeline",
    "qiao.compiler.schedules",
    "qiao.compiler.schedules.tuning",
    "qiao.compiler.passes",
    "qiao.compiler.passes.lower_moe",
    "qiao.backends",
    "qiao.backends.base",
    "qiao.backends.cuda",
    "qiao.backends.registry",
    "qiao.models",
}


@pytest.mark.parametrize(
    ("module", "source", "line", "imported", "words"),
    [
        # a function-level import counts as much as a module-level one
        (
            "qiao.compiler.pipeline",
            "import os\n\ndef f():\n    from qiao.backends.base import Phase\n",
            4,
            "qiao.backends.base",
            "library may import only errors, library",
        ),
        (
            "qiao.compiler.passes.lower_moe",
            "def f():\n    from qiao.backends import registry\n",
            2,
            "qiao.backends.registry",
            "library may import only",
        ),
        (
            "qiao.models.qwen3_moe",
            "import torch\nfrom qiao.compiler.driver import compile\n",
            2,
            "qiao.compiler.driver",
            "models may import only errors, models",
        ),
        (
            "qiao.backends.handoff",
            "from qiao.compiler import driver\n",
            1,
            "qiao.compiler.driver",
            "backends may import only",
        ),
        (
            "qiao.compiler.rpc",
            "import qiao.backends.cuda as cuda\n",
            1,
            "qiao.backends.cuda",
            "only through qiao.backends or qiao.backends.registry",
        ),
        (  # relative import, resolved against the importing module
            "qiao.compiler.schedules.cpu",
            "def f():\n    from ..driver import compile\n",
            2,
            "qiao.compiler.driver",
            "library may import only",
        ),
        (  # TYPE_CHECKING imports are dependencies too
            "qiao.compiler.kernels.group_gemm",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qiao.models\n",
            3,
            "qiao.models",
            "qiao.models is models",
        ),
    ],
)
def test_checker_catches_a_violation_in_a_snippet(module, source, line, imported, words):
    (found,) = violations_in(source, module, "snippet.py", KNOWN)
    assert (found.path, found.line, found.imported) == ("snippet.py", line, imported)
    assert words in found.rule
    assert str(found).startswith(f"snippet.py:{line}: {module} imports {imported} (")


def test_checker_accepts_imports_down_the_layers():
    allowed = {
        "qiao.compiler.driver": (
            "from qiao.backends import get_backend\nfrom qiao.backends.registry import discover\n"
            "from qiao.models import get_model\nfrom qiao.compiler import errors\n"
            "import numpy\n"
        ),
        "qiao.backends.cuda": (
            "from qiao.compiler.pipeline import default_phases\nfrom qiao.backends.base import "
            "Backend\ndef f():\n    from qiao.compiler.schedules import tuning\n"
        ),
        "qiao.models.mlp": "from qiao.compiler.errors import QiaoError\nimport qiao.models\n",
        "qiao.compiler.schedules": "from . import tuning\nfrom .tuning import x\n",
    }
    for module, source in allowed.items():
        is_package = module == "qiao.compiler.schedules"  # its relative imports are siblings
        assert violations_in(source, module, "ok.py", KNOWN, is_package) == [], module
