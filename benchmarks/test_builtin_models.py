"""Built-in models (mlp, cnn, transformer) on the CPU: qiao vs ONNX Runtime vs PyTorch eager.

One artifact per model serves every size (the batch or token dimension is symbolic). Each group is
one (model, size); its qiao case first checks qiao's outputs against ONNX Runtime, so a figure is
never the speed of a wrong answer. See conftest.py for smoke mode and how to compare runs.
"""

from __future__ import annotations

import pytest

from qiao.compiler.bench import OnnxRuntimeEngine, QiaoEngine, TorchEngine, plan_sizes
from qiao.compiler.validate import compare, tolerances

full = pytest.mark.full_only
CASES = [
    pytest.param("mlp", "batch", 1, id="mlp-batch1"),
    pytest.param("mlp", "batch", 16, id="mlp-batch16", marks=full),
    pytest.param("mlp", "batch", 256, id="mlp-batch256", marks=full),
    pytest.param("cnn", "batch", 1, id="cnn-batch1"),
    pytest.param("cnn", "batch", 16, id="cnn-batch16", marks=full),
    pytest.param("transformer", "tokens", 1, id="transformer-tokens1"),
    pytest.param("transformer", "tokens", 16, id="transformer-tokens16", marks=full),
    pytest.param("transformer", "tokens", 128, id="transformer-tokens128", marks=full),
]
ENGINES = ["qiao", "onnxruntime", "torch"]
_engines: dict[tuple[str, str], object] = {}


def _engine(artifact, kind: str):
    key = (artifact.directory, kind)
    if key not in _engines:
        if kind == "qiao":
            _engines[key] = QiaoEngine(artifact)
        elif kind == "onnxruntime":
            _engines[key] = OnnxRuntimeEngine(f"{artifact.directory}/model.onnx", "cpu")
        else:
            _engines[key] = TorchEngine(artifact.manifest["source"], "cpu")
    return _engines[key]


@pytest.mark.parametrize("engine_kind", ENGINES)
@pytest.mark.parametrize("model, mode, size", CASES)
def test_builtin_model(benchmark, bench_run, compiled_model, model, mode, size, engine_kind):
    artifact = compiled_model(model)
    plan = plan_sizes(artifact.inputs, **{mode: [size]})
    inputs = artifact.random_inputs(0, plan.dims(size))
    engine = _engine(artifact, engine_kind)
    if engine_kind == "qiao":
        rtol, atol = tolerances(artifact, None, None)
        expected = _engine(artifact, "onnxruntime").outputs(inputs)
        for name, value in engine.outputs(inputs).items():
            check = compare(name, "onnxruntime", value, expected[name], rtol, atol)
            assert check.ok, f"{model} {mode}={size}: {name} differs from onnxruntime: {check}"
    samples, tokens = plan.items(size, artifact.inputs)
    bench_run(
        benchmark,
        engine.prepare(inputs),
        group=f"{model} {mode}={size}",
        engine=engine.name,
        samples_per_call=samples,
        tokens_per_call=tokens,
    )
