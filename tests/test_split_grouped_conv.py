"""SplitGroupedConv: a grouped (not depthwise) convolution becomes one dense convolution per group
and a concatenation (CPU only), and the compiled model still matches torch.

Nothing here times anything: the speed-up is measured in the pass's docstring and benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from onnx import TensorProto, helper
from tvm import relax

from qiao.compiler.passes.split_grouped_conv import SplitGroupedConv
from qiao.compiler.testing import assert_close, compiled_graph, main_instructions, relax_calls


def _cpu_target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


def _conv_module(groups, cin=12, cout=18, kernel=3):
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, cin, 9, 11), "float32"))
    w = relax.Var("w", relax.TensorType((cout, cin // groups, kernel, kernel), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1, groups=groups))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_grouped_convolution_runs_group_by_group(groups):
    """``groups`` dense convolutions, each over its channels of ``x`` and its rows of ``w``, with
    the original's stride and padding, concatenated along the channels to the original shape."""
    mod = _conv_module(groups)
    (before,) = relax_calls(mod["main"], "relax.nn.conv2d")
    with _cpu_target():
        after = SplitGroupedConv()(mod)
    convs = relax_calls(after["main"], "relax.nn.conv2d")
    assert len(convs) == groups
    for conv in convs:
        assert int(conv.attrs.groups) == 1
        assert [int(s) for s in conv.attrs.strides] == [2, 2]
        assert [int(p) for p in conv.attrs.padding] == [1, 1, 1, 1]
        assert [int(v) for v in conv.args[1].ty.shape.values] == [18 // groups, 12 // groups, 3, 3]
    (joined,) = relax_calls(after["main"], "relax.concat")
    assert int(joined.attrs.axis) == 1
    assert [str(v) for v in joined.ty.shape.values] == [str(v) for v in before.ty.shape.values]


@pytest.mark.parametrize("groups,cin,cout", [(1, 12, 18), (12, 12, 12), (12, 12, 24), (18, 36, 36)])
def test_dense_depthwise_and_many_group_convolutions_left_alone(groups, cin, cout):
    """``groups`` 1 is the GEMM schedule's already; ``groups`` = input channels (depthwise, with a
    channel multiplier too) the window rule's; more than ``MAX_GROUPS`` groups (here 18 of 2
    channels) make GEMMs too small and too many to compile."""
    mod = _conv_module(groups, cin=cin, cout=cout)
    with _cpu_target():
        after = SplitGroupedConv()(mod)
    tvm.ir.assert_structural_equal(after, mod)


def test_gpu_targets_left_alone():
    mod = _conv_module(3)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        after = SplitGroupedConv()(mod)
    tvm.ir.assert_structural_equal(after, mod)
    with _cpu_target():
        # the backend says GPU
        tvm.ir.assert_structural_equal(SplitGroupedConv(gpu=True)(mod), mod)


def test_grouped_1d_convolution_runs_group_by_group():
    """The same for a 1-D convolution (wav2vec2's and HuBERT's positional convolution: 16 groups,
    kernel 128 over the frames)."""
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 16, 40), "float32"))
    w = relax.Var("w", relax.TensorType((16, 4, 8), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv1d(x, w, padding=4, groups=4)))
        bb.emit_func_output(out)
    mod = bb.get()
    (before,) = relax_calls(mod["main"], "relax.nn.conv1d")
    with _cpu_target():
        after = SplitGroupedConv()(mod)
    convs = relax_calls(after["main"], "relax.nn.conv1d")
    assert len(convs) == 4
    for conv in convs:
        assert int(conv.attrs.groups) == 1 and [int(p) for p in conv.attrs.padding] == [4, 4]
        assert [int(v) for v in conv.args[1].ty.shape.values] == [4, 4, 8]
    (joined,) = relax_calls(after["main"], "relax.concat")
    assert [str(v) for v in joined.ty.shape.values] == [str(v) for v in before.ty.shape.values]


def test_compiled_grouped_convolutions_match_torch(tmp_path):
    """AlexNet's grouped 5x5 convolution (2 groups, bias, ReLU) and ShuffleNet's grouped 1x1 one
    (3 groups) then a depthwise 3x3 one, symbolic batch: the compiled model runs no grouped
    convolution kernel (one dense kernel per group, the depthwise one kept) and matches torch in
    float64 at batch 1 and 3."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((12, 4, 5, 5)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(12).astype(np.float32)
    w2 = rng.standard_normal((9, 4, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((9, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[2, 2, 2, 2], group=2),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=3),
        helper.make_node("Conv", ["c2", "w3"], ["y"], pads=[1, 1, 1, 1], group=9),
    ]
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 13, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 9, 13, 13])],
        {"w1": w1, "b1": b1, "w2": w2, "w3": w3},
        {"N": (1, 4)},
    )
    assert "split" in main_instructions(art.runner)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 8, 13, 13)).astype(np.float32)
        conv = torch.nn.functional.conv2d
        xt = torch.from_numpy(x).double()
        c1 = conv(
            xt, torch.from_numpy(w1).double(), torch.from_numpy(b1).double(), padding=2, groups=2
        )
        c2 = conv(torch.relu(c1), torch.from_numpy(w2).double(), groups=3)
        expected = conv(c2, torch.from_numpy(w3).double(), padding=1, groups=9).numpy()
        # float32 sums of up to 100 products of N(0, 1)-sized values, against float64
        got = art.run({"x": x})["y"].astype(np.float64)
        assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_compiled_grouped_1d_convolution_matches_torch(tmp_path):
    """A wav2vec2-style positional convolution (16 channels in 4 groups, kernel 8, padding 4,
    bias, ReLU), symbolic frames: the compiled model splits it and matches torch in float64."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 4, 8)).astype(np.float32) * 0.3
    b = rng.standard_normal(16).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[4, 4], group=4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, "U"])],
        {"w": w, "b": b},
        {"T": (8, 64)},
    )
    assert "split" in main_instructions(art.runner)
    for frames in (9, 40):
        x = rng.standard_normal((1, 16, frames)).astype(np.float32)
        expected = torch.relu(
            torch.nn.functional.conv1d(
                torch.from_numpy(x).double(),
                torch.from_numpy(w).double(),
                torch.from_numpy(b).double(),
                padding=4,
                groups=4,
            )
        ).numpy()
        # float32 sums of 32 products of N(0, 1)-sized values, against float64
        got = art.run({"x": x})["y"].astype(np.float64)
        assert_close(got, expected, rtol=1e-4, atol=1e-4)
