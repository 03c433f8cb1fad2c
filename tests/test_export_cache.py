"""A built-in model's ONNX export is cached by content (``$QIAO_CACHE_DIR/onnx``): the next compile
of the same model reads the cached graph instead of exporting again; other weights, options or a
change to qiao's code export again."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from qiao.compiler import content_cache, driver
from qiao.models import get_model

# the module (``qiao.compiler.export`` the attribute is the function)
export_module = importlib.import_module("qiao.compiler.export")


@pytest.fixture
def exports(monkeypatch, tmp_path):
    """A fresh cache, and the list of modules torch exported into it."""
    monkeypatch.setenv("QIAO_CACHE_DIR", str(tmp_path))
    calls = []
    real = export_module.export

    def counting(module, *args, **kwargs):
        calls.append(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(export_module, "export", counting)
    return calls


def _weights(proto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in proto.graph.initializer]


def test_a_builtin_is_exported_once_and_read_back_the_same(exports, tmp_path):
    first = driver.resolve_model("mlp", None, None, True).proto
    again = driver.resolve_model("mlp", None, None, True).proto
    assert len(exports) == 1
    assert again.SerializeToString() == first.SerializeToString()
    # the cached graph is the one a direct export writes
    spec = get_model("mlp")
    direct = driver._export_to_proto(
        spec.module,
        spec.example_inputs,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
    )
    assert direct.graph == first.graph
    assert len(os.listdir(tmp_path / "onnx")) == 1


def test_other_weights_options_or_code_export_again(exports, tmp_path, monkeypatch):
    before = driver.resolve_model("mlp", None, None, True).proto
    spec = get_model("mlp")
    with torch.no_grad():
        spec.module.fc2.weight.add_(1.0)
    changed = driver._builtin_proto(spec, {})
    assert len(exports) == 2
    w = spec.module.fc2.weight.detach().numpy()
    assert any(a.shape == w.shape and np.array_equal(a, w) for a in _weights(changed))
    assert not any(a.shape == w.shape and np.array_equal(a, w) for a in _weights(before))

    driver.resolve_model("mlp", None, {"hidden": 128}, True)
    assert len(exports) == 3
    monkeypatch.setattr(content_cache, "code_fingerprint", lambda: "other qiao code")
    driver.resolve_model("mlp", None, None, True)
    assert len(exports) == 4
    assert len(os.listdir(tmp_path / "onnx")) == 4


def test_a_model_over_the_limit_is_not_cached(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "BUILTIN_EXPORT_CACHE_BYTES", 1024)
    driver.resolve_model("mlp", None, None, True)
    driver.resolve_model("mlp", None, None, True)
    assert len(exports) == 2
    assert not (tmp_path / "onnx").exists()


def test_the_least_recently_used_exports_go_past_the_size_limit(exports, tmp_path, monkeypatch):
    from qiao.compiler.content_cache import _folder_bytes

    root = tmp_path / "onnx"
    for seed in (0, 1):  # same sizes, other weights
        driver.resolve_model("mlp", None, {"seed": seed}, True)
    first, second = sorted(
        root.iterdir(), key=lambda p: (p / "qiao_cache_key.json").stat().st_mtime
    )
    size = _folder_bytes(str(first))
    monkeypatch.setattr(driver, "EXPORT_CACHE_TOTAL_BYTES", int(2.5 * size))
    driver.resolve_model("mlp", None, {"seed": 0}, True)  # a hit: now the most recently used
    assert len(exports) == 2
    driver.resolve_model("mlp", None, {"seed": 2}, True)  # a third entry: seed 1 goes
    assert len(exports) == 3
    assert first.exists() and not second.exists() and len(list(root.iterdir())) == 2
    driver.resolve_model("mlp", None, {"seed": 1}, True)  # exported again
    assert len(exports) == 4
