"""Converters for elementwise ops TVM lacks or mistypes: Pow, Celu, Elu, Selu, Swish, Cosh,
Sinh, Sign, ThresholdedRelu, Not, Equal (of booleans), variadic Max/Min, IsInf, Dropout.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, is_symbolic_value


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
        if is_symbolic_value(base) or is_symbolic_value(exponent):
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
        alpha = const(attr.get("alpha", 1.0), dtype)
        zero = const(0, dtype)
        negative = relax.op.multiply(
            alpha, relax.op.subtract(relax.op.exp(relax.op.divide(x, alpha)), const(1, dtype))
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
            const(attr.get("alpha", 1.0), dtype),
            relax.op.subtract(relax.op.exp(x), const(1, dtype)),
        )
        return relax.op.where(relax.op.greater(x, const(0, dtype)), x, negative)


@register_converter("Selu")
class Selu(tvm_onnx.OnnxOpConverter):
    """``gamma * (x if x > 0 else alpha * (exp(x) - 1))`` in the input's dtype (same float32
    constant problem as TVM's Elu)."""

    @classmethod
    def _impl_v6(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        alpha = const(attr.get("alpha", 1.67326319217681884765625), dtype)
        gamma = const(attr.get("gamma", 1.05070102214813232421875), dtype)
        negative = relax.op.multiply(alpha, relax.op.subtract(relax.op.exp(x), const(1, dtype)))
        inner = relax.op.where(relax.op.greater(x, const(0, dtype)), x, negative)
        return relax.op.multiply(gamma, inner)


@register_converter("Swish")
class Swish(tvm_onnx.OnnxOpConverter):
    """``x * sigmoid(alpha * x)`` (opset 24); TVM has no converter."""

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        x = inputs[0]
        alpha = const(attr.get("alpha", 1.0), str(x.ty.dtype))
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
        return relax.op.multiply(both, const(0.5, str(x.ty.dtype)))


@register_converter("Cosh")
class Cosh(_Hyperbolic):
    __doc__ = _Hyperbolic.__doc__
    combine = staticmethod(relax.op.add)


@register_converter("Sinh")
class Sinh(_Hyperbolic):
    __doc__ = _Hyperbolic.__doc__
    combine = staticmethod(relax.op.subtract)


@register_converter("Sign")
class Sign(tvm_onnx.OnnxOpConverter):
    """``sign(x)``, NaN for NaN: TOPI's ``sign`` is ``x < 0 ? -1 : (x > 0 ? 1 : 0)``, which makes
    NaN 0 (ONNX Runtime, PyTorch and NumPy give NaN; found by ``qiao.compiler.fuzzing``)."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        if "float" not in dtype:
            return relax.op.sign(x)
        # x > 0 ? 1 : (x < 0 ? -1 : x): NaN and ±0 are themselves, with no tirx.isnan (which has
        # made TVM's vectorizer fail elsewhere: see passes/vectorizable_math._clamp)
        negative = relax.op.where(relax.op.less(x, const(0, dtype)), const(-1, dtype), x)
        return relax.op.where(relax.op.greater(x, const(0, dtype)), const(1, dtype), negative)


@register_converter("ThresholdedRelu")
class ThresholdedRelu(tvm_onnx.OnnxOpConverter):
    """``x if x > alpha else 0`` as a select in the input's dtype. TVM's converter multiplies
    ``x`` by a float32 mask: ``-inf · 0`` is NaN where ONNX Runtime gives 0, negative inputs give
    -0, and float16 inputs fail type checking (found by ``qiao.compiler.fuzzing``'s probes)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        keep = relax.op.greater(x, const(attr.get("alpha", 1.0), dtype))
        return relax.op.where(keep, x, const(0, dtype))


@register_converter("Not")
class Not(tvm_onnx.OnnxOpConverter):
    """``x xor true``. TVM's ``logical_not`` of a float comparison is simplified into the opposite
    comparison (``!(a > b)`` → ``a <= b``), which is false for NaN where ``Not`` is true: a
    ``Where(Not(x > c), x, y)`` dropped NaN (found by ``qiao.compiler.fuzzing``)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.logical_xor(inputs[0], const(True, "bool"))


@register_converter("Equal")
class Equal(tvm_onnx.OnnxOpConverter):
    """Equal of two boolean tensors compares them as uint8: TVM's LLVM code generator emits a
    float compare for vectors of booleans ("Invalid operand types for FCmp instruction")."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        if all(isinstance(v, relax.Expr) and _is_bool_tensor(v) for v in (a, b)) and not all(
            isinstance(v, tvm.ir.GenericConst) for v in (a, b)
        ):
            return relax.op.equal(relax.op.astype(a, "uint8"), relax.op.astype(b, "uint8"))
        return tvm_onnx.Equal._impl_v13(bb, inputs, attr, params)


def _is_bool_tensor(value) -> bool:
    ty = getattr(value, "ty", None)
    return getattr(ty, "dtype", None) is not None and str(ty.dtype) == "bool"


class _PairwiseExtremum(tvm_onnx.OnnxOpConverter):
    """Variadic Max/Min as a chain of elementwise maximum/minimum. TVM's converter stacks the
    inputs and reduces the new axis, whose identity is the lowest finite float: ``Max`` of
    inputs that are all ``-inf`` gave ``-3.4e38`` (found by ``qiao.compiler.fuzzing``)."""

    pairwise = None  # relax.op.maximum / minimum
    tvm_converter = None  # TVM's converter, for constants

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        values = [v for v in inputs if v is not None]
        if len(values) < 2 or all(isinstance(v, tvm.ir.GenericConst) for v in values):
            return cls.tvm_converter._impl_v1(bb, inputs, attr, params)
        out = values[0]
        for value in values[1:]:
            out = bb.normalize(cls.pairwise(out, value))
        return out


@register_converter("Max")
class Max(_PairwiseExtremum):
    pairwise = staticmethod(relax.op.maximum)
    tvm_converter = tvm_onnx.Max


@register_converter("Min")
class Min(_PairwiseExtremum):
    pairwise = staticmethod(relax.op.minimum)
    tvm_converter = tvm_onnx.Min


@register_converter("IsInf")
class IsInf(tvm_onnx.OnnxOpConverter):
    """IsInf honouring ``detect_positive``/``detect_negative`` (TVM's converter ignores them)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        positive = relax.op.equal(x, const(np.inf, dtype))
        negative = relax.op.equal(x, const(-np.inf, dtype))
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


@register_converter("Mod")
class Mod(tvm_onnx.OnnxOpConverter):
    """Mod; for floats with ``fmod=0`` NumPy's ``np.mod`` semantics (the ONNX reference).

    TVM's converter uses ``floor_mod``, computed as ``x - floor(x / y) * y``, which gives NaN for
    a finite ``x`` mod an infinite ``y`` and loses the sign of zero results. ``np.mod`` is
    ``r = fmod(x, y)``, then ``r + y`` when ``r`` is non-zero with a sign unlike ``y``'s, and a
    zero result takes ``y``'s sign. Integer inputs and ``fmod=1`` go to TVM's converter (retried
    on int64 tensors when a symbolic shape value trips it, as for every wrapped TVM converter).
    """

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, y = inputs[0], inputs[1]
        dtype = str(getattr(getattr(x, "ty", None), "dtype", ""))
        if attr.get("fmod", 0) != 0 or "float" not in dtype:
            try:
                return bb.normalize(tvm_onnx.Mod._impl_v10(bb, inputs, dict(attr), params))
            except Exception:  # noqa: BLE001 - a PrimExpr/ShapeExpr operand: retry as tensors
                if not any(is_symbolic_value(v) for v in inputs):
                    raise
                from qiao.compiler.frontend.convert_common import materialize

                tensors = tvm_onnx.onnx_input(materialize(bb, v) for v in inputs)
                return tvm_onnx.Mod._impl_v10(bb, tensors, attr, params)
        from tvm import te, tirx

        wide = "float32" if dtype in ("float16", "bfloat16") else dtype

        def numpy_mod(a, b):
            def at(*i):
                av = a(*i) if len(a.shape) else a()
                bv = b(*i) if len(b.shape) else b()
                av, bv = tirx.Cast(wide, av), tirx.Cast(wide, bv)
                r = tirx.truncmod(av, bv)  # LLVM's frem: C fmod
                zero = tirx.const(0, wide)
                unlike = tirx.Or(tirx.And(r < zero, bv > zero), tirx.And(r > zero, bv < zero))
                r = tirx.Select(unlike, r + bv, r)
                r = tirx.Select(r == zero, tirx.copysign(zero, bv), r)
                return tirx.Cast(dtype, r)

            return te.compute(a.shape, at, name="np_mod")

        shape = relax.op.broadcast_to  # broadcast both sides first: the TE body indexes elementwise
        out_shape = bb.normalize(relax.op.add(x, y)).ty.shape
        x = bb.normalize(shape(x, out_shape))
        y = bb.normalize(shape(y, out_shape))
        return bb.emit_te(numpy_mod, x, y)
