"""Malformed bytes never crash: damaged models through ``qiao compile``, damaged artifacts and
input ``.npz`` files through ``qiao run`` / ``qiao validate``, damaged result JSON through
``qiao report``.

Every case ends with exit code 2 and one ``qiao CMD: error: ...`` line (no traceback, no signal
death, no hang) and leaves no output directory behind; a byte-level mutation that happens to leave a
valid file may instead succeed (exit 0), with a complete artifact. The cases run through qiao's CLI
entry point in a worker subprocess (this file run as a script: one TVM start-up for all of them);
a worker killed by a signal or silent past ``JOB_TIMEOUT_S`` fails the case it was running and a
fresh worker takes the rest.

CI runs a fixed sample; ``QIAO_MUTATIONS=N`` adds N seeded random byte mutations per kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

JOB_TIMEOUT_S = 300  # one case (a compile of a 4-node model takes seconds; CI hosts are busy)
EXTRA = int(os.environ.get("QIAO_MUTATIONS", "0"))


# ----------------------------------------------------------------------------------------------
# The worker: runs qiao's CLI main() for each job, stdout/stderr captured at the file descriptor
# (native libraries print there too); one JSON line per event on the original stdout.


def _worker(jobs_path: str) -> None:
    from qiao.compiler.cli.__main__ import main

    with open(jobs_path) as f:
        jobs = json.load(f)
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    for index, job in enumerate(jobs):
        channel.write(json.dumps({"start": index}) + "\n")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = main(job["argv"])
            except SystemExit as exit_:  # argparse
                rc = exit_.code if isinstance(exit_.code, int) else 2
            except BaseException as exc:  # noqa: BLE001 - reported as a failure of the case
                rc = f"escaped {type(exc).__name__}: {exc}"
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        channel.write(json.dumps({"done": index, "rc": rc, "stderr": stderr}) + "\n")


# ----------------------------------------------------------------------------------------------
# Cases and how they are judged.


@dataclasses.dataclass
class Case:
    name: str
    argv: list[str]
    output: str | None = None  # a path the command must not leave behind when it fails
    may_succeed: bool = False  # a byte mutation that can leave a valid input
    result: dict | None = None

    @property
    def command(self) -> str:
        return self.argv[0]

    def problem(self) -> str | None:
        """Why this case did not end cleanly (None when it did)."""
        r = self.result or {}
        if "crash" in r:
            return r["crash"]
        rc, stderr = r.get("rc"), r.get("stderr", "")
        lines = stderr.strip().splitlines()
        if rc == 0 and self.may_succeed:
            return None
        if rc != 2:
            return f"exit {rc}: {stderr.strip()[-600:]}"
        if "Traceback" in stderr:
            return f"traceback: {stderr[-600:]}"
        if len(lines) != 1 or not lines[0].startswith(f"qiao {self.command}: error: "):
            return f"not one error line: {stderr.strip()[-600:]}"
        if self.output and os.path.exists(self.output):
            return f"left {self.output} behind"
        if self.output:
            parent, base = os.path.split(self.output)
            left = [n for n in os.listdir(parent) if n.startswith(f".{base}.")]
            if left:
                return f"left staging directories {left} behind"
        return None


def run_cases(cases: list[Case], workdir: str) -> None:
    """Run ``cases`` in worker subprocesses; fills each case's ``result``."""
    todo = list(cases)
    while todo:
        jobs_path = os.path.join(workdir, "jobs.json")
        with open(jobs_path, "w") as f:
            json.dump([{"argv": c.argv} for c in todo], f)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), jobs_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env=dict(os.environ, QIAO_DEBUG="0"),
        )
        current, deadline, buffer = None, time.monotonic() + JOB_TIMEOUT_S, b""
        finished = 0
        while True:
            ready, _, _ = select.select(
                [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                proc.kill()
                proc.wait()
                todo[current or 0].result = {"crash": f"hang: no answer in {JOB_TIMEOUT_S} s"}
                finished = (current or 0) + 1
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                rc = proc.wait()
                if current is not None and todo[current].result is None:
                    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"worker exit {rc}"
                    todo[current].result = {"crash": f"worker died: {how}"}
                    finished = current + 1
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                if "start" in event:
                    current = event["start"]
                    deadline = time.monotonic() + JOB_TIMEOUT_S
                else:
                    todo[event["done"]].result = event
                    finished = event["done"] + 1
        proc.stdout.close()
        todo = todo[finished:]


def assert_all_clean(cases: list[Case]) -> None:
    bad = [(c.name, c.problem()) for c in cases if c.problem()]
    summary = f"{len(cases) - len(bad)}/{len(cases)} cases ended cleanly"
    print(summary)
    assert not bad, summary + "\n" + "\n".join(f"{n}: {p}" for n, p in bad)


# ----------------------------------------------------------------------------------------------
# Mutations


def tiny_model():
    """A 4-node MLP (MatMul, Add, Relu, MatMul) with a symbolic batch: compiles in seconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def byte_mutations(data: bytes, rng: random.Random, n: int, avoid=()) -> list[tuple[str, bytes]]:
    """Truncations, bit flips, overwritten runs and appended garbage (``n`` of each kind), with
    positions outside the ``avoid`` byte ranges where possible (weights' bytes: flipping those
    leaves a valid file)."""
    allowed = [i for i in range(len(data)) if not any(a <= i < b for a, b in avoid)] or list(
        range(len(data))
    )
    out = [("empty", b""), ("one byte", data[:1])]
    for _ in range(n):
        cut = rng.randrange(1, len(data))
        out.append((f"truncated at {cut}", data[:cut]))
    for _ in range(n):
        pos, bit = rng.choice(allowed), rng.randrange(8)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        out.append((f"bit {bit} of byte {pos} flipped", bytes(flipped)))
    for _ in range(n):
        pos = rng.choice(allowed)
        run = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        out.append(
            (f"bytes {pos}+{len(run)} overwritten", data[:pos] + run + data[pos + len(run) :])
        )
    out.append(("garbage appended", data + b"\xff\x00garbage" * 4))
    return out


def structural_mutations(model) -> list[tuple[str, object]]:
    """Well-formed protobuf, broken model: each ``(name, ModelProto)``."""
    import onnx
    from onnx import TensorProto, helper

    def edit(fn):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        fn(m)
        return m

    g = lambda m: m.graph  # noqa: E731

    def set_input(node, i, name):
        return lambda m: g(m).node[node].input.__setitem__(i, name)

    def set_output(node, i, name):
        return lambda m: g(m).node[node].output.__setitem__(i, name)

    def init(i, **fields):
        def fn(m):
            t = g(m).initializer[i]
            for k, v in fields.items():
                if k in ("dims", "float_data"):
                    del getattr(t, k)[:]
                    getattr(t, k).extend(v)
                else:
                    setattr(t, k, v)

        return fn

    def input_shape(dims, elem_type=TensorProto.FLOAT):
        def fn(m):
            tt = g(m).input[0].type.tensor_type
            tt.elem_type = elem_type
            del tt.shape.dim[:]
            for d in dims:
                dim = tt.shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                elif d is not None:  # None: a dimension with neither value nor name
                    dim.dim_value = d

        return fn

    def opset(version):
        return lambda m: m.opset_import[0].__setattr__("version", version)

    w_raw = bytes(model.graph.initializer[0].raw_data)
    cases = {
        "cycle through the whole graph": set_input(0, 0, "y"),
        "node reads its own output": set_input(2, 0, "h3"),
        "two-node cycle": lambda m: set_input(1, 0, "h2")(m),
        "dangling node input": set_input(1, 0, "nowhere"),
        "dangling graph output": lambda m: g(m).output[0].__setattr__("name", "nowhere"),
        "duplicate node outputs": set_output(1, 0, "h"),
        "graph output listed twice": lambda m: g(m).output.extend([g(m).output[0]]),
        "input shadowed by an initializer name": lambda m: g(m).input[0].__setattr__("name", "w"),
        "duplicate initializer names": lambda m: g(m).initializer[1].__setattr__("name", "w"),
        "empty node output name": set_output(3, 0, ""),
        "initializer raw data too short": init(0, raw_data=w_raw[:-4]),
        "initializer raw data too long": init(0, raw_data=w_raw + b"\0" * 8),
        "initializer dims disagree with data": init(0, dims=[16, 16]),
        "initializer negative dim": init(0, dims=[-8, 16]),
        "initializer dims of 2^62 elements": init(0, dims=[1 << 31, 1 << 31]),
        "initializer dims of 2^64 elements (overflow)": init(0, dims=[1 << 32, 1 << 32]),
        "initializer unknown data type 99": init(0, data_type=99),
        "initializer data type STRING": init(0, data_type=TensorProto.STRING),
        "initializer data type UNDEFINED": init(0, data_type=TensorProto.UNDEFINED),
        "initializer float_data count wrong": init(1, raw_data=b"", float_data=[1.0, 2.0]),
        "initializer int64 where float expected": init(1, data_type=TensorProto.INT64),
        "input rank 1": input_shape(["batch"]),
        "input rank 3": input_shape(["batch", 8, 8]),
        "input wrong width": input_shape(["batch", 9]),
        "input negative dim": input_shape([-1, 8]),
        "input dims of 2^62 elements": input_shape([1 << 31, 1 << 31]),
        # a symbolic reduction length TVM cannot compile (found by QIAO_MUTATIONS=25: TVM's
        # warnings came before the error line)
        "input width unknown": input_shape(["batch", None]),
        "input unknown elem type 99": input_shape(["batch", 8], 99),
        "input elem type STRING": input_shape(["batch", 8], TensorProto.STRING),
        "input elem type INT64 into MatMul": input_shape(["batch", 8], TensorProto.INT64),
        "input without a type": lambda m: g(m).input[0].ClearField("type"),
        "output declared INT64": lambda m: (
            g(m).output[0].type.tensor_type.__setattr__("elem_type", TensorProto.INT64)
        ),
        "opset 999": opset(999),
        "opset 0": opset(0),
        "no opset import": lambda m: m.ClearField("opset_import"),
        "ir_version 999": lambda m: m.__setattr__("ir_version", 999),
        "empty op type": lambda m: g(m).node[2].__setattr__("op_type", ""),
        "MatMul with one input": lambda m: g(m).node[0].input.__delitem__(1),
        "Relu with three inputs": lambda m: g(m).node[2].input.extend(["w", "b"]),
        "Relu with a stray attribute": lambda m: (
            g(m).node[2].attribute.append(helper.make_attribute("alpha", 0.5))
        ),
        "no nodes": lambda m: g(m).ClearField("node"),
        "no outputs": lambda m: g(m).ClearField("output"),
    }
    return [(name, edit(fn)) for name, fn in cases.items()]


def _manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def _write_manifest(d: str, manifest) -> None:
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def _rehash(d: str) -> None:
    """Make the manifest's hashes match the (damaged) files: damage a hash cannot catch."""
    from qiao.compiler.artifact import _hash_tree

    m = _manifest(d)
    m["files"] = _hash_tree(d)
    _write_manifest(d, m)


def _edit_manifest(fn):
    def apply(d):
        m = _manifest(d)
        fn(m)
        _write_manifest(d, m)

    return apply


def _damage_file(name: str, how, rehash: bool = True):
    def apply(d):
        path = os.path.join(d, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(how(data))
        if rehash:
            _rehash(d)

    return apply


def _replace_params(**arrays):
    def apply(d):
        np.savez(os.path.join(d, "params.npz"), **arrays)
        _rehash(d)

    return apply


def artifact_mutations(artifact_dir: str, rng: random.Random, n: int) -> list[tuple[str, object]]:
    """``(name, apply(copy_dir))`` damaging a copy of a valid artifact."""
    manifest_bytes = open(os.path.join(artifact_dir, "manifest.json"), "rb").read()
    params = dict(np.load(os.path.join(artifact_dir, "params.npz")))

    def setter(*path, value=None, delete=False):
        def fn(m):
            for key in path[:-1]:
                m = m[key]
            if delete:
                del m[path[-1]]
            else:
                m[path[-1]] = value

        return _edit_manifest(fn)

    cases = [
        (f"manifest: {name}", _damage_file("manifest.json", lambda _, b=data: b, rehash=False))
        for name, data in byte_mutations(manifest_bytes, rng, n)
    ]
    cases += [
        ("manifest: a JSON list", lambda d: _write_manifest(d, [1, 2])),
        ("manifest: null", lambda d: _write_manifest(d, None)),
        ("manifest: format_version '1'", setter("format_version", value="1")),
        ("manifest: no inputs", setter("inputs", delete=True)),
        ("manifest: inputs a string", setter("inputs", value="x")),
        ("manifest: input without a name", setter("inputs", 0, "name", delete=True)),
        ("manifest: input dtype float99", setter("inputs", 0, "dtype", value="float99")),
        ("manifest: input dtype object", setter("inputs", 0, "dtype", value="object")),
        ("manifest: input shape a number", setter("inputs", 0, "shape", value=3)),
        ("manifest: input dim -3", setter("inputs", 0, "shape", 1, value=-3)),
        ("manifest: input dim 2^62", setter("inputs", 0, "shape", 1, value=1 << 62)),
        ("manifest: input dim a float", setter("inputs", 0, "shape", 1, value=8.5)),
        ("manifest: outputs empty", setter("outputs", value=[])),
        ("manifest: no backend", setter("backend", delete=True)),
        ("manifest: backend unknown", setter("backend", "name", value="nosuchbackend")),
        ("manifest: backend a list", setter("backend", value=[])),
        ("manifest: no library", setter("backend", "library", delete=True)),
        ("manifest: library ../", setter("backend", "library", value="../model.so")),
        ("manifest: library absolute", setter("backend", "library", value="/bin/true")),
        ("manifest: files lists ../", setter("files", "../outside", value="0" * 64)),
        ("manifest: files lists an absolute path", setter("files", "/etc/hostname", value="0")),
        ("manifest: files not a dict", setter("files", value=["model.so"])),
        ("manifest: params file ../", setter("params", "file", value="../params.npz")),
        ("manifest: one param name too many", setter("params", "names", value=["a"] * 9)),
        ("manifest: params names a string", setter("params", "names", value="abc")),
        ("manifest: cpu features unknown", setter("backend", "cpu", value={"arch": 3})),
        ("library: truncated, rehashed", _damage_file("model.so", lambda b: b[: len(b) // 2])),
        ("library: garbage, rehashed", _damage_file("model.so", lambda b: b"\x7fELF" + b"\0" * 64)),
        ("library: empty, rehashed", _damage_file("model.so", lambda b: b"")),
        ("library: bit flip, not rehashed", _damage_file("model.so", _flip, rehash=False)),
        ("params: truncated, rehashed", _damage_file("params.npz", lambda b: b[: len(b) // 2])),
        ("params: not a zip, rehashed", _damage_file("params.npz", lambda b: b"nonsense")),
        ("params: bit flip, rehashed", _damage_file("params.npz", _flip)),
        ("params: a weight missing", _replace_params(**dict(list(params.items())[:-1]))),
        (
            "params: a weight of the wrong shape",
            _replace_params(**dict(params, p0=np.zeros((3, 3), np.float32))),
        ),
        (
            "params: a weight of the wrong dtype",
            _replace_params(**{k: v.astype(np.float64) for k, v in params.items()}),
        ),
        ("params: pickled object array", _replace_params(p0=np.array([{}], dtype=object))),
        ("params: file removed", lambda d: os.remove(os.path.join(d, "params.npz"))),
        ("library: symlink to an identical file outside", _symlink_outside("model.so")),
        ("extra file", lambda d: open(os.path.join(d, "extra.txt"), "w").write("x")),
    ]
    return cases


def _flip(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    return bytes(flipped)


def _symlink_outside(name: str):
    def apply(d):
        outside = os.path.join(os.path.dirname(d), f"outside-{os.path.basename(d)}-{name}")
        shutil.copy(os.path.join(d, name), outside)
        os.remove(os.path.join(d, name))
        os.symlink(outside, os.path.join(d, name))  # same bytes: the hash still matches

    return apply


def npz_mutations(good: bytes, rng: random.Random, n: int, workdir: str) -> list[tuple[str, bytes]]:
    """Damaged and wrong input files for the tiny model (input x: float32[batch, 8])."""
    import io

    def npz(**arrays) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def npy_header_lie() -> bytes:
        # an .npy member whose header declares 2^40 elements over 32 bytes of data
        buf = io.BytesIO()
        np.save(buf, np.zeros(8, np.float32))
        raw = buf.getvalue().replace(b"(8,)", b"(1099511627776,)")
        zbuf = io.BytesIO()
        import zipfile

        with zipfile.ZipFile(zbuf, "w") as z:
            z.writestr("x.npy", raw)
        return zbuf.getvalue()

    x = np.zeros((2, 8), np.float32)
    cases = byte_mutations(good, rng, n)
    cases += [
        ("not a zip", b"hello, this is text"),
        ("an .npy, not an .npz", _npy_bytes(x)),
        ("object array (pickle)", npz(x=np.array([{}, 1], dtype=object))),
        ("wrong key", npz(z=x)),
        ("extra key", npz(x=x, z=x)),
        ("no arrays", npz()),
        ("float64", npz(x=x.astype(np.float64))),
        ("wrong width", npz(x=np.zeros((2, 9), np.float32))),
        ("rank 1", npz(x=np.zeros(8, np.float32))),
        ("header declares 2^40 elements", npy_header_lie()),
        ("strings", npz(x=np.array([["a"] * 8] * 2))),
    ]
    return cases


def _npy_bytes(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def result_mutations(good: bytes, rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """Damaged ``qiao bench -o`` result files."""
    doc = json.loads(good)

    def edited(fn) -> bytes:
        d = json.loads(good)
        fn(d)
        return json.dumps(d).encode()

    def case0(d):
        return d["cases"][0]

    cases = byte_mutations(good, rng, n)
    cases += [
        ("a JSON list", b"[1, 2, 3]"),
        ("null", b"null"),
        ("a number", b"42"),
        ("nested 100000 deep", b"[" * 100000 + b"]" * 100000),
        ("not UTF-8", b"\xff\xfe" + good[2:]),
        ("NaN where a number goes", good.replace(b'"median": ', b'"median": NaN, "x": ', 1)),
        ("no cases", edited(lambda d: d.pop("cases"))),
        ("cases a dict", edited(lambda d: d.__setitem__("cases", {}))),
        ("case a string", edited(lambda d: d.__setitem__("cases", ["x"]))),
        ("engines missing", edited(lambda d: case0(d).pop("engines"))),
        ("engines a list", edited(lambda d: case0(d).__setitem__("engines", [1]))),
        (
            "median a string",
            edited(lambda d: case0(d)["engines"]["qiao"]["latency_s"].__setitem__("median", "x")),
        ),
        (
            "median negative",
            edited(lambda d: case0(d)["engines"]["qiao"]["latency_s"].__setitem__("median", -1)),
        ),
        ("latency missing", edited(lambda d: case0(d)["engines"]["qiao"].pop("latency_s"))),
        ("size a number", edited(lambda d: case0(d).__setitem__("size", 3))),
        ("flops a string", edited(lambda d: case0(d).__setitem__("flops", "many"))),
        ("speedup a list", edited(lambda d: case0(d).__setitem__("speedup", [1]))),
        ("machine missing", edited(lambda d: d.pop("machine", None))),
        ("schema wrong", edited(lambda d: d.__setitem__("schema", "other"))),
        ("schema version 99", edited(lambda d: d.__setitem__("schema_version", 99))),
    ]
    assert doc["cases"], "the sample result has cases"
    return cases


# ----------------------------------------------------------------------------------------------
# The tests

N_RANDOM = 4 + EXTRA  # random byte mutations of each kind (truncation, bit flip, overwrite)


def _raw_data_ranges(model, data: bytes) -> list[tuple[int, int]]:
    ranges = []
    for t in model.graph.initializer:
        start = data.find(t.raw_data)
        if start >= 0:
            ranges.append((start, start + len(t.raw_data)))
    return ranges


def _check_success(case: Case) -> str | None:
    """A mutation that compiled must have left a complete, loadable artifact."""
    from qiao.compiler.artifact import read_manifest
    from qiao.compiler.errors import QiaoError

    if case.result and case.result.get("rc") == 0 and case.output:
        try:
            read_manifest(case.output)
        except QiaoError as err:
            return f"compiled but the artifact is broken: {err}"
    return None


def _write_cases(root: str, named: list[tuple[str, bytes]], suffix: str) -> list[tuple[str, str]]:
    out = []
    for i, (name, data) in enumerate(named):
        path = os.path.join(root, f"m{i}{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        out.append((name, path))
    return out


# Structural edits that leave a valid model (MatMul broadcasts a rank-1 or rank-3 input): they
# compile, and the artifact's outputs take the shapes the graph computes.
STILL_VALID = {"graph: input rank 1", "graph: input rank 3"}


def test_malformed_models_through_compile(tmp_path):
    model = tiny_model()
    data = model.SerializeToString()
    rng = random.Random(1)
    named = [
        (f"bytes: {n}", d)
        for n, d in byte_mutations(data, rng, N_RANDOM, _raw_data_ranges(model, data))
    ]
    structural = [(f"graph: {n}", m.SerializeToString()) for n, m in structural_mutations(model)]
    cases = []
    for i, (name, path) in enumerate(_write_cases(str(tmp_path), named + structural, ".onnx")):
        out = str(tmp_path / f"out{i}")
        may = name.startswith("bytes: ") or name in STILL_VALID
        cases.append(Case(name, ["compile", path, "-o", out], out, may))
    run_cases(cases, str(tmp_path))
    broken = [(c.name, p) for c in cases if (p := _check_success(c))]
    assert not broken, broken
    assert_all_clean(cases)
    compiled = sum(c.result.get("rc") == 0 for c in cases)
    assert compiled < len(named) // 2, "most byte mutations must break the model"


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from qiao.compiler import compile

    root = tmp_path_factory.mktemp("tiny")
    return compile(tiny_model(), "cpu", str(root / "tiny")).directory


def test_damaged_artifacts_through_run_and_validate(tmp_path, tiny_artifact):
    rng = random.Random(2)
    cases = []
    for i, (name, apply) in enumerate(artifact_mutations(tiny_artifact, rng, N_RANDOM)):
        copy = str(tmp_path / f"a{i}")
        shutil.copytree(tiny_artifact, copy, symlinks=True)
        apply(copy)
        byte_level = "flipped" in name or "overwritten" in name or "appended" in name
        cases.append(Case(f"run {name}", ["run", copy], may_succeed=byte_level))
        if not byte_level:
            cases.append(Case(f"validate {name}", ["validate", copy]))
    run_cases(cases, str(tmp_path))
    assert_all_clean(cases)


def test_damaged_inputs_through_run_and_validate(tmp_path, tiny_artifact):
    good = _npz_bytes(x=np.zeros((2, 8), np.float32))
    named = npz_mutations(good, random.Random(3), N_RANDOM, str(tmp_path))
    cases = []
    for name, path in _write_cases(str(tmp_path), named, ".npz"):
        cases.append(Case(f"run {name}", ["run", tiny_artifact, "--inputs", path]))
        cases.append(Case(f"validate {name}", ["validate", tiny_artifact, "--inputs", path]))
    for dim in ("batch=1000000000000", "batch=-2", "batch=x"):  # random inputs of hostile sizes
        cases.append(Case(f"run --dim {dim}", ["run", tiny_artifact, "--dim", dim]))
    run_cases(cases, str(tmp_path))
    for c in cases:  # a byte mutation of an .npz that still holds x: float32[2, 8] may run
        c.may_succeed = c.name.split(" ", 1)[1].startswith(("bit", "bytes", "garbage"))
    assert_all_clean(cases)


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_damaged_results_through_report(tmp_path):
    from tests.test_report import make_result

    good = json.dumps(make_result("m1", "cpu", {1: {"qiao": 1e-3, "onnxruntime": 2e-3}})).encode()
    named = result_mutations(good, random.Random(4), N_RANDOM)
    cases = []
    for i, (name, path) in enumerate(_write_cases(str(tmp_path), named, ".json")):
        out = str(tmp_path / f"report{i}")
        may = name.startswith(("bit", "bytes", "garbage", "NaN"))
        cases.append(Case(name, ["report", path, "-o", out], out, may))
    run_cases(cases, str(tmp_path))
    assert_all_clean(cases)


def test_cli_subprocess_spot_check(tmp_path):
    """The same through a real ``qiao`` process (not the worker): a truncated model."""
    from qiao.compiler.testing import run_cli

    data = tiny_model().SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    proc = run_cli("compile", str(path), "-o", str(tmp_path / "o"), timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qiao compile: error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":
    _worker(sys.argv[1])


# ----------------------------------------------------------------------------------------------
# Hostile inputs: files that point outside their folder, sizes that would exhaust memory.


def _external_model(folder, location: str, data_file=None):
    """The tiny model with weight ``w`` as external data at ``location`` (relative to
    ``folder``); ``data_file``, when given, is where the bytes are written."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = tiny_model()
    w = model.graph.initializer[0]
    raw = bytes(w.raw_data)
    target = data_file or os.path.join(folder, location)
    with open(target, "wb") as f:
        f.write(raw)
    set_external_data(w, location=location, offset=0, length=len(raw))
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    from qiao.compiler.frontend import load_onnx

    path = _external_model(str(tmp_path), "w.bin")
    proto = load_onnx(path)
    assert len(proto.graph.initializer[0].raw_data) == 8 * 16 * 4


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "symlinked folder"])
def test_external_data_outside_the_folder_refused(tmp_path, how):
    from qiao.compiler import InvalidModel
    from qiao.compiler.frontend import load_onnx

    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    if how == "parent":
        path = _external_model(str(folder), "../secret.bin")
    elif how == "absolute":
        path = _external_model(str(folder), str(secret))
    elif how == "symlink":
        path = _external_model(str(folder), "w.bin", data_file=str(secret))
        os.symlink(secret, folder / "w.bin")
    else:
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", folder / "sub")
        path = _external_model(str(folder), "sub/w.bin")
    assert secret.exists() or how == "symlinked folder"
    with pytest.raises(InvalidModel, match="outside the model's folder"):
        load_onnx(path)


def test_external_data_shorter_than_declared_refused(tmp_path):
    from qiao.compiler import InvalidModel
    from qiao.compiler.frontend import load_onnx

    path = _external_model(str(tmp_path), "w.bin")
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(InvalidModel, match=r"reads bytes 0\.\.512 of 'w.bin', which holds 100"):
        load_onnx(path)


def test_sizes_that_would_exhaust_memory_refused_with_the_size(tmp_path):
    from qiao.compiler import InvalidModel
    from qiao.compiler.frontend import load_onnx

    huge = tiny_model()
    w = huge.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([1 << 20, 1 << 20])  # 4 TiB of float32 declared over 512 bytes
    with pytest.raises(InvalidModel, match=r"(4\.0 TiB|4398046511104 bytes)"):
        load_onnx(huge)  # the ONNX checker or qiao's guard: either names the size
    wide = tiny_model()
    dims = wide.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 1 << 50
    with pytest.raises(InvalidModel, match=r"input 'x' declares 32\.0 PiB"):
        load_onnx(wide)
    bad_type = tiny_model()
    bad_type.graph.output[0].type.tensor_type.elem_type = 99
    with pytest.raises(InvalidModel, match="element type 99"):
        load_onnx(bad_type)


def test_external_data_beyond_memory_refused_before_reading(tmp_path, monkeypatch):
    from qiao.compiler import InvalidModel
    from qiao.compiler.frontend import guards, load_onnx

    path = _external_model(str(tmp_path), "w.bin")
    monkeypatch.setattr(guards, "host_memory_bytes", lambda: 256)
    with pytest.raises(InvalidModel, match=r"totals 512 B, more than this machine's 256 B"):
        load_onnx(path)


def test_manifest_naming_files_outside_refused(tmp_path, tiny_artifact):
    from qiao.compiler import ArtifactCorrupt, load

    for field, value, message in [
        (("backend", "library"), "../model.so", "not one of the artifact's files"),
        (("backend", "library"), "/usr/lib/x86_64-linux-gnu/libc.so.6", "not one of"),
        (("files", "../x.so"), "0" * 64, "outside the artifact: ../x.so"),
        (("params", "file"), "/etc/passwd", "not one of the artifact's files"),
    ]:
        copy = tmp_path / f"a-{len(os.listdir(tmp_path))}"
        shutil.copytree(tiny_artifact, copy)
        m = _manifest(str(copy))
        m[field[0]][field[1]] = value
        _write_manifest(str(copy), m)
        with pytest.raises(ArtifactCorrupt, match=message):
            load(copy)


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand"])
def test_constants_that_would_exhaust_memory_when_folded_refused(op):
    """A few bytes of shape constant asking the compiler to fold a 4 TiB constant."""
    from onnx import TensorProto, helper, numpy_helper

    from qiao.compiler import InvalidModel
    from qiao.compiler.frontend import load_onnx

    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "shape")
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    if op == "ConstantOfShape":
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        make = helper.make_node(op, ["shape"], ["c"], value=value)
    else:
        make = helper.make_node(op, ["one", "shape"], ["c"])
    graph = helper.make_graph(
        [make, helper.make_node("Add", ["c", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [shape, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModel, match=rf"\({op}\) computes a constant 'c' .* \(4\.0 TiB\)"):
        load_onnx(model)
