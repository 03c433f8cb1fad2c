"""`qiao bench`: statistics against numpy, size binding, FLOPs estimates against hand counts, the
result schema, fingerprint parsing, and the CLI's exit codes. No wall-clock value is asserted."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler import QiaoError, UnknownTarget
from qiao.compiler.bench import (
    SCHEMA_VERSION,
    check_result,
    choose_number,
    estimate_cost,
    latency_stats,
    parse_sizes,
    percentile,
    plan_sizes,
    time_callable,
)
from qiao.compiler.fingerprint import (
    gpu_info,
    machine_fingerprint,
    parse_nvidia_smi,
    parse_rocm_smi,
)
from qiao.compiler.testing import assert_close, run_cli


# -- statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_latency_stats_match_numpy(n):
    samples = np.random.default_rng(n).lognormal(-8, 0.5, n)  # latency-like: skewed, positive
    stats = latency_stats(list(samples))
    expected = {
        "mean": np.mean(samples),
        "median": np.median(samples),
        "p90": np.percentile(samples, 90),
        "p99": np.percentile(samples, 99),
        "min": np.min(samples),
        "max": np.max(samples),
        "std": np.std(samples),
    }
    for key, value in expected.items():
        assert_close(np.float64(stats[key]), value, rtol=1e-12, atol=0, name=key)
    assert stats["n"] == n


@pytest.mark.parametrize("q", [0, 12.5, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = sorted(np.random.default_rng(1).standard_normal(37))
    assert_close(
        np.float64(percentile(values, q)), np.percentile(values, q), rtol=1e-12, atol=1e-15
    )


def test_statistics_refuse_bad_input():
    with pytest.raises(QiaoError, match="no latency samples"):
        latency_stats([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_choose_number_reaches_min_time():
    for single, repeat, min_time in [(1e-3, 10, 0.5), (3e-6, 30, 1.0), (0.2, 5, 0.1)]:
        number = choose_number(single, repeat, min_time)
        assert number * repeat * single >= min_time or number == 1
        assert number == 1 or (number - 1) * repeat * single < min_time
    assert choose_number(1e-3, 10, 0) == 1
    assert choose_number(1e-12, 10, 10.0) == 100_000  # capped


def test_time_callable_counts_calls():
    calls = []
    samples = time_callable(lambda: calls.append(1), repeat=4, number=3)
    assert len(samples) == 4 and len(calls) == 12
    assert all(s >= 0 for s in samples)


# -- sizes -----------------------------------------------------------------------------------------
def test_parse_sizes():
    assert parse_sizes("16,1,16, 128", "--batch") == [1, 16, 128]
    assert parse_sizes(None, "--batch") is None
    for bad in ["a", "0", "", "1,-2"]:
        with pytest.raises(QiaoError, match="--tokens"):
            parse_sizes(bad, "--tokens")


LLM = [{"name": "h", "dtype": "float32", "shape": ["batch", "seq", 64]}]
MLP = [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
ODD = [{"name": "x", "dtype": "float32", "shape": ["rows", 8]}]
STATIC = [{"name": "x", "dtype": "float32", "shape": [4, 8]}]


def test_plan_sizes_tokens_and_batch():
    plan = plan_sizes(LLM, tokens=[1, 16])
    assert (plan.mode, plan.dim, plan.sizes) == ("tokens", "seq", (1, 16))
    assert plan.dims(16) == {"seq": 16, "batch": 1}
    assert plan.items(16, LLM) == (1, 16)
    plan = plan_sizes(LLM, tokens=[8], dims={"batch": 2})
    assert plan.items(8, LLM) == (2, 16)  # tokens per call = batch * seq
    plan = plan_sizes(LLM, batch=[4])
    assert plan.dims(4) == {"batch": 4, "seq": 1} and plan.items(4, LLM) == (4, 4)
    plan = plan_sizes(MLP, batch=[1, 16])
    assert plan.dims(16) == {"batch": 16} and plan.items(16, MLP) == (16, None)
    assert plan_sizes(ODD, batch=[3]).dims(3) == {"rows": 3}  # the only symbolic dim
    assert plan_sizes(MLP).dims(1) == {"batch": 1}  # default: size 1
    static = plan_sizes(STATIC)
    assert static.mode == "static" and static.dims(1) == {} and static.items(1, STATIC) == (4, None)


def test_plan_sizes_errors():
    with pytest.raises(QiaoError, match="--tokens needs a symbolic token dimension"):
        plan_sizes(MLP, tokens=[1])
    with pytest.raises(QiaoError, match="--batch needs"):
        plan_sizes(STATIC, batch=[2])
    with pytest.raises(QiaoError, match="no such symbolic dimension"):
        plan_sizes(MLP, batch=[1], dims={"heads": 2})
    with pytest.raises(QiaoError, match="either --tokens or --batch"):
        plan_sizes(LLM, tokens=[1], batch=[1])


# -- FLOPs / bytes estimates -----------------------------------------------------------------------
def _graph_model():
    """MatMul (batch, 8, 16) x (16, 32) → Gemm (transB); a Conv and a ConvTranspose on `img`."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((12, 32)).astype(np.float32)  # Gemm with transB: (M, 32) x (32, 12)
    wc = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # Conv, groups=2, Cin=4
    wt = rng.standard_normal((6, 5, 2, 2)).astype(np.float32)  # ConvTranspose: Cin=6, Cout=5
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["y2"]),
        helper.make_node("Gemm", ["y2", "w2"], ["z"], transB=1),
        helper.make_node("Conv", ["img", "wc"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "cost",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 4, 10, 10]),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, None),
        ],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(wc, "wc"),
            numpy_helper.from_array(wt, "wt"),
            numpy_helper.from_array(np.array([-1, 32], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, 3])
def test_estimate_cost_counts_matmul_gemm_conv(batch):
    cost = estimate_cost(_graph_model(), {"batch": batch})
    rows = batch * 8
    matmul = 2 * rows * 32 * 16
    gemm = 2 * rows * 12 * 32
    conv = 2 * (batch * 6 * 10 * 10) * (2 * 3 * 3)  # each output: Cin/groups * kh * kw MACs
    # ConvTranspose: every input element (batch, 6, 10, 10) meets Cout * kh * kw = 5 * 2 * 2 weights
    convt = 2 * (batch * 6 * 10 * 10) * (5 * 2 * 2)
    assert cost["flops"] == matmul + gemm + conv + convt
    weights = 4 * (16 * 32 + 12 * 32 + 6 * 2 * 9 + 6 * 5 * 4) + 8 * 2
    io = 4 * (batch * 8 * 16 + batch * 4 * 100 + rows * 12 + batch * 5 * 20 * 20)
    assert cost["bytes"] == weights + io
    assert cost["counted_nodes"] == 4 and cost["unknown_nodes"] == 0


def test_estimate_cost_moe_node():
    experts, hidden, inter, k = 4, 8, 6, 2
    rng = np.random.default_rng(0)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32)
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32)
    node = helper.make_node(
        "MoE", ["x", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=k
    )
    graph = helper.make_graph(
        [node],
        "moe",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden]),
            helper.make_tensor_value_info("router", TensorProto.FLOAT, ["tokens", experts]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])],
        initializer=[numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    for tokens in (1, 5):
        cost = estimate_cost(model, {"tokens": tokens})
        assert cost["flops"] == 2 * tokens * k * (2 * inter * hidden + hidden * inter)
        touched = min(1.0, tokens * k / experts)  # tokens*k routes reach at most that many experts
        io = 4 * (tokens * hidden + tokens * experts + tokens * hidden)
        assert cost["bytes"] == int(io + touched * (fc1.nbytes + fc2.nbytes))


def test_estimate_cost_without_counted_ops_is_none():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    assert estimate_cost(helper.make_model(graph), {"batch": 2}) is None


# -- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_parsers():
    text = "NVIDIA H100 80GB HBM3, 550.54.15, 81559, 9.0\n" * 2
    gpus = parse_nvidia_smi(text)
    assert len(gpus) == 2
    assert gpus[0] == {
        "vendor": "nvidia",
        "name": "NVIDIA H100 80GB HBM3",
        "driver": "550.54.15",
        "memory_bytes": 81559 * 1024 * 1024,
        "compute_capability": "9.0",
    }
    rocm = json.dumps(
        {
            "card0": {"Card Series": "AMD Instinct MI300X", "GFX Version": "gfx942"},
            "card1": {"Card Series": "AMD Instinct MI300X", "GFX Version": "gfx942"},
            "system": {"Driver version": "6.8.5"},
        }
    )
    gpus = parse_rocm_smi(rocm)
    assert [g["name"] for g in gpus] == ["AMD Instinct MI300X"] * 2
    assert gpus[0]["driver"] == "6.8.5" and gpus[0]["gfx"] == "gfx942"
    assert parse_rocm_smi("not json") == []
    fake = {"nvidia-smi": text.splitlines()[0], "rocm-smi": None}
    assert [g["vendor"] for g in gpu_info(lambda argv: fake[argv[0]])] == ["nvidia"]
    assert gpu_info(lambda argv: None) == []


def test_machine_fingerprint_fields():
    machine = machine_fingerprint()
    assert machine["cpu"]["cores_logical"] == os.cpu_count()
    assert machine["cpu"]["cores_usable"] >= 1
    assert machine["os"]["system"]
    json.dumps(machine)  # serialisable as it stands


# -- end to end (library) --------------------------------------------------------------------------
def _mlp_flops(batch: int) -> int:
    from qiao.models import get_model

    module = get_model("mlp").module
    return sum(
        2 * batch * m.in_features * m.out_features
        for m in module.modules()
        if hasattr(m, "in_features")
    )


@pytest.fixture(scope="module")
def mlp_result():
    from qiao.compiler.bench import bench

    return bench(
        "mlp",
        "cpu",
        baselines=("onnxruntime", "torch"),
        batch=[1, 4],
        warmup=1,
        repeat=3,
        min_time=0,
        roofs=False,
    )


def test_bench_result_schema_and_figures(mlp_result):
    result = check_result(json.loads(json.dumps(mlp_result)))
    assert result["schema_version"] == SCHEMA_VERSION
    assert result["model"]["name"] == "mlp" and result["model"]["sizes"]["dim"] == "batch"
    target = result["targets"][0]
    assert target["status"] == "ok" and target["target_json"]["kind"] == "llvm"
    assert target["compile_s"] > 0
    assert result["software"]["apache-tvm"] and result["software"]["onnxruntime"]
    assert [c["size"] for c in result["cases"]] == [{"batch": 1}, {"batch": 4}]
    for case in result["cases"]:
        batch = case["size"]["batch"]
        assert set(case["engines"]) == {"qiao", "onnxruntime-cpu", "torch-cpu"}
        for timed in case["engines"].values():
            samples = np.array(timed["samples_s"])
            assert len(samples) == 3 and (samples > 0).all()
            stats = timed["latency_s"]
            assert_close(np.float64(stats["median"]), np.median(samples), rtol=1e-12, atol=0)
            assert_close(
                np.float64(timed["throughput"]["samples_per_s"]),
                batch / np.mean(samples),
                rtol=1e-12,
                atol=0,
            )
            mem = timed["peak_rss_delta_mib"]
            assert mem is None or mem >= 0
        qiao = case["engines"]["qiao"]["latency_s"]["median"]
        for name in ("onnxruntime-cpu", "torch-cpu"):
            base = case["engines"][name]["latency_s"]["median"]
            assert math.isclose(case["speedup"][name], base / qiao, rel_tol=1e-12)
            assert case["check"][name]["ok"], case["check"][name]
        assert case["flops"] == _mlp_flops(batch)


def test_bench_result_feeds_report(mlp_result, tmp_path):
    from qiao.compiler.report import load_results, write_report

    path = tmp_path / "r.json"
    path.write_text(json.dumps(mlp_result))
    written = write_report(load_results([path]), tmp_path / "rep")
    assert {"markdown", "latency", "speedup", "roofline"} <= set(written)
    text = open(written["markdown"]).read()
    assert "| mlp |" in text and "onnxruntime-cpu" in text


def test_bench_existing_artifact(compiled_builtin):
    from qiao.compiler.bench import bench

    artifact = compiled_builtin("mlp")
    result = bench(
        artifact.directory, baselines=(), batch=[2], warmup=0, repeat=2, min_time=0, roofs=False
    )
    assert result["targets"][0]["compile_s"] is None
    assert list(result["cases"][0]["engines"]) == ["qiao"]
    with pytest.raises(QiaoError, match="is an artifact for target 'cpu'"):
        bench(artifact.directory, "cpu,cpu", baselines=())
    with pytest.raises(UnknownTarget):
        bench("mlp", "no-such-target")
    with pytest.raises(QiaoError, match="unknown baseline"):
        bench("mlp", "cpu", baselines=("tensorrt",))
    with pytest.raises(QiaoError, match="dim ranges are a compile option"):
        bench(artifact.directory, baselines=(), dim_ranges={"batch": (1, 2)})
    with pytest.raises(QiaoError, match="go together"):
        bench("mlp", "cpu", rpc_tracker="127.0.0.1:9190")


def test_check_result_refuses_other_versions():
    with pytest.raises(QiaoError, match="schema version 99"):
        check_result({"schema": "qiao-bench", "schema_version": 99}, "x.json")
    with pytest.raises(QiaoError, match="not a qiao bench result"):
        check_result({"hello": 1}, "x.json")
    with pytest.raises(QiaoError, match="missing"):
        check_result({"schema": "qiao-bench", "schema_version": SCHEMA_VERSION}, "x.json")


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_bench_json_and_file(tmp_path):
    out = tmp_path / "res.json"
    proc = run_cli(
        "bench",
        "mlp",
        "--target",
        "cpu",
        "--baseline",
        "onnxruntime",
        "--batch",
        "1,2",
        "--warmup",
        "1",
        "--repeat",
        "2",
        "--min-time",
        "0",
        "--no-roofs",
        "--json",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)  # --json: stdout is the document and nothing else
    assert printed == json.loads(out.read_text())
    assert [c["size"]["batch"] for c in printed["cases"]] == [1, 2]
    assert set(printed["cases"][0]["engines"]) == {"qiao", "onnxruntime-cpu"}


def test_cli_bench_errors_exit_2(tmp_path):
    proc = run_cli("bench", "mlp", "--target", "cpu,nope")
    assert proc.returncode == 2
    assert "unknown target 'nope'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("bench", "mlp", "--batch", "1,x")
    assert proc.returncode == 2 and "bad --batch" in proc.stderr
    proc = run_cli("bench", "mlp", "--rpc-tracker", "nohost", "--rpc-key", "k")
    assert proc.returncode == 2 and "bad --rpc-tracker address" in proc.stderr


# -- engines: one interface for qiao validate, qiao bench and benchmarks/ --------------------------
def _tiny_onnx(path):
    """y = relu(x @ W + b) with a symbolic batch, W and b seeded."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return model, w, b


def test_time_until_counts_calls():
    from qiao.compiler.bench import time_until

    calls = []
    samples = time_until(lambda: calls.append(1), repeat=4, warmup=2, min_time=0.0)
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    assert len(calls) == 2 + 4  # min_time 0: one call per sample


def test_ort_providers_come_from_the_backends():
    from qiao.backends import get_backend
    from qiao.compiler.bench import ort_providers

    cpu = get_backend("cpu")
    assert ort_providers(cpu.reference_device) == tuple(cpu.ort_providers)
    with pytest.raises(QiaoError, match="no backend runs its ONNX Runtime reference"):
        ort_providers("no-such-device")


def test_onnxruntime_engine_and_validate_reference_vs_numpy(tmp_path):
    from qiao.compiler.bench import OnnxRuntimeEngine
    from qiao.compiler.validate import onnxruntime_reference

    path = tmp_path / "tiny.onnx"
    model, w, b = _tiny_onnx(path)
    x = np.random.default_rng(4).standard_normal((6, 5)).astype(np.float32)
    expected = np.maximum(x @ w + b, 0)
    engine = OnnxRuntimeEngine(path)
    assert engine.name == "onnxruntime-cpu" and engine.provider == "CPUExecutionProvider"
    assert_close(engine.outputs({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    from_bytes = OnnxRuntimeEngine(model.SerializeToString(), threads=1)
    assert_close(from_bytes.outputs({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    assert_close(onnxruntime_reference(str(path), {"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    calls = engine.prepare({"x": x})
    calls()  # the prepared callable runs (its result is not returned: timing only)
    samples, number = engine.measure({"x": x}, warmup=1, repeat=2, min_time=0)
    assert len(samples) == 2 and number == 1


class _CountingRunner:
    """A runner with only the public ``Runner`` interface (``run``; ``prepare`` and ``benchmark``
    from the base class): what ``QiaoEngine`` must be content with."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, inputs):
        self.calls += 1
        return self.inner.run(inputs)


def test_qiao_engine_uses_only_the_public_runner_interface(compiled_builtin):
    from qiao.backends.base import Runner
    from qiao.compiler.bench import OnnxRuntimeEngine, QiaoEngine

    artifact = compiled_builtin("mlp")
    runner = type("PublicOnly", (_CountingRunner, Runner), {})(artifact.runner)
    engine = QiaoEngine(artifact, runner)
    inputs = artifact.random_inputs(0, {"batch": 3})
    expected = OnnxRuntimeEngine(f"{artifact.directory}/model.onnx").outputs(inputs)
    for name, value in engine.outputs(inputs).items():
        assert_close(value, expected[name], rtol=1e-4, atol=1e-4, name=name)
    before = runner.calls
    engine.prepare(inputs)()
    samples, number = engine.measure(inputs, warmup=1, repeat=2, min_time=0)
    assert len(samples) == 2 and number == 1
    # one prepared call, one warm-up, three calibration calls, two timed samples of one call
    assert runner.calls - before == 1 + 1 + 3 + 2
    # the TVM runner's own prepare: device-resident arguments, same answer as run
    prepared = artifact.runner.prepare(artifact.check_inputs(inputs))
    prepared()


def test_baseline_devices_come_from_the_backend(compiled_builtin):
    """Where the baselines run is the backend's ``reference_device`` / ``ort_providers``; a backend
    without one gets a note, not a guess from its target kind."""
    from types import SimpleNamespace

    from qiao.compiler.bench import baseline_engines

    artifact = compiled_builtin("mlp")

    def fake(reference_device, providers):
        backend = SimpleNamespace(reference_device=reference_device, ort_providers=providers)
        return SimpleNamespace(
            backend=backend, manifest=artifact.manifest, directory=artifact.directory
        )

    notes: list[str] = []
    assert baseline_engines(fake(None, ()), ["onnxruntime", "torch"], notes) == []
    assert len(notes) == 2 and all("no baseline device" in n for n in notes)
    notes = []
    (engine,) = baseline_engines(fake("toy", ("CPUExecutionProvider",)), ["onnxruntime"], notes)
    assert engine.name == "onnxruntime-toy" and engine.provider == "CPUExecutionProvider"
    assert notes == []
    notes = []
    missing = fake("toy", ("NoSuchExecutionProvider",))
    (engine,) = baseline_engines(missing, ["onnxruntime"], notes)  # falls back to the CPU
    assert engine.name == "onnxruntime-cpu" and "timed on the CPU instead" in notes[0]


def test_bench_and_validate_use_only_public_runner_fields():
    """Engines reach runners through ``run`` / ``prepare`` / ``benchmark`` only (the target-kind
    switches are checked for all of compiler/ by tests/test_no_target_switch.py)."""
    import glob
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compiler")
    paths = glob.glob(os.path.join(root, "bench", "*.py")) + [os.path.join(root, "validate.py")]
    assert len(paths) > 2
    for path in paths:
        with open(path) as f:
            assert not re.search(r"runner\)?\._[a-z]", f.read()), path


def test_bench_compiles_with_dim_ranges(tmp_path):
    """``dim_ranges`` reaches the compile (the kept artifact records it) and the benchmarked sizes
    run inside it; ``qiao bench --dim-range`` is the same option."""
    from qiao.compiler import load
    from qiao.compiler.bench import bench

    result = bench(
        "mlp", "cpu", baselines=(), batch=[1, 3], dim_ranges={"batch": (1, 3)}, warmup=0,
        repeat=1, min_time=0, roofs=False, artifact_dir=str(tmp_path / "arts"),
    )  # fmt: skip
    assert [c["size"] for c in result["cases"]] == [{"batch": 1}, {"batch": 3}]
    assert load(result["targets"][0]["artifact"]).manifest["dim_ranges"] == {"batch": [1, 3]}
    proc = run_cli("bench", "mlp", "--batch", "1", "--baseline", "none", "--dim-range", "batch=1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "fix: write it as NAME=LO:HI" in proc.stderr + proc.stdout


@pytest.mark.parametrize("json_out", [False, True])
def test_cli_report_exits_1_on_a_mismatch(tmp_path, capsys, json_out):
    """`qiao bench` and `qiao bench --generate` report through one path: the result is written
    (``--output``) and printed as JSON or as the formatter's table, and a case whose outputs
    differ from a baseline's names the case on stderr and exits 1 (timings of wrong results)."""
    from argparse import Namespace

    from qiao.compiler.cli.bench import _report

    def case(ok):
        return {"target": "cpu", "size": "batch=1", "check": {"onnxruntime": {"ok": ok}}}

    for ok, code in ((True, 0), (False, 1)):
        out = tmp_path / f"{ok}.json"
        result = {"cases": [case(True), case(ok)]}
        args = Namespace(output=str(out), json=json_out)
        assert _report(args, result, lambda r: f"table of {len(r['cases'])}", "bad ({})") == code
        assert json.loads(out.read_text()) == result
        printed = capsys.readouterr()
        if json_out:
            assert json.loads(printed.out) == result
        else:
            assert printed.out == f"table of 2\nwrote {out}\n"
        assert printed.err == ("" if ok else "qiao bench: bad (cpu batch=1 vs onnxruntime)\n")
