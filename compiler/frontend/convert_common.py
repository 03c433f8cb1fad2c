"""Helpers shared by qiao's ONNX converters (the ``convert_*`` modules): constants, symbolic
shape values (``ShapeExpr`` / PrimExpr) and tensors whose shape is known only at run time.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


def scalar(x):
    """A Python number for a constant scalar input, a PrimExpr for a symbolic one, else ``None``."""
    if isinstance(x, tvm.ir.GenericConst):
        value = x.value.numpy()
        return value.item() if value.size == 1 else None
    if tvm.ir.is_prim_expr(x):
        return x
    return None


def _prim_dtype(x) -> str:
    return str(getattr(x, "dtype", None) or x.ty)


def integral_prim(x):
    """``x`` as int64 PrimExpr when it is an integer in disguise, e.g. ``Cast("float32", seq)``."""
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer()):
        return tirx.IntImm("int64", int(x))
    if isinstance(x, tirx.Cast) and "int" in _prim_dtype(x.value):
        return tirx.Cast("int64", x.value) if _prim_dtype(x.value) != "int64" else x.value
    if tvm.ir.is_prim_expr(x) and "int" in _prim_dtype(x):
        return tirx.Cast("int64", x) if _prim_dtype(x) != "int64" else x
    return None


def simplify_dims(expr):
    """Simplify a PrimExpr knowing every variable in it is a tensor dim, hence >= 0.

    Without that, ``max(seq, 0)`` stays in shapes (``Range``) and then never matches ``seq``, so
    broadcasting and matmul shape inference give up further down.
    """
    analyzer = tvm.sym.Analyzer()
    for var in tirx.analysis.undefined_vars(expr):
        analyzer.update(var, tvm.sym.ConstIntBound(0, tvm.sym.ConstIntBound.POS_INF))
    return analyzer.simplify(expr)


def is_symbolic_value(x) -> bool:
    """True for the importer's symbolic shape values: a ``ShapeExpr`` or a bare PrimExpr."""
    return isinstance(x, relax.ShapeExpr) or (x is not None and tvm.ir.is_prim_expr(x))


def const(value, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def prim_to_tensor(bb: relax.BlockBuilder, x) -> relax.Expr:
    """A 0-d tensor holding the PrimExpr ``x`` (an integer expression, or a float cast of one).

    ``relax.op.full`` refuses PrimExpr fill values, so integers go through ``shape_to_tensor``.
    """
    dtype = _prim_dtype(x)
    if isinstance(x, (tirx.IntImm, tirx.FloatImm)):
        return const(x.value, dtype)
    source = x
    if isinstance(x, tirx.Cast) and "float" in dtype and "int" in _prim_dtype(x.value):
        source = x.value
    elif "float" in dtype:
        raise ValueError(f"cannot turn the symbolic float value {x} into a tensor")
    as_int = integral_prim(source) if _prim_dtype(source) != "bool" else tirx.Cast("int64", source)
    tensor = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([as_int])))
    tensor = bb.normalize(relax.op.reshape(tensor, ()))
    return tensor if dtype == "int64" else bb.normalize(relax.op.astype(tensor, dtype))


def materialize(bb: relax.BlockBuilder, x):
    """``x`` as a tensor when it is a symbolic shape value (``ShapeExpr`` → int64[n], PrimExpr →
    0-d); anything else unchanged."""
    if isinstance(x, relax.ShapeExpr):
        return bb.normalize(relax.op.shape_to_tensor(x))
    if x is not None and tvm.ir.is_prim_expr(x):
        return prim_to_tensor(bb, x)
    return x


def static_dims(expr) -> list[int] | None:
    """The shape of a tensor expression as ints, or ``None`` when any dim is symbolic/unknown."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = list(shape.values)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d.value) for d in dims]


def shape_tensor(bb: relax.BlockBuilder, data) -> relax.Expr:
    """The shape of tensor ``data`` as an int64[rank] tensor (a constant when static)."""
    dims = static_dims(data)
    if dims is not None:
        return const(dims, "int64")
    return bb.normalize(relax.op.shape_to_tensor(bb.normalize(relax.op.shape_of(data))))


def tensor_length(expr) -> int | None:
    """Static length of a 1-D tensor expression, else ``None``."""
    dims = static_dims(expr)
    return dims[0] if dims is not None and len(dims) == 1 else None


def runtime_shape(bb: relax.BlockBuilder, tensor, length: int, prefix: str):
    """A ``ShapeExpr`` of fresh symbolic dims bound to the values of an int64[length] tensor."""
    return tvm_onnx._tensor_to_shape_expr(bb, tensor, length, prefix)


def int_tensor(bb: relax.BlockBuilder, value) -> relax.Expr:
    """An int64 scalar tensor for an int, IntImm or symbolic length."""
    if isinstance(value, int):
        return const(value, "int64")
    if isinstance(value, tirx.IntImm):
        return const(int(value.value), "int64")
    return prim_to_tensor(bb, integral_prim(value))


def unify_broadcast_args(bb, args: list) -> list | None:
    """Tensor arguments of a broadcasting op, cast so that Relax can infer the result's shape.

    Relax leaves the shape unknown (``ndim=4``) when two symbolic dims differ, e.g. an attention
    mask ``[B, 1, S, total_sequence_length]`` added to a causal mask
    ``[B, 1, S, S + past_sequence_length]`` (ONNX Runtime GenAI's fp16 builder writes this), and
    such an op cannot be legalised. ONNX broadcasting says two dims that are not 1 are equal, so
    each such dim becomes one of them (a static size first, then a graph input's name, then an
    expression) through ``match_cast``, checked when the model runs: a mismatch is an error then,
    never a wrong result. ``None`` when there is nothing to unify or the shapes cannot broadcast.
    """
    shapes = [
        list(a.ty.shape.values)
        if isinstance(getattr(getattr(a, "ty", None), "shape", None), relax.ShapeExpr)
        else None
        for a in args
    ]
    tensors = [
        i for i, a in enumerate(args) if isinstance(getattr(a, "ty", None), relax.TensorType)
    ]
    if not tensors or any(shapes[i] is None for i in tensors):
        return None
    rank = max(len(shapes[i]) for i in tensors)
    chosen = []
    for axis in range(rank):
        options = []
        for i in tensors:
            at = axis - (rank - len(shapes[i]))
            d = shapes[i][at] if at >= 0 else None
            if d is None or (isinstance(d, tirx.IntImm) and d.value == 1):
                continue
            if not any(tvm_ffi.structural_equal(d, o) for o in options):
                options.append(d)
        static = [d for d in options if isinstance(d, tirx.IntImm)]
        if len(static) > 1:
            return None
        plain = [d for d in options if isinstance(d, tirx.Var)]
        pick = static or plain or options
        chosen.append(pick[0] if pick else None)
    out, changed = list(args), False
    for i in tensors:
        dims, cast = list(shapes[i]), False
        offset = rank - len(dims)
        for at, d in enumerate(dims):
            want = chosen[at + offset]
            if want is None or (isinstance(d, tirx.IntImm) and d.value == 1):
                continue
            if not tvm_ffi.structural_equal(d, want):
                dims[at], cast = want, True
        if cast:  # (a list `!=` would compare PrimExprs with `==`, which builds an expression)
            out[i] = bb.match_cast(args[i], relax.TensorType(dims, args[i].ty.dtype))
            changed = True
    return out if changed else None
