"""Threads and leaks: one loaded artifact called from 8 threads at once gives the outputs of serial
calls (``Artifact.run`` takes a lock: TVM's Relax VM is not reentrant), artifacts loaded once per
thread run in parallel; 10,000 consecutive runs do not grow resident memory by 5 %; 200
load/unload cycles leak no file descriptors and no memory (TVM never frees a loaded library module:
``tvm_backend.load_library`` loads each file once per process).

The measurements run in a fresh subprocess (this file run as a script) so that nothing else the test
session allocates moves them. ``QIAO_LEAK_RUNS`` / ``QIAO_LEAK_CYCLES`` change the counts
(defaults 10,000 and 200; both take a few seconds for the ``mlp`` model).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

RUNS = int(os.environ.get("QIAO_LEAK_RUNS", "10000"))
CYCLES = int(os.environ.get("QIAO_LEAK_CYCLES", "200"))
THREADS = 8
CALLS_PER_THREAD = 300


def _calls_from_threads(call, inputs: list) -> list[list]:
    """``call(inputs[i])`` ``CALLS_PER_THREAD`` times in thread ``i``, all threads started together;
    every result of every thread, or the exception a thread raised."""
    results: list[list] = [[] for _ in inputs]
    barrier = threading.Barrier(len(inputs))

    def work(i):
        barrier.wait()
        try:
            for _ in range(CALLS_PER_THREAD):
                results[i].append(call(i, inputs[i]))
        except Exception as err:  # noqa: BLE001 - reported by the test
            results[i].append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _assert_same(results, expected):
    for i, outs in enumerate(results):
        assert len(outs) == CALLS_PER_THREAD, (i, outs[-1])
        for out in outs:
            assert not isinstance(out, Exception), f"thread {i}: {out}"
            for name, value in expected[i].items():
                # the same kernels on the same inputs: bit-identical to the serial call
                np.testing.assert_array_equal(out[name], value, err_msg=f"thread {i}, {name}")


def test_one_artifact_called_from_8_threads(compiled_builtin):
    artifact = compiled_builtin("mlp")
    inputs = [artifact.random_inputs(seed=i, dims={"batch": 1 + i}) for i in range(THREADS)]
    expected = [artifact.run(x) for x in inputs]  # serial
    _assert_same(_calls_from_threads(lambda i, x: artifact.run(x), inputs), expected)


def test_one_artifact_per_thread_runs_in_parallel(compiled_builtin):
    from qiao.compiler import load

    directory = compiled_builtin("mlp").directory
    artifacts = [load(directory) for _ in range(THREADS)]
    inputs = [artifacts[0].random_inputs(seed=i, dims={"batch": 1 + i}) for i in range(THREADS)]
    expected = [artifacts[0].run(x) for x in inputs]
    _assert_same(_calls_from_threads(lambda i, x: artifacts[i].run(x), inputs), expected)


def _measure(directory: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), directory, str(RUNS), str(CYCLES)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runs_and_load_cycles_do_not_leak(compiled_builtin, capsys):
    m = _measure(compiled_builtin("mlp").directory)
    with capsys.disabled():
        print(f"\nleak figures (mlp): {json.dumps(m)}")
    mib = 1 << 20
    assert m["run_growth"] < 0.05, f"{RUNS} runs grew RSS by {m['run_growth']:.1%}"
    assert m["run_fds"][1] == m["run_fds"][0]
    assert m["cycle_fds"][1] == m["cycle_fds"][0], f"{CYCLES} loads leaked file descriptors"
    # before load_library, each load of mlp kept ~21 KB (4 MiB over 200 cycles)
    grown = m["cycle_rss"][1] - m["cycle_rss"][0]
    assert grown < max(1, CYCLES / 200) * mib, f"{CYCLES} load/unload cycles grew RSS by {grown} B"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _leak_main(directory: str, runs: int, cycles: int) -> None:
    from qiao.compiler import load

    artifact = load(directory)
    x = artifact.random_inputs(dims={"batch": 4})
    for _ in range(200):  # warm-up: allocator pools, lazily created state
        artifact.run(x)
    gc.collect()
    rss0, fds0, start = _rss(), _fds(), time.perf_counter()
    for _ in range(runs):
        artifact.run(x)
    gc.collect()
    rss1, fds1, run_s = _rss(), _fds(), time.perf_counter() - start
    del artifact
    for _ in range(20):  # warm-up of the load path
        load(directory).run(x)
    gc.collect()
    rss2, fds2, start = _rss(), _fds(), time.perf_counter()
    for _ in range(cycles):
        loaded = load(directory)
        loaded.run(x)
        del loaded
    gc.collect()
    rss3, fds3 = _rss(), _fds()
    result = {
        "runs": runs,
        "run_s": round(run_s, 3),
        "run_rss": [rss0, rss1],
        "run_growth": (rss1 - rss0) / rss0,
        "run_fds": [fds0, fds1],
        "cycles": cycles,
        "cycle_s": round(time.perf_counter() - start, 3),
        "cycle_rss": [rss2, rss3],
        "cycle_fds": [fds2, fds3],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    _leak_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))


def test_recompile_into_the_same_directory_runs_the_new_model(tmp_path):
    """A second model compiled into the same directory in one process runs its own code: dlopen
    matches an already loaded library by its path name, so the new library is loaded under a name
    of its own (found by the issue-15 fuzzing helper: Relu then Neg into one folder gave Relu)."""
    from onnx import TensorProto, helper

    from qiao.compiler import compile, load

    def model(op):
        graph = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    x = {"x": np.array([-1, 2, -3, 4], np.float32)}
    out = tmp_path / "same"
    np.testing.assert_array_equal(compile(model("Relu"), "cpu", out).run(x)["y"], [0, 2, 0, 4])
    np.testing.assert_array_equal(compile(model("Neg"), "cpu", out).run(x)["y"], [1, -2, 3, -4])
    np.testing.assert_array_equal(load(out).run(x)["y"], [1, -2, 3, -4])
    np.testing.assert_array_equal(compile(model("Abs"), "cpu", out).run(x)["y"], [1, 2, 3, 4])
