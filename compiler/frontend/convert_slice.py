"""Converters for slicing and padding with run-time parameters: Slice, Split, OneHot, Pad."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import (
    const,
    is_symbolic_value,
    materialize,
    runtime_shape,
    shape_tensor,
    tensor_length,
)


def _int64(bb, x):
    return bb.normalize(relax.op.astype(x, "int64"))


def _per_dim(bb, rank: int, axes, values, default):
    """int64[rank]: ``values[p]`` for the dims named by ``axes[p]`` (run time), ``default`` (an
    int64[rank] tensor) elsewhere."""
    dims = const(np.arange(rank).reshape(rank, 1), "int64")
    hit = relax.op.astype(relax.op.equal(dims, relax.op.expand_dims(axes, 0)), "int64")  # (rank, k)
    picked = relax.op.sum(relax.op.multiply(hit, relax.op.expand_dims(values, 0)), axis=1)
    named = relax.op.greater(relax.op.sum(hit, axis=1), const(0, "int64"))
    return bb.normalize(relax.op.where(named, picked, default))


@register_converter("Slice")
class Slice(tvm_onnx.OnnxOpConverter):
    """Slice whose starts/ends/axes/steps are tensors known only at run time.

    TVM's converter takes a dynamic-slice path that fails to compile ("There is no definition of
    I.GlobalVar("shape_func")"). Here the per-dim start and length are computed at run time with
    ONNX's clamping rules, the lengths are bound to names, and each dim is gathered with
    ``start + arange(length) * step`` (negative steps included).
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        params_in = [tvm_onnx.get_constant(inputs[i], params) for i in range(1, 5)]
        dynamic = [
            p is not None
            and not isinstance(p, (tvm.ir.GenericConst, relax.ShapeExpr))
            and not tvm.ir.is_prim_expr(p)
            for p in params_in
        ]
        if not any(dynamic) or is_symbolic_value(data) or tensor_length(inputs[1]) is None:
            return tvm_onnx.Slice._impl_v13(bb, inputs, attr, params)
        rank = data.ty.ndim
        starts, ends = (_int64(bb, materialize(bb, p)) for p in params_in[:2])
        count = tensor_length(starts)
        axes = (
            _int64(bb, materialize(bb, params_in[2]))
            if params_in[2] is not None
            else const(np.arange(count), "int64")
        )
        steps = (
            _int64(bb, materialize(bb, params_in[3]))
            if params_in[3] is not None
            else const(np.ones(count), "int64")
        )
        zero = const(0, "int64")
        axes = bb.normalize(
            relax.op.where(
                relax.op.less(axes, zero), relax.op.add(axes, const(rank, "int64")), axes
            )
        )
        dims = shape_tensor(bb, data)
        start = _per_dim(bb, rank, axes, starts, const(np.zeros(rank), "int64"))
        end = _per_dim(bb, rank, axes, ends, dims)
        step = _per_dim(bb, rank, axes, steps, const(np.ones(rank), "int64"))
        forward = relax.op.greater(step, zero)
        start = relax.op.where(relax.op.less(start, zero), relax.op.add(start, dims), start)
        end = relax.op.where(relax.op.less(end, zero), relax.op.add(end, dims), end)
        last = relax.op.subtract(dims, const(1, "int64"))
        start = relax.op.where(
            forward,
            relax.op.minimum(relax.op.maximum(start, zero), dims),
            relax.op.minimum(relax.op.maximum(start, zero), last),
        )
        end = relax.op.where(
            forward,
            relax.op.minimum(relax.op.maximum(end, zero), dims),
            relax.op.minimum(relax.op.maximum(end, const(-1, "int64")), last),
        )
        start, end = bb.normalize(start), bb.normalize(end)
        # ceil((end - start) / step), at least 0
        span = relax.op.subtract(end, start)
        length = relax.op.floor_divide(
            relax.op.subtract(
                relax.op.add(span, step),
                relax.op.where(forward, const(1, "int64"), const(-1, "int64")),
            ),
            step,
        )
        length = bb.normalize(relax.op.maximum(length, zero))
        lengths = runtime_shape(bb, length, rank, "slice_dim").values
        out = data
        for d in range(rank):
            index = relax.op.take(start, const(d, "int64"), axis=0)
            stride = relax.op.take(step, const(d, "int64"), axis=0)
            positions = relax.op.arange(0, lengths[d], 1, "int64")
            gather = bb.normalize(relax.op.add(relax.op.multiply(positions, stride), index))
            out = bb.normalize(relax.op.take(out, gather, axis=d))
        return out


@register_converter("Split")
class Split(tvm_onnx.OnnxOpConverter):
    """Split by sizes given as a run-time tensor (TVM: "Dynamic Split not yet supported"): the
    offsets are a cumulative sum at run time and every piece is a slice bound to named dims."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):  # sizes as an attribute
        return tvm_onnx.Split._impl_v1(bb, inputs, attr, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        sizes = tvm_onnx.get_constant(inputs[1], params) if inputs[1] is not None else None
        if (
            sizes is None
            or isinstance(sizes, tvm.ir.GenericConst)
            or tensor_length(sizes)
            in (
                None,
                0,
            )
        ):
            return tvm_onnx.Split._impl_v13(bb, inputs, attr, params)
        data, axis = inputs[0], attr.get("axis", 0)
        axis = axis + data.ty.ndim if axis < 0 else axis
        sizes = _int64(bb, sizes)
        begins = bb.normalize(relax.op.cumsum(sizes, axis=0, exclusive=True))
        bounds = bb.normalize(relax.op.concat([begins, relax.op.add(begins, sizes)], axis=0))
        count = tensor_length(sizes)
        values = runtime_shape(bb, bounds, 2 * count, "split").values
        pieces = [
            bb.normalize(
                relax.op.strided_slice(
                    data, [axis], [values[i]], [values[count + i]], assume_inbound=True
                )
            )
            for i in range(count)
        ]
        return relax.Tuple(pieces)


@register_converter("OneHot")
class OneHot(tvm_onnx.OnnxOpConverter):
    """OneHot whose ``depth`` (and ``values``) arrive at run time (TVM: "Only constant depth
    currently supported"): the depth is bound to a name and compared with an ``arange``."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        indices, depth, values = (tvm_onnx.get_constant(inputs[i], params) for i in range(3))
        if isinstance(depth, tvm.ir.GenericConst) and isinstance(values, tvm.ir.GenericConst):
            return tvm_onnx.OneHot._impl_v11(bb, inputs, attr, params)
        rank = indices.ty.ndim
        axis = attr.get("axis", -1)
        axis = axis + rank + 1 if axis < 0 else axis
        depth_1d = bb.normalize(relax.op.reshape(_int64(bb, materialize(bb, depth)), [1]))
        (depth_dim,) = runtime_shape(bb, depth_1d, 1, "one_hot_depth").values
        idx = _int64(bb, indices)
        idx = relax.op.where(
            relax.op.less(idx, const(0, "int64")),
            relax.op.add(idx, relax.op.reshape(depth_1d, ())),
            idx,
        )
        idx = bb.normalize(relax.op.expand_dims(idx, axis))
        classes = relax.op.arange(0, depth_dim, 1, "int64")
        classes = relax.op.reshape(classes, [1] * axis + [depth_dim] + [1] * (rank - axis))
        values = materialize(bb, values)
        off = relax.op.take(values, const(0, "int64"), axis=0)
        on = relax.op.take(values, const(1, "int64"), axis=0)
        return relax.op.where(relax.op.equal(idx, classes), on, off)


@register_converter("Pad")
class Pad(tvm_onnx.OnnxOpConverter):
    """Pad whose pads (or constant value, or axes) are known only at run time.

    TVM's converter requires constant pads ("Dynamic pads are not supported yet"), and a constant
    value that is a graph input fails with "'Var' object has no attribute 'value'". Here each axis
    is gathered from ``arange(out_len) - pad_begin``, with out-of-range positions mapped per mode
    (constant: masked to the value, edge: clamped, reflect: mirrored, wrap: modulo) — the output
    lengths are bound to named dims. Negative pads (crops) follow from the same formula.
    """

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        pads = tvm_onnx.get_constant(inputs[1], params)
        value = tvm_onnx.get_constant(inputs[2], params) if len(inputs) > 2 else None
        axes = tvm_onnx.get_constant(inputs[3], params) if len(inputs) > 3 else None
        if all(x is None or isinstance(x, tvm.ir.GenericConst) for x in (pads, value, axes)):
            mode = attr.get("mode", b"constant")
            before, after, fill = tvm_onnx.Pad._parse_pads_and_axes(inputs, params)
            if mode in (b"constant", "constant") and min(before + after) >= 0:
                # Relax's own pad (not a TE kernel), so that ``passes.fold_padding`` can give a
                # convolution or pooling that follows it this padding instead
                widths = [int(w) for pair in zip(before, after) for w in pair]
                return relax.op.nn.pad(inputs[0], widths, pad_value=float(fill))
            return tvm_onnx.Pad._impl_v18(bb, inputs, attr, params)
        data = inputs[0]
        rank, dtype = data.ty.ndim, str(data.ty.dtype)
        mode = attr.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = _int64(bb, materialize(bb, pads))
        count = tensor_length(pads) // 2
        axes = (
            _int64(bb, materialize(bb, axes))
            if axes is not None
            else const(np.arange(count), "int64")
        )
        axes = bb.normalize(
            relax.op.where(
                relax.op.less(axes, const(0, "int64")),
                relax.op.add(axes, const(rank, "int64")),
                axes,
            )
        )
        zeros = const(np.zeros(rank), "int64")
        pads_begin = bb.normalize(relax.op.strided_slice(pads, [0], [0], [count]))
        pads_end = bb.normalize(relax.op.strided_slice(pads, [0], [count], [2 * count]))
        begin = _per_dim(bb, rank, axes, pads_begin, zeros)
        end = _per_dim(bb, rank, axes, pads_end, zeros)
        dims = shape_tensor(bb, data)
        out_dims = bb.normalize(relax.op.add(relax.op.add(dims, begin), end))
        lengths = runtime_shape(bb, out_dims, rank, "pad_dim").values
        out, valid = data, None
        for d in range(rank):
            extent = relax.op.take(dims, const(d, "int64"), axis=0)
            source = relax.op.subtract(
                relax.op.arange(0, lengths[d], 1, "int64"),
                relax.op.take(begin, const(d, "int64"), axis=0),
            )
            source = bb.normalize(source)
            last = relax.op.subtract(extent, const(1, "int64"))
            if mode == "constant":
                inside = bb.normalize(
                    relax.op.logical_and(
                        relax.op.greater_equal(source, const(0, "int64")),
                        relax.op.less(source, extent),
                    )
                )
                shape = [1] * rank
                shape[d] = -1
                inside = bb.normalize(relax.op.reshape(inside, shape))
                valid = inside if valid is None else relax.op.logical_and(valid, inside)
                index = relax.op.minimum(relax.op.maximum(source, const(0, "int64")), last)
            elif mode == "edge":
                index = relax.op.minimum(relax.op.maximum(source, const(0, "int64")), last)
            elif mode == "wrap":
                index = relax.op.floor_mod(source, extent)
            elif mode == "reflect":
                period = relax.op.maximum(
                    relax.op.multiply(last, const(2, "int64")), const(1, "int64")
                )
                folded = relax.op.floor_mod(relax.op.abs(source), period)
                index = relax.op.where(
                    relax.op.greater(folded, last), relax.op.subtract(period, folded), folded
                )
            else:
                raise ValueError(f"Pad mode {mode!r} is not one of constant, edge, reflect, wrap")
            out = bb.normalize(relax.op.take(out, bb.normalize(index), axis=d))
        if mode != "constant":
            return out
        fill = (
            relax.op.astype(relax.op.reshape(materialize(bb, value), ()), dtype)
            if value is not None
            else const(0, dtype)
        )
        return relax.op.where(valid, out, fill)
