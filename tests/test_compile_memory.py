"""Compile memory: weights kept as ONNX external data are mapped, never copied, on their way into
an artifact (``load_onnx(keep_external=True)``, the importer's maps, ``save_params``,
``save_proto``), so compiling a decoder holds far less than its weights in memory."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from qiao.compiler.frontend import import_onnx, keeps_external, load_onnx

DATA = "model.onnx.data"


def _mlp(path, hidden: int, layers: int, seed: int = 0) -> int:
    """An MLP whose weights are external data beside ``path`` (and a few small tensors that stay
    inline); returns the weights' bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((hidden, hidden), dtype=np.float32)
        b = rng.standard_normal(hidden, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
    inits.append(numpy_helper.from_array(np.array([1, hidden], np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", [x, "shape"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, os.fspath(path), save_as_external_data=True, location=DATA, size_threshold=0)
    return layers * (hidden * hidden + hidden) * 4


def _digests(arrays) -> list[str]:
    return sorted(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays)


def test_import_maps_external_weights_and_equals_an_eager_import(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(path, hidden=64, layers=2)
    lazy = import_onnx(str(path))
    eager = import_onnx(onnx.load(str(path)))  # external data read into the proto
    assert lazy.external_dir == str(tmp_path) and eager.external_dir is None
    assert list(lazy.params) == list(eager.params)
    for name, value in lazy.params.items():
        assert isinstance(value, np.memmap) and not value.flags.writeable, name
        np.testing.assert_array_equal(value, eager.params[name])
        assert not isinstance(eager.params[name], np.memmap)
    import tvm

    tvm.ir.assert_structural_equal(lazy.mod, eager.mod)
    # the weights stayed in the file; the small int64 shape was read (constants fold on it)
    kept = [t.name for t in lazy.proto.graph.initializer if uses_external_data(t)]
    assert sorted(kept) == ["b0", "b1", "w0", "w1"]


def test_load_keeps_only_weights_external(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(path, hidden=32, layers=1)
    proto = load_onnx(str(path), keep_external=True)
    for tensor in proto.graph.initializer:
        assert uses_external_data(tensor) == keeps_external(tensor), tensor.name
    assert not any(uses_external_data(t) for t in load_onnx(str(path)).graph.initializer)


def test_truncated_external_data_is_a_clear_error(tmp_path):
    from qiao.compiler.errors import InvalidModel

    path = tmp_path / "mlp.onnx"
    _mlp(path, hidden=32, layers=1)
    data = tmp_path / DATA
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(InvalidModel, match="w0|b0|external data"):
        import_onnx(str(path))


def test_decoder_artifact_copies_its_weights_file_and_streams_params(tmp_path):
    """The artifact's model.onnx (ONNX Runtime's reference) names its weights in a copy of the
    source's data file instead of holding them; params.npz holds exactly those weights."""
    from qiao.compiler import compile

    options = {"num_hidden_layers": 1}
    artifact = compile("qwen3-small", "cpu", tmp_path / "art", model_options=options)
    source = artifact.manifest["source"]["path"]
    model = os.path.join(artifact.directory, "model.onnx")
    assert filecmp.cmp(os.path.join(os.path.dirname(source), DATA), model + ".data", False)
    proto = onnx.load(model, load_external_data=False)
    weights = [t for t in proto.graph.initializer if keeps_external(t)]
    assert weights and all(uses_external_data(t) for t in weights)
    inline = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert inline < 64 << 10  # shapes and indices only
    loaded = onnx.load(model)  # with the copied data file
    onnx.checker.check_model(model)
    arrays = [numpy_helper.to_array(t) for t in loaded.graph.initializer if keeps_external(t)]
    with np.load(os.path.join(artifact.directory, "params.npz")) as npz:
        params = [npz[k] for k in npz.files]
    assert len(params) == len(artifact.manifest["params"]["names"])
    assert _digests(params) == _digests(arrays)


def test_save_params_copies_mapped_weights_from_their_file(tmp_path):
    from qiao.compiler.artifact import PARAMS, save_params
    from qiao.compiler.errors import InvalidModel

    values = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16 + values.tobytes())
    mapped = np.memmap(path, np.float32, "c", 16, values.shape)
    mapped.flags.writeable = False
    plain = values[:, :7] * 2  # not a map (and not contiguous)
    assert save_params(str(tmp_path), {"a": mapped, "b": plain}) == ["a", "b"]
    with np.load(tmp_path / PARAMS) as npz:
        np.testing.assert_array_equal(npz["p0"], values)
        np.testing.assert_array_equal(npz["p1"], plain)
    with open(path, "r+b") as f:  # the model rewritten while it compiles: an error, no SIGBUS
        f.truncate(16 + values.nbytes // 2)
    with pytest.raises(InvalidModel, match="ended .* before the weight"):
        save_params(str(tmp_path), {"a": mapped})


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import qiao.compiler.driver as driver
    import tvm  # loaded before the baseline: its libraries are not the weights

    def status(key):  # kB
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    model, out = sys.argv[1], sys.argv[2]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident set
    before = status("VmRSS")
    driver.compile(model, "cpu", out)
    print(json.dumps({"before": before * 1024, "peak": status("VmHWM") * 1024}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="peak resident set reset is Linux-only"
)
def test_compile_peak_memory_is_a_fraction_of_the_weights(tmp_path):
    """Compiling a model with 200 MB of external weights grows the process' peak resident set
    by less than the weights (it grew by over 3x them when each stage held its own copy)."""
    path = tmp_path / "mlp.onnx"
    weight_bytes = _mlp(path, hidden=3584, layers=4)  # four 51 MB weights
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(tmp_path / "art")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    grown = peak["peak"] - peak["before"]
    assert grown < 0.75 * weight_bytes, (grown, weight_bytes)
