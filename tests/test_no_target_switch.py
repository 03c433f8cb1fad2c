"""``compiler/`` never switches on TVM target-kind strings: what a target is (CPU or GPU, its
device, schedule rules, tuning keys) is said once, by its backend (``qiao.backends``), and the
compiler asks it. A new target kind then needs a new backend file only (see
``tests/test_new_backend.py``).

The scan reads every ``compiler/**/*.py`` as a syntax tree and reports ``file:line`` for:

- a comparison of a string constant with ``<x>.kind.name``, or any comparison on ``.kind.name``
  (``==``, ``!=``, ``in``; passing it on, e.g. to ``backend_for_kind``, is fine);
- ``==`` / ``!=`` / ``in`` against a target-kind name (``kind == "llvm"``), or a membership test
  on a literal tuple/list/set holding one (``kind in ("cuda", "rocm")``);
- a literal collection naming two or more kinds (``GPU_KINDS = ("cuda", "rocm", ...)``);
- a dict literal keyed by a kind name (``{"llvm": ..., "cuda": ...}``), a subscript or ``.get``
  with one (``table["cuda"]``), a ``case "llvm":``.

Building a target (``Target({"kind": "llvm", ...})``) is not a switch and is not reported.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = os.path.join(ROOT, "compiler")

# TVM target kinds (``tvm.target.Target.list_kinds()`` of TVM 0.27, less its "test" kind).
KINDS = frozenset(
    {
        "c",
        "composite",
        "cuda",
        "cuda_host",
        "ext_dev",
        "hexagon",
        "llvm",
        "metal",
        "nvptx",
        "opencl",
        "rocm",
        "trn",
        "vulkan",
        "webgpu",
    }
)

# Paths (relative to compiler/, "/"-separated; a trailing "/" is a folder) allowed to switch.
ALLOWED: dict[str, str] = {}


def _is_kind(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KINDS


def _kinds_in(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if _is_kind(e)]
    return []


def _is_kind_name(node: ast.AST) -> bool:
    """``<x>.kind.name`` (e.g. ``target.kind.name``)."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "name"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "kind"
    )


def find_target_switches(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """``[(line, what)]`` for each switch on a TVM target-kind string in ``source``.

    Parameters
    ----------
    source : str
        Python source.
    filename : str
        Used in syntax errors only.

    Returns
    -------
    list of (int, str)
        Line numbers and a description, in source order.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            membership = any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            if any(_is_kind_name(o) for o in operands):
                found.append((node.lineno, "comparison on .kind.name"))
            elif any(_is_kind(o) for o in operands):
                names = [o.value for o in operands if _is_kind(o)]
                found.append((node.lineno, f"comparison with kind name(s) {names}"))
            elif membership and any(_kinds_in(o) for o in operands):
                names = [k for o in operands for k in _kinds_in(o)]
                found.append((node.lineno, f"membership test on kind names {names}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_kinds_in(node)) >= 2:
            found.append((node.lineno, f"collection of kind names {_kinds_in(node)}"))
        elif isinstance(node, ast.Dict) and any(k is not None and _is_kind(k) for k in node.keys):
            names = [k.value for k in node.keys if k is not None and _is_kind(k)]
            found.append((node.lineno, f"dict keyed by kind name(s) {names}"))
        elif isinstance(node, ast.Subscript) and _is_kind(node.slice):
            found.append((node.lineno, f"subscript by kind name {node.slice.value!r}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and _is_kind(node.args[0])
        ):
            found.append((node.lineno, f".get by kind name {node.args[0].value!r}"))
        elif isinstance(node, ast.MatchValue) and _is_kind(node.value):
            found.append((node.value.lineno, f"case on kind name {node.value.value!r}"))
    # A collection inside a membership test is reported once, as the test.
    lines_of_tests = {line for line, what in found if not what.startswith("collection")}
    found = [
        (ln, w) for ln, w in found if not (w.startswith("collection") and ln in lines_of_tests)
    ]
    return sorted(set(found))


def _allowed(rel: str) -> bool:
    return any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in ALLOWED)


def scan_compiler() -> list[str]:
    """``path:line: what`` for every switch in ``compiler/`` outside ``ALLOWED``."""
    out = []
    for folder, _, files in os.walk(COMPILER):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, COMPILER).replace(os.sep, "/")
            if _allowed(rel):
                continue
            with open(path, encoding="utf-8") as f:
                source = f.read()
            for line, what in find_target_switches(source, path):
                out.append(f"compiler/{rel}:{line}: {what}")
    return out


def test_compiler_does_not_switch_on_target_kinds():
    found = scan_compiler()
    assert not found, (
        "compiler/ switches on TVM target kinds; say it in the backend instead "
        "(Backend.is_gpu, device_type, schedule_rules/schedule_passes, tuning_keys):\n"
        + "\n".join(found)
    )


# The switches compiler/ held before the backends said what their targets are (commit 94777f0:
# lower_moe.py, schedules/__init__.py, schedules/moe_table.py, rpc.py, schedules/cpu_info.py).
OLD_SWITCHES = {
    "lower_moe": (
        'GPU_KINDS = ("cuda", "rocm", "vulkan", "metal", "opencl", "webgpu")\n'
        "gpu = target.kind.name in GPU_KINDS\n",
        [1, 2],
    ),
    "rule_sets": (
        "_RULE_SETS = {\n"
        '    "llvm": "qiao.compiler.schedules.cpu:cpu_rules",\n'
        '    "cuda": "qiao.compiler.schedules.gpu:gpu_rules",\n'
        "}\n"
        'if options.get("use_tuning_db", True) and target.kind.name == "llvm":\n'
        "    pass\n",
        [1, 5],
    ),
    "moe_keys": (
        "kind = target.kind.name\n"
        'if kind == "llvm":\n'
        "    pass\n"
        'if kind in ("cuda", "rocm"):\n'
        "    pass\n",
        [2, 4],
    ),
    "rpc": (
        'DEVICE_OF_KIND = {"llvm": "cpu", "c": "cpu", "cuda": "cuda"}\n'
        'local = vm if manifest.get("target", {}).get("kind") == "llvm" else None\n'
        'device = DEVICE_OF_KIND["cuda"]\n',
        [1, 2, 3],
    ),
    "cpu_rule": (
        'def is_target_available(self, target):\n    return target.kind.name == "llvm"\n',
        [2],
    ),
    "match": ('match kind:\n    case "metal":\n        pass\n', [2]),
    "get": ('rules = table.get("vulkan")\n', [1]),
}


@pytest.mark.parametrize("name", sorted(OLD_SWITCHES))
def test_scanner_finds_the_old_switches(name):
    source, lines = OLD_SWITCHES[name]
    assert [line for line, _ in find_target_switches(source)] == lines


def test_scanner_leaves_target_construction_and_delegation_alone():
    source = (
        'target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})\n'
        "backend = backend_for_kind(str(target.kind.name))\n"
        'cpu = "cpu" in target.keys\n'
        'record = {"kind": "gemm", "tile": tile}\n'
        'fmt = "fatbin" if code else "ptx"\n'
    )
    assert find_target_switches(source) == []
