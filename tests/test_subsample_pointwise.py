"""SubsamplePointwise: a strided 1x1 convolution becomes a subsampling copy of its input and a
pointwise convolution (CPU only), and the compiled model still matches torch.

Nothing here times anything: the speed-up is measured in the pass's docstring and benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from onnx import TensorProto, helper
from tvm import relax

from qiao.compiler.passes.subsample_pointwise import SubsamplePointwise
from qiao.compiler.testing import assert_close, compiled_graph, main_instructions, relax_calls


def _cpu_target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


def _conv_module(size, kernel, stride, padding, groups=1, cin=8, cout=12, dilation=1):
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, cin, size[0], size[1]), "float32"))
    w = relax.Var("w", relax.TensorType((cout, cin // groups, kernel, kernel), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x, w, strides=stride, padding=padding, dilation=dilation, groups=groups
                )
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(
    "size,stride,groups",
    [((28, 28), (2, 2), 1), ((15, 13), (2, 3), 1), ((14, 14), (2, 2), 4)],
)
def test_strided_pointwise_reads_a_subsampled_copy(size, stride, groups):
    """On a CPU target the convolution runs at stride 1 over ``x[:, :, ::s_h, ::s_w]`` and keeps
    its output shape (odd sizes: ``ceil(H / s)`` rows)."""
    mod = _conv_module(size, 1, stride, 0, groups=groups)
    before = [int(v) for v in relax_calls(mod["main"], "relax.nn.conv2d")[0].ty.shape.values[1:]]
    with _cpu_target():
        after = SubsamplePointwise()(mod)
    (conv,) = relax_calls(after["main"], "relax.nn.conv2d")
    assert [int(s) for s in conv.attrs.strides] == [1, 1]
    assert int(conv.attrs.groups) == groups
    assert [int(v) for v in conv.ty.shape.values[1:]] == before
    (picked,) = relax_calls(after["main"], "relax.strided_slice")
    assert picked.args[0].same_as(after["main"].params[0])  # a copy of x
    assert [int(v) for v in picked.ty.shape.values[2:]] == before[1:]


@pytest.mark.parametrize(
    "size,kernel,stride,padding,dilation",
    [
        ((28, 28), 3, (2, 2), 1, 1),  # a window: not a subsample
        ((28, 28), 1, (2, 2), 1, 1),  # padded: the padding's positions would be read too
        ((28, 28), 1, (1, 1), 0, 1),  # already pointwise
        ((28, 28), 1, (2, 2), 0, 2),  # dilated: left to the GEMM schedule as it is
    ],
)
def test_other_convolutions_left_alone(size, kernel, stride, padding, dilation):
    mod = _conv_module(size, kernel, stride, padding, dilation=dilation)
    with _cpu_target():
        after = SubsamplePointwise()(mod)
    assert not relax_calls(after["main"], "relax.strided_slice")
    tvm.ir.assert_structural_equal(after, mod)


def test_gpu_targets_left_alone():
    mod = _conv_module((28, 28), 1, (2, 2), 0)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        after = SubsamplePointwise()(mod)
    tvm.ir.assert_structural_equal(after, mod)
    with _cpu_target():
        # the backend says GPU
        tvm.ir.assert_structural_equal(SubsamplePointwise(gpu=True)(mod), mod)


def test_compiled_downsampling_matches_torch(tmp_path):
    """A ResNet-style block: a strided 1x1 shortcut beside a strided 3x3 convolution of the same
    input (odd map: 15x15 -> 8x8), summed and ReLU'd; the compiled model calls the subsampling
    copy and matches torch in float64 at batch 1 and 3."""
    rng = np.random.default_rng(0)
    cin, cout, size = 16, 24, 15
    w1 = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(cout).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["s"], strides=[2, 2]),
        helper.make_node("Conv", ["x", "w3"], ["m"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["s", "m"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, 8, 8])],
        {"w1": w1, "w3": w3, "b1": b1},
        {"N": (1, 4)},
    )
    assert "strided_slice" in main_instructions(art.runner)
    for batch in (1, 3):
        x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
        xt = torch.from_numpy(x).double()
        s = torch.nn.functional.conv2d(xt, torch.from_numpy(w1).double(), stride=2)
        m = torch.nn.functional.conv2d(xt, torch.from_numpy(w3).double(), stride=2, padding=1)
        expected = torch.relu(s + torch.from_numpy(b1).double()[:, None, None] + m).numpy()
        # float32 sums of up to 144 products of N(0, 1)-sized values, against float64
        got = art.run({"x": x})["y"].astype(np.float64)
        assert_close(got, expected, rtol=1e-4, atol=1e-4)
