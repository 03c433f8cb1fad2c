"""Grouped convolutions on the CPU: the GEMM rule batches the groups of one kernel
(``cpu_gemm.split_group_axis``), small windows stay the window rule's, and compiled models with
grouped convolutions match torch.

Nothing here times anything: the speed-ups are measured in ``split_group_axis``'s docstring and
``benchmarks/``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from onnx import TensorProto, helper
from tvm import relax, s_tir, tirx

from qiao.compiler.schedules.cpu_gemm import (
    CPUMatmul,
    find_gemm_block,
    gemm_shape,
    normalize_gemm,
    split_group_axis,
)
from qiao.compiler.schedules.tir_util import static_int
from qiao.compiler.testing import assert_close, compiled_graph, fused_module, prim_func


def _cpu_target(arch=None):
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target(arch)


def _runnable_target(arch):
    """The CPU target for ``arch``; the test is skipped where this host cannot run its code."""
    from qiao.compiler.schedules.cpu_info import missing_here

    target = _cpu_target(arch)
    missing = missing_here(target) if arch else []
    if missing:
        pytest.skip(f"this host cannot run {arch} code: it lacks {missing}")
    return target


def _conv(cin, cout, groups, kernel, size=14, conv1d=False, batch=None, bias=False):
    """The conv kernel of one ``conv2d`` (or ``conv1d``) over a symbolic batch (or ``batch``),
    with a bias added (the epilogue folded into the kernel) where ``bias``."""
    n = tvm.tirx.Var("n", "int64") if batch is None else batch
    dims = (size,) if conv1d else (size, size)
    window = (kernel,) if conv1d else (kernel, kernel)
    op = relax.op.nn.conv1d if conv1d else relax.op.nn.conv2d

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, cin, *dims), "float32"))
        w = relax.Var("w", relax.TensorType((cout, cin // groups, *window), "float32"))
        b = relax.Var("b", relax.TensorType((1, cout, *(1 for _ in dims)), "float32"))
        with bb.function("main", [x, w, b] if bias else [x, w]):
            with bb.dataflow():
                y = bb.emit(op(x, w, padding=kernel // 2, groups=groups))
                out = bb.emit_output(bb.emit(relax.op.add(y, b)) if bias else y)
            bb.emit_func_output(out)

    return prim_func(fused_module(build), "conv")


def _floordivs(stmt) -> int:
    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.FloorDiv, lambda e: found.append(e))])
    return len(found)


def _conv_block(func):
    sch = s_tir.Schedule(func)
    (block,) = [
        b
        for b in sch.get_child_blocks(sch.get_sblock("root"))
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)
    ]
    return sch, block


# (in channels, out channels, groups, kernel, 1-D): AlexNet's 2 groups of a 5x5 window,
# ShuffleNet's grouped 1x1 (3 groups), 16-channel groups of a 1x1 (a 16-product window, but no
# window to slide: the window rule's loops would not vectorise it), ResNeXt's 32 groups of 8 and
# RegNet's 54 under a 3x3 window, and wav2vec2's grouped positional convolution (1-D)
GROUPED = [
    (16, 24, 2, 5, False),
    (24, 12, 3, 1, False),
    (64, 64, 4, 1, False),
    (256, 256, 32, 3, False),
    (432, 432, 54, 3, False),
    (32, 32, 4, 16, True),
]


@pytest.mark.parametrize("cin,cout,groups,kernel,conv1d", GROUPED)
def test_group_axis_split_makes_a_batched_gemm(cin, cout, groups, kernel, conv1d):
    """The output channel splits into (group, channel in the group): the input is read at
    ``g · (C / G) + c`` (no ``//`` left), the GEMM rule finds the block and normalises it to a
    GEMM batched over the groups, each of ``cout / groups`` output channels against the
    group's ``cin / groups`` input channels times the window."""
    func = _conv(cin, cout, groups, kernel, conv1d=conv1d)
    sch, block = _conv_block(func)
    assert _floordivs(sch.get(block).reads[0].region) + _floordivs(sch.get(block).reads[1].region)
    assert find_gemm_block(sch) is None

    split = split_group_axis(func)
    assert split is not None
    sch, block = _conv_block(split)
    stmt = sch.get(block)
    assert not _floordivs([r.region for r in stmt.reads])
    extents = [static_int(iv.dom.extent) for iv in stmt.iter_vars]
    assert groups in extents and cout // groups in extents
    assert find_gemm_block(sch) is not None
    normalize_gemm(sch, block)
    shape = gemm_shape(sch, block)
    taps = kernel if conv1d else kernel * kernel
    assert shape.groups == groups and shape.k == cin // groups * taps
    assert {shape.m, shape.n} & {cout // groups}, shape
    with _cpu_target() as target:
        assert CPUMatmul().apply(func, target, False) is not None


def _stores_per_element(func, target):
    """How many times the scheduled kernel ``func`` stores each element of its output: run
    serially (its parallel loops made serial, so the count is exact) with every store to the
    output turned into ``out[...] += 1``, from zeros."""
    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel

    out = func.params[-1]

    def on_for(loop, mutator):
        loop = mutator.default_mutate(loop)
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body)

    def on_store(store, mutator):
        if not store.buffer.same_as(out):
            return mutator.default_mutate(store)
        one = tirx.const(1.0, "float32")
        return tirx.BufferStore(
            store.buffer, tirx.BufferLoad(out, store.indices) + one, store.indices
        )

    counted = tvm_ffi.structural_mutate(func, [(tirx.For, on_for), (tirx.BufferStore, on_store)])
    fn = compile_cpu_kernel(counted, target).jit()["main"]
    dev = tvm.cpu()
    args = [
        tvm.runtime.tensor(np.zeros([int(d) for d in p.shape], "float32"), dev) for p in func.params
    ]
    fn(*args)
    return args[-1].numpy()


# (in channels, out channels, groups): 2 groups of 24 output channels (padded to two 16-lane
# vectors on AVX-512, three 8-lane ones on AVX2: a 5x5 window read in place), 2 groups of 6
# (one vector), 4 groups of 20 from 1x1 windows (packed, the channels as tile rows)
@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
@pytest.mark.parametrize("cin,cout,groups,kernel", [(32, 48, 2, 5), (16, 12, 2, 3), (64, 80, 4, 1)])
def test_each_output_stored_once(arch, cin, cout, groups, kernel):
    """Every output element of a scheduled grouped convolution with a bias folded in is stored
    exactly once: the register tiles pad a group's channels, and no padded channel is stored
    over the next group's first ones (``bound_group_channels``; in parallel those stores raced
    with the next group's and the model's output was wrong). The count comes from running the
    kernel (serially) with its stores counted, not from reading its code."""
    target = _runnable_target(arch)
    func = _conv(cin, cout, groups, kernel, size=8, batch=2, bias=True)
    with target:
        scheduled = CPUMatmul().apply(func, target, False)
    assert scheduled is not None
    counts = _stores_per_element(scheduled.mod["main"], target)
    assert counts.shape == (2, cout, 8, 8)
    assert (counts == 1).all(), np.argwhere(counts != 1)[:8]


# (in channels, out channels, groups, kernel): groups of 4 channels under a 3x3 window (36
# products), a depthwise convolution with a channel multiplier of 2, a 1-D one of 4-channel
# groups and a 3-tap kernel; a depthwise and a dense convolution have no group axis to split
@pytest.mark.parametrize(
    "cin,cout,groups,kernel,conv1d",
    [
        (128, 128, 32, 3, False),
        (32, 64, 32, 3, False),
        (16, 16, 4, 3, True),
        (32, 32, 32, 3, False),
        (32, 32, 1, 3, False),
    ],
)
def test_small_windows_left_to_the_window_rule(cin, cout, groups, kernel, conv1d):
    """At most ``cpu_conv.MAX_WINDOW`` products per output over a window of several taps are
    ``CPUWindowReduction``'s (computed in place, 2-6x faster than the batched GEMM there); dense
    convolutions are the GEMM rule's without a split."""
    from qiao.compiler.schedules.cpu_conv import CPUWindowReduction

    func = _conv(cin, cout, groups, kernel, conv1d=conv1d)
    assert split_group_axis(func) is None
    target = _cpu_target()
    with target:
        if groups == 1:
            assert CPUMatmul().apply(func, target, False) is not None
        else:
            assert CPUMatmul().apply(func, target, False) is None
            assert CPUWindowReduction().apply(func, target, False) is not None


def _chain():
    """A chain of grouped convolutions over 14x14 (ONNX nodes, weights, torch reference): 2
    groups of a 5x5 window (16 -> 24 channels a group, read in place: two-vector tiles), ReLU,
    a 3-group 1x1, a depthwise 3x3, 4 groups of 6 channels under a 3x3 window (the window
    rule's), 8 groups of 8 -> 16 channels (one AVX-512 vector a tile row), 2 groups of 64 -> 48
    (three vectors), with bias."""
    rng = np.random.default_rng(0)
    specs = [  # (cin, cout, groups, kernel)
        (32, 48, 2, 5),
        (48, 24, 3, 1),
        (24, 24, 24, 3),
        (24, 64, 4, 3),
        (64, 128, 8, 3),
        (128, 96, 2, 3),
    ]
    nodes, weights, layers = [], {}, []
    x = "x"
    for i, (cin, cout, groups, kernel) in enumerate(specs):
        scale = 1 / np.sqrt(cin // groups * kernel * kernel)
        w = (rng.standard_normal((cout, cin // groups, kernel, kernel)) * scale).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32) * 0.1
        weights.update({f"w{i}": w, f"b{i}": b})
        pads = [kernel // 2] * 4
        nodes.append(
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=pads, group=groups)
        )
        x = f"c{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["r0"]))
            x = "r0"
        layers.append((w, b, groups, kernel // 2, i == 0))
    nodes[-1].output[0] = "y"

    def reference(inputs: np.ndarray) -> np.ndarray:
        out = torch.from_numpy(inputs).double()
        for w, b, groups, pad, relu in layers:
            out = torch.nn.functional.conv2d(
                out,
                torch.from_numpy(w).double(),
                torch.from_numpy(b).double(),
                padding=pad,
                groups=groups,
            )
            out = torch.relu(out) if relu else out
        return out.numpy()

    return nodes, weights, reference


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
def test_compiled_grouped_convolutions_match_torch(tmp_path, caplog, arch):
    """The chain, compiled with a symbolic batch for this host's code and for AVX2 code: every
    kernel gets a schedule rule (none fails or falls back), and the model matches torch in
    float64 at batch 1 and 3."""
    _runnable_target(arch)
    nodes, weights, reference = _chain()
    caplog.set_level(logging.WARNING, logger="qiao.schedules")
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96, 14, 14])],
        weights,
        {"N": (1, 4)},
        arch=arch,
    )
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 32, 14, 14)).astype(np.float32)
        got = art.run({"x": x})["y"].astype(np.float64)
        # float32 sums of up to 400 products of N(0, 1) x N(0, 1/fan-in) values, six layers deep
        assert_close(got, reference(x), rtol=1e-4, atol=1e-4)


def test_compiled_grouped_1d_convolution_matches_torch(tmp_path, caplog):
    """A wav2vec2-style positional convolution (32 channels in 4 groups, kernel 16, padding 8,
    bias, ReLU), symbolic frames: the batched GEMM, no schedule warning, and torch's values in
    float64."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 8, 16)) * 0.1).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[8, 8], group=4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    caplog.set_level(logging.WARNING, logger="qiao.schedules")
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, "U"])],
        {"w": w, "b": b},
        {"T": (8, 64)},
    )
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for frames in (9, 40):
        x = rng.standard_normal((1, 32, frames)).astype(np.float32)
        expected = torch.relu(
            torch.nn.functional.conv1d(
                torch.from_numpy(x).double(),
                torch.from_numpy(w).double(),
                torch.from_numpy(b).double(),
                padding=8,
                groups=4,
            )
        ).numpy()
        # float32 sums of 128 products of N(0, 1) x N(0, 0.01) values, against float64
        got = art.run({"x": x})["y"].astype(np.float64)
        assert_close(got, expected, rtol=1e-4, atol=1e-4)
