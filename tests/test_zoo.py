"""The model zoo (``tests/zoo``): architectures from ``transformers`` and the classic CNNs, made by
three exporters (TorchScript at opsets 8-13, dynamo at 18+, Caffe2-style rewrites), compiled by
qiao for the CPU and matched to ONNX Runtime on the same file at two input sizes; every CPU kernel
gets its schedule rule (no fallback to an unscheduled loop nest); a subset also compiles for CUDA
(sm_80) and ROCm (gfx942), code generation only.

The default run takes the representative ``ci=True`` subset (one model per exporter);
``QIAO_ZOO=full`` takes the whole zoo (its pass count is in the README).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from qiao.compiler.testing import assert_close, kernels_packing_per_call
from tests.zoo import CAFFE2, DYNAMO, ENTRIES, EXPORTERS, TORCHSCRIPT
from tests.zoo.harness import compile_entry, run_size

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

FULL = os.environ.get("QIAO_ZOO", "").lower() == "full"
SELECTED = [e for e in ENTRIES if FULL or e.ci]


def _params(entries, reason_of=lambda e: e.xfail):
    return [
        pytest.param(
            e,
            id=e.name,
            marks=[pytest.mark.xfail(strict=True, reason=reason_of(e))] if reason_of(e) else [],
        )
        for e in entries
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``compiled(entry)`` → the entry's CPU artifacts, compiled once for the module."""
    cache = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(entry):
        if entry.name not in cache:
            try:
                cache[entry.name] = compile_entry(entry, str(root))
            except Exception as err:  # noqa: BLE001 - a known failure is not compiled twice
                cache[entry.name] = err
        if isinstance(cache[entry.name], Exception):
            raise cache[entry.name]
        return cache[entry.name]

    return get


def test_zoo_spans_thirty_architectures_and_three_exporters():
    """What the zoo promises, checked on the registry itself (and the CI subset's spread)."""
    assert len({e.arch for e in ENTRIES}) >= 30
    assert {e.exporter for e in ENTRIES} == set(EXPORTERS)
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)
    for e in ENTRIES:
        assert e.sizes[0] != e.sizes[1], e.name
        if e.exporter == TORCHSCRIPT:
            assert 9 <= e.opset <= 13, e.name
        elif e.exporter == DYNAMO:
            assert e.opset >= 18, e.name
        else:
            assert 8 <= e.opset <= 9, e.name
    ci = [e for e in ENTRIES if e.ci]
    assert {e.exporter for e in ci} == set(EXPORTERS)
    assert any(e.gpu for e in ci)


@pytest.mark.parametrize("entry", _params(SELECTED))
def test_zoo_model_matches_onnxruntime(entry, compiled):
    c = compiled(entry)
    if c.built.dynamic:  # one artifact serves both sizes: its dims really are symbolic
        assert c.artifacts[0] is c.artifacts[1]
        assert any(isinstance(d, str) for s in c.artifacts[0].inputs for d in s["shape"])
    for i, size in enumerate(entry.sizes):
        got, expected = run_size(c, i)
        assert float(np.std(expected)) > 1e-3, f"degenerate reference output at {size}"
        assert_close(got, expected, rtol=entry.rtol, atol=entry.atol, name=f"output at {size}")


@pytest.mark.parametrize("entry", _params(SELECTED, lambda e: e.xfail_compile or e.xfail_fallback))
def test_zoo_model_kernels_all_get_their_schedule(entry, compiled):
    """A failing rule, or no rule at all, leaves a kernel slower than it should be with only a
    log warning (``qiao.schedules``): none may occur in a zoo model."""
    assert not compiled(entry).fallbacks


@pytest.mark.parametrize("entry", _params(SELECTED, lambda e: e.xfail_compile))
def test_zoo_model_packs_its_weights_at_load(entry, compiled):
    """Weight packing runs once at load (``main_transform_params``), never in ``main``: static
    shapes once made an input's packing share the weight's lifted kernel, which kept it in ``main``
    (the old exporters' AlexNet repacked its dense layers' weights on every call)."""
    for artifact in compiled(entry).artifacts:
        assert not kernels_packing_per_call(artifact.runner)


GPU_TARGETS = [("cuda", "sm_80"), ("rocm", "gfx942")]


def _toolchain_missing(target):
    from qiao.backends import cuda, rocm

    if target == "cuda" and cuda.find_nvcc() is None:
        return "nvcc (CUDA toolkit) not installed"
    if target == "rocm" and rocm.find_lld() is None:
        return "ld.lld not installed (lld-19)"
    return None


def _gpu_entries():
    """The GPU subset; in CI its first entry that is also in the CI subset (one small CNN)."""
    gpu = [e for e in SELECTED if e.gpu]
    return gpu if FULL else gpu[:1]


@pytest.mark.parametrize("target,arch", GPU_TARGETS)
@pytest.mark.parametrize("entry", _params(_gpu_entries(), lambda e: e.xfail_compile))
def test_zoo_model_compiles_for_gpu(entry, target, arch, tmp_path):
    """Code generation only: the device code object is for ``arch`` and holds every kernel the
    manifest lists (checked by reading the ELF images, as tests/test_cuda.py and test_rocm.py)."""
    from qiao.backends.binfmt import EM_AMDGPU, EM_CUDA, cubin_arch, fatbin_entries, read_elf

    reason = _toolchain_missing(target)
    if reason:
        pytest.skip(reason)
    c = compile_entry(entry, str(tmp_path), target, first_only=True, arch=arch)
    section = c.artifacts[0].manifest["backend"]
    assert section["arch"] == arch
    with open(os.path.join(c.artifacts[0].directory, section["device_code"]), "rb") as f:
        code = f.read()
    if target == "cuda":
        (image,) = [e for e in fatbin_entries(code) if e.kind == "elf"]
        info = read_elf(image.payload)
        assert info.machine == EM_CUDA
        assert cubin_arch(info.flags, info.abi_version) == int(arch[3:])
    else:
        info = read_elf(code)
        assert info.machine == EM_AMDGPU
        assert arch.encode() in code
    kernels = set(section["kernels"])
    assert kernels and kernels <= set(info.functions), kernels - set(info.functions)
    assert not c.fallbacks


def test_caffe2_entries_really_look_like_caffe2_files(tmp_path):
    """The third exporter is what it claims: IR version 3, every initializer also a graph input,
    Caffe2-style names."""
    import onnx

    from tests.zoo.common import export
    from tests.zoo.harness import build

    entry = next(e for e in ENTRIES if e.exporter == CAFFE2 and e.ci)
    path = export(entry, build(entry), entry.sizes[0], str(tmp_path / "m.onnx"))
    model = onnx.load(path)
    assert model.ir_version == 3 and model.opset_import[0].version == entry.opset
    inputs = [v.name for v in model.graph.input]
    assert inputs[0] == "gpu_0/data_0"
    assert {t.name for t in model.graph.initializer} <= set(inputs)
    assert "conv1_w_0" in inputs and "conv1_b_0" in inputs


def test_a_kernel_no_rule_schedules_is_reported_unless_written_parallel(caplog):
    """What the fallback test above listens for: a kernel that no rule schedules is logged as an
    unscheduled loop nest; one written with a parallel loop (TVM's IRBuilder scan kernels, e.g.
    cumsum in the decoders' masks) is kept as written, without a warning."""
    import logging

    import tvm
    from tvm.script import tirx as T

    from qiao.compiler.passes.apply_schedule_rules import ApplyScheduleRules
    from tests.zoo.harness import FALLBACK

    @T.prim_func(s_tir=True)
    def serial(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in range(64):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    @T.prim_func(s_tir=True)
    def parallel(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in T.parallel(64):
            b[i] = a[i] + T.float32(1)

    for func, warned in ((serial, True), (parallel, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qiao.schedules"):
            with tvm.target.Target("llvm"):
                ApplyScheduleRules([])(tvm.IRModule({"main": func}))
        found = [r.getMessage() for r in caplog.records if FALLBACK.search(r.getMessage())]
        assert bool(found) == warned, found


def test_old_opset_pad_and_scalar_constant_of_shape(tmp_path):
    """What the zoo's old-opset files need, on a hand-written one: Pad-2 (pads as an attribute,
    opsets 2-10) on an input with a symbolic batch, which TVM's Pad-2 converter rejects as
    'dynamic pads' (qiao upgrades files below opset 11 first), and ConstantOfShape of an empty
    shape (a scalar: TorchScript writes it for 0-d constants), which TVM's converter broadcast to
    rank 0 and failed on."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qiao.compiler import compile

    nodes = [
        helper.make_node("Pad", ["x"], ["padded"], pads=[0, 0, 1, 2, 0, 0, 3, 0], value=0.5),
        helper.make_node(
            "Constant", [], ["empty"], value=helper.make_tensor("e", TensorProto.INT64, [0], [])
        ),
        helper.make_node(
            "ConstantOfShape",
            ["empty"],
            ["scale"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [3.0]),
        ),
        helper.make_node("Mul", ["padded", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pad2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8, 7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 5
    onnx.checker.check_model(model)
    path = tmp_path / "pad2.onnx"
    onnx.save(model, path)
    artifact = compile(path, "cpu", tmp_path / "art")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 4, 5)).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        assert_close(artifact.run({"x": x})["y"], expected, rtol=1e-6, atol=1e-6)
