"""Converters for reductions (``ReduceSum``, ``ReduceMean``, ... ``ReduceLogSumExp``) whose
axes are known only at run time.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import (
    const,
    int_tensor,
    runtime_shape,
    shape_tensor,
    tensor_length,
)


def _runtime_axes_mask(bb, axes, rank: int):
    """bool[rank]: which axes an int tensor of (possibly negative) axis numbers names."""
    axes = bb.normalize(relax.op.astype(axes, "int64"))
    axes = bb.normalize(
        relax.op.where(
            relax.op.less(axes, const(0, "int64")),
            relax.op.add(axes, const(rank, "int64")),
            axes,
        )
    )
    # A scatter, not a reduction over the axes list: TVM's CPU reductions over an extent that is
    # zero at run time (empty axes) return garbage.
    ones = relax.op.ones_like(axes, "int64")
    hits = relax.op.scatter_elements(const(np.zeros(rank), "int64"), axes, ones, axis=0)
    return bb.normalize(relax.op.greater(hits, const(0, "int64")))


def reduce_runtime_axes(bb, x, axes, keepdims: bool, reduce_fn, noop_with_empty_axes=False):
    """Reduce ``x`` (static rank) over the axes in the int tensor ``axes`` (static length, values
    known only at run time) with ``reduce_fn(x, axis)`` (keepdims=True).

    Axis by axis: the reduction along the axis is concatenated in front of the data and a slice
    bound at run time keeps either it (axis named) or the data (axis not named), so zero-sized
    axes reduce to the reduction's identity as they should. Without ``keepdims`` the named axes
    are then dropped with a reshape to a run-time shape.
    """
    rank, length = x.ty.ndim, tensor_length(axes)
    if not keepdims and length is None:
        raise ValueError("a reduction without keepdims needs axes of static length")
    mask = _runtime_axes_mask(bb, axes, rank)
    if not noop_with_empty_axes and length is None:
        # Empty axes (possible when the length is only known at run time) mean all axes.
        none = relax.op.equal(relax.op.max(relax.op.astype(mask, "int32")), const(0, "int32"))
        mask = bb.normalize(relax.op.logical_or(mask, none))
    out = x
    for i in range(rank):
        selected = bb.normalize(relax.op.take(mask, const(i, "int64"), axis=0))
        stacked = bb.normalize(relax.op.concat([reduce_fn(out, i), out], axis=i))
        extent = int_tensor(bb, out.ty.shape.values[i])
        bounds = relax.op.where(
            selected,
            const([0, 1], "int64"),
            relax.op.concat(
                [
                    const([1], "int64"),
                    relax.op.add(relax.op.reshape(extent, [1]), const([1], "int64")),
                ],
                axis=0,
            ),
        )
        begin, end = runtime_shape(bb, bb.normalize(bounds), 2, f"reduce_axis{i}").values
        out = bb.normalize(
            relax.op.strided_slice(stacked, [i], [begin], [end], assume_inbound=True)
        )
    if keepdims:
        return out
    # The k-th kept axis is the number of axes whose running count of kept axes is <= k.
    keep = relax.op.astype(relax.op.logical_not(mask), "int64")
    running = relax.op.expand_dims(relax.op.cumsum(keep, axis=0), 0)
    ks = const(np.arange(rank - length).reshape(-1, 1), "int64")
    src = relax.op.sum(relax.op.astype(relax.op.less_equal(running, ks), "int64"), axis=1)
    out_dims = bb.normalize(relax.op.take(shape_tensor(bb, x), src, axis=0))
    return relax.op.reshape(out, runtime_shape(bb, out_dims, rank - length, "reduced_dim"))


_REDUCTIONS = {
    # op type: (pre-transform, reduction, post-transform); None = identity
    "ReduceSum": (None, relax.op.sum, None),
    "ReduceMean": (None, relax.op.mean, None),
    "ReduceMax": (None, relax.op.max, None),
    "ReduceMin": (None, relax.op.min, None),
    "ReduceProd": (None, relax.op.prod, None),
    "ReduceSumSquare": (lambda x: relax.op.multiply(x, x), relax.op.sum, None),
    "ReduceL1": (relax.op.abs, relax.op.sum, None),
    "ReduceL2": (lambda x: relax.op.multiply(x, x), relax.op.sum, relax.op.sqrt),
    "ReduceLogSum": (None, relax.op.sum, relax.op.log),
    "ReduceLogSumExp": (relax.op.exp, relax.op.sum, relax.op.log),
}


class _RuntimeAxesReduce(tvm_onnx.OnnxOpConverter):
    """Reductions whose ``axes`` input is not a constant (opset 13 ReduceSum, opset 18 the rest).

    TVM's converters assert "Only constant axes currently supported". Constant axes still go to
    TVM's converter; a run-time ``axes`` of static length goes through ``reduce_runtime_axes``.
    """

    op_type = ""

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = tvm_onnx._get_convert_map()[cls.op_type].get_converter(opset)
        pre, reduce_op, post = _REDUCTIONS[cls.op_type]

        def convert(bb, inputs, attr, params):
            data = inputs[0]
            if str(data.ty.dtype) == "bool" and reduce_op in (relax.op.max, relax.op.min):
                # TVM has no min/max identity for bool; uint8 orders False < True the same way.
                as_int = tvm_onnx.onnx_input([bb.normalize(relax.op.astype(data, "uint8"))])
                as_int.extend(inputs[1:])
                return relax.op.astype(bb.normalize(convert(bb, as_int, attr, params)), "bool")
            axes = tvm_onnx.get_constant(inputs[1], params) if len(inputs) > 1 else None
            if axes is None or isinstance(axes, tvm.ir.GenericConst):
                return tvm_convert(bb, inputs, attr, params)
            if tensor_length(axes) == 0:
                if attr.get("noop_with_empty_axes", 0):
                    return data
                return tvm_convert(bb, tvm_onnx.onnx_input([data]), attr, params)
            if pre is not None:
                data = bb.normalize(pre(data))

            def reduce_fn(x, axis):
                return reduce_op(x, axis=axis, keepdims=True)

            out = reduce_runtime_axes(
                bb,
                data,
                axes,
                bool(attr.get("keepdims", 1)),
                reduce_fn,
                bool(attr.get("noop_with_empty_axes", 0)),
            )
            return post(out) if post is not None else out

        def integer_mean(bb, inputs, attr, params):
            # TVM legalizes the mean of an int32 tensor to an int64 buffer behind an int32
            # signature (the artifact returned int64). ONNX's integer mean truncates sum / count:
            # so does float64's quotient cast back (exact below 2**53).
            dtype = str(inputs[0].ty.dtype)
            if not dtype.startswith(("int", "uint")):
                return convert(bb, inputs, attr, params)
            wide = tvm_onnx.onnx_input([bb.normalize(relax.op.astype(inputs[0], "float64"))])
            wide.extend(inputs[1:])
            return relax.op.astype(bb.normalize(convert(bb, wide, attr, params)), dtype)

        def log_sum_exp(bb, inputs, attr, params):
            # TVM's is max + log(sum(exp(x - max))): an infinite max makes x - max NaN (ONNX
            # Runtime: +inf). Shifting by 0 where the max is infinite keeps the right infinity.
            x, axes = inputs[0], attr.get("axes")
            if len(inputs) > 1 and inputs[1] is not None:
                constant = tvm_onnx.get_constant(inputs[1], params)
                if not isinstance(constant, tvm.ir.GenericConst):
                    return convert(bb, inputs, attr, params)  # run-time axes
                axes = [int(a) for a in constant.value.numpy().reshape(-1)]
            if not axes:
                if attr.get("noop_with_empty_axes", 0):
                    return x
                axes = None
            top = bb.normalize(relax.op.max(x, axes, keepdims=True))
            shift = bb.normalize(relax.op.where(relax.op.isinf(top), relax.op.zeros_like(top), top))
            total = relax.op.sum(relax.op.exp(relax.op.subtract(x, shift)), axes, keepdims=True)
            out = relax.op.add(relax.op.log(total), shift)
            return out if attr.get("keepdims", 1) else relax.op.squeeze(out, axes)

        special = {"ReduceMean": integer_mean, "ReduceLogSumExp": log_sum_exp}
        return special.get(cls.op_type, convert)


for _op_type in _REDUCTIONS:
    register_converter(_op_type)(type(_op_type, (_RuntimeAxesReduce,), {"op_type": _op_type}))
