"""Large CPU weights live on transparent huge pages (``tvm_backend.weight_tensor``): the memory is
advised (``madvise(MADV_HUGEPAGE)``) before the weights are written into it, for the weights as
loaded and for the packed ones ``main_transform_params`` makes. Checked in the process's own
memory map (``/proc/self/smaps``: the ``hg`` flag of the mapping); values checked against NumPy."""

from __future__ import annotations

import re
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.backends import tvm_backend
from qiao.backends.tvm_backend import HUGE_PAGE_BYTES, HUGE_PAGE_MIN_BYTES, weight_tensor


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return None


THP_REASON = "transparent huge pages need Linux with THP enabled (mode 'always' or 'madvise')"
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() in (None, "never"), reason=THP_REASON
)


def dense_onnx(folder):
    """``dense.onnx`` in ``folder``: ``y = x @ w`` with ``w`` a seeded 2048 x N float32 weight of
    ``HUGE_PAGE_MIN_BYTES``, rows symbolic; returns (path, w)."""
    K, N = 2048, HUGE_PAGE_MIN_BYTES // 4 // 2048
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "dense.onnx"
    onnx.save(model, str(path))
    return path, w


def _advised(ptr: int, nbytes: int) -> bool:
    """Whether the mapping holding the first whole 2 MB page of ``[ptr, ptr + nbytes)`` carries
    the huge-page advice (``hg`` in its VmFlags)."""
    page = -(-ptr // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    assert page + HUGE_PAGE_BYTES <= ptr + nbytes
    with open("/proc/self/smaps") as f:
        maps = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", f.read())
    for block in maps:
        lo, hi = (int(x, 16) for x in block.split()[0].split("-"))
        if lo <= page < hi:
            flags = re.search(r"VmFlags:(.*)", block).group(1).split()
            return "hg" in flags
    raise AssertionError(f"no mapping holds {page:#x}")


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_weight_tensor_keeps_the_values(dtype, large):
    import tvm

    count = (HUGE_PAGE_MIN_BYTES if large else 4096) // np.dtype(dtype).itemsize + 7
    array = (np.random.default_rng(0).standard_normal(count) * 50).astype(dtype).reshape(1, -1)
    dev = tvm.cpu()
    from_array = weight_tensor(array, dev)
    np.testing.assert_array_equal(from_array.numpy(), array)
    from_tensor = weight_tensor(tvm.runtime.tensor(array, dev), dev)
    np.testing.assert_array_equal(from_tensor.numpy(), array)


@needs_thp
def test_large_weight_memory_is_advised_before_it_is_written():
    import tvm

    array = np.arange(HUGE_PAGE_MIN_BYTES // 4 * 2, dtype=np.float32)
    tensor = weight_tensor(array, tvm.cpu())
    assert _advised(tensor.data_ptr(), array.nbytes)
    # a tensor handed in (what the load-time weight packing returns) is copied onto such memory
    plain = tvm.runtime.tensor(array, tvm.cpu())
    moved = weight_tensor(plain, tvm.cpu())
    assert moved.data_ptr() != plain.data_ptr()
    assert _advised(moved.data_ptr(), array.nbytes)
    np.testing.assert_array_equal(moved.numpy(), array)


def test_advice_outside_linux_or_without_a_whole_page_is_declined(monkeypatch):
    assert not tvm_backend.advise_huge_pages(HUGE_PAGE_BYTES + 64, HUGE_PAGE_BYTES)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not tvm_backend.advise_huge_pages(0, 4 * HUGE_PAGE_BYTES)


@needs_thp
def test_runner_weights_packed_at_load_are_on_huge_pages(tmp_path, monkeypatch):
    """A dense layer whose 8 MB weight the CPU schedule packs at load time: the runner's weights
    are the packed ones moved by ``weight_tensor`` (the transform's own allocation may land on
    advised memory by chance: freed heap memory keeps its advice), they sit on advised memory,
    and the layer still computes x @ w."""
    from qiao.compiler import compile

    moved = []
    real = tvm_backend.weight_tensor

    def spy(value, device):
        out = real(value, device)
        if not isinstance(value, np.ndarray):
            moved.append(out)
        return out

    monkeypatch.setattr(tvm_backend, "weight_tensor", spy)

    path, w = dense_onnx(tmp_path)
    K = w.shape[0]
    art = compile(str(path), "cpu", tmp_path / "art")
    runner = art.runner
    large = [p for p in runner.params if p.numel() * 4 >= HUGE_PAGE_MIN_BYTES]
    assert large, "the packed weight should be at least HUGE_PAGE_MIN_BYTES"
    assert tuple(large[0].shape) != w.shape, "expected the weight packed at load"
    for p in large:
        assert any(p is m for m in moved)
        assert _advised(p.data_ptr(), p.numel() * 4)
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})["y"], x @ w, rtol=1e-4, atol=1e-3)
