"""FoldPadding: an exported Pad before a convolution or a pooling becomes that op's padding, and
the compiled model still matches ONNX Runtime.

Nothing here times anything: the gain is measured in the pass's docstring and benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper

from qiao.compiler.passes.fold_padding import FoldPadding
from qiao.compiler.testing import assert_close, compiled_graph, main_instructions, relax_calls

relax = tvm.relax


def _module(widths, consumer, value=0.0, extra_use=False):
    """``main(x, w)``: ``consumer`` of ``pad(x, widths, value)`` over a symbolic batch."""
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 4, 9, 11), "float32"))
    w = relax.Var("w", relax.TensorType((6, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.pad(x, widths, pad_value=value))
            y = bb.emit(consumer(p, w))
            if extra_use:
                out = bb.emit_output(relax.Tuple([y, p]))
            else:
                out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _conv(p, w):
    return relax.op.nn.conv2d(p, w, padding=[1, 0, 0, 1])


def _avg(p, w):
    return relax.op.nn.avg_pool2d(p, pool_size=3, strides=2)


def _avg_padded(p, w):
    return relax.op.nn.avg_pool2d(p, pool_size=3, strides=2, padding=1)


def _max(p, w):
    return relax.op.nn.max_pool2d(p, pool_size=3, strides=2, padding=[0, 1, 0, 1])


def _max_ceil(p, w):
    return relax.op.nn.max_pool2d(p, pool_size=3, strides=2, ceil_mode=True)


SPATIAL = [0, 0, 0, 0, 2, 1, 0, 3]  # top 2, bottom 1, left 0, right 3


@pytest.mark.parametrize(
    "consumer,value,op,padding,include",
    [
        (_conv, 0.0, "relax.nn.conv2d", [3, 0, 1, 4], None),
        (_avg, 0.0, "relax.nn.avg_pool2d", [2, 0, 1, 3], True),
        (_max, float("-inf"), "relax.nn.max_pool2d", [2, 1, 1, 4], None),
        (_max, float(np.finfo("float32").min), "relax.nn.max_pool2d", [2, 1, 1, 4], None),
    ],
)
def test_pad_becomes_the_ops_padding(consumer, value, op, padding, include):
    """The pad's spatial widths are added to the op's own padding (``(top, left, bottom,
    right)``); an average pooling then counts the padded zeros, as the pad made it do."""
    mod = _module(SPATIAL, consumer, value)
    after = FoldPadding()(mod)
    assert not relax_calls(after["main"], "relax.nn.pad")
    (call,) = relax_calls(after["main"], op)
    assert [int(p) for p in call.attrs.padding] == padding
    if include is not None:
        assert bool(call.attrs.count_include_pad) == include
    assert call.args[0].same_as(after["main"].params[0])
    # the same output shape
    tvm.ir.assert_structural_equal(after["main"].ret_ty, mod["main"].ret_ty)


@pytest.mark.parametrize(
    "widths,consumer,value",
    [
        ([0, 0, 1, 1, 1, 1, 1, 1], _avg, 0.0),  # pads the channels too
        (SPATIAL, _conv, 1.0),  # not zeros
        (SPATIAL, _avg_padded, 0.0),  # its own padding not counted, the pad's would be
        (SPATIAL, _max, 0.0),  # zeros are not -inf to a max
        (SPATIAL, _max_ceil, float("-inf")),  # a ceil-mode window may start in the pad
    ],
)
def test_other_pads_left_alone(widths, consumer, value):
    mod = _module(widths, consumer, value)
    after = FoldPadding()(mod)
    tvm.ir.assert_structural_equal(after, mod)


def test_pad_read_elsewhere_stays():
    mod = _module(SPATIAL, _conv, extra_use=True)
    after = FoldPadding()(mod)
    assert len(relax_calls(after["main"], "relax.nn.pad")) == 1
    (conv,) = relax_calls(after["main"], "relax.nn.conv2d")
    assert conv.args[0].same_as(after["main"].params[0])


def test_compiled_pads_match_onnxruntime(tmp_path):
    """Pad -> AveragePool (TorchScript's opset-9 export of a pooling counting its padding),
    asymmetric Pad -> Conv (a TensorFlow converter's "SAME"), Pad(-inf) -> MaxPool, compiled for
    the CPU with a symbolic batch: no pad kernel left, and ONNX Runtime's values."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Pad", ["x", "p1"], ["x1"], mode="constant"),
        helper.make_node("AveragePool", ["x1"], ["a"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Pad", ["x", "p2"], ["x2"], mode="constant"),
        helper.make_node("Conv", ["x2", "w"], ["c"]),
        helper.make_node("Pad", ["x", "p3", "ninf"], ["x3"], mode="constant"),
        helper.make_node("MaxPool", ["x3"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
    ]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 11])]
    shapes = {"a": ["N", 4, 5, 6], "c": ["N", 6, 9, 11], "m": ["N", 4, 5, 5]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in shapes.items()]
    art = compiled_graph(
        tmp_path,
        nodes,
        graph_inputs,
        outputs,
        {
            "w": w,
            "ninf": np.array(-np.inf, np.float32),
            "p1": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
            "p2": np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64),
            "p3": np.array([0, 0, 0, 1, 0, 0, 2, 0], np.int64),
        },
        {"N": (1, 4)},
    )
    assert "pad" not in main_instructions(art.runner)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rng.standard_normal((batch, 4, 9, 11)).astype(np.float32)
        got = art.run({"x": x})
        expected = dict(zip(("a", "c", "m"), session.run(["a", "c", "m"], {"x": x})))
        for name in ("a", "c", "m"):
            # float32 sums of at most 36 products of N(0, 1) values
            assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, name=name)
