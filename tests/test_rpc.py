"""Remote devices through TVM's RPC tracker, end to end on 127.0.0.1: a tracker and a server started
by the test on free ports, `qiao bench --rpc-tracker/--rpc-key` against them, and the errors (bad
address, nothing listening, not a tracker, unknown key)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from qiao.compiler.rpc import RPCError, parse_tracker_address, probe, tracker_keys
from qiao.compiler.testing import assert_close, run_cli

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install -e '.[rpc]')")
pytest.importorskip("cloudpickle", reason="TVM's RPC needs cloudpickle (pip install -e '.[rpc]')")
pytest.importorskip("psutil", reason="TVM's RPC server needs psutil (pip install -e '.[rpc]')")

KEY = "qiao-test-cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """``HOST:PORT`` of a tracker with one CPU server registered under ``KEY`` (loopback only)."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 100, silent=True)
    server = None
    try:
        server_port = _free_port()
        server = Server(
            "127.0.0.1",
            port=server_port,
            port_end=server_port + 100,
            tracker_addr=("127.0.0.1", tracker.port),
            key=KEY,
            silent=True,
        )
        address = f"127.0.0.1:{tracker.port}"
        deadline = time.monotonic() + 30
        while True:  # the server registers asynchronously
            with contextlib.suppress(RPCError):
                probe(address, KEY)
                break
            if time.monotonic() > deadline:
                pytest.fail("the RPC server did not register with the tracker within 30 s")
            time.sleep(0.2)
        yield address
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()


def test_parse_tracker_address():
    assert parse_tracker_address("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert parse_tracker_address("[::1]:9190") == ("::1", 9190)
    for bad in ["localhost", "host:", ":9190", "host:port", "host:70000"]:
        with pytest.raises(RPCError, match="HOST:PORT"):
            parse_tracker_address(bad)


def test_tracker_keys():
    summary = {"server_info": [{"key": "server:a"}, {"key": "server:a"}, {"key": "server:b"}]}
    assert tracker_keys(summary) == {"a": 2, "b": 1}


def test_rpc_runner_matches_onnxruntime(tracker, compiled_builtin):
    from qiao.compiler.rpc import RPCRunner, request_device
    from qiao.compiler.validate import onnxruntime_reference

    artifact = compiled_builtin("mlp")
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    with request_device(tracker, KEY) as remote:
        runner = RPCRunner(remote, artifact.directory, artifact.manifest)
        (logits,) = runner.run([x])
        times = runner.benchmark([x], repeat=2, number=1)
        assert runner.info["key"] == KEY and runner.info["llvm_cpu"]
    expected = onnxruntime_reference(f"{artifact.directory}/model.onnx", {"x": x})["logits"]
    assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_bench_over_rpc(tracker):
    from qiao.compiler.bench import bench, check_result

    result = bench(
        "mlp",
        "cpu",
        batch=[1, 3],
        warmup=1,
        repeat=2,
        min_time=0,
        rpc_tracker=tracker,
        rpc_key=KEY,
        roofs=False,
    )
    check_result(result)
    target = result["targets"][0]
    assert target["remote"]["key"] == KEY and target["remote"]["tracker"] == tracker
    assert result["settings"]["rpc"] == {"tracker": tracker, "key": KEY}
    assert result["label"] == f"{KEY} (rpc)"
    for case in result["cases"]:
        # remote: only qiao is timed; the local baselines still check the remote outputs
        assert list(case["engines"]) == ["qiao"]
        assert case["engines"]["qiao"]["peak_rss_delta_mib"] is None  # remote memory: not measured
        assert case["check"]["onnxruntime-cpu"]["ok"] and case["check"]["torch-cpu"]["ok"]


def test_rpc_errors(tracker):
    with pytest.raises(RPCError, match=f"no server with key 'other-key' \\(keys: {KEY}\\)"):
        probe(tracker, "other-key")
    with pytest.raises(RPCError, match="cannot reach the RPC tracker"):
        probe(f"127.0.0.1:{_free_port()}", KEY)
    # something listening that is not a tracker: accepts, then hangs up
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def hang_up():
            conn, _ = listener.accept()
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        with pytest.raises(RPCError, match="not a TVM RPC tracker"):
            probe(f"127.0.0.1:{listener.getsockname()[1]}", KEY)


def test_cli_rpc_unknown_key_exits_2(tracker):
    proc = run_cli("bench", "mlp", "--rpc-tracker", tracker, "--rpc-key", "missing")
    assert proc.returncode == 2
    assert "no server with key 'missing'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
