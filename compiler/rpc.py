"""Remote devices through TVM's RPC tracker: compile here, upload, run and time there.

A remote machine runs ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` against a
tracker (``python -m tvm.exec.rpc_tracker``); ``qiao bench ... --rpc-tracker HOST:PORT --rpc-key
KEY`` asks the tracker for a server with that key, uploads the artifact's library, loads it in a
Relax VM on the remote device with the weights copied over, and times it with TVM's evaluator, which
runs on the remote side (no network time in the figures). Needs the ``rpc`` extra (tornado,
cloudpickle, psutil) where the tracker and server run.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qiao.backends import TVMRunner
from qiao.compiler.errors import QiaoError, ToolchainMissing

_TRACKER_HINT = (
    "start one with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190` and the device's "
    "server with `python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY`"
)


class RPCError(QiaoError):
    """The RPC tracker or server cannot be reached or has no device for the key."""


def artifact_backend(manifest: Mapping[str, Any]) -> Any:
    """The backend that says where an artifact runs: the one that built it, or, when that one
    declares no ``device_type`` (a backend reusing another's target), the backend claiming the
    artifact's target kind. ``RPCError`` when neither names a device."""
    from qiao.backends.registry import backend_for_kind, get_backend

    name = manifest.get("backend", {}).get("name")
    kind = manifest.get("target", {}).get("kind")
    try:
        backend = get_backend(name) if name else None
    except QiaoError:  # built by a backend not installed here: its target kind still tells
        backend = None
    if backend is None or backend.device_type is None:
        backend = backend_for_kind(kind) if kind else None
    if backend is None or backend.device_type is None:
        raise RPCError(
            f"no installed backend says which TVM device runs an artifact of backend {name!r} "
            f"(target kind {kind!r}). fix: install the backend that built it, or copy the "
            "artifact to the device and run `qiao bench` there"
        )
    return backend


def parse_tracker_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → ``(host, port)``; ``[::1]:9190`` style IPv6 addresses are accepted."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RPCError(
            f"bad --rpc-tracker address {address!r}. fix: write it as HOST:PORT, e.g. "
            "127.0.0.1:9190"
        )
    return host, int(port)


def check_tracker(host: str, port: int, timeout: float = 5.0) -> None:
    """Connect and exchange TVM's tracker magic number, failing fast instead of TVM's 60 s retry."""
    from tvm.rpc import base

    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise RPCError(
            f"cannot reach the RPC tracker at {where} ({err.strerror or err}). fix: check the "
            f"address, or {_TRACKER_HINT}"
        ) from err
    with sock:
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            reply = struct.unpack("<i", base.recvall(sock, 4))[0]
        except OSError as err:  # hung up, or silent past the timeout
            reply, why = None, f"the tracker handshake failed: {err or type(err).__name__}"
        else:
            why = "it answered the tracker handshake with another magic number"
    if reply != base.RPC_TRACKER_MAGIC:
        raise RPCError(
            f"{where} is not a TVM RPC tracker ({why}). fix: check the port, or {_TRACKER_HINT}"
        )


def tracker_keys(summary: Mapping[str, Any]) -> dict[str, int]:
    """``{key: servers registered}`` from a tracker summary (``server_info`` entries are
    ``{"key": "server:KEY", "addr": ...}``)."""
    counts: dict[str, int] = {}
    for info in summary.get("server_info", []):
        key = str(info.get("key", "")).partition(":")[2]
        if key:
            counts[key] = counts.get(key, 0) + 1
    return counts


class RemoteDevice:
    """An RPC session on one server the tracker handed out for ``key``; ``close`` releases it."""

    def __init__(self, tracker: str, key: str, session, tracker_session):
        self.tracker = tracker
        self.key = key
        self.session = session
        self._tracker_session = tracker_session

    def close(self) -> None:
        self.session = None  # the server ends the session when the last reference goes
        if self._tracker_session is not None:
            self._tracker_session.close()
            self._tracker_session = None

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tracker(tracker: str, key: str):
    """A tracker session that has at least one server registered under ``key``."""
    host, port = parse_tracker_address(tracker)
    check_tracker(host, port)
    from tvm import rpc

    tracker_session = rpc.connect_tracker(host, port)
    keys = tracker_keys(tracker_session.summary())
    if key not in keys:
        tracker_session.close()
        known = ", ".join(sorted(keys)) or "none: no server is registered"
        raise RPCError(
            f"the RPC tracker at {tracker} has no server with key {key!r} (keys: {known}). fix: "
            "pass --rpc-key with one of those, or start a server with `python -m "
            f"tvm.exec.rpc_server --tracker {tracker} --key {key}`"
        )
    return tracker_session


def probe(tracker: str, key: str) -> None:
    """Fail fast (``RPCError``) unless the tracker is reachable and has a server for ``key``; holds
    no device, so a long compile can run before ``request_device``."""
    _open_tracker(tracker, key).close()


def request_device(
    tracker: str, key: str, timeout: float = 60.0, session_timeout: float = 0
) -> RemoteDevice:
    """Ask the tracker at ``tracker`` (``HOST:PORT``) for a server registered under ``key``.

    Parameters
    ----------
    tracker : str
        ``HOST:PORT`` of a ``tvm.exec.rpc_tracker``.
    key : str
        The device key the server registered with (``rpc_server --key``).
    timeout : float
        Seconds to wait for a free server when all of them are busy.
    session_timeout : float
        Passed to TVM: the server ends the session after this many seconds (0: never).

    Raises
    ------
    RPCError
        Unreachable tracker, not a tracker, no server with ``key`` (listing the keys it has),
        or every server busy for ``timeout`` seconds.
    """
    tracker_session = _open_tracker(tracker, key)
    result: dict[str, Any] = {}

    def _request() -> None:  # blocks in the tracker's queue while every server is busy
        try:
            result["session"] = tracker_session.request(
                key, session_timeout=session_timeout, max_retry=2
            )
        except Exception as err:  # reported below, in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=_request, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or "error" in result:
        tracker_session.close()
        why = (
            f"every server with key {key!r} stayed busy for {timeout:g} s"
            if worker.is_alive()
            else f"{type(result['error']).__name__}: {result['error']}"
        )
        raise RPCError(
            f"could not get a session for key {key!r} from the tracker at {tracker}: {why}. fix: "
            "wait for the running jobs to end, or add a server with that key"
        )
    return RemoteDevice(tracker, key, result["session"], tracker_session)


def remote_info(remote: RemoteDevice, device) -> dict[str, Any]:
    """What the remote side reports: device attributes and, for CPUs, LLVM's name of the CPU."""
    info: dict[str, Any] = {"tracker": remote.tracker, "key": remote.key}
    for attr in (
        "device_name",
        "driver_version",
        "compute_version",
        "total_global_memory",
        "multi_processor_count",
    ):
        try:
            value = getattr(device, attr)
        except Exception:  # not every device API answers every attribute
            value = None
        if value is not None:
            info[attr] = value if isinstance(value, (int, float, str)) else str(value)
    for name, field in (
        ("target.llvm_get_system_cpu", "llvm_cpu"),
        ("target.llvm_get_system_triple", "llvm_triple"),
    ):
        try:
            info[field] = str(remote.session.get_function(name)())
        except Exception:  # a server built without LLVM
            pass
    return info


class RPCRunner(TVMRunner):
    """A TVM artifact loaded in a Relax VM on a remote device; ``run`` and ``benchmark`` as locally.

    The library is uploaded under a name carrying its hash, so sessions on a shared server never
    load each other's files. ``info`` holds ``remote_info`` plus any note about the compiled CPU.
    """

    def __init__(self, remote: RemoteDevice, artifact_dir: str, manifest: Mapping[str, Any]):
        from tvm import relax

        library = manifest.get("backend", {}).get("library")
        if not library:
            raise RPCError(
                f"backend {manifest['backend']['name']!r} writes no TVM library, so its artifacts "
                "cannot run through TVM RPC. fix: copy the artifact to the device and run `qiao "
                "bench` there"
            )
        backend = artifact_backend(manifest)
        device_type = backend.device_type
        self.remote = remote
        session = remote.session
        digest = manifest.get("files", {}).get(library, "")[:12] or "x"
        remote_name = f"qiao-{digest}-{os.path.basename(library)}"
        session.upload(os.path.join(artifact_dir, library), remote_name)
        self.device = session.device(device_type, 0)
        if not self.device.exist:
            raise ToolchainMissing(
                f"the RPC server for key {remote.key!r} has no {device_type} device. fix: "
                "pass the key of a server on a machine with that device"
            )
        self.info = remote_info(remote, self.device)
        mcpu = manifest.get("target", {}).get("mcpu")
        if not backend.is_gpu and mcpu and self.info.get("llvm_cpu") not in (None, mcpu):
            self.info["note"] = (
                f"compiled for mcpu={mcpu}, the remote CPU is {self.info['llvm_cpu']}; pass --arch "
                f"{self.info['llvm_cpu']} to compile for it"
            )
        self.executable = session.load_module(remote_name)
        self.vm = relax.VirtualMachine(self.executable, self.device)
        self.params = self._remote_params(
            artifact_dir, manifest, library, getattr(backend, "lift_weight_packing", False)
        )

    def _remote_params(
        self, artifact_dir: str, manifest: Mapping[str, Any], library: str, lifted: bool
    ) -> list:
        """Weights on the remote device. TVM's RPC cannot pass the tuple that
        ``main_transform_params`` takes, so the lifted weight packing runs here, on this host's CPU
        (only backends that lift it, ``lifted``: the CPU's), and its results are uploaded."""
        import tvm
        from tvm import relax

        from qiao.compiler.artifact import load_params

        params = load_params(artifact_dir, manifest)
        local = (
            relax.VirtualMachine(
                tvm.runtime.load_module(os.path.join(artifact_dir, library)), tvm.cpu()
            )
            if lifted
            else None
        )
        try:
            transform = local["main_transform_params"] if local is not None else None
        except (AttributeError, KeyError, RuntimeError):
            transform = None
        if transform is not None:
            params = [p.numpy() for p in transform([tvm.runtime.tensor(p) for p in params])]
        return [tvm.runtime.tensor(np.asarray(p, order="C"), self.device) for p in params]

    def benchmark(self, inputs: Sequence[np.ndarray], repeat: int, number: int) -> list[float]:
        # A saved closure avoids returning the outputs over the network on every timed call.
        self.vm.save_function("main", "qiao_bench_main", *self._args(inputs))
        timer = self.vm.time_evaluator("qiao_bench_main", self.device, number=number, repeat=repeat)
        return list(timer().results)
