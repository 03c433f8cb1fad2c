"""The Relax side of low-precision emulation (see ``lowprec``): ``QiaoLowPrecEncode``, the private
op ``lower_low_precision`` emits to round a tensor to float8 / float4e2m1 bits or wrap it to int4 /
int2 values, held in the format's storage type (uint8 bits, int8/uint8 values).

The rounding is integer arithmetic on the float32 bit pattern (``reinterpret``), elementwise in one
TE kernel: TVM's own float8 casts compile to ``if_then_else`` on vector lanes, which its LLVM
codegen rejects, and none of them know the ONNX saturation rules.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import materialize
from qiao.compiler.frontend.lowprec import ENCODE_OP, LOW_PRECISION, ROUND_MODES, LowPrecType


def _u32(value: int):
    return tirx.const(value, "uint32")


def _rne_shift(m, s):
    """``m >> s`` rounded to nearest, ties to even (uint32 ``m``, ``1 <= s <= 31``)."""
    q = m >> s
    rem = m & ((_u32(1) << s) - _u32(1))
    half = _u32(1) << (s - _u32(1))
    up = tirx.Or(rem > half, tirx.And(rem == half, (q & _u32(1)) == _u32(1)))
    return q + tirx.Select(up, _u32(1), _u32(0))


def encode_float(v, t: LowPrecType, saturate: bool):
    """Bits (uint32) of float32 ``v`` in float format ``t``: round-half-even; overflow and
    infinities to the largest finite value when saturating (always for float4e2m1, which has no
    infinity or NaN), else to the format's infinity or NaN; NaN to its NaN (float4e2m1: a zero of
    the opposite sign, as ml_dtypes and onnx's reference give); fnuz formats have no negative
    zero."""
    u = tirx.reinterpret("uint32", v)
    sign = u >> _u32(31)
    a = u & _u32(0x7FFFFFFF)
    e32 = a >> _u32(23)
    m, bias = t.mbits, t.bias
    # Normal in the target: drop 23 - m mantissa bits with round-half-even; a carry moves into
    # the exponent by itself. Then rebias the exponent from float32's 127 to the format's.
    shift = 23 - m
    rounded = a + _u32((1 << (shift - 1)) - 1) + ((a >> _u32(shift)) & _u32(1))
    normal = (rounded >> _u32(shift)) - _u32((127 - bias) << m)
    # Subnormal in the target: the significand (with its implicit bit, float32 subnormals have
    # none) shifted to the target's subnormal step, rounded; rounding up to 1 << m lands on the
    # smallest normal, which is the right code.
    significand = tirx.Select(
        e32 == _u32(0), a & _u32(0x7FFFFF), (a & _u32(0x7FFFFF)) | _u32(1 << 23)
    )
    steps = tirx.Cast("int32", tirx.max(e32, _u32(1)))
    s = tirx.Cast("uint32", tirx.min(tirx.max(tirx.const(151 - bias - m, "int32") - steps, 1), 31))
    sub = _rne_shift(significand, s)
    mag = tirx.Select(e32 > _u32(127 - bias), normal, sub)

    is_nan = a > _u32(0x7F800000)
    overflow = tirx.Or(a == _u32(0x7F800000), mag > _u32(t.max_code))
    sign_bit = sign << _u32(t.ebits + m)
    if saturate or t.special == "none":
        mag = tirx.Select(overflow, _u32(t.max_code), mag)
    elif t.special == "fn":
        mag = tirx.Select(overflow, _u32(t.max_code + 1), mag)  # S.1111.111 is NaN
    elif t.special == "ieee":
        mag = tirx.Select(overflow, _u32(t.max_code + 1), mag)  # the infinity
    if t.special == "fnuz":
        nan = is_nan if saturate else tirx.Or(is_nan, overflow)
        signed = tirx.Select(mag == _u32(0), _u32(0), mag | sign_bit)
        return tirx.Select(nan, _u32(0x80), signed)
    if t.special == "none":  # ml_dtypes' "NaN" here is -0, negated for a negative NaN
        return tirx.Select(is_nan, sign_bit ^ _u32(1 << (t.ebits + m)), mag | sign_bit)
    nan_mag = {"fn": t.max_code + 1, "ieee": t.max_code + 3}[t.special]
    return tirx.Select(is_nan, _u32(nan_mag), mag) | sign_bit


def encode_e8m0(v, saturate: bool, round_mode: int):
    """Bits (uint32) of float32 ``v`` as float8e8m0 (a power of two; the sign is dropped), exactly
    as ``onnx.numpy_helper.to_float8e8m0`` rounds: ``up`` to the next power unless exact,
    ``down`` truncates, ``nearest`` on the guard bit; 0xFF is NaN and takes NaN and infinities."""
    u = tirx.reinterpret("uint32", v)
    exponent = (u >> _u32(23)) & _u32(0xFF)
    if round_mode == ROUND_MODES["up"]:
        up = (u & _u32(0x7FFFFF)) != _u32(0)
    elif round_mode == ROUND_MODES["nearest"]:
        guard = (u & _u32(0x400000)) != _u32(0)
        rest = tirx.Or((u & _u32(0x200000)) != _u32(0), (u & _u32(0x1FFFFF)) != _u32(0))
        up = tirx.And(guard, tirx.Or(rest, exponent > _u32(0)))
    else:
        up = tirx.const(False, "bool")
    if saturate:
        up = tirx.And(up, exponent != _u32(0xFE))
    special = exponent == _u32(0xFF)
    return tirx.Select(special, _u32(0xFF), exponent + tirx.Select(up, _u32(1), _u32(0)))


def encode_int(v, t: LowPrecType):
    """``v`` as an int4/uint4/int2/uint2 value (in int64): floats truncate toward zero, then every
    value wraps modulo 2**bits, as ml_dtypes converted before 0.7 (0.7 gives 0 out of range; ONNX
    leaves it undefined); NaN and infinities give 0."""
    if "float" in str(v.ty):
        wide = v.astype("float64")
        finite = tirx.And(tirx.abs(wide) < tirx.const(2.0**63, "float64"), wide == wide)
        v = tirx.Select(finite, wide.astype("int64"), tirx.const(0, "int64"))
    else:
        v = v.astype("int64")
    mask = tirx.const((1 << t.bits) - 1, "int64")
    if not t.signed:
        return v & mask
    top = tirx.const(1 << (t.bits - 1), "int64")
    return ((v & mask) ^ top) - top


def encode(x: te.Tensor, t: LowPrecType, saturate: bool, round_mode: int) -> te.Tensor:
    """The TE kernel: ``x`` (any real or integer dtype) encoded as ``t`` in ``t.storage``."""

    def element(*index):
        v = x(*index)
        if not t.is_float:
            return encode_int(v, t).astype(t.storage)
        if str(v.ty) != "float32":
            # float16/bfloat16 widen exactly. float64 (and wide integers) round to float32 first,
            # as ONNX Runtime does (and ml_dtypes before 0.7): a value just off a tie can
            # become the tie, so this double rounding is what their outputs hold.
            v = v.astype("float32")
        bits = (
            encode_e8m0(v, saturate, round_mode)
            if t.special == "e8m0"
            else encode_float(v, t, saturate)
        )
        return bits.astype(t.storage)

    return te.compute(x.shape, element, name=f"encode_{t.name}")


@register_converter(ENCODE_OP)
class LowPrecEncode(tvm_onnx.OnnxOpConverter):
    """``QiaoLowPrecEncode(x; to, saturate, round_mode)``: ``x`` rounded to the low-precision
    ONNX type ``to``, as its storage (see ``lowprec``). Emitted by ``lower_low_precision`` only."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        t = LOW_PRECISION[int(attr["to"])]
        x = materialize(bb, inputs[0])
        saturate, round_mode = bool(attr.get("saturate", 1)), int(attr.get("round_mode", 0))

        def encode_lowprec(tensor: te.Tensor) -> te.Tensor:  # emit_te takes tensors only
            return encode(tensor, t, saturate, round_mode)

        return bb.emit_te(encode_lowprec, x)
