"""Converters for scans and axis-indexed ops: CumSum, CumProd (axis possibly given at run time)
and ReverseSequence.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const


def _select_over_axes(bb, axis_input, rank: int, build):
    """``build(axis)`` for a constant axis; for a run-time scalar axis, every candidate axis is
    built and the one named is selected (ranks are small, and each candidate keeps the shape)."""
    axis = tvm_onnx.get_constant(axis_input, [{}, {}]) if axis_input is not None else None
    if isinstance(axis, tvm.ir.GenericConst):
        value = int(axis.value.numpy().reshape(-1)[0])
        return build(value + rank if value < 0 else value)
    axis = bb.normalize(relax.op.reshape(relax.op.astype(axis_input, "int64"), ()))
    axis = bb.normalize(
        relax.op.where(
            relax.op.less(axis, const(0, "int64")), relax.op.add(axis, const(rank, "int64")), axis
        )
    )
    out = build(rank - 1)
    for candidate in range(rank - 2, -1, -1):
        out = relax.op.where(relax.op.equal(axis, const(candidate, "int64")), build(candidate), out)
    return out


class _Scan(tvm_onnx.OnnxOpConverter):
    """CumSum / CumProd with ``exclusive`` and ``reverse``, also for an axis given at run time
    (TVM: "CumSum with non-constant axis input is not supported yet"; no CumProd converter)."""

    scan = staticmethod(relax.op.cumsum)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        data = inputs[0]
        exclusive, reverse = bool(attr.get("exclusive", 0)), bool(attr.get("reverse", 0))

        def build(axis: int):
            x = bb.normalize(relax.op.flip(data, axis)) if reverse else data
            out = bb.normalize(cls.scan(x, axis, exclusive=exclusive))
            return bb.normalize(relax.op.flip(out, axis)) if reverse else out

        return _select_over_axes(bb, inputs[1], data.ty.ndim, build)


@register_converter("CumSum")
class CumSum(_Scan):
    __doc__ = _Scan.__doc__
    scan = staticmethod(relax.op.cumsum)


@register_converter("CumProd")
class CumProd(_Scan):
    __doc__ = _Scan.__doc__
    scan = staticmethod(relax.op.cumprod)


@register_converter("ReverseSequence")
class ReverseSequence(tvm_onnx.OnnxOpConverter):
    """Reverse the first ``sequence_lens[b]`` steps of each batch entry; TVM has no converter."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return relax.op.reverse_sequence(
            inputs[0],
            bb.normalize(relax.op.astype(inputs[1], "int64")),
            attr.get("time_axis", 0),
            attr.get("batch_axis", 1),
        )
