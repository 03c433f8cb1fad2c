"""PadConvRows: a convolution over a map that no register tile height divides computes an extra
output row (sliced off), so that the GEMM schedule reads its input in place (CPU only); the
compiled model still matches torch.

Nothing here times anything: the speed-up is measured in the pass's docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from onnx import TensorProto, helper
from tvm import relax

from qiao.compiler.passes.pad_conv_rows import PadConvRows
from qiao.compiler.schedules.cpu_gemm import DIRECT_ROWS, direct_rows_height
from qiao.compiler.schedules.cpu_info import cpu_info
from qiao.compiler.testing import (
    assert_close,
    compiled_graph,
    main_instructions,
    marked,
    prim_func,
    relax_calls,
)


def _cpu_target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


def _conv_module(size, kernel, stride=1, padding=1, cin=16, cout=32, groups=1, batch=None):
    """``main(x, w)``: one conv2d over a symbolic batch (or a static ``batch``)."""
    n = tvm.tirx.Var("n", "int64") if batch is None else batch
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, cin, size, size), "float32"))
    w = relax.Var("w", relax.TensorType((cout, cin // groups, kernel, kernel), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, groups=groups))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _out_dims(mod):
    return [int(v) for v in mod["main"].body.ty.shape.values[1:]]


# (input map, kernel, stride, padding, output rows): maps of 9x9, 13x13, 17x17 and 57x57 (81 /
# 169 / 289 / 3249 positions: no height of 4 .. 8 divides them), one reached at stride 2, and a
# 5x5 window
@pytest.mark.parametrize(
    "size,kernel,stride,padding,rows",
    [
        (9, 3, 1, 1, 9),
        (13, 3, 1, 1, 13),
        (17, 3, 1, 1, 17),
        (33, 3, 2, 1, 17),
        (57, 3, 1, 1, 57),
        (19, 5, 1, 2, 19),
    ],
)
def test_convolution_computes_extra_rows_and_slices_them_off(size, kernel, stride, padding, rows):
    mod = _conv_module(size, kernel, stride, padding)
    with _cpu_target() as target:
        after = PadConvRows()(mod)
    cpu = cpu_info(target)
    (conv,) = relax_calls(after["main"], "relax.nn.conv2d")
    taller = int(conv.ty.shape.values[2])
    extra = taller - rows
    assert 1 <= extra <= rows // 8
    bottom = padding + extra * stride
    assert [int(p) for p in conv.attrs.padding] == [padding, padding, bottom, padding]
    assert int(conv.ty.shape.values[3]) == rows  # the width is left as it is
    # the rows before do not divide into register tiles; with the extra ones they do
    assert not direct_rows_height(cpu, rows * rows)
    assert direct_rows_height(cpu, taller * rows)
    (sliced,) = relax_calls(after["main"], "relax.strided_slice")
    assert [int(v) for v in sliced.ty.shape.values[2:]] == [rows, rows]
    assert _out_dims(after) == _out_dims(mod) == [32, rows, rows]


def test_grouped_convolution_computes_extra_rows_by_its_groups_channels():
    """A grouped convolution reaches the in-place path too (the GEMM schedule batches its
    groups, ``cpu_gemm.split_group_axis``): 2 groups of 8 -> 16 channels over 17x17 get the rows
    of 16-channel tiles (``direct_vectors``: one AVX-512 vector, two AVX2 ones), and the
    scheduled kernel reads its input in place."""
    from qiao.compiler.schedules.cpu_gemm import direct_vectors

    mod = _conv_module(17, 3, groups=2)
    with _cpu_target() as target:
        after = PadConvRows()(mod)
    cpu = cpu_info(target)
    vectors = direct_vectors(cpu.lanes("float32"), 16)
    (conv,) = relax_calls(after["main"], "relax.nn.conv2d")
    assert int(conv.attrs.groups) == 2
    taller = int(conv.ty.shape.values[2])
    assert not direct_rows_height(cpu, 17 * 17, vectors)
    assert taller > 17 and direct_rows_height(cpu, taller * 17, vectors)
    assert _out_dims(after) == _out_dims(mod) == [32, 17, 17]
    assert not marked(_scheduled_conv(mod), DIRECT_ROWS)
    assert marked(_scheduled_conv(after), DIRECT_ROWS)


@pytest.mark.parametrize(
    "size,kernel,kwargs",
    [
        (16, 3, {}),  # 256 positions: tiles of 8 (or 4) rows divide them already
        (5, 3, {"cin": 32, "cout": 64, "padding": (0, 4)}),  # 3x11: a row more is a third more
        (17, 3, {"cin": 3}),  # a 27-long reduction: packed whatever its positions
        (17, 3, {"groups": 4}),  # 4 channels a group, 36 products: the window rule's
        (17, 1, {"padding": 0}),  # a 1x1 convolution keeps its panels
    ],
)
def test_other_convolutions_left_alone(size, kernel, kwargs):
    mod = _conv_module(size, kernel, **kwargs)
    with _cpu_target():
        after = PadConvRows()(mod)
    assert not relax_calls(after["main"], "relax.strided_slice")
    tvm.ir.assert_structural_equal(after, mod)


def test_gpu_targets_left_alone():
    mod = _conv_module(17, 3)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        tvm.ir.assert_structural_equal(PadConvRows()(mod), mod)
    with _cpu_target():
        # the backend says GPU
        tvm.ir.assert_structural_equal(PadConvRows(gpu=True)(mod), mod)


def _scheduled_conv(mod):
    """The conv2d kernel of ``mod`` after the pipeline's legalize phase and the CPU rules."""
    from qiao.compiler.passes.apply_schedule_rules import ApplyScheduleRules
    from qiao.compiler.pipeline import legalize_passes
    from qiao.compiler.schedules import rules_for

    target = _cpu_target()
    with target:
        mod = tvm.transform.Sequential(legalize_passes(None))(mod)
        mod = ApplyScheduleRules(rules_for(target), strict=True)(mod)
    return prim_func(mod, "conv2d")


@pytest.mark.parametrize("batch", [None, 1, 8])
def test_padded_convolution_reads_its_input_in_place(batch):
    """The point of the rows: the GEMM schedule packs the 17x17 convolution's input into im2col
    panels, and reads the padded one's in place (``cpu_gemm.direct_rows``). A static batch of 8
    (2312 positions as the schedule counts them, the batch inside) is read in place as it is and
    left alone."""
    mod = _conv_module(17, 3, batch=batch)
    with _cpu_target():
        padded = PadConvRows()(mod)
    if batch == 8:
        tvm.ir.assert_structural_equal(padded, mod)
    else:
        assert not marked(_scheduled_conv(mod), DIRECT_ROWS)
    assert marked(_scheduled_conv(padded), DIRECT_ROWS)


@pytest.mark.parametrize("size,stride", [(17, 1), (33, 2)])
def test_compiled_convolution_matches_torch(tmp_path, size, stride):
    """Conv (3x3, padding 1, bias) and ReLU over a 17x17 output map, compiled for the CPU with a
    symbolic batch: the model calls the slice and matches torch in float64 at batch 1 and 3 (the
    extra row's values, computed from the extra zero padding, are dropped)."""
    rng = np.random.default_rng(size)
    cin, cout = 16, 32
    w = (rng.standard_normal((cout, cin, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride] * 2, pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    art = compiled_graph(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, 17, 17])],
        {"w": w, "b": b},
        {"N": (1, 4)},
    )
    assert "strided_slice" in main_instructions(art.runner)
    for batch in (1, 3):
        x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
        ref = torch.nn.functional.conv2d(
            torch.from_numpy(x).double(),
            torch.from_numpy(w).double(),
            torch.from_numpy(b).double(),
            stride=stride,
            padding=1,
        )
        got = art.run({"x": x})["y"].astype(np.float64)
        # float32 sums of 144 products of N(0, 1) x N(0, 0.04) values, against float64
        assert_close(got, torch.relu(ref).numpy(), rtol=1e-4, atol=1e-4)
