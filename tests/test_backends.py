"""The Backend interface, the same checks for every discovered backend, and the README's "Writing a
backend" example compiled and validated as a real separately-installed distribution."""

from __future__ import annotations

import json
import os
import re

import pytest

from qiao.backends import Availability, get_backend
from qiao.backends.registry import discover
from qiao.compiler.errors import UnknownTarget
from qiao.compiler.testing import has_nvcc, run_cli

# The README section "Writing a backend": its example is installed and run by this test.
WRITING_A_BACKEND = os.environ.get(
    "QIAO_WRITING_A_BACKEND_DOC", os.path.join(os.path.dirname(__file__), "..", "README.md")
)
BUILTINS = sorted(n for n, e in discover().items() if e.builtin)


@pytest.mark.parametrize("name", BUILTINS)
def test_backend_contract(name):
    backend = get_backend(name)
    assert backend.name == name and backend.vendor
    presets = backend.presets()
    assert presets and backend.default_preset in presets
    for key, preset in presets.items():
        assert preset.name == key and preset.description
        assert backend.target(key) is not None  # every preset maps to a target
    avail = backend.availability()  # never raises
    assert isinstance(avail, Availability)
    assert avail.status and (avail.can_run or avail.missing), "a backend that cannot run says why"
    with pytest.raises(UnknownTarget, match="fix:"):
        backend.target("no-such-chip")


def test_cpu_ready_gpu_status_names_what_is_missing():
    # No GPU here: cuda/rocm compile where their tool is installed (nvcc; ld.lld from lld-19, which
    # .ci/run installs) and otherwise say which tool is missing — a fresh machine has neither.
    from qiao.backends.toolchains import find_lld

    assert get_backend("cpu").availability().status == "ready"
    tools = {"cuda": ("nvcc", has_nvcc()), "rocm": ("ld.lld", find_lld() is not None)}
    for name, (tool, installed) in tools.items():
        avail = get_backend(name).availability()
        if avail.can_run:
            continue  # a real device: nothing to say about "compiles only"
        if installed:
            assert avail.status.startswith("compiles only (no device)"), avail.status
        else:
            assert avail.status.startswith("toolchain missing") and tool in avail.status, (
                avail.status
            )


def test_handoff_backends_do_not_import_relax():
    for name in ("ascend", "cambricon"):
        backend = get_backend(name)
        assert backend.imports_relax is False and backend.availability().can_compile
    for name in ("cpu", "cuda", "rocm"):
        assert get_backend(name).imports_relax is True


def test_targets_lists_vendor_presets_status(capsys):
    from qiao.compiler.cli.__main__ import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        backend = get_backend(name)
        assert f"{name}  —  {backend.vendor}" in out
        for preset in backend.presets():
            assert f"--arch {preset} (" in out
        assert f"status: {backend.availability().status}" in out


def write_tiny_onnx(path) -> str:
    """y = relu(x @ W + b) with a symbolic batch: a model that needs no PyTorch to build."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return str(path)


def _code_blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", markdown, flags=re.S)


def test_writing_a_backend_example_runs(tmp_path):
    """Install the README's example as its own distribution and compile + validate with it."""
    with open(WRITING_A_BACKEND) as f:
        doc = f.read()
    section = doc[doc.index("## Writing a backend") :]
    (code,) = _code_blocks(section, "python")[:1]
    toml = _code_blocks(section, "toml")[0]
    assert len(code.splitlines()) < 100, "the example must fit on a screen"
    name, value = re.search(r'^(\w+) = "([\w.:]+)"', toml, flags=re.M).groups()
    module = value.split(":")[0]
    site = tmp_path / "site"
    (site / f"{module}-1.0.dist-info").mkdir(parents=True)
    (site / f"{module}.py").write_text(code)
    (site / f"{module}-1.0.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n"
    )
    (site / f"{module}-1.0.dist-info" / "entry_points.txt").write_text(
        f"[qiao.backends]\n{name} = {value}\n"
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "art"
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    proc = run_cli("validate", model, "--target", name, "--arch", "v3", "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "onnxruntime" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["name"] == name and manifest["target"]["mcpu"] == "x86-64-v3"
    assert manifest["validation"]["ok"] is True


def test_imports_relax_false_backend_gets_onnx_only(tmp_path):
    """``imports_relax = False``: the backend gets the checked ONNX model and no Relax module."""
    import onnx
    from onnx import TensorProto, helper

    from qiao.compiler.frontend import import_onnx

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    backend = get_backend("ascend")
    imported = import_onnx(str(tmp_path / "relu.onnx"), to_relax=backend.imports_relax)
    assert imported.mod is None and imported.op_types == ["Relu"]
    assert [s.shape for s in imported.inputs] == [["n"]]


@pytest.mark.parametrize("preset", [None, "1"])
def test_cpu_thread_pool_uses_every_usable_core(preset):
    """TVM's pool would start with half the hardware threads (one on a 2-vCPU machine); the CPU
    backend's device sizes it to the process's cores, unless the user chose TVM_NUM_THREADS."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if preset:
        env["TVM_NUM_THREADS"] = preset
    code = (
        "import os, tvm\n"
        "from qiao.backends.cpu import CPUBackend\n"
        "CPUBackend().device()\n"
        "print(tvm.get_global_func('runtime.NumThreads')(), len(os.sched_getaffinity(0)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    threads, cores = int(out[-2]), int(out[-1])
    assert threads == (int(preset) if preset else cores)
