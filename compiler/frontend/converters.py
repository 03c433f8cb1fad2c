"""qiao's converters for standard ONNX operators that TVM's importer lacks or gets wrong.

Each converter is an ``OnnxOpConverter`` subclass registered with ``register_converter``; keep one
family of ops per section and say why TVM's own converter is not enough.

TVM's importer tracks shape arithmetic symbolically: ``Shape`` gives a ``relax.ShapeExpr``,
``Gather``/``Squeeze`` of one dimension a bare PrimExpr (``batch * 4``), and most converters accept
neither — exported PyTorch models (the dynamo exporter spells ``x.view(b * h, s, d)`` as Shape →
Squeeze → Mul → Reshape → Concat) then fail with "expects the input data to be a Tensor". Two
mechanisms fix that class of problem here: converters that keep symbolic values symbolic where the
result is shape arithmetic (``Reshape``, ``Shape``), and, for every other TVM converter, a wrapper
(``_SymbolicTolerant``) that retries a failed conversion with its symbolic inputs materialised as
int64 tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import _CONVERTERS, register_converter


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


def _is_symbolic_value(x) -> bool:
    """True for the importer's symbolic shape values: a ``ShapeExpr`` or a bare PrimExpr."""
    return isinstance(x, relax.ShapeExpr) or (x is not None and tvm.ir.is_prim_expr(x))


def _const(value, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def prim_to_tensor(bb: relax.BlockBuilder, x) -> relax.Expr:
    """A 0-d tensor holding the PrimExpr ``x`` (an integer expression, or a float cast of one).

    ``relax.op.full`` refuses PrimExpr fill values, so integers go through ``shape_to_tensor``.
    """
    dtype = _prim_dtype(x)
    if isinstance(x, (tirx.IntImm, tirx.FloatImm)):
        return _const(x.value, dtype)
    source = x
    if isinstance(x, tirx.Cast) and "float" in dtype and "int" in _prim_dtype(x.value):
        source = x.value
    elif "float" in dtype:
        raise ValueError(f"cannot turn the symbolic float value {x} into a tensor")
    as_int = _integral_prim(source) if _prim_dtype(source) != "bool" else tirx.Cast("int64", source)
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


def _static_dims(expr) -> list[int] | None:
    """The shape of a tensor expression as ints, or ``None`` when any dim is symbolic/unknown."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = list(shape.values)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d.value) for d in dims]


def _shape_tensor(bb: relax.BlockBuilder, data) -> relax.Expr:
    """The shape of tensor ``data`` as an int64[rank] tensor (a constant when static)."""
    dims = _static_dims(data)
    if dims is not None:
        return _const(dims, "int64")
    return bb.normalize(relax.op.shape_to_tensor(bb.normalize(relax.op.shape_of(data))))


def _tensor_length(expr) -> int | None:
    """Static length of a 1-D tensor expression, else ``None``."""
    dims = _static_dims(expr)
    return dims[0] if dims is not None and len(dims) == 1 else None


def _runtime_shape(bb: relax.BlockBuilder, shape_tensor, length: int, prefix: str):
    """A ``ShapeExpr`` of fresh symbolic dims bound to the values of an int64[length] tensor."""
    return tvm_onnx._tensor_to_shape_expr(bb, shape_tensor, length, prefix)


# --- Symbolic-value tolerance for TVM's converters ------------------------------------------------
class _SymbolicTolerant(tvm_onnx.OnnxOpConverter):
    """Runs TVM's converter ``base``; when that fails on an input that is a ``ShapeExpr`` or a
    PrimExpr, runs it again with those inputs as int64 tensors.

    TVM's converters accept symbolic shape values only here and there (``Unsqueeze`` of a PrimExpr,
    ``Concat`` of ShapeExprs), so e.g. ``Sqrt(Cast(Shape(x)[-1]))`` or ``Equal(batch, 0)`` fails in
    type inference. The first attempt keeps the value symbolic where TVM can; the retry is plain
    tensor arithmetic, which is always right, only less foldable. Bindings the failed attempt
    emitted are unused and pure.
    """

    base: type = tvm_onnx.OnnxOpConverter

    @classmethod
    def get_converter(cls, opset):
        inner = cls.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if not any(_is_symbolic_value(x) for x in inputs):
                return fold_small_constant(inputs, inner(bb, inputs, attr, params))
            try:
                out = inner(bb, inputs, dict(attr), params)
                return bb.normalize(out) if isinstance(out, relax.Expr) else out
            except Exception as first:  # noqa: BLE001 - retried, then re-raised
                tensors = tvm_onnx.onnx_input(materialize(bb, x) for x in inputs)
                try:
                    out = inner(bb, tensors, attr, params)
                    return bb.normalize(out) if isinstance(out, relax.Expr) else out
                except Exception:  # noqa: BLE001
                    raise first from None

        return convert


def fold_small_constant(inputs, out):
    """Evaluate ``out`` now when all its inputs are constants and it is a small integer or boolean
    tensor — shape arithmetic. TVM's converters fold some ops with NumPy but not others
    (``Not``, ``And``, ``Less``...), and a shape that is not a constant at import time sends
    ``Expand``/``Reshape``/``Slice`` down their dynamic-shape paths, which are slower to compile
    and, for TVM's ``Expand``, wrong. Float results are left to ``FoldConstant`` in the pipeline.
    """
    if not isinstance(out, relax.Call) or not all(
        x is None or isinstance(x, tvm.ir.GenericConst) for x in inputs
    ):
        return out
    if not any(isinstance(a, tvm.ir.GenericConst) for a in out.args):
        return out
    dims = _static_dims(out) if hasattr(out, "ty") and out.ty is not None else None
    if dims is None:
        try:
            out = relax.BlockBuilder().normalize(out)
        except Exception:  # noqa: BLE001 - leave it to the importer's own normalisation
            return out
        dims = _static_dims(out)
    dtype = str(getattr(out.ty, "dtype", ""))
    if dims is None or int(np.prod(dims)) > 4096 or not dtype.startswith(("int", "uint", "bool")):
        return out
    bb = relax.BlockBuilder()
    with bb.function("fold", []):
        bb.emit_func_output(bb.emit(out))
    mod = relax.transform.LegalizeOps()(bb.get())
    with tvm.target.Target({"kind": "llvm"}):
        mod = relax.transform.FoldConstant()(mod)
    body = mod["fold"].body
    folded = body.body if isinstance(body, relax.SeqExpr) else body
    return folded if isinstance(folded, tvm.ir.GenericConst) else out


# Converters of TVM's map that belong to com.microsoft: qiao decides separately which of those it
# supports (``find_unsupported_ops`` treats a registered com.microsoft op as supported).
_NOT_WRAPPED = {
    "FastGelu",
    "BiasGelu",
    "MatMulInteger16",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "Attention",
}


def _wrap_tvm_converters() -> None:
    """Register ``_SymbolicTolerant`` around every TVM converter qiao does not replace."""
    for op_type, base in tvm_onnx._get_convert_map().items():
        if op_type in _CONVERTERS or op_type in _NOT_WRAPPED:
            continue
        _CONVERTERS[op_type] = type(op_type, (_SymbolicTolerant,), {"base": base})


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
                return _const(list(value) if isinstance(value, tuple) else value, dtype)
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
        dims = _static_dims(inputs[0])
        if dims is None:
            return tvm_onnx.Shape._impl_v15(bb, inputs, attr, params)
        rank = len(dims)
        start = attr.get("start", 0)
        end = attr.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return _const(dims[start:end], "int64")


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
                return relax.ShapeExpr([_integral_prim(data)])
            data = prim_to_tensor(bb, data)
        if isinstance(data, relax.ShapeExpr) and target is not None:
            if len(target) == 1 and target[0] in (-1, len(data.values)):
                return data
        if target is not None or isinstance(new_shape, relax.ShapeExpr):
            return tvm_onnx.Reshape._impl_v13(bb, [data, new_shape], attr, params)
        return cls._runtime_reshape(bb, materialize(bb, data), new_shape, allowzero)

    @classmethod
    def _runtime_reshape(cls, bb, data, new_shape, allowzero):
        length = _tensor_length(new_shape)
        rank = len(data.ty.shape.values) if isinstance(data.ty.shape, relax.ShapeExpr) else None
        if length is None or rank is None:
            raise ValueError("Reshape needs a statically known input rank and shape length")
        shape = bb.normalize(relax.op.astype(new_shape, "int64"))
        in_shape = _shape_tensor(bb, data)
        if not allowzero and rank > 0:
            # 0 copies the input dim at the same position (positions past the input rank are
            # invalid ONNX; clamp so the gather stays in bounds).
            positions = _const(np.minimum(np.arange(length), rank - 1), "int64")
            same_pos = bb.normalize(relax.op.take(in_shape, positions, axis=0))
            shape = bb.normalize(
                relax.op.where(relax.op.equal(shape, _const(0, "int64")), same_pos, shape)
            )
        is_rest = bb.normalize(relax.op.equal(shape, _const(-1, "int64")))
        known = bb.normalize(
            relax.op.prod(relax.op.where(is_rest, _const(1, "int64"), shape), keepdims=True)
        )
        total = (
            bb.normalize(relax.op.prod(in_shape, keepdims=True)) if rank else _const([1], "int64")
        )
        rest = bb.normalize(
            relax.op.floor_divide(total, relax.op.maximum(known, _const(1, "int64")))
        )
        shape = bb.normalize(relax.op.where(is_rest, rest, shape))
        return relax.op.reshape(data, _runtime_shape(bb, shape, length, "reshape_dim"))


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
            and _tensor_length(shape) is not None
        ):
            # A shape tensor computed at run time: TVM's tensor_to_shape leaves the dims unknown,
            # and ops on the result then cannot be legalised.
            shape = _runtime_shape(
                bb, bb.normalize(relax.op.astype(shape, "int64")), _tensor_length(shape), "dim"
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


# --- Slicing with run-time parameters -------------------------------------------------------------
def _int64(bb, x):
    return bb.normalize(relax.op.astype(x, "int64"))


def _per_dim(bb, rank: int, axes, values, default):
    """int64[rank]: ``values[p]`` for the dims named by ``axes[p]`` (run time), ``default`` (an
    int64[rank] tensor) elsewhere."""
    dims = _const(np.arange(rank).reshape(rank, 1), "int64")
    hit = relax.op.astype(relax.op.equal(dims, relax.op.expand_dims(axes, 0)), "int64")  # (rank, k)
    picked = relax.op.sum(relax.op.multiply(hit, relax.op.expand_dims(values, 0)), axis=1)
    named = relax.op.greater(relax.op.sum(hit, axis=1), _const(0, "int64"))
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
        if not any(dynamic) or _is_symbolic_value(data) or _tensor_length(inputs[1]) is None:
            return tvm_onnx.Slice._impl_v13(bb, inputs, attr, params)
        rank = data.ty.ndim
        starts, ends = (_int64(bb, materialize(bb, p)) for p in params_in[:2])
        count = _tensor_length(starts)
        axes = (
            _int64(bb, materialize(bb, params_in[2]))
            if params_in[2] is not None
            else _const(np.arange(count), "int64")
        )
        steps = (
            _int64(bb, materialize(bb, params_in[3]))
            if params_in[3] is not None
            else _const(np.ones(count), "int64")
        )
        zero = _const(0, "int64")
        axes = bb.normalize(
            relax.op.where(
                relax.op.less(axes, zero), relax.op.add(axes, _const(rank, "int64")), axes
            )
        )
        dims = _shape_tensor(bb, data)
        start = _per_dim(bb, rank, axes, starts, _const(np.zeros(rank), "int64"))
        end = _per_dim(bb, rank, axes, ends, dims)
        step = _per_dim(bb, rank, axes, steps, _const(np.ones(rank), "int64"))
        forward = relax.op.greater(step, zero)
        start = relax.op.where(relax.op.less(start, zero), relax.op.add(start, dims), start)
        end = relax.op.where(relax.op.less(end, zero), relax.op.add(end, dims), end)
        last = relax.op.subtract(dims, _const(1, "int64"))
        start = relax.op.where(
            forward,
            relax.op.minimum(relax.op.maximum(start, zero), dims),
            relax.op.minimum(relax.op.maximum(start, zero), last),
        )
        end = relax.op.where(
            forward,
            relax.op.minimum(relax.op.maximum(end, zero), dims),
            relax.op.minimum(relax.op.maximum(end, _const(-1, "int64")), last),
        )
        start, end = bb.normalize(start), bb.normalize(end)
        # ceil((end - start) / step), at least 0
        span = relax.op.subtract(end, start)
        length = relax.op.floor_divide(
            relax.op.subtract(
                relax.op.add(span, step),
                relax.op.where(forward, _const(1, "int64"), _const(-1, "int64")),
            ),
            step,
        )
        length = bb.normalize(relax.op.maximum(length, zero))
        lengths = _runtime_shape(bb, length, rank, "slice_dim").values
        out = data
        for d in range(rank):
            index = relax.op.take(start, _const(d, "int64"), axis=0)
            stride = relax.op.take(step, _const(d, "int64"), axis=0)
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
            or _tensor_length(sizes)
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
        count = _tensor_length(sizes)
        values = _runtime_shape(bb, bounds, 2 * count, "split").values
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
        (depth_dim,) = _runtime_shape(bb, depth_1d, 1, "one_hot_depth").values
        idx = _int64(bb, indices)
        idx = relax.op.where(
            relax.op.less(idx, _const(0, "int64")),
            relax.op.add(idx, relax.op.reshape(depth_1d, ())),
            idx,
        )
        idx = bb.normalize(relax.op.expand_dims(idx, axis))
        classes = relax.op.arange(0, depth_dim, 1, "int64")
        classes = relax.op.reshape(classes, [1] * axis + [depth_dim] + [1] * (rank - axis))
        values = materialize(bb, values)
        off = relax.op.take(values, _const(0, "int64"), axis=0)
        on = relax.op.take(values, _const(1, "int64"), axis=0)
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
            return tvm_onnx.Pad._impl_v18(bb, inputs, attr, params)
        data = inputs[0]
        rank, dtype = data.ty.ndim, str(data.ty.dtype)
        mode = attr.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = _int64(bb, materialize(bb, pads))
        count = _tensor_length(pads) // 2
        axes = (
            _int64(bb, materialize(bb, axes))
            if axes is not None
            else _const(np.arange(count), "int64")
        )
        axes = bb.normalize(
            relax.op.where(
                relax.op.less(axes, _const(0, "int64")),
                relax.op.add(axes, _const(rank, "int64")),
                axes,
            )
        )
        zeros = _const(np.zeros(rank), "int64")
        pads_begin = bb.normalize(relax.op.strided_slice(pads, [0], [0], [count]))
        pads_end = bb.normalize(relax.op.strided_slice(pads, [0], [count], [2 * count]))
        begin = _per_dim(bb, rank, axes, pads_begin, zeros)
        end = _per_dim(bb, rank, axes, pads_end, zeros)
        dims = _shape_tensor(bb, data)
        out_dims = bb.normalize(relax.op.add(relax.op.add(dims, begin), end))
        lengths = _runtime_shape(bb, out_dims, rank, "pad_dim").values
        out, valid = data, None
        for d in range(rank):
            extent = relax.op.take(dims, _const(d, "int64"), axis=0)
            source = relax.op.subtract(
                relax.op.arange(0, lengths[d], 1, "int64"),
                relax.op.take(begin, _const(d, "int64"), axis=0),
            )
            source = bb.normalize(source)
            last = relax.op.subtract(extent, _const(1, "int64"))
            if mode == "constant":
                inside = bb.normalize(
                    relax.op.logical_and(
                        relax.op.greater_equal(source, _const(0, "int64")),
                        relax.op.less(source, extent),
                    )
                )
                shape = [1] * rank
                shape[d] = -1
                inside = bb.normalize(relax.op.reshape(inside, shape))
                valid = inside if valid is None else relax.op.logical_and(valid, inside)
                index = relax.op.minimum(relax.op.maximum(source, _const(0, "int64")), last)
            elif mode == "edge":
                index = relax.op.minimum(relax.op.maximum(source, _const(0, "int64")), last)
            elif mode == "wrap":
                index = relax.op.floor_mod(source, extent)
            elif mode == "reflect":
                period = relax.op.maximum(
                    relax.op.multiply(last, _const(2, "int64")), _const(1, "int64")
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
            else _const(0, dtype)
        )
        return relax.op.where(valid, out, fill)


# --- Attention (ai.onnx, opset 23+) ---------------------------------------------------------------
@register_converter("Attention")
class Attention(tvm_onnx.OnnxOpConverter):
    """ONNX ``Attention`` (opset 23-25): scaled dot-product attention with causal/boolean/additive
    masks, KV cache, grouped-query heads, softcap, sliding windows and padded KV lengths.

    TVM's "Attention" converter is the ``com.microsoft`` contrib op (packed QKV weights, required
    ``num_heads``) and fails on the standard op with ``KeyError: 'num_heads'``; that form is still
    handed to it. This follows the ONNX reference (``onnx/reference/ops/op_attention.py``) step by
    step, including its fully-masked-row convention (such rows give 0, not NaN).

    Shapes: Q ``(B, Hq, S, D)`` or ``(B, S, Hq*D)``; K ``(B, Hkv, L, D)``; V ``(B, Hkv, L, Dv)``;
    ``attn_mask`` broadcastable to ``(B, Hq, S, L_total)`` (its last dim may be shorter: padded
    with -inf); ``past_key``/``past_value`` ``(B, Hkv, P, D|Dv)``; ``nonpad_kv_seqlen`` ``(B,)``.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "num_heads" in attr:  # com.microsoft::Attention
            return tvm_onnx.Attention._impl_v1(bb, inputs, attr, params)
        q, k, v, mask, past_k, past_v, nonpad = (inputs[i] for i in range(7))
        dtype = str(q.ty.dtype)
        three_d = q.ty.ndim == 3
        if three_d:
            q = cls._split_heads(bb, q, attr["q_num_heads"])
            k = cls._split_heads(bb, k, attr["kv_num_heads"])
            v = cls._split_heads(bb, v, attr["kv_num_heads"])
        head_size = q.ty.shape.values[3]
        if "scale" in attr:
            scale = float(attr["scale"])
        elif isinstance(head_size, tirx.IntImm):
            scale = 1.0 / np.sqrt(head_size.value)
        else:
            raise ValueError("Attention without a scale needs a static head size")
        # The reference scales Q and K by sqrt(scale) each, rounded to the input dtype.
        root = _const(np.sqrt(np.float32(scale)).astype(dtype), dtype)
        if past_k is not None:
            k = bb.normalize(relax.op.concat([past_k, k], axis=2))
            v = bb.normalize(relax.op.concat([past_v, v], axis=2))
        present_k, present_v = k, v
        q_len, kv_len = q.ty.shape.values[2], k.ty.shape.values[2]
        past_len = past_k.ty.shape.values[2] if past_k is not None else 0
        bias = cls._bias(bb, attr, dtype, mask, nonpad, q_len, kv_len, past_len)

        q_heads, kv_heads = q.ty.shape.values[1], k.ty.shape.values[1]
        if not tvm.sym.Analyzer().can_prove_equal(q_heads, kv_heads):
            reps = tvm.sym.Analyzer().simplify(tirx.floordiv(q_heads, kv_heads))
            if not isinstance(reps, tirx.IntImm):
                raise ValueError("grouped-query Attention needs static head counts")
            k = bb.normalize(relax.op.repeat(k, int(reps.value), axis=1))
            v = bb.normalize(relax.op.repeat(v, int(reps.value), axis=1))
        scores = relax.op.matmul(
            relax.op.multiply(q, root),
            relax.op.multiply(relax.op.permute_dims(k, [0, 1, 3, 2]), root),
        )
        scores = bb.normalize(scores)
        softcap = attr.get("softcap")
        if softcap is not None and softcap > 0:
            cap = _const(softcap, dtype)
            scores = bb.normalize(
                relax.op.multiply(relax.op.tanh(relax.op.divide(scores, cap)), cap)
            )
        qk_out = scores
        with_bias = bb.normalize(relax.op.add(scores, bias)) if bias is not None else scores
        mode = attr.get("qk_matmul_output_mode", 0)
        if mode == 2:
            qk_out = with_bias
        precision = attr.get("softmax_precision")
        logits = with_bias
        if precision is not None:
            logits = bb.normalize(relax.op.astype(logits, tvm_onnx.get_type(precision)))
        probs = cls._safe_softmax(bb, logits)
        if bias is not None:
            row_max = relax.op.max(bias, axis=-1, keepdims=True)
            fully_masked = relax.op.equal(row_max, _const(-np.inf, dtype))
            probs = bb.normalize(
                relax.op.where(fully_masked, _const(0, str(probs.ty.dtype)), probs)
            )
        if mode == 3:
            qk_out = probs
        qk_out = bb.normalize(relax.op.astype(qk_out, dtype))
        probs = bb.normalize(relax.op.astype(probs, dtype))
        y = bb.normalize(relax.op.matmul(probs, v))
        if three_d:
            y = bb.normalize(relax.op.permute_dims(y, [0, 2, 1, 3]))
            b, s, h, d = y.ty.shape.values
            y = bb.normalize(relax.op.reshape(y, relax.ShapeExpr([b, s, h * d])))
        outputs = [y, present_k, present_v, qk_out]
        count = attr["tvm_custom"]["num_outputs"]
        return y if count == 1 else relax.Tuple(outputs[:count])

    @staticmethod
    def _split_heads(bb, x, heads: int):
        b, s, hidden = x.ty.shape.values
        x = relax.op.reshape(x, relax.ShapeExpr([b, s, heads, tirx.floordiv(hidden, heads)]))
        return bb.normalize(relax.op.permute_dims(x, [0, 2, 1, 3]))

    @staticmethod
    def _safe_softmax(bb, x):
        """Softmax over the last axis that gives 0 (not NaN) for a row of -inf."""
        dtype = str(x.ty.dtype)
        zero = _const(0, dtype)
        row_max = relax.op.max(x, axis=-1, keepdims=True)
        row_max = relax.op.where(relax.op.equal(row_max, _const(-np.inf, dtype)), zero, row_max)
        e = bb.normalize(relax.op.exp(relax.op.subtract(x, row_max)))
        total = relax.op.sum(e, axis=-1, keepdims=True)
        total = relax.op.where(relax.op.equal(total, zero), _const(1, dtype), total)
        return bb.normalize(relax.op.divide(e, total))

    @staticmethod
    def _int_tensor(bb, value):
        """An int64 scalar tensor for an int, IntImm or symbolic length."""
        if isinstance(value, int):
            return _const(value, "int64")
        if isinstance(value, tirx.IntImm):
            return _const(int(value.value), "int64")
        return prim_to_tensor(bb, _integral_prim(value))

    @classmethod
    def _bias(cls, bb, attr, dtype, mask, nonpad, q_len, kv_len, past_len):
        """The additive bias ``(…, S, L)``: mask (padded to L), causal, window, KV padding."""
        zero, neg_inf = _const(0, dtype), _const(-np.inf, dtype)
        if mask is not None:
            mask_len = mask.ty.shape.values[-1]
            pad = tvm.sym.Analyzer().simplify(kv_len - mask_len)
            if not isinstance(pad, tirx.IntImm):
                raise ValueError("Attention mask length must be static relative to the KV length")
            if pad.value > 0:
                pad_widths = [0, 0] * (mask.ty.ndim - 1) + [0, int(pad.value)]
                fill = False if str(mask.ty.dtype) == "bool" else -np.inf
                mask = relax.op.nn.pad(
                    mask, pad_widths, pad_value=float(fill) if fill is not False else 0.0
                )
                mask = bb.normalize(mask)
            if str(mask.ty.dtype) == "bool":
                mask = bb.normalize(relax.op.where(mask, zero, neg_inf))
        causal = attr.get("is_causal", 0)
        left, right = attr.get("left_window_size", -1), attr.get("right_window_size", -1)
        if not causal and left < 0 and right < 0 and nonpad is None:
            return mask
        # Query i (absolute position i + offset) may see key j; offset is the past length, or
        # per batch nonpad_kv_seqlen - S for an external cache.
        rows = relax.op.reshape(relax.op.arange(0, q_len, 1, "int64"), relax.ShapeExpr([q_len, 1]))
        cols = relax.op.reshape(
            relax.op.arange(0, kv_len, 1, "int64"), relax.ShapeExpr([1, kv_len])
        )
        rows, cols = bb.normalize(rows), bb.normalize(cols)
        if nonpad is not None:
            nonpad = bb.normalize(relax.op.astype(nonpad, "int64"))
            nonpad = bb.normalize(relax.op.reshape(nonpad, [-1, 1, 1, 1]))
        if nonpad is not None and past_len == 0:
            offset = bb.normalize(relax.op.subtract(nonpad, cls._int_tensor(bb, q_len)))
        else:
            offset = cls._int_tensor(bb, past_len)
        diff = bb.normalize(relax.op.subtract(relax.op.add(rows, offset), cols))  # i + off - j
        bias = mask if mask is not None else zero
        if causal:
            allowed = relax.op.greater_equal(diff, _const(0, "int64"))
            bias = relax.op.add(bias, relax.op.where(allowed, zero, neg_inf))
        if left >= 0 or right >= 0:
            allowed = relax.op.ones_like(diff, "bool")
            if left >= 0:
                allowed = relax.op.logical_and(
                    allowed, relax.op.less_equal(diff, _const(left, "int64"))
                )
            if right >= 0:
                allowed = relax.op.logical_and(
                    allowed,
                    relax.op.less_equal(relax.op.negative(diff), _const(right, "int64")),
                )
            bias = relax.op.add(bias, relax.op.where(allowed, zero, neg_inf))
        if nonpad is not None:
            valid = relax.op.less(cols, nonpad)
            bias = relax.op.add(bias, relax.op.where(valid, zero, neg_inf))
        bias = bb.normalize(bias)
        # Broadcast up to (S, L) at least, as the reference's zeros((S, L)) + bias does.
        return bb.normalize(
            relax.op.add(bias, relax.op.zeros(relax.ShapeExpr([q_len, kv_len]), dtype))
        )


# --- Reductions with axes known only at run time ------------------------------------------------
def _runtime_axes_mask(bb, axes, rank: int):
    """bool[rank]: which axes an int tensor of (possibly negative) axis numbers names."""
    axes = bb.normalize(relax.op.astype(axes, "int64"))
    axes = bb.normalize(
        relax.op.where(
            relax.op.less(axes, _const(0, "int64")),
            relax.op.add(axes, _const(rank, "int64")),
            axes,
        )
    )
    # A scatter, not a reduction over the axes list: TVM's CPU reductions over an extent that is
    # zero at run time (empty axes) return garbage.
    ones = relax.op.ones_like(axes, "int64")
    hits = relax.op.scatter_elements(_const(np.zeros(rank), "int64"), axes, ones, axis=0)
    return bb.normalize(relax.op.greater(hits, _const(0, "int64")))


def reduce_runtime_axes(bb, x, axes, keepdims: bool, reduce_fn, noop_with_empty_axes=False):
    """Reduce ``x`` (static rank) over the axes in the int tensor ``axes`` (static length, values
    known only at run time) with ``reduce_fn(x, axis)`` (keepdims=True).

    Axis by axis: the reduction along the axis is concatenated in front of the data and a slice
    bound at run time keeps either it (axis named) or the data (axis not named), so zero-sized
    axes reduce to the reduction's identity as they should. Without ``keepdims`` the named axes
    are then dropped with a reshape to a run-time shape.
    """
    rank, length = x.ty.ndim, _tensor_length(axes)
    if not keepdims and length is None:
        raise ValueError("a reduction without keepdims needs axes of static length")
    mask = _runtime_axes_mask(bb, axes, rank)
    if not noop_with_empty_axes and length is None:
        # Empty axes (possible when the length is only known at run time) mean all axes.
        none = relax.op.equal(relax.op.max(relax.op.astype(mask, "int32")), _const(0, "int32"))
        mask = bb.normalize(relax.op.logical_or(mask, none))
    out = x
    for i in range(rank):
        selected = bb.normalize(relax.op.take(mask, _const(i, "int64"), axis=0))
        stacked = bb.normalize(relax.op.concat([reduce_fn(out, i), out], axis=i))
        extent = Attention._int_tensor(bb, out.ty.shape.values[i])
        bounds = relax.op.where(
            selected,
            _const([0, 1], "int64"),
            relax.op.concat(
                [
                    _const([1], "int64"),
                    relax.op.add(relax.op.reshape(extent, [1]), _const([1], "int64")),
                ],
                axis=0,
            ),
        )
        begin, end = _runtime_shape(bb, bb.normalize(bounds), 2, f"reduce_axis{i}").values
        out = bb.normalize(
            relax.op.strided_slice(stacked, [i], [begin], [end], assume_inbound=True)
        )
    if keepdims:
        return out
    # The k-th kept axis is the number of axes whose running count of kept axes is <= k.
    keep = relax.op.astype(relax.op.logical_not(mask), "int64")
    running = relax.op.expand_dims(relax.op.cumsum(keep, axis=0), 0)
    ks = _const(np.arange(rank - length).reshape(-1, 1), "int64")
    src = relax.op.sum(relax.op.astype(relax.op.less_equal(running, ks), "int64"), axis=1)
    out_dims = bb.normalize(relax.op.take(_shape_tensor(bb, x), src, axis=0))
    return relax.op.reshape(out, _runtime_shape(bb, out_dims, rank - length, "reduced_dim"))


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
            if _tensor_length(axes) == 0:
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

        return convert


for _op_type in _REDUCTIONS:
    register_converter(_op_type)(type(_op_type, (_RuntimeAxesReduce,), {"op_type": _op_type}))


# --- Normalisations -------------------------------------------------------------------------------
def _normalized_axes(data, axis: int) -> list[int]:
    rank = data.ty.ndim
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        raise ValueError(f"normalisation axis {axis} is out of range for rank {rank}")
    return list(range(axis, rank))


def _broadcast_to_normalized(bb, weight, data, axes: list[int]):
    """``weight`` broadcast to the normalised trailing dims of ``data`` (ONNX allows any
    broadcastable shape; TVM's norm ops read it with exactly those dims)."""
    dims = list(data.ty.shape.values)[axes[0] :]
    return bb.normalize(relax.op.broadcast_to(weight, relax.ShapeExpr(dims)))


@register_converter("LayerNormalization")
class LayerNormalization(tvm_onnx.OnnxOpConverter):
    """LayerNormalization with its ``Mean`` and ``InvStdDev`` outputs and broadcastable weights.

    TVM's converter returns scalar placeholders for the second and third outputs (they are real
    outputs of the op, computed in ``stash_type`` precision with the reduced dims kept), and
    requires ``Scale``/``B`` to have exactly the normalised shape.
    """

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        data, scale, bias = inputs[0], inputs[1], inputs[2]
        axes = _normalized_axes(data, attr.get("axis", -1))
        eps = float(attr.get("epsilon", 1e-5))
        dtype = str(data.ty.dtype)
        scale = _broadcast_to_normalized(bb, scale, data, axes)
        bias = (
            _broadcast_to_normalized(bb, bias, data, axes)
            if bias is not None
            else relax.op.zeros_like(scale)
        )
        count = attr["tvm_custom"]["num_outputs"]
        if count == 1:
            return relax.op.nn.layer_norm(data, scale, bias, axes, eps)
        stash = tvm_onnx.get_type(attr.get("stash_type", 1))
        x = bb.normalize(relax.op.astype(data, stash)) if stash != dtype else data
        mean = bb.normalize(relax.op.mean(x, axes, keepdims=True))
        centered = bb.normalize(relax.op.subtract(x, mean))
        var = relax.op.mean(relax.op.multiply(centered, centered), axes, keepdims=True)
        inv_std = bb.normalize(
            relax.op.divide(_const(1, stash), relax.op.sqrt(relax.op.add(var, _const(eps, stash))))
        )
        normalized = relax.op.astype(relax.op.multiply(centered, inv_std), dtype)
        y = relax.op.add(relax.op.multiply(normalized, scale), bias)
        return relax.Tuple([y, mean, inv_std][:count])


@register_converter("RMSNormalization")
class RMSNormalization(tvm_onnx.OnnxOpConverter):
    """RMSNormalization as ``x / sqrt(mean(x², axes) + eps) * scale`` in ``stash_type``.

    TVM's converter lowers to ``nn.rms_norm``, which fails to compile when the normalised axes
    start at 0 ("Tensor dimension mismatch in read") and when ``scale`` is broadcastable rather
    than exactly the normalised shape.
    """

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        data, scale = inputs[0], inputs[1]
        axes = _normalized_axes(data, attr.get("axis", -1))
        eps = float(attr.get("epsilon", 1e-5))
        dtype = str(data.ty.dtype)
        stash = tvm_onnx.get_type(attr.get("stash_type", 1))
        x = bb.normalize(relax.op.astype(data, stash)) if stash != dtype else data
        mean_square = relax.op.mean(relax.op.multiply(x, x), axes, keepdims=True)
        rms = relax.op.sqrt(relax.op.add(mean_square, _const(eps, stash)))
        normalized = relax.op.astype(relax.op.divide(x, rms), dtype)
        return relax.op.multiply(normalized, scale)


@register_converter("LpNormalization")
class LpNormalization(tvm_onnx.OnnxOpConverter):
    """``x / ||x||_p`` along ``axis`` (p = 1 or 2); TVM has no converter. A zero norm gives 0, as
    in the ONNX reference."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        axis, p = attr.get("axis", -1), attr.get("p", 2)
        if p == 1:
            norm = relax.op.sum(relax.op.abs(x), axis, keepdims=True)
        elif p == 2:
            norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis, keepdims=True))
        else:
            raise ValueError(f"LpNormalization supports p = 1 or 2, not {p}")
        norm = bb.normalize(norm)
        zero = _const(0, str(x.ty.dtype))
        is_zero = relax.op.equal(norm, zero)
        safe = relax.op.where(is_zero, _const(1, str(x.ty.dtype)), norm)
        return relax.op.where(is_zero, zero, relax.op.divide(x, safe))


# --- Elementwise ops TVM lacks or mistypes --------------------------------------------------------
@register_converter("Pow")
class Pow(tvm_onnx.OnnxOpConverter):
    """Pow with mixed or integer dtypes.

    ONNX lets the exponent have any numeric type (``x ** 2`` exports as Pow(float, int64)); TVM's
    converter requires equal dtypes, and TVM's ``power`` refuses integers. The exponent is cast to
    the base's dtype; integer powers are computed in float64 and rounded back.
    """

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        base, exponent = inputs[0], inputs[1]
        if _is_symbolic_value(base) or _is_symbolic_value(exponent):
            return tvm_onnx.Pow._impl_v7(bb, inputs, attr, params)
        dtype = str(base.ty.dtype)
        if str(exponent.ty.dtype) != dtype:
            exponent = bb.normalize(relax.op.astype(exponent, dtype))
        if "float" in dtype:
            return tvm_onnx.Pow._impl_v7(bb, tvm_onnx.onnx_input([base, exponent]), attr, params)
        wide = relax.op.power(
            relax.op.astype(base, "float64"), relax.op.astype(exponent, "float64")
        )
        return relax.op.astype(relax.op.round(wide), dtype)


@register_converter("Celu")
class Celu(tvm_onnx.OnnxOpConverter):
    """``max(0, x) + min(0, alpha * (exp(x / alpha) - 1))``; TVM has no converter."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        alpha = _const(attr.get("alpha", 1.0), dtype)
        zero = _const(0, dtype)
        negative = relax.op.multiply(
            alpha, relax.op.subtract(relax.op.exp(relax.op.divide(x, alpha)), _const(1, dtype))
        )
        return relax.op.add(relax.op.maximum(x, zero), relax.op.minimum(negative, zero))


@register_converter("Elu")
class Elu(tvm_onnx.OnnxOpConverter):
    """``x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise, in the input's dtype (TVM's converter
    mixes float32 constants into float16/float64 graphs and fails type checking)."""

    @classmethod
    def _impl_v6(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        negative = relax.op.multiply(
            _const(attr.get("alpha", 1.0), dtype),
            relax.op.subtract(relax.op.exp(x), _const(1, dtype)),
        )
        return relax.op.where(relax.op.greater(x, _const(0, dtype)), x, negative)


@register_converter("Selu")
class Selu(tvm_onnx.OnnxOpConverter):
    """``gamma * (x if x > 0 else alpha * (exp(x) - 1))`` in the input's dtype (same float32
    constant problem as TVM's Elu)."""

    @classmethod
    def _impl_v6(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        alpha = _const(attr.get("alpha", 1.67326319217681884765625), dtype)
        gamma = _const(attr.get("gamma", 1.05070102214813232421875), dtype)
        negative = relax.op.multiply(alpha, relax.op.subtract(relax.op.exp(x), _const(1, dtype)))
        inner = relax.op.where(relax.op.greater(x, _const(0, dtype)), x, negative)
        return relax.op.multiply(gamma, inner)


@register_converter("Swish")
class Swish(tvm_onnx.OnnxOpConverter):
    """``x * sigmoid(alpha * x)`` (opset 24); TVM has no converter."""

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        x = inputs[0]
        alpha = _const(attr.get("alpha", 1.0), str(x.ty.dtype))
        return relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(alpha, x)))


class _Hyperbolic(tvm_onnx.OnnxOpConverter):
    """``(exp(x) ± exp(-x)) / 2``: TVM's converters emit ``tirx.cosh``/``tirx.sinh``, which have
    no LLVM lowering once qiao's CPU schedule vectorises the kernel ("unknown intrinsic
    tirx.cosh"); ``exp`` has one."""

    combine = staticmethod(relax.op.add)

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        x = inputs[0]
        both = cls.combine(relax.op.exp(x), relax.op.exp(relax.op.negative(x)))
        return relax.op.multiply(both, _const(0.5, str(x.ty.dtype)))


@register_converter("Cosh")
class Cosh(_Hyperbolic):
    __doc__ = _Hyperbolic.__doc__
    combine = staticmethod(relax.op.add)


@register_converter("Sinh")
class Sinh(_Hyperbolic):
    __doc__ = _Hyperbolic.__doc__
    combine = staticmethod(relax.op.subtract)


@register_converter("IsInf")
class IsInf(tvm_onnx.OnnxOpConverter):
    """IsInf honouring ``detect_positive``/``detect_negative`` (TVM's converter ignores them)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        positive = relax.op.equal(x, _const(np.inf, dtype))
        negative = relax.op.equal(x, _const(-np.inf, dtype))
        if attr.get("detect_positive", 1) and attr.get("detect_negative", 1):
            return relax.op.logical_or(positive, negative)
        if attr.get("detect_positive", 1):
            return positive
        if attr.get("detect_negative", 1):
            return negative
        return relax.op.zeros_like(x, "bool")


@register_converter("Dropout")
class Dropout(tvm_onnx.OnnxOpConverter):
    """Inference Dropout: the input, and an all-true ``bool`` mask when asked for (TVM's mask is
    float). In training mode the output is random unless the ratio is a constant 0, so other
    training-mode Dropouts are refused rather than silently compiled as identity."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        x = inputs[0]
        training = tvm_onnx.get_constant(inputs[2], params) if len(inputs) > 2 else None
        ratio = tvm_onnx.get_constant(inputs[1], params) if len(inputs) > 1 else None
        is_training = training is not None and (
            not isinstance(training, tvm.ir.GenericConst) or bool(training.value.numpy())
        )
        zero_ratio = isinstance(ratio, tvm.ir.GenericConst) and float(ratio.value.numpy()) == 0.0
        if is_training and not zero_ratio:
            raise ValueError(
                "Dropout in training mode with a non-zero ratio is random; qiao compiles "
                "inference graphs only"
            )
        if attr["tvm_custom"]["num_outputs"] == 1:
            return x
        return relax.Tuple([x, bb.normalize(relax.op.ones_like(x, "bool"))])


@register_converter("RotaryEmbedding")
class RotaryEmbedding(tvm_onnx.OnnxOpConverter):
    """ONNX RotaryEmbedding (opset 23); TVM has no converter.

    Input ``(B, H, S, D)`` or ``(B, S, H*D)`` (with ``num_heads``); caches ``(max_pos, R/2)``
    gathered by ``position_ids`` ``(B, S)``, or ``(B, S, R/2)`` without them; the first ``R``
    (``rotary_embedding_dim``, default D) channels rotate, as halves or interleaved pairs.
    """

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, cos, sin, positions = inputs[0], inputs[1], inputs[2], inputs[3]
        four_d = x.ty.ndim == 4
        if four_d:
            x = bb.normalize(relax.op.permute_dims(x, [0, 2, 1, 3]))  # (B, S, H, D)
        else:
            b, s, hidden = x.ty.shape.values
            heads = attr["num_heads"]
            x = bb.normalize(
                relax.op.reshape(x, relax.ShapeExpr([b, s, heads, tirx.floordiv(hidden, heads)]))
            )
        head = x.ty.shape.values[3]
        rot = attr.get("rotary_embedding_dim", 0) or int(head)
        half = rot // 2
        if positions is not None:
            cos = relax.op.take(cos, positions, axis=0)
            sin = relax.op.take(sin, positions, axis=0)
        cos = bb.normalize(relax.op.expand_dims(cos, 2))  # (B, S, 1, R/2)
        sin = bb.normalize(relax.op.expand_dims(sin, 2))
        rotate = bb.normalize(relax.op.strided_slice(x, [3], [0], [rot]))
        if attr.get("interleaved", 0):
            x1 = relax.op.strided_slice(rotate, [3], [0], [rot], [2])
            x2 = relax.op.strided_slice(rotate, [3], [1], [rot], [2])
        else:
            x1 = relax.op.strided_slice(rotate, [3], [0], [half])
            x2 = relax.op.strided_slice(rotate, [3], [half], [rot])
        x1, x2 = bb.normalize(x1), bb.normalize(x2)
        real = relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2))
        imag = relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2))
        real, imag = bb.normalize(real), bb.normalize(imag)
        if attr.get("interleaved", 0):
            pairs = relax.op.concat(
                [relax.op.expand_dims(real, 4), relax.op.expand_dims(imag, 4)], axis=4
            )
            rotated = relax.op.reshape(bb.normalize(pairs), rotate.ty.shape)
        else:
            rotated = relax.op.concat([real, imag], axis=3)
        rotated = bb.normalize(rotated)
        if not (isinstance(head, tirx.IntImm) and rot == int(head)):
            rest = relax.op.strided_slice(x, [3], [rot], [head])
            rotated = bb.normalize(relax.op.concat([rotated, rest], axis=3))
        if four_d:
            return relax.op.permute_dims(rotated, [0, 2, 1, 3])
        return relax.op.reshape(rotated, inputs[0].ty.shape)


# --- Scans and axis-indexed ops whose axis arrives at run time ------------------------------------
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
            relax.op.less(axis, _const(0, "int64")), relax.op.add(axis, _const(rank, "int64")), axis
        )
    )
    out = build(rank - 1)
    for candidate in range(rank - 2, -1, -1):
        out = relax.op.where(
            relax.op.equal(axis, _const(candidate, "int64")), build(candidate), out
        )
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


# --- Losses ---------------------------------------------------------------------------------------
def _loss_attrs(attr) -> tuple[str, int]:
    reduction = attr.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    # No ignore_index means none: pick a value no valid class index can take.
    return reduction, int(attr.get("ignore_index", -(2**31)))


@register_converter("NegativeLogLikelihoodLoss")
class NegativeLogLikelihoodLoss(tvm_onnx.OnnxOpConverter):
    """``-input[n, target[n, ...], ...]`` weighted and reduced; TVM has the Relax op
    (``nn.nll_loss``) but no ONNX converter."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        reduction, ignore_index = _loss_attrs(attr)
        return relax.op.nn.nll_loss(inputs[0], inputs[1], inputs[2], reduction, ignore_index)


@register_converter("SoftmaxCrossEntropyLoss")
class SoftmaxCrossEntropyLoss(tvm_onnx.OnnxOpConverter):
    """NLL loss of ``log_softmax(scores, axis=1)``, with the log-probabilities as optional second
    output; TVM has no converter."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        reduction, ignore_index = _loss_attrs(attr)
        log_prob = bb.normalize(relax.op.nn.log_softmax(inputs[0], axis=1))
        loss = relax.op.nn.nll_loss(log_prob, inputs[1], inputs[2], reduction, ignore_index)
        if attr["tvm_custom"]["num_outputs"] == 2:
            return relax.Tuple([bb.normalize(loss), log_prob])
        return loss


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
        start, limit, delta = (_scalar(x) for x in consts)
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
            count = simplify_dims(count)
            positions = relax.op.arange(0, count, 1, "int64")
            if delta_i.value != 1:
                positions = relax.op.multiply(positions, relax.const(delta_i.value, "int64"))
            if start_i.value != 0:
                positions = relax.op.add(positions, relax.const(start_i.value, "int64"))
            return positions if out_dtype == "int64" else relax.op.astype(positions, out_dtype)
        return tvm_onnx.Range._impl_v12(bb, inputs, attr, params)


# --- Expand ---------------------------------------------------------------------------------------
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
        if not isinstance(shape, relax.ShapeExpr) and _tensor_length(shape) is not None:
            return cls._runtime_expand(bb, materialize(bb, data), shape)
        return tvm_onnx.Expand._impl_v13(bb, inputs, attr, params)

    @classmethod
    def _runtime_expand(cls, bb, data, shape):
        # TVM binds the requested shape itself, so a 1 where the data dim is larger shrinks the
        # output instead of broadcasting (ONNX: out = broadcast(data dims, shape)).
        length = _tensor_length(shape)
        rank = len(data.ty.shape.values)
        out_rank = max(rank, length)
        if rank < out_rank:
            data = bb.normalize(
                relax.op.reshape(data, [1] * (out_rank - rank) + list(data.ty.shape.values))
            )
        target = bb.normalize(relax.op.astype(shape, "int64"))
        if length < out_rank:
            target = bb.normalize(
                relax.op.concat([_const([1] * (out_rank - length), "int64"), target], axis=0)
            )
        data_dims = _shape_tensor(bb, data)
        one = _const(1, "int64")
        out = bb.normalize(relax.op.where(relax.op.equal(target, one), data_dims, target))
        return relax.op.broadcast_to(data, _runtime_shape(bb, out, out_rank, "expand_dim"))


def _fold_qiao_converters() -> None:
    """Give every converter of this module the import-time folding ``_SymbolicTolerant`` applies
    to TVM's (qiao's converters delegate constant cases to TVM's, whose results would otherwise
    stay unfolded and send shape arithmetic down the dynamic-shape paths)."""
    for op_type, cls in list(_CONVERTERS.items()):
        if cls.__module__ != __name__ or issubclass(cls, _SymbolicTolerant):
            continue

        @classmethod
        def get_converter(folded, opset, _inner=cls.get_converter):
            convert = _inner(opset)

            def folding(bb, inputs, attr, params):
                return fold_small_constant(inputs, convert(bb, inputs, attr, params))

            return folding

        _CONVERTERS[op_type] = type(
            cls.__name__, (cls,), {"get_converter": get_converter, "__doc__": cls.__doc__}
        )


_fold_qiao_converters()
_wrap_tvm_converters()  # last: every converter registered above takes precedence
