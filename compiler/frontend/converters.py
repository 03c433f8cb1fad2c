"""qiao's converters for standard ONNX operators that TVM's importer lacks or gets wrong.

Each converter is an ``OnnxOpConverter`` subclass registered with ``register_converter``; keep one
family of ops per section and say why TVM's own converter is not enough.
"""

from __future__ import annotations

import numpy as np
import tvm
from qiao.compiler.frontend import register_converter
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


def _scalar(x):
    """A Python number for a constant scalar input, a PrimExpr for a symbolic one, else ``None``."""
    if isinstance(x, tvm.ir.GenericConst):
        value = x.value.numpy()
        return value.item() if value.size == 1 else None
    if tvm.ir.is_prim_expr(x):
        return x
    return None


def _prim_dtype(x) -> str:
    return str(getattr(x, "dtype", None) or x.ty)


def _integral_prim(x):
    """``x`` as an int64 PrimExpr when it is an integer in disguise (e.g. ``Cast("float32", seq)``)."""
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer()):
        return tirx.IntImm("int64", int(x))
    if isinstance(x, tirx.Cast) and "int" in _prim_dtype(x.value):
        return tirx.Cast("int64", x.value) if _prim_dtype(x.value) != "int64" else x.value
    if tvm.ir.is_prim_expr(x) and "int" in _prim_dtype(x):
        return tirx.Cast("int64", x) if _prim_dtype(x) != "int64" else x
    return None


# --- Range ------------------------------------------------------------------------------------------
@register_converter("Range")
class Range(tvm_onnx.OnnxOpConverter):
    """Range whose bounds are integers, even when typed float (``torch.arange(seq, dtype=float)``).

    TVM's converter turns a symbolic float bound into a tensor and back into a *fresh* shape variable,
    so ``arange(seq)`` no longer has length ``seq`` and every broadcast against the sequence axis loses
    its shape (RoPE tables in every exported transformer hit this). Here the length stays an
    expression of the original symbolic dims; other cases fall back to TVM's converter.
    """

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        start, limit, delta = (_scalar(tvm_onnx.get_constant(x, params)) for x in inputs[:3])
        start_i, limit_i, delta_i = (_integral_prim(v) for v in (start, limit, delta))
        dtype_src = inputs[0]
        out_dtype = (
            str(dtype_src.ty.dtype)
            if isinstance(dtype_src, relax.Expr) and hasattr(dtype_src.ty, "dtype")
            else "int64"
        )
        if (
            all(v is not None for v in (start_i, limit_i, delta_i))
            and isinstance(delta_i, tirx.IntImm)
            and delta_i.value > 0
            and isinstance(start_i, tirx.IntImm)
        ):
            count = tirx.max(
                tirx.floordiv(limit_i - start_i + delta_i - 1, delta_i), tirx.IntImm("int64", 0)
            )
            count = tvm.sym.Analyzer().simplify(count)
            positions = relax.op.arange(0, count, 1, "int64")
            if delta_i.value != 1:
                positions = relax.op.multiply(positions, relax.const(delta_i.value, "int64"))
            if start_i.value != 0:
                positions = relax.op.add(positions, relax.const(start_i.value, "int64"))
            return positions if out_dtype == "int64" else relax.op.astype(positions, out_dtype)
        return tvm_onnx.Range._impl_v12(bb, inputs, attr, params)


# --- Expand -----------------------------------------------------------------------------------------
@register_converter("Expand")
class Expand(tvm_onnx.OnnxOpConverter):
    """Expand to a constant shape when the data has symbolic dims.

    TVM's converter reads ``dim.value`` of every data dim and so fails on symbolic ones; exported
    ``repeat_interleave`` (grouped-query attention) is exactly that case. Broadcasting follows ONNX:
    right-aligned, 1 broadcasts, -1 keeps the data dim.
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        data_shape = getattr(data.ty, "shape", None)
        if isinstance(shape, tvm.ir.GenericConst) and data_shape is not None:
            target = [int(v) for v in shape.value.numpy().tolist()]
            dims = list(data_shape.values) if hasattr(data_shape, "values") else list(data_shape)
            rank = max(len(dims), len(target))
            dims = [tirx.IntImm("int64", 1)] * (rank - len(dims)) + dims
            target = [1] * (rank - len(target)) + target
            out = []
            for d, t in zip(dims, target):
                static = d.value if isinstance(d, tirx.IntImm) else None
                if t in (-1, 1):
                    out.append(d)
                elif static is not None and static not in (1, t):
                    raise ValueError(f"Expand: cannot broadcast dim {static} to {t}")
                else:
                    out.append(tirx.IntImm("int64", t))
            return relax.op.broadcast_to(data, relax.ShapeExpr(out))
        return tvm_onnx.Expand._impl_v13(bb, inputs, attr, params)
