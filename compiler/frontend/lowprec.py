"""Low-precision ONNX element types TVM cannot hold: float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz,
e8m0), float4e2m1 and the sub-byte integers int4/uint4/int2/uint2.

TVM's runtime cannot copy packed sub-byte tensors in or out, its LLVM codegen has no casts for
them, and its vectorised float8 casts fail to compile. qiao emulates these types instead:

* **storage** — every tensor of such a type is held in a byte type TVM has: the float formats as
  their bit pattern in ``uint8`` (float4e2m1 in the low nibble), the integers unpacked, one value
  per ``int8``/``uint8``. ``lower_low_precision`` rewrites the ONNX graph before TVM's importer
  sees it: declared types, initializers and constants become storage, data-movement ops (Reshape,
  Transpose, Gather, ...) run on the storage unchanged.
* **compute** — Cast, CastLike, QuantizeLinear and DequantizeLinear to or from these types become
  standard ops around two conversions: *decode* (float formats: a lookup table of the 2^n values as
  float32, indexed by the bits; integers: the storage already is the value) and *encode*
  (``QiaoLowPrecEncode``, a qiao converter in ``convert_lowprec`` that rounds float32 to the
  format's bits as ONNX specifies: round-half-even, the ``saturate`` attribute, each format's
  NaN/inf rules, e8m0's round modes; integers truncate and wrap like onnx's reference). The same
  decomposition serves blocked (per-block scale) quantisation, which TVM's converters lack.
* **boundary** — a graph input or output of such a type keeps its ONNX dtype in the manifest (an
  ``ml_dtypes`` dtype name such as ``float8_e4m3fn`` or ``int4``); ``inputs_to_storage`` and
  ``outputs_from_storage`` convert at the runner's boundary, so callers see the real type.

This module has no TVM dependency; ``convert_lowprec`` holds the Relax side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler.errors import CompileError

# The private op the rewrite emits for float32/int -> low-precision bits (see convert_lowprec).
ENCODE_OP = "QiaoLowPrecEncode"
# e8m0 round modes, as ints so the attribute survives TVM's attribute parsing untouched.
ROUND_MODES = {"up": 0, "down": 1, "nearest": 2}


@dataclass(frozen=True)
class LowPrecType:
    """One emulated ONNX element type.

    ``special`` says how a float format spends its top codes: ``"fn"`` (e4m3fn: S.1111.111 is NaN,
    no infinity), ``"ieee"`` (e5m2: infinities and NaNs as in IEEE 754), ``"fnuz"`` (0x80 is the one
    NaN, no negative zero, no infinity), ``"none"`` (float4e2m1: every code is finite) and
    ``"e8m0"`` (an unsigned power of two, 0xFF is NaN).
    """

    onnx_type: int
    name: str  # the ml_dtypes / numpy dtype name: what the manifest and callers see
    storage: str  # the numpy dtype TVM holds it in
    bits: int
    signed: bool = True
    ebits: int = 0  # 0 for the integer types
    mbits: int = 0
    bias: int = 0
    special: str = ""

    @property
    def is_float(self) -> bool:
        return self.ebits > 0

    @property
    def max_code(self) -> int:
        """Bits of the largest finite magnitude (float formats)."""
        top = (1 << (self.ebits + self.mbits)) - 1
        return {"fn": top - 1, "ieee": top - (1 << self.mbits), "fnuz": top, "none": top}.get(
            self.special, 0xFE
        )


_T = TensorProto
LOW_PRECISION: dict[int, LowPrecType] = {
    t.onnx_type: t
    for t in (
        LowPrecType(_T.FLOAT8E4M3FN, "float8_e4m3fn", "uint8", 8, True, 4, 3, 7, "fn"),
        LowPrecType(_T.FLOAT8E4M3FNUZ, "float8_e4m3fnuz", "uint8", 8, True, 4, 3, 8, "fnuz"),
        LowPrecType(_T.FLOAT8E5M2, "float8_e5m2", "uint8", 8, True, 5, 2, 15, "ieee"),
        LowPrecType(_T.FLOAT8E5M2FNUZ, "float8_e5m2fnuz", "uint8", 8, True, 5, 2, 16, "fnuz"),
        LowPrecType(_T.FLOAT8E8M0, "float8_e8m0fnu", "uint8", 8, False, 8, 0, 127, "e8m0"),
        LowPrecType(_T.FLOAT4E2M1, "float4_e2m1fn", "uint8", 4, True, 2, 1, 1, "none"),
        LowPrecType(_T.INT4, "int4", "int8", 4, True),
        LowPrecType(_T.UINT4, "uint4", "uint8", 4, False),
        LowPrecType(_T.INT2, "int2", "int8", 2, True),
        LowPrecType(_T.UINT2, "uint2", "uint8", 2, False),
    )
}
_BY_NAME = {t.name: t for t in LOW_PRECISION.values()}
_STORAGE_ONNX = {"uint8": _T.UINT8, "int8": _T.INT8}

# Ops that only move, select or describe elements: on the storage they do what they do on the real
# type (Pad's and ConstantOfShape's fill value is converted like any other tensor).
_DATA_MOVEMENT = frozenset(
    {
        "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape", "Size",
        "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile",
        "Where", "Pad", "DepthToSpace", "SpaceToDepth", "ConstantOfShape", "Constant",
    }
)  # fmt: skip
_REWRITTEN = frozenset({"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear"})


# --- the formats, in NumPy ----------------------------------------------------------------------
def decode_table(t: LowPrecType) -> np.ndarray:
    """The float32 value of every code of float format ``t`` (2**bits entries), from the bit
    fields: the lookup table decoding uses."""
    codes = np.arange(1 << t.bits, dtype=np.int64)
    if t.special == "e8m0":
        out = np.ldexp(np.float64(1.0), codes - t.bias)
        out[0xFF] = np.nan
        return out.astype(np.float32)
    sign = np.where(codes >> (t.ebits + t.mbits) & 1, -1.0, 1.0)
    exp = (codes >> t.mbits) & ((1 << t.ebits) - 1)
    man = codes & ((1 << t.mbits) - 1)
    frac = man / float(1 << t.mbits)
    mag = np.where(exp == 0, np.ldexp(frac, 1 - t.bias), np.ldexp(1.0 + frac, exp - t.bias))
    out = sign * mag
    top_exp = (1 << t.ebits) - 1
    nan = np.zeros(codes.shape, bool)
    if t.special == "fn":
        nan = (exp == top_exp) & (man == (1 << t.mbits) - 1)
    elif t.special == "ieee":
        out[(exp == top_exp) & (man == 0)] = sign[(exp == top_exp) & (man == 0)] * np.inf
        nan = (exp == top_exp) & (man != 0)
    elif t.special == "fnuz":
        nan = codes == 1 << (t.bits - 1)  # the code of -0
    out[nan] = np.copysign(np.nan, sign[nan])  # NaNs keep the sign bit, as ml_dtypes decodes
    return out.astype(np.float32)


def ml_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a manifest dtype name, ``ml_dtypes`` names included."""
    import ml_dtypes  # noqa: F401  (registers float8_*, int4, ... with NumPy)

    return np.dtype(name)


def to_storage(value: Any, dtype: str) -> np.ndarray:
    """``value`` (an array of the low-precision dtype ``dtype``) as its storage array; other
    dtypes pass through unchanged."""
    t = _BY_NAME.get(dtype)
    array = np.asarray(value)
    if t is None or array.dtype != ml_dtype(dtype):
        return array
    if t.is_float:
        bits = np.ascontiguousarray(array).view(np.uint8)
        return bits & np.uint8(0x0F) if t.bits == 4 else bits
    return array.astype(t.storage)


def from_storage(value: Any, dtype: str) -> np.ndarray:
    """A storage array back as the low-precision dtype ``dtype``; other dtypes unchanged."""
    t = _BY_NAME.get(dtype)
    array = np.asarray(value)
    if t is None or array.dtype != np.dtype(t.storage):
        return array
    if t.is_float:
        return np.ascontiguousarray(array).view(ml_dtype(dtype))
    return array.astype(ml_dtype(dtype))


def random_array(rng: np.random.Generator, shape: tuple, dtype: str) -> np.ndarray | None:
    """Seeded random values of the low-precision dtype ``dtype`` (standard normal rounded to a
    float format, or the whole range of an integer type); ``None`` for other dtypes."""
    t = _BY_NAME.get(dtype)
    if t is None:
        return None
    if t.is_float:
        values = rng.standard_normal(shape).astype(np.float32)
        return (values if t.signed else np.abs(values)).astype(ml_dtype(dtype))  # e8m0: no sign
    lo, hi = (-(1 << (t.bits - 1)), 1 << (t.bits - 1)) if t.signed else (0, 1 << t.bits)
    return rng.integers(lo, hi, shape).astype(ml_dtype(dtype))


def inputs_to_storage(specs: Sequence[Any], inputs: Sequence[Any]) -> list:
    """Inputs ordered as ``specs`` (manifest dicts or ``TensorSpec``), each as its storage."""
    return [to_storage(x, _spec_dtype(s)) for s, x in zip(specs, inputs)]


def outputs_from_storage(specs: Sequence[Any], outputs: Sequence[Any]) -> list:
    """Outputs ordered as ``specs``, low-precision ones back in their ONNX dtype."""
    return [from_storage(y, _spec_dtype(s)) for s, y in zip(specs, outputs)]


def _spec_dtype(spec: Any) -> str:
    return spec["dtype"] if isinstance(spec, dict) else spec.dtype


def _tensor_to_storage(tensor: onnx.TensorProto) -> onnx.TensorProto:
    t = LOW_PRECISION[tensor.data_type]
    array = to_storage(numpy_helper.to_array(tensor), t.name)
    return numpy_helper.from_array(np.asarray(array, dtype=t.storage), tensor.name)


# --- the graph rewrite --------------------------------------------------------------------------
def uses_low_precision(proto: onnx.ModelProto) -> bool:
    """Whether the main graph declares, stores, casts to or quantises with an emulated type, or
    quantises per block (both are rewritten by ``lower_low_precision``)."""
    g = proto.graph
    declared = [vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)]
    if any(e in LOW_PRECISION for e in declared):
        return True
    if any(t.data_type in LOW_PRECISION for t in g.initializer):
        return True
    for node in g.node:
        for a in node.attribute:
            if a.name in ("to", "output_dtype") and a.i in LOW_PRECISION:
                return True
            if a.name == "block_size" and a.i > 0:
                return True
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in LOW_PRECISION:
                return True
    return False


def lower_low_precision(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every emulated element type in storage and the ops converting to or from
    one (and blocked quantisation) decomposed; ``proto`` itself when it uses none.

    Raises
    ------
    CompileError
        For an op other than a conversion or data movement on an emulated type, or one inside a
        subgraph (If/Loop/Scan bodies), which are not rewritten.
    """
    if not uses_low_precision(proto):
        return proto
    return _Lowering(proto).run()


class _Lowering:
    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list] = {}
        try:  # inferred types of intermediates (best effort: a model may defeat inference)
            inferred = onnx.shape_inference.infer_shapes(proto).graph
        except Exception:  # noqa: BLE001 - the declared types are then all there is
            inferred = proto.graph
        g = proto.graph
        for vi in (*inferred.value_info, *g.value_info, *g.input, *g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
                ]
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = list(t.dims)
        self.nodes: list[onnx.NodeProto] = []
        self.counter = 0

    # -- helpers that append nodes and return the new value's name --
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__lowprec{self.counter}"

    def add(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(inputs[0] if inputs else op)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        out = self.fresh(hint)
        self.nodes.append(
            helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out))
        )
        return out

    def cast(self, x: str, to: int, out: str | None = None) -> str:
        return self.add("Cast", [x], out, to=to)

    def low(self, name: str) -> LowPrecType | None:
        return LOW_PRECISION.get(self.types.get(name, 0))

    def decode(self, x: str, t: LowPrecType) -> str:
        """Storage ``x`` of type ``t`` as float32 (float formats) or its storage integers."""
        if not t.is_float:
            return x
        index = self.cast(x, TensorProto.INT32)
        return self.add("Gather", [self.const(decode_table(t), f"{t.name}_table"), index], axis=0)

    def encode(self, x: str, t: LowPrecType, out: str, saturate: int = 1, round_mode="up"):
        mode = round_mode.decode() if isinstance(round_mode, bytes) else round_mode
        if mode not in ROUND_MODES:
            raise CompileError(
                f"Cast round_mode {mode!r} is not an ONNX round mode. fix: use one of "
                + ", ".join(ROUND_MODES)
            )
        self.add(
            ENCODE_OP,
            [x],
            out,
            to=t.onnx_type,
            saturate=int(saturate),
            round_mode=ROUND_MODES[mode],
        )

    # -- the rewrite --
    def run(self) -> onnx.ModelProto:
        g = self.proto.graph
        for node in g.node:
            self.check_subgraphs(node)
            handler = getattr(self, f"lower_{node.op_type}", None)
            if node.domain in ("", "ai.onnx") and handler is not None and handler(node):
                continue
            self.plain(node)
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        graph = out.graph
        for vi in (*graph.input, *graph.output, *graph.value_info):
            t = LOW_PRECISION.get(vi.type.tensor_type.elem_type)
            if t is not None:
                vi.type.tensor_type.elem_type = _STORAGE_ONNX[t.storage]
        inits = [
            _tensor_to_storage(t) if t.data_type in LOW_PRECISION else t for t in graph.initializer
        ]
        del graph.initializer[:]
        graph.initializer.extend(inits)
        del graph.node[:]
        graph.node.extend(self.nodes)
        return out

    def check_subgraphs(self, node: onnx.NodeProto) -> None:
        for a in node.attribute:
            graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in graphs:
                probe = onnx.ModelProto()
                probe.graph.CopyFrom(sub)
                if uses_low_precision(probe):
                    raise CompileError(
                        f"{node.op_type} node {node.name!r}: its subgraph uses a low-precision "
                        "type (float8/float4/int4/int2), which qiao emulates in the main graph "
                        "only. fix: move the conversions out of the subgraph"
                    )

    def plain(self, node: onnx.NodeProto) -> None:
        """A node kept as is: fine on storage when it only moves elements."""
        lows = [self.low(n) for n in node.input if n] + [
            LOW_PRECISION.get(a.t.data_type) for a in node.attribute if a.type == a.TENSOR
        ]
        lows = [t for t in lows if t is not None]
        if lows and node.op_type not in _DATA_MOVEMENT:
            raise CompileError(
                f"{node.op_type} node {node.name!r} takes a {lows[0].name} tensor; qiao emulates "
                f"{lows[0].name} for Cast, CastLike, QuantizeLinear, DequantizeLinear and data "
                "movement only. fix: cast to float32 (or the integer type) before the op"
            )
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for a in new.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in LOW_PRECISION:
                a.t.CopyFrom(_tensor_to_storage(a.t))
        self.nodes.append(new)
        data = next((t for t in lows), None)
        if data is not None:  # outputs of data movement keep the type (Shape/Size give int64)
            for out in new.output:
                if node.op_type not in ("Shape", "Size") and out not in self.types:
                    self.types[out] = data.onnx_type
                if node.op_type in ("Shape", "Size"):
                    self.types[out] = TensorProto.INT64

    def lower_Cast(self, node: onnx.NodeProto) -> bool:  # noqa: N802
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return self.convert(node.input[0], attrs["to"], node.output[0], attrs)

    def lower_CastLike(self, node: onnx.NodeProto) -> bool:  # noqa: N802
        to = self.types.get(node.input[1])
        if to is None:
            if self.low(node.input[0]) is None:
                return False
            raise CompileError(
                f"CastLike node {node.name!r}: the type of {node.input[1]!r} is unknown. fix: "
                "declare it (value_info) or use Cast"
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return self.convert(node.input[0], to, node.output[0], attrs)

    def convert(self, x: str, to: int, out: str, attrs: dict) -> bool:
        src, dst = self.low(x), LOW_PRECISION.get(to)
        self.types[out] = to
        if src is None and dst is None:
            return False
        wide = self.decode(x, src) if src is not None else x
        if dst is None:
            self.cast(wide, to, out)
        else:
            self.encode(wide, dst, out, attrs.get("saturate", 1), attrs.get("round_mode", "up"))
        return True

    def lower_IsNaN(self, node: onnx.NodeProto) -> bool:  # noqa: N802
        """IsNaN/IsInf of a float8/float4 tensor: the same op on its decoded float32 values."""
        t = self.low(node.input[0])
        if t is None or not t.is_float:
            return False
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[0] = self.decode(node.input[0], t)
        self.nodes.append(new)
        self.types[node.output[0]] = TensorProto.BOOL
        return True

    lower_IsInf = lower_IsNaN  # noqa: N815

    # -- QuantizeLinear / DequantizeLinear --
    def broadcast_param(self, p: str, x: str, axis: int, block: int, what: str) -> str:
        """Scale or zero point ``p`` shaped to broadcast against ``x``, as onnx's reference
        ``reshape_input`` does: per tensor, per axis, or repeated per block."""
        pshape, xshape = self.shapes.get(p), self.shapes.get(x)
        if pshape is None:
            raise CompileError(f"{what}: the shape of {p!r} is unknown. fix: declare it")
        if int(np.prod(pshape)) == 1 and None not in pshape:
            return self.add("Reshape", [p, self.const(np.zeros(0, np.int64), "scalar")])
        if xshape is None:
            raise CompileError(f"{what}: the rank of {x!r} is unknown. fix: declare its shape")
        axis = axis % len(xshape)
        if not block:
            dims = np.ones(len(xshape), np.int64)
            dims[axis] = -1
            return self.add("Reshape", [p, self.const(dims, "axis_shape")])
        if xshape[axis] is None:
            raise CompileError(
                f"{what}: blocked quantisation needs a static size of axis {axis} of {x!r}. "
                "fix: give the input a static shape"
            )
        index = np.arange(xshape[axis], dtype=np.int64) // block
        return self.add("Gather", [p, self.const(index, "block_index")], axis=axis)

    def lower_QuantizeLinear(self, node: onnx.NodeProto) -> bool:  # noqa: N802
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        target = self.types.get(zp) if zp else (attrs.get("output_dtype") or TensorProto.UINT8)
        block = attrs.get("block_size", 0)
        t = LOW_PRECISION.get(target or 0)
        self.types[node.output[0]] = target or TensorProto.UINT8
        if t is None and not block:
            return False
        if target is None:
            raise CompileError(
                f"QuantizeLinear node {node.name!r}: the type of zero point {zp!r} is unknown. "
                "fix: declare it (value_info)"
            )
        what = f"QuantizeLinear node {node.name!r}"
        axis = attrs.get("axis", 1)
        s = self.broadcast_param(scale, x, axis, block, what)
        precision = attrs.get("precision", 0)
        xt, st = self.types.get(x), self.types.get(scale)
        if precision:
            x, s = self.cast(x, precision), self.cast(s, precision)
        elif xt != st or xt is None:
            x, s = self.cast(x, TensorProto.FLOAT), self.cast(s, TensorProto.FLOAT)
        q = self.cast(self.add("Div", [x, s]), TensorProto.FLOAT)
        zpb = self.broadcast_param(zp, node.input[0], axis, block, what) if zp else None
        out = node.output[0]
        if t is not None and t.is_float:
            if zpb is not None and t.special == "none":  # onnx adds a float4 zero point
                q = self.add("Add", [q, self.decode(zpb, t)])
            # float8 zero points must be 0 and onnx's reference ignores them
            self.encode(q, t, out, attrs.get("saturate", 1))
            return True
        lo, hi = _integer_range(target)
        y = self.add("Round", [q])
        if zpb is not None:
            y = self.add("Add", [y, self.cast(zpb, TensorProto.FLOAT)])
        y = self.add(
            "Clip",
            [y, self.const(np.float32(lo), "qmin"), self.const(np.float32(hi), "qmax")],
        )
        self.cast(y, _STORAGE_ONNX[t.storage] if t is not None else target, out)
        return True

    def lower_DequantizeLinear(self, node: onnx.NodeProto) -> bool:  # noqa: N802
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        block = attrs.get("block_size", 0)
        t = self.low(x)
        st = self.types.get(scale, TensorProto.FLOAT)
        to = attrs.get("output_dtype") or st
        self.types[node.output[0]] = to
        if t is None and not block:
            return False
        what = f"DequantizeLinear node {node.name!r}"
        axis = attrs.get("axis", 1)
        dx = self.cast(self.decode(x, t) if t is not None else x, TensorProto.FLOAT)
        if zp is not None and (t is None or not t.is_float):  # float zero points are ignored
            zpb = self.broadcast_param(zp, x, axis, block, what)
            dx = self.add("Sub", [dx, self.cast(zpb, TensorProto.FLOAT)])
        s = self.cast(self.broadcast_param(scale, x, axis, block, what), TensorProto.FLOAT)
        self.cast(self.add("Mul", [dx, s]), to, node.output[0])
        return True


def _integer_range(elem_type: int) -> tuple[int, int]:
    t = LOW_PRECISION.get(elem_type)
    if t is not None and t.signed:
        return -(1 << (t.bits - 1)), (1 << (t.bits - 1)) - 1
    if t is not None:
        return 0, (1 << t.bits) - 1
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(elem_type))
    return int(info.min), int(info.max)


__all__ = [
    "ENCODE_OP",
    "LOW_PRECISION",
    "LowPrecType",
    "decode_table",
    "from_storage",
    "inputs_to_storage",
    "lower_low_precision",
    "outputs_from_storage",
    "random_array",
    "to_storage",
    "uses_low_precision",
]
