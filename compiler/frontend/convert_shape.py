"""Converters for constants and shapes: Constant, Shape, Reshape, ConstantOfShape, Range and Expand.

TVM's importer keeps shape arithmetic symbolic (``Shape`` gives a ``relax.ShapeExpr``, one gathered
dim a bare PrimExpr); these converters keep such values symbolic where the result is a shape, and
bind shapes known only at run time to named dims.
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import (
    const,
    integral_prim,
    materialize,
    prim_to_tensor,
    runtime_shape,
    scalar,
    shape_tensor,
    simplify_dims,
    static_dims,
    tensor_length,
)


# --- Constant -------------------------------------------------------------------------------------
@register_converter("Constant")
class Constant(tvm_onnx.OnnxOpConverter):
    """Constant with any of its value attributes.

    TVM's converter reads only ``value`` (a tensor) and fails with "no value in Constant" on
    ``value_int(s)`` / ``value_float(s)``, which every function-expanded ONNX op and many
    hand-written graphs use for scalars.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "value" in attr:
            return tvm_onnx.Constant._impl_v13(bb, inputs, attr, params)
        for key, dtype in (
            ("value_int", "int64"),
            ("value_ints", "int64"),
            ("value_float", "float32"),
            ("value_floats", "float32"),
        ):
            if key in attr:
                value = attr[key]
                return const(list(value) if isinstance(value, tuple) else value, dtype)
        if "sparse_value" in attr:
            return relax.const(onnx.numpy_helper.to_array(attr["sparse_value"]))
        raise ValueError(
            f"Constant with attributes {sorted(k for k in attr if k != 'tvm_custom')} is not "
            "supported (strings have no tensor type in TVM)"
        )


# --- Shape / Reshape ------------------------------------------------------------------------------
@register_converter("Shape")
class Shape(tvm_onnx.OnnxOpConverter):
    """Shape of a statically shaped tensor as an int64 constant.

    TVM's converter returns a ``ShapeExpr`` even when every dim is known, and its importer refuses
    ShapeExpr inputs to all but a dozen ops, so ``Cast(Shape(x)) → Sqrt`` (attention scaling in
    every function-expanded Attention) fails. A constant folds through any op. Symbolic shapes stay
    ShapeExprs (TVM's converter).
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        dims = static_dims(inputs[0])
        if dims is None:
            return tvm_onnx.Shape._impl_v15(bb, inputs, attr, params)
        rank = len(dims)
        start = attr.get("start", 0)
        end = attr.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return const(dims[start:end], "int64")


@register_converter("Reshape")
class Reshape(tvm_onnx.OnnxOpConverter):
    """Reshape of symbolic scalars and with a shape computed at run time.

    * A PrimExpr (``batch * 4`` from Shape → Squeeze → Mul) reshaped to ``[1]``: TVM's converter
      hands it to ``relax.op.reshape``, which takes tensors only ("Reshape expects the input data to
      be a Tensor. However, the given input is ir.PrimType" — ``torch.nn.MultiheadAttention``
      exported with dynamic batch). Here it becomes a one-element ``ShapeExpr``, so the
      ``Concat`` → ``Reshape`` that follows keeps the symbolic dims.
    * A ShapeExpr reshaped to its own length: kept as is.
    * A shape tensor known only at run time ("requires the input new shape to be Shape"): the
      output shape is resolved at run time (0 copies the input dim unless ``allowzero``, -1 takes
      the rest) and bound to fresh symbolic dims.
    """

    @classmethod
    def _impl_v5(cls, bb, inputs, attr, params):
        data, new_shape = inputs[0], tvm_onnx.get_constant(inputs[1], params)
        allowzero = attr.get("allowzero", 0)
        target = (
            [int(v) for v in new_shape.value.numpy().tolist()]
            if isinstance(new_shape, tvm.ir.GenericConst)
            else None
        )
        if data is not None and tvm.ir.is_prim_expr(data) and target is not None:
            if target == []:
                return data
            if len(target) == 1 and target[0] in (1, -1):
                return relax.ShapeExpr([integral_prim(data)])
            data = prim_to_tensor(bb, data)
        if isinstance(data, relax.ShapeExpr) and target is not None:
            if len(target) == 1 and target[0] in (-1, len(data.values)):
                return data
        if target is not None or isinstance(new_shape, relax.ShapeExpr):
            return tvm_onnx.Reshape._impl_v13(bb, [data, new_shape], attr, params)
        return cls._runtime_reshape(bb, materialize(bb, data), new_shape, allowzero)

    @classmethod
    def _runtime_reshape(cls, bb, data, new_shape, allowzero):
        length = tensor_length(new_shape)
        rank = len(data.ty.shape.values) if isinstance(data.ty.shape, relax.ShapeExpr) else None
        if length is None or rank is None:
            raise ValueError("Reshape needs a statically known input rank and shape length")
        shape = bb.normalize(relax.op.astype(new_shape, "int64"))
        in_shape = shape_tensor(bb, data)
        if not allowzero and rank > 0:
            # 0 copies the input dim at the same position (positions past the input rank are
            # invalid ONNX; clamp so the gather stays in bounds).
            positions = const(np.minimum(np.arange(length), rank - 1), "int64")
            same_pos = bb.normalize(relax.op.take(in_shape, positions, axis=0))
            shape = bb.normalize(
                relax.op.where(relax.op.equal(shape, const(0, "int64")), same_pos, shape)
            )
        is_rest = bb.normalize(relax.op.equal(shape, const(-1, "int64")))
        known = bb.normalize(
            relax.op.prod(relax.op.where(is_rest, const(1, "int64"), shape), keepdims=True)
        )
        total = (
            bb.normalize(relax.op.prod(in_shape, keepdims=True)) if rank else const([1], "int64")
        )
        rest = bb.normalize(
            relax.op.floor_divide(total, relax.op.maximum(known, const(1, "int64")))
        )
        shape = bb.normalize(relax.op.where(is_rest, rest, shape))
        return relax.op.reshape(data, runtime_shape(bb, shape, length, "reshape_dim"))


@register_converter("ConstantOfShape")
class ConstantOfShape(tvm_onnx.OnnxOpConverter):
    """ConstantOfShape whose shape is known only at run time.

    TVM's converter calls ``tensor_to_shape`` on anything that is not a ``ShapeExpr``: on a value
    that is already shape-typed (e.g. produced inside an ``If`` branch) type inference fails, and
    on a run-time tensor the result has unknown dims, so no op after it can be legalised. Here the
    dims are bound to names first.
    """

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        shape = inputs[0]
        if isinstance(shape, tvm.ir.GenericConst) and shape.value.numpy().size == 0:
            # An empty shape means a scalar (the TorchScript exporter writes this for a 0-d
            # constant); TVM's converter broadcasts the 1-element value to rank 0 and fails.
            value = attr.get("value")
            array = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, "f4")
            return relax.const(array.reshape(()), str(array.dtype))
        if isinstance(getattr(shape, "ty", None), relax.ShapeType) and not isinstance(
            shape, relax.ShapeExpr
        ):
            if shape.ty.ndim < 0:
                raise ValueError("ConstantOfShape needs a shape of known length")
            # Bind the dims to names so the result (and everything after it) has a known shape.
            dims = [tirx.Var(f"const_of_shape_{i}", "int64") for i in range(shape.ty.ndim)]
            bb.match_cast(shape, relax.ShapeType(dims))
            shape = relax.ShapeExpr(dims)
        elif (
            not isinstance(shape, (relax.ShapeExpr, tvm.ir.GenericConst))
            and not tvm.ir.is_prim_expr(shape)
            and tensor_length(shape) is not None
        ):
            # A shape tensor computed at run time: TVM's tensor_to_shape leaves the dims unknown,
            # and ops on the result then cannot be legalised.
            shape = runtime_shape(
                bb, bb.normalize(relax.op.astype(shape, "int64")), tensor_length(shape), "dim"
            )
        if isinstance(shape, relax.ShapeExpr) and not all(
            isinstance(d, tirx.IntImm) for d in shape.values
        ):
            value = attr.get("value")
            array = (
                onnx.numpy_helper.to_array(value).reshape(())
                if value is not None
                else np.zeros((), "float32")
            )
            return relax.op.broadcast_to(relax.const(array, str(array.dtype)), shape)
        return tvm_onnx.ConstantOfShape._impl_v9(bb, inputs, attr, params)


# --- Range ----------------------------------------------------------------------------------------
@register_converter("Range")
class Range(tvm_onnx.OnnxOpConverter):
    """Range whose bounds are integers, even when typed float (``torch.arange(seq, dtype=float)``).

    TVM's converter turns a symbolic float bound into a tensor and back into a *fresh* shape
    variable, so ``arange(seq)`` no longer has length ``seq`` and every broadcast against the
    sequence axis loses its shape (RoPE tables in every exported transformer hit this). Here the
    length stays an expression of the original symbolic dims; other cases fall back to TVM's
    converter.
    """

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        consts = [tvm_onnx.get_constant(x, params) for x in inputs[:3]]
        if all(isinstance(x, tvm.ir.GenericConst) for x in consts):
            return tvm_onnx.Range._impl_v12(bb, consts, attr, params)  # a NumPy constant
        start, limit, delta = (scalar(x) for x in consts)
        start_i, limit_i, delta_i = (integral_prim(v) for v in (start, limit, delta))
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
            count = simplify_dims(count)
            positions = relax.op.arange(0, count, 1, "int64")
            if delta_i.value != 1:
                positions = relax.op.multiply(positions, relax.const(delta_i.value, "int64"))
            if start_i.value != 0:
                positions = relax.op.add(positions, relax.const(start_i.value, "int64"))
            return positions if out_dtype == "int64" else relax.op.astype(positions, out_dtype)
        return tvm_onnx.Range._impl_v12(bb, inputs, attr, params)


# --- Expand ---------------------------------------------------------------------------------------
@register_converter("Concat")
class Concat(tvm_onnx.OnnxOpConverter):
    """TVM's Concat with the concatenated length simplified: joining ``[2, N, 3]``, ``[2, 1, 3]``
    and ``[2, 2, 3]`` gives ``N + 1 + 2``, and a kernel made from that shape (Clip's) failed in
    FuseTIR's shape matching ("Parameter expression T.int64(2) expected an integer argument with
    value 2, but was provided with the argument T.int64(3)"; found by ``qiao.compiler.fuzzing``).
    The result is cast to its simplified shape (``N + 3``)."""

    @classmethod
    def _impl_v4(cls, bb, inputs, attr, params):
        import tvm_ffi
        from tvm.sym import Analyzer

        out = tvm_onnx.Concat._impl_v13(bb, inputs, attr, params)
        if not isinstance(out, relax.Call):
            return out  # shape arithmetic or a constant
        out = bb.normalize(out)
        shape = getattr(out.ty, "shape", None)
        if not isinstance(shape, relax.ShapeExpr):
            return out
        analyzer = Analyzer()
        dims = [analyzer.simplify(d) for d in shape.values]
        if all(tvm_ffi.structural_equal(a, b) for a, b in zip(dims, shape.values)):
            return out
        return bb.match_cast(out, relax.TensorType(dims, out.ty.dtype))


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
        if not isinstance(shape, relax.ShapeExpr) and tensor_length(shape) is not None:
            return cls._runtime_expand(bb, materialize(bb, data), shape)
        if isinstance(shape, relax.ShapeExpr) and data_shape is not None:
            out = cls._symbolic_expand(bb, data, list(shape.values))
            if out is not None:
                return out
        return tvm_onnx.Expand._impl_v13(bb, inputs, attr, params)

    @classmethod
    def _symbolic_expand(cls, bb, data, target):
        """Expand where a symbolic data dim meets another target dim (``(1, 1, S, S)`` to
        ``(B, 1, S, S + P)``: the causal mask of ONNX Runtime GenAI's fp16 builder, ``S = 1`` at
        every decode step). TVM's ``broadcast_to`` takes such dims as equal and reads past the
        data's end when ``S`` is 1; here the index wraps (``i mod S``): ``0`` when the data dim is
        1, ``i`` when it equals the target's. ``None`` when no dim needs it."""
        from tvm import te

        dims = list(data.ty.shape.values)
        rank = max(len(dims), len(target))
        dims = [tirx.IntImm("int64", 1)] * (rank - len(dims)) + dims
        target = [tirx.IntImm("int64", 1)] * (rank - len(target)) + target
        out, wrap = [], []
        for d, t in zip(dims, target):
            if isinstance(t, tirx.IntImm) and t.value in (-1, 1):
                out.append(d)
                wrap.append(False)
            elif isinstance(d, tirx.IntImm) or tvm_ffi.structural_equal(d, t):
                out.append(t if isinstance(d, tirx.IntImm) and d.value == 1 else d)
                wrap.append(False)
            else:
                out.append(t)
                wrap.append(True)
        if not any(wrap):
            return None
        offset = rank - len(data.ty.shape.values)

        def compute(x):
            def at(*idx):
                src = []
                for axis, i in enumerate(idx):
                    if axis < offset:
                        continue
                    d = x.shape[axis - offset]  # the placeholder's dim: bound to the argument
                    if isinstance(d, tirx.IntImm) and d.value == 1:
                        src.append(tirx.IntImm("int64", 0))
                    elif wrap[axis]:
                        src.append(tirx.floormod(i, d))
                    else:
                        src.append(i)
                return x(*src)

            return te.compute(out, at, name="expand_wrap")

        return bb.emit_te(compute, data, primfunc_name_hint="expand_wrap")

    @classmethod
    def _runtime_expand(cls, bb, data, shape):
        # TVM binds the requested shape itself, so a 1 where the data dim is larger shrinks the
        # output instead of broadcasting (ONNX: out = broadcast(data dims, shape)).
        length = tensor_length(shape)
        rank = len(data.ty.shape.values)
        out_rank = max(rank, length)
        if rank < out_rank:
            data = bb.normalize(
                relax.op.reshape(data, [1] * (out_rank - rank) + list(data.ty.shape.values))
            )
        target = bb.normalize(relax.op.astype(shape, "int64"))
        if length < out_rank:
            target = bb.normalize(
                relax.op.concat([const([1] * (out_rank - length), "int64"), target], axis=0)
            )
        data_dims = shape_tensor(bb, data)
        one = const(1, "int64")
        out = bb.normalize(relax.op.where(relax.op.equal(target, one), data_dims, target))
        shape = runtime_shape(bb, out, out_rank, "expand_dim")
        # a symbolic data dim that is 1 at run time broadcasts (broadcast_to would read past it)
        wrapped = cls._symbolic_expand(bb, data, list(shape.values))
        return wrapped if wrapped is not None else relax.op.broadcast_to(data, shape)


@register_converter("EyeLike")
class EyeLike(tvm_onnx.OnnxOpConverter):
    """An identity-like matrix with ones on diagonal ``k``, of the ``dtype`` attribute's type.

    TVM's converter rejects a ``dtype`` different from the input's, which is the attribute's
    purpose (the input only gives the shape); and ``eye_like``'s legalisation ignores its dtype,
    so this builds ``eye`` from the input's dims.
    """

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = tvm_onnx.get_type(attr["dtype"]) if "dtype" in attr else str(x.ty.dtype)
        rows, cols = x.ty.shape.values
        return relax.op.eye(rows, cols, int(attr.get("k", 0)), dtype)


@register_converter("SpaceToDepth")
class SpaceToDepth(tvm_onnx.OnnxOpConverter):
    """SpaceToDepth in ``DCR`` (default) and ``CRD`` (opset 28) channel orders; TVM's converter
    ignores ``mode`` and always uses DCR."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        block = int(attr["blocksize"])
        mode = attr.get("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        b, c, h, w = inputs[0].ty.shape.values
        x = relax.op.reshape(inputs[0], (b, c, h // block, block, w // block, block))
        order = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
        x = relax.op.permute_dims(x, order)
        return relax.op.reshape(x, (b, c * block * block, h // block, w // block))
