"""Built-in models and exported PyTorch modules compile for the CPU and match ORT and torch."""

from __future__ import annotations

import re

import onnxruntime as ort
import pytest
import torch

from qiao.compiler import compile, export, load
from qiao.compiler.testing import assert_close, kernels_packing_per_call, main_instructions
from qiao.compiler.validate import validate
from qiao.models import get_model, list_models


def test_builtin_models_listed():
    assert {"mlp", "cnn", "transformer"} <= set(list_models())


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_builtin_matches_torch_and_ort(name, compiled_builtin):
    artifact = compiled_builtin(name)
    spec = get_model(name)
    inputs = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
    got = artifact.run(inputs)
    with torch.no_grad():
        expected = spec.module(*spec.example_inputs).numpy()
    assert_close(got[spec.output_names[0]], expected, rtol=spec.rtol, atol=spec.atol)
    report = validate(artifact)
    assert report.ok, report.format()
    assert {c.reference for c in report.comparisons} == {"onnxruntime", "torch"}
    assert load(artifact.directory).manifest["validation"]["ok"] is True


@pytest.mark.parametrize(
    "name,sizes",
    [
        ("mlp", [{"batch": 1}, {"batch": 7}]),
        ("transformer", [{"batch": 1, "seq": 1}, {"batch": 3, "seq": 33}]),
    ],
)
def test_symbolic_dims_one_artifact_all_sizes(name, sizes, compiled_builtin):
    artifact = compiled_builtin(name)
    spec = get_model(name)
    for dims in sizes:
        shapes = {s["name"]: s["shape"] for s in artifact.inputs}
        assert any(isinstance(d, str) for d in shapes[spec.input_names[0]]), (
            "dims must stay symbolic"
        )
        inputs = artifact.random_inputs(seed=1, dims=dims)
        got = artifact.run(inputs)[spec.output_names[0]]
        with torch.no_grad():
            expected = spec.module(*[torch.from_numpy(inputs[n]) for n in spec.input_names]).numpy()
        assert_close(got, expected, rtol=spec.rtol, atol=spec.atol, name=f"{name} {dims}")


class _Foreign(torch.nn.Module):
    """A module qiao did not define: layer norm, causal SDPA, tanh-GELU, residuals."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.qkv = torch.nn.Linear(32, 96)
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU("tanh"), torch.nn.Linear(64, 32)
        )

    def forward(self, x):
        h = self.norm(x)
        b, s, _ = h.shape
        q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, s, 32)
        return x + self.ff(x)


def test_torch_module_and_onnx_file_paths(tmp_path):
    torch.manual_seed(0)
    module = _Foreign().eval()
    x = torch.randn(2, 5, 32)
    path = export(
        module,
        (x,),
        tmp_path / "foreign.onnx",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b", 1: "s"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for model in (path, module):
        artifact = compile(
            model, "cpu", tmp_path / f"art-{type(model).__name__}", example_args=(x,)
        )
        got = artifact.run({artifact.inputs[0]["name"]: x.numpy()})
        expected = session.run(None, {"x": x.numpy()})[0]
        assert_close(list(got.values())[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_weight_packing_runs_at_load_not_per_call(name, compiled_builtin):
    """The CPU GEMM schedules pack weights into panels; the pipeline lifts that packing into
    ``main_transform_params`` (run once by the runner), so ``main`` never repacks a weight."""
    artifact = compiled_builtin(name)
    runner = artifact.runner
    packed = [p for p in runner.params if len(p.shape) == 5]  # (S, JO, J/nr, K, nr) panels
    assert packed, f"{name}: no weight arrives packed from main_transform_params"
    main = main_instructions(runner)
    assert "_prepacked" in main, f"{name}: main calls no kernel taking pre-packed weights"
    assert not kernels_packing_per_call(runner)


@pytest.mark.parametrize("batch", ["batch", 1])
def test_classifier_head_weight_is_packed_at_load(tmp_path, batch):
    """TorchScript's classifier head, ``Gemm(x, W, b, transB=1)`` with 100 classes (not whole
    panels). A symbolic batch: the schedule pads the batch rows up front, and that stage once came
    before the weight's packing, which then ran on every call instead of once at load. A static
    batch of 1: the input is a static-shaped parameter too, its packing was marked like the
    weight's, and the lifted function then depended on the input and stayed in ``main``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 64)).astype(np.float32)
    b = rng.standard_normal(100).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 100])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "head.onnx")
    artifact = compile(tmp_path / "head.onnx", "cpu", tmp_path / "art")
    main = main_instructions(artifact.runner)
    gemms = set(re.findall(r"(fused_(?:matmul|gemm|dense)\w*|matmul\w*)", main))
    assert gemms and all(g.endswith("_prepacked") for g in gemms), sorted(gemms)
    assert not kernels_packing_per_call(artifact.runner)
    x = rng.standard_normal((3 if batch == "batch" else batch, 64)).astype(np.float32)
    assert_close(artifact.run({"x": x})["y"], x @ w.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_every_kernel_is_scheduled_by_its_rule(name, tmp_path, caplog):
    """No schedule rule fails on a built-in model's kernels: a failing rule falls back to a
    slower generic one with only a log warning, so the test makes that warning an error."""
    import logging

    with caplog.at_level(logging.WARNING, logger="qiao.schedules"):
        compile(name, "cpu", tmp_path / name)
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert not failures, failures


def test_kernels_keep_noalias_next_to_the_vm_shape_functions():
    """TVM's LLVM code generation drops ``noalias`` from every pointer of a module as soon as one
    PrimFunc lacks ``tirx.noalias``. The VM's shape functions do; before qiao marked them, every
    kernel of a model with symbolic shapes could lose it (register tiles spilled: 2.5x slower
    convolutions). A kernel next to a shape function keeps ``noalias`` after MarkHostFuncsNoAlias,
    and the module does reproduce TVM's behaviour without it."""
    import tvm
    from tvm.script import tirx as T

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.passes.mark_host_funcs_no_alias import MarkHostFuncsNoAlias

    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "add_one"})
        for i in range(64):
            with T.sblock("b"):
                vi = T.axis.remap("S", [i])
                b[vi] = a[vi] + T.float32(1)

    @T.prim_func(s_tir=True)
    def shape_func(h: T.Buffer((3,), "int64")):
        T.func_attr({"tirx.is_host_func": True, "global_symbol": "shape_func"})
        h[1] = h[0] * T.int64(4)

    def kernel_defs(mod):
        llvm_ir = tvm.compile(mod, target=CPUBackend().target()).mod.inspect_source("ll")
        return [d for d in llvm_ir.splitlines() if d.startswith("define") and "add_one" in d]

    mod = tvm.IRModule({"add_one": add_one, "shape_func": shape_func})
    assert not any("noalias" in d for d in kernel_defs(mod)), "TVM behaviour changed: revisit"
    marked = MarkHostFuncsNoAlias()(mod)
    assert any("noalias" in d for d in kernel_defs(marked))
    assert marked["shape_func"].attrs["tirx.noalias"]


@pytest.mark.parametrize("name", ["cnn", "transformer", "qwen3-moe-tiny"])
def test_every_kernel_declares_noalias_after_the_pipeline(name):
    """One PrimFunc without ``tirx.noalias`` costs every kernel of the module its ``noalias``
    pointers (see the test above): after the CPU pipeline, all of them carry it — schedule-rule
    output, the MoE kernels and the VM's shape functions."""
    import tvm

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.driver import resolve_model
    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.pipeline import make_pipeline

    backend = CPUBackend()
    target = backend.target()
    mod = import_onnx(resolve_model(name).proto).mod
    with target:
        lowered = make_pipeline(backend.phases(target, {}), target)(mod)
    missing = [
        gvar.name_hint
        for gvar, func in lowered.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
        and not (func.attrs is not None and bool(func.attrs.get("tirx.noalias", False)))
    ]
    assert not missing, f"{name}: kernels without tirx.noalias: {missing}"
