"""The per-device tuning database: keys, persistence, tune-on-demand, reuse without retuning.

One real (tiny) tuning run with two trials; everything else uses records written by the test.
Every test points ``QIAO_CACHE_DIR`` at a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax

from qiao.compiler.testing import assert_close, fused_module


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QIAO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _host_target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


def _dense_module(k=32, n=48):
    """``relu(x[b, k] @ w[k, n])`` with a symbolic batch, legalised and fused."""

    def build(bb):
        b = tvm.tirx.Var("batch", "int64")
        x = relax.Var("x", relax.TensorType((b, k), "float32"))
        w = relax.Var("w", relax.TensorType((k, n), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
            bb.emit_func_output(out)

    return fused_module(build)


def _gemm(mod):
    (func,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("fused_matmul")]
    return func


def test_device_key_separates_cpus_and_core_counts():
    from qiao.compiler.schedules.tuning import device_key

    t = tvm.target.Target
    a = device_key(t({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}))
    b = device_key(t({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}))
    c = device_key(t({"kind": "llvm", "mcpu": "znver3", "num-cores": 8}))
    assert len({a, b, c}) == 3
    assert a.startswith("znver3-2c-") and c.startswith("znver3-8c-")
    assert a == device_key(t({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}))


def test_workload_key_is_stable_across_processes():
    from qiao.compiler.schedules.tuning import workload_key

    here = workload_key(_gemm(_dense_module()))
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_tuning as t;"
        "from qiao.compiler.schedules.tuning import workload_key;"
        "print(workload_key(t._gemm(t._dense_module())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here
    assert workload_key(_gemm(_dense_module(n=64))) != here


def test_database_round_trip_and_stale_versions(cache_dir):
    from qiao.compiler.schedules import tuning

    target = _host_target()
    func = _gemm(_dense_module())
    db = tuning.TuningDatabase.for_target(target)
    assert db.lookup(func) is None
    record = {
        "kind": "gemm",
        "tile": {"mr": 4, "nr_vectors": 1, "mc_tiles": 1, "nc_tiles": 0, "k_unroll": 4},
        "seconds": 1e-5,
    }
    db.commit(func, record)
    assert str(cache_dir) in db.path
    assert tuning.TuningDatabase.for_target(target).lookup(func) == record
    with open(db.path) as f:
        data = json.load(f)
    data["schedule_version"] = tuning.SCHEDULE_VERSION + 1
    with open(db.path, "w") as f:
        json.dump(data, f)
    assert tuning.TuningDatabase.for_target(target).lookup(func) is None
    with open(db.path, "w") as f:
        f.write("{not json")
    assert tuning.TuningDatabase.for_target(target).lookup(func) is None


def test_tune_once_then_reuse_without_measuring(monkeypatch):
    """Two real trials on a tiny kernel; the record then serves a fresh database object, and
    asking again never measures (a second tuning attempt would raise here)."""
    from qiao.compiler.schedules import tuning

    target = _host_target()
    func = _gemm(_dense_module())
    db = tuning.TuningDatabase.for_target(target, tune_dims={"batch": 16})
    scheduled = db.schedule(func, target, tune_trials=2)
    assert scheduled is not None and db.tuned == [tuning.workload_key(func)]
    record = db.lookup(func)
    assert record["trials"] == 2 and record["dims"] == {"batch": 16}
    assert record["seconds"] > 0 and record["seconds"] <= record["default_seconds"]

    def no_tuning(*args, **kwargs):
        raise AssertionError("a workload already tuned on this device was tuned again")

    monkeypatch.setattr(tuning, "tune_gemm", no_tuning)
    again = tuning.TuningDatabase.for_target(target)
    assert again.schedule(func, target, tune_trials=2) is not None
    assert again.tuned == []
    # The tuned kernel is still right.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32)).astype("float32")
    w = rng.standard_normal((32, 48)).astype("float32")
    fn = tvm.compile(
        tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target
    ).jit()["main"]
    out = tvm.runtime.tensor(np.zeros((5, 48), "float32"))
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    assert_close(out.numpy(), np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


def test_compiles_apply_recorded_tiles(tmp_path):
    """A record written for a workload decides that workload's schedule in the next compile."""
    from qiao.compiler.schedules import schedule_passes, tuning

    target = _host_target()
    mod = _dense_module()
    func = _gemm(mod)
    db = tuning.TuningDatabase.for_target(target, root=str(tmp_path / "db"))
    db.commit(
        func,
        {
            "kind": "gemm",
            "tile": {"mr": 5, "nr_vectors": 1, "mc_tiles": 1, "nc_tiles": 0, "k_unroll": 2},
        },
    )

    def schedule(options):
        with target:
            out = tvm.transform.Sequential(schedule_passes(target, options))(mod)
        return _gemm(out).script()

    recorded = schedule({"tuning_db": str(tmp_path / "db")})
    default = schedule({"tuning_db": str(tmp_path / "empty")})
    assert "T.unroll(T.int64(5))" in recorded  # the recorded 5-row register block
    assert "T.unroll(T.int64(5))" not in default
    assert schedule({"tuning_db": str(tmp_path / "db"), "use_tuning_db": False}) == default


def test_tuning_refuses_another_cpu():
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.schedules import tuning

    host = str(tvm.target.codegen.llvm_get_system_cpu())
    other = "znver3" if host != "znver3" else "skylake"
    target = tvm.target.Target({"kind": "llvm", "mcpu": other, "num-cores": 2})
    with pytest.raises(QiaoError, match="cannot tune"):
        tuning.tune_gemm(_gemm(_dense_module()), target, 2)


def test_measuring_a_broken_candidate_gives_none(tmp_path):
    from qiao.compiler.schedules.tuning import measure_libraries

    missing = str(tmp_path / "no-such-library.so")
    assert measure_libraries([missing], [{"shape": [2], "dtype": "float32"}], repeat=1) == [None]


def _tuned_tile(monkeypatch, screened: list[float], gain: float | None):
    """The tile ``tune_gemm`` records for the dense kernel when the screening measures its two
    candidates at ``screened`` seconds and the cold re-measurement finds ``gain``."""
    from qiao.compiler.schedules import tuning

    confirmations = []

    def confirm(default_path, candidate_path, args):
        confirmations.append((default_path, candidate_path))
        return gain

    monkeypatch.setattr(tuning, "measure_libraries", lambda paths, args: list(screened))
    monkeypatch.setattr(tuning, "confirmed_gain", confirm)
    record = tuning.tune_gemm(_gemm(_dense_module()), _host_target(), 2, {"batch": 16})
    assert record["trials"] == 2
    return record, confirmations


def test_a_screened_win_replaces_the_default_only_when_confirmed(monkeypatch):
    """The screening's winner is re-measured against the default (cold, interleaved); it is
    recorded only when that confirms a gain of ``MIN_GAIN`` or more, else the default is."""
    from qiao.compiler.schedules.tuning import MIN_GAIN

    default, asked = _tuned_tile(monkeypatch, [1e-5, 2e-5], None)
    assert asked == [] and default["confirmed_gain"] is None  # the default won: nothing to confirm
    kept, asked = _tuned_tile(monkeypatch, [2e-5, 1e-5], MIN_GAIN * 0.98)
    assert len(asked) == 1 and asked[0][0] != asked[0][1]
    assert kept["tile"] == default["tile"] and kept["seconds"] == 2e-5
    failed, _ = _tuned_tile(monkeypatch, [2e-5, 1e-5], None)  # the re-measurement failed
    assert failed["tile"] == default["tile"]
    taken, _ = _tuned_tile(monkeypatch, [2e-5, 1e-5], MIN_GAIN * 1.2)
    assert taken["tile"] != default["tile"] and taken["seconds"] == 1e-5
    assert taken["confirmed_gain"] == pytest.approx(MIN_GAIN * 1.2)


def test_cold_rounds_time_real_kernels(tmp_path):
    """``measure_rounds`` times real libraries round by round with the caches flushed; a kernel
    against itself gains about 1x; a library that cannot load fails the whole measurement."""
    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
    from qiao.compiler.schedules import schedule_passes
    from qiao.compiler.schedules.tuning import (
        concrete_args,
        confirmed_gain,
        flush_bytes,
        measure_rounds,
    )

    target = _host_target()
    mod = _dense_module()
    with target:
        scheduled = _gemm(tvm.transform.Sequential(schedule_passes(target, {}))(mod))
    path = str(tmp_path / "dense.so")
    compile_cpu_kernel(scheduled, target).export_library(path)
    args = concrete_args(_gemm(mod), {"batch": 16})
    rounds = measure_rounds([path, path], args, 3, flush_bytes(), repeat=2)
    assert [len(r) for r in rounds] == [3, 3] and all(t > 0 for r in rounds for t in r)
    assert 0.3 < confirmed_gain(path, path, args) < 3.0
    assert measure_rounds([path, str(tmp_path / "missing.so")], args, 2, 1 << 20) is None
    assert flush_bytes() >= 8 << 20


def test_model_compile_tunes_its_gemms_once(monkeypatch):
    """The whole flow ``qiao compile --tune`` wires up: the schedule phase of the CPU backend with
    ``tune`` tunes every GEMM of the model into the device database; the next compile (tune asked
    again) only reads records; outputs match ONNX Runtime."""
    import onnxruntime as ort

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.driver import random_inputs, resolve_model
    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.pipeline import make_pipeline
    from qiao.compiler.schedules import tuning

    backend = CPUBackend()
    target = backend.target()
    resolved = resolve_model("mlp")
    imported = import_onnx(resolved.proto)
    options = {"tune": True, "trials": 2, "tune_dims": {"batch": 8}}

    def build():
        phases = backend.phases(target, options)
        pipeline = make_pipeline(phases, target)
        return tvm.compile(imported.mod, target=target, relax_pipeline=pipeline)

    executable = build()
    records = tuning.TuningDatabase.for_target(target).records()
    assert len(records) == 3  # fc1, fc2, fc3
    assert all(r["trials"] == 2 and r["dims"] == {"batch": 8} for r in records.values())

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned again")

    monkeypatch.setattr(tuning, "tune_gemm", no_tuning)
    build()

    inputs = random_inputs([s.to_json() for s in imported.inputs], 0, {"batch": 5})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(inputs[s.name]) for s in imported.inputs]
    # Weights go through the lifted packing once, as TVMRunner does at load.
    args += list(
        vm["main_transform_params"]([tvm.runtime.tensor(v) for v in imported.params.values()])
    )
    got = vm["main"](*args).numpy()
    session = ort.InferenceSession(resolved.proto.SerializeToString())
    assert_close(got, session.run(None, inputs)[0], rtol=1e-5, atol=1e-5)


def test_tune_model_cli_shares_the_store_with_compile_tune(cache_dir, tmp_path):
    """`qiao compile --tune` and `qiao tune model` fill one store: what the first measured, the
    second finds recorded and does not measure again; `qiao tune show` lists the device."""
    from qiao.compiler.testing import run_cli

    env = {"QIAO_CACHE_DIR": str(cache_dir)}
    tune = ["--trials", "2", "--tune-dim", "batch=8"]
    proc = run_cli("compile", "mlp", "-o", str(tmp_path / "art"), "--tune", *tune, env=env)
    assert proc.returncode == 0, proc.stderr
    from qiao.compiler.schedules import tuning

    records = tuning.TuningDatabase.for_target(_host_target()).records()
    assert len(records) == 3 and all(r["trials"] == 2 for r in records.values())
    proc = run_cli("tune", "model", "mlp", *tune, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "0 kernel(s) measured, 3 recorded" in proc.stdout
    assert tuning.TuningDatabase.for_target(_host_target()).records() == records
    shown = run_cli("tune", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert str(cache_dir / "tuning") in shown.stdout
    assert f"{tuning.device_key(_host_target())}: 3" in shown.stdout
    gpu = run_cli("tune", "model", "mlp", "--target", "cuda", env=env)
    assert gpu.returncode != 0 and "fix: use --target cpu" in gpu.stderr


def test_a_candidate_that_crashes_the_measuring_child_costs_only_itself(tmp_path, monkeypatch):
    """A kernel that kills the measuring process (a store far outside its buffer) is recorded as
    failed; the candidates after it are measured by a fresh child, which serves later specs
    until the environment changes."""
    from tvm.script import tirx as T

    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
    from qiao.compiler.schedules import tuning

    @T.prim_func
    def fill(a: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main"})
        for i in range(64):
            a[i] = T.float32(1)

    @T.prim_func
    def crash(a: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main"})
        a[T.int64(1) << T.int64(44)] = T.float32(1)  # 64 TB past the buffer: unmapped

    paths = []
    for name, func in (("fill", fill), ("crash", crash)):
        paths.append(str(tmp_path / f"{name}.so"))
        compile_cpu_kernel(func, _host_target()).export_library(paths[-1])
    args = [{"shape": [64], "dtype": "float32"}]
    assert tuning.measure_libraries([paths[0]], args, repeat=1)[0] > 0
    first = tuning._CHILD.proc
    seconds = tuning.measure_libraries([paths[0], paths[1], paths[0]], args, repeat=1)
    assert seconds[1] is None and seconds[0] > 0 and seconds[2] > 0
    assert tuning._CHILD.proc is not first  # the crashed child was replaced
    again = tuning._CHILD.proc
    assert tuning.measure_libraries([paths[0]], args, repeat=1)[0] > 0
    assert tuning._CHILD.proc is again  # and the new one serves the next spec
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert tuning.measure_libraries([paths[0]], args, repeat=1)[0] > 0
    assert tuning._CHILD.proc is not again  # a child of the new environment
