"""Converters for ONNX Runtime's weight-only quantized operators: ``com.microsoft`` ``MatMulNBits``,
``GatherBlockQuantized`` and ``QMoE``. TVM has none of them.

Layouts (ONNX Runtime 1.32's contrib op contract, checked against its CPU kernels in
``tests/test_quant_ops.py``):

``MatMulNBits`` — ``Y = A @ dequant(B)^T (+ bias)``, attributes ``K``, ``N``, ``bits`` (2/4/8),
``block_size`` (a power of 2, >= 16), ``accuracy_level``.

- ``B``: uint8 ``[N, n_blocks, blob_size]``, ``n_blocks = ceil(K / block_size)``, ``blob_size =
  block_size * bits / 8``. Row ``n`` holds column ``n`` of the ``[K, N]`` weight; its codes run
  along K and are packed low bits first (4-bit: code ``2i`` in the low nibble of byte ``i``,
  ``2i + 1`` in the high one; 2-bit: four per byte, bits 0-1 first). The last block is padded
  to ``block_size`` codes; the padding is ignored.
- ``scales``: ``[N * n_blocks]`` or ``[N, n_blocks]``, the dtype of ``A``.
- ``zero_points`` (optional): uint8 packed per row like ``B``: ``[N * ceil(n_blocks * bits / 8)]``
  (each row padded to whole bytes), or ``[N, n_blocks]`` of the dtype of ``A`` (unpacked, may
  be fractional). Default ``2^(bits - 1)``.
- ``g_idx`` (optional, int32 ``[K]``): the block of each k (GPTQ act-order); default ``k //
  block_size``.
- ``bias`` (optional): ``[N]``.
- ``W[k, n] = (code[n, k] - zero_point[n, block(k)]) * scale[n, block(k)]``.

``accuracy_level`` chooses the compute type (ONNX Runtime: 4 quantizes the activations to int8
per block). qiao computes the exact dequantize-then-float32 result at levels 0-3; at level 4 its
packed CPU kernel does what ONNX Runtime does (int8 activations per block, integer dot products)
where the target has them (AVX2, AVX-512BW, VNNI), and the exact result elsewhere.

``GatherBlockQuantized`` — ``Y = dequant(data)[..., indices, ...]`` gathered along
``gather_axis`` (default 0; negative indices count from the end): ``data`` uint8, two 4-bit codes
per byte (low nibble first, along the last axis; ``bits`` 4, the default) or one 8-bit code;
``scales`` has ``data``'s logical shape with ``quantize_axis`` (default last) divided (rounded
up) by ``block_size`` (default 128); ``zero_points`` packed like ``data``. Default zero point 8
(4-bit) or 128 (8-bit). ``data`` of type int4/uint4 (also allowed by ONNX Runtime) is refused
earlier, by ``lowprec``'s rewrite, with a CompileError.

``QMoE`` (quant_type ``'int'``) — a ``com.microsoft::MoE`` whose expert weights are stored as
uint8 ``[E, N, K * bits / 8]`` rows (``MatMulNBits``'s packing, the row-major ``[N, K]`` weight of
each expert), with ``fc*_scales`` ``[E, N]`` (per output column, no ``block_size``) or ``[E, N, K /
block_size]``, optional uint8 ``fc*_zero_points`` packed like the weights (per column: ``[E,
ceil(N * bits / 8)]``, packed along N; block-wise: ``[E, N, ceil(K / block_size * bits / 8)]``),
``expert_weight_bits`` (default 4) with per-projection ``fc*_expert_weight_bits`` overrides.
ONNX Runtime 1.32's CPU kernel runs SwiGLU only with ``swiglu_fusion=1``, and computes block-wise
8-bit experts (and 4-bit ones at ``accuracy_level=4``) with int8 activations.

``MatMulNBits`` with 4- or 8-bit codes in block order (no ``g_idx``) and float32 activations
keeps its weights packed: the converter emits a ``qiao.matmul_nbits`` placeholder holding the
packed bytes, scales and zero points as constants, which ``qiao.compiler.passes.lower_quant``
turns into qiao's int4/int8 CPU kernel (``qiao.compiler.kernels.quant_gemm``: a GEMV reading each
weight byte once, dequantizing in registers) or, on GPU targets, into the dequantized fallback.
``QMoE`` with 4- or 8-bit experts keeps them packed too (``LowerMoE`` and
``qiao.compiler.kernels.quant_moe``). ``GatherBlockQuantized`` in the common layout (rows
gathered, ``gather_axis`` 0; blocks along the last axis; ``block_size`` a power of 2 >= 16,
the last block possibly ragged; zero points absent, packed uint8 or float) keeps its table
packed on every target: the uint8 rows, their scales and zero points are gathered at run time
and only those rows are dequantized, by elementwise Relax ops that TVM fuses into one kernel
(Qwen3-0.6B's int4 151936 x 1024 embedding: 78 MB of codes and 19 MB of float32 scales at
block_size 32, instead of a 622 MB float32 table).
Everything else (2-bit codes, act-order ``g_idx``, float16 activations, other
``GatherBlockQuantized`` layouts) is dequantized here, at import, into a float weight and
becomes a plain ``matmul`` / ``take`` / MoE: exact and runs everywhere, but reads four bytes
per weight.
Float scales of 64 or more elements arrive as run-time parameters of ``main`` (see
``importer``): their values are read from the importer's parameter table and the parameter
stays, unused, in ``main``'s signature.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter


def _known_array(value, params, op: str, what: str) -> np.ndarray:
    """The NumPy value of a constant input: a ``tvm.ir.GenericConst``, or a float initializer
    the importer made a run-time parameter (``params[1]``: name -> (var, array))."""
    if isinstance(value, tvm.ir.GenericConst):
        return value.value.numpy()
    for var, array in params[1].values():
        if var.same_as(value):
            return array.numpy() if hasattr(array, "numpy") else np.asarray(array)
    raise CompileError(
        f"{op}: {what} must be a constant (an initializer); qiao dequantizes quantized weights "
        "at import. fix: store the quantized weight, scales and zero points as initializers"
    )


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack the last axis of uint8 ``packed`` into ``count`` ``bits``-bit codes, low bits first.

    Parameters
    ----------
    packed : np.ndarray
        uint8 bytes, ``8 // bits`` codes each along the last axis.
    bits : int
        2, 4 or 8.
    count : int
        Codes to keep per row (the rest is padding).

    Returns
    -------
    np.ndarray
        uint8 codes, shape ``packed.shape[:-1] + (count,)``.
    """
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :count]


def dequantize_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    g_idx: np.ndarray | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The float weight ``[K, N]`` of a ``MatMulNBits`` node (layout in the module docstring).

    Returns
    -------
    np.ndarray
        float32 ``[K, N]``: ``W[k, n] = (code - zero_point) * scale``.
    """
    n_blocks = -(-k // block_size)
    codes = unpack_codes(b.reshape(n, -1), bits, n_blocks * block_size)[:, :k].astype(np.float32)
    scale = scales.astype(np.float32).reshape(n, n_blocks)
    if zero_points is None:
        zp = np.full((n, n_blocks), float(1 << (bits - 1)), np.float32)
    elif zero_points.dtype == np.uint8:
        zp = unpack_codes(zero_points.reshape(n, -1), bits, n_blocks).astype(np.float32)
    else:
        zp = zero_points.astype(np.float32).reshape(n, n_blocks)
    block = np.arange(k) // block_size if g_idx is None else g_idx.astype(np.int64).reshape(k)
    if block.min() < 0 or block.max() >= n_blocks:
        raise CompileError(
            f"MatMulNBits: g_idx holds a block index outside [0, {n_blocks}). "
            "fix: re-export the model; g_idx[k] is the block of row k"
        )
    return np.ascontiguousarray(((codes - zp[:, block]) * scale[:, block]).T)


def check_nbits_shapes(b, scales, zero_points, k, n, bits, block_size):
    n_blocks = -(-k // block_size)
    blob = block_size * bits // 8
    problems = []
    if b.size != n * n_blocks * blob:
        problems.append(f"B has {b.shape}, expected [{n}, {n_blocks}, {blob}]")
    if scales.size != n * n_blocks:
        problems.append(f"scales has {scales.shape}, expected [{n * n_blocks}]")
    if zero_points is not None:
        expected = n * -(-n_blocks * bits // 8) if zero_points.dtype == np.uint8 else n * n_blocks
        if zero_points.size != expected:
            problems.append(f"zero_points has {zero_points.shape}, expected {expected} elements")
    if problems:
        raise CompileError(
            f"MatMulNBits (K={k}, N={n}, bits={bits}, block_size={block_size}): "
            + "; ".join(problems)
            + ". fix: re-export the model with ONNX Runtime's matmul_nbits_quantizer"
        )


def _input(inputs, i):
    return inputs[i] if len(inputs) > i and inputs[i] is not None else None


@register_converter("MatMulNBits", ("com.microsoft",))
class MatMulNBits(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::MatMulNBits`` with constant quantized weights: dequantized at import."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        k, n = int(attr["K"]), int(attr["N"])
        bits = int(attr.get("bits", 4))
        block_size = int(attr["block_size"])
        if bits not in (2, 4, 8):
            raise CompileError(
                f"MatMulNBits: bits={bits} is not supported by qiao (2, 4 or 8). "
                "fix: quantize the weights to 2, 4 or 8 bits"
            )
        if block_size < 16 or block_size & (block_size - 1):
            raise CompileError(
                f"MatMulNBits: block_size={block_size} must be a power of 2, at least 16. "
                "fix: re-quantize with such a block size"
            )
        arrays = {}
        for i, name in enumerate(("B", "scales", "zero_points", "g_idx")):
            value = _input(inputs, i + 1)
            arrays[name] = (
                None if value is None else _known_array(value, params, "MatMulNBits", name)
            )
        check_nbits_shapes(
            arrays["B"], arrays["scales"], arrays["zero_points"], k, n, bits, block_size
        )
        a = inputs[0]
        bias = _input(inputs, 5)
        if packed_kernel_covers(a, bits, arrays["g_idx"]):
            return emit_matmul_nbits(
                bb, a, arrays["B"], arrays["scales"], arrays["zero_points"], bias,
                k, n, bits, block_size, int(attr.get("accuracy_level", 0)),
            )  # fmt: skip
        weight = dequantize_nbits(
            arrays["B"], arrays["scales"], arrays["zero_points"], arrays["g_idx"],
            k, n, bits, block_size,
        )  # fmt: skip
        y = relax.op.matmul(a, relax.const(weight.astype(str(a.ty.dtype))))
        if bias is not None:
            y = relax.op.add(y, bias)
        return y


def packed_kernel_covers(a, bits: int, g_idx) -> bool:
    """Whether a ``MatMulNBits`` node goes through the ``qiao.matmul_nbits`` placeholder (packed
    weights, lowered by ``LowerQuant``): 4- and 8-bit codes in block order (no ``g_idx``) against
    float32 activations. Other nodes are dequantized here (2-bit, act-order, float16)."""
    return bits in (4, 8) and g_idx is None and str(a.ty.dtype) == "float32"


def emit_matmul_nbits(bb, a, b, scales, zero_points, bias, k, n, bits, block_size, level=0):
    """The ``qiao.matmul_nbits`` placeholder for ``Y = A @ dequant(B)^T (+ bias)``: ``A`` as a
    ``[M, K]`` matrix, the weight, scales and zero points as constants in ONNX Runtime's layout,
    the shapes in a JSON config (``qiao.compiler.passes.lower_quant`` describes the call)."""
    import json

    from qiao.compiler.passes.lower_quant import MATMUL_NBITS_EXTERN

    shape = list(a.ty.shape)
    if int(shape[-1]) != k:
        raise CompileError(
            f"MatMulNBits: A has {shape[-1]} features, the node's K is {k}. fix: re-export the "
            "model so that K matches the input"
        )
    rows = 1
    for d in shape[:-1]:
        rows = rows * d
    a2 = a if len(shape) == 2 else bb.normalize(relax.op.reshape(a, relax.ShapeExpr([rows, k])))
    zp_kind = "default"
    if zero_points is not None:
        zp_kind = "uint8" if zero_points.dtype == np.uint8 else "float32"
    placeholder = relax.const(np.zeros((1,), "float32"))
    config = {
        "k": k,
        "n": n,
        "bits": bits,
        "block_size": block_size,
        "zero_points": zp_kind,
        "accuracy_level": level,
    }
    args = [
        a2,
        relax.const(np.ascontiguousarray(b, np.uint8).reshape(n, -1)),
        relax.const(scales.astype(np.float32).reshape(n, -1)),
        placeholder if zero_points is None else relax.const(zero_points.reshape(n, -1)),
        placeholder if bias is None else bias,
        tvm.ir.StringImm(json.dumps({**config, "bias": bias is not None}, sort_keys=True)),
    ]
    y = bb.emit(
        relax.call_dps_packed(
            MATMUL_NBITS_EXTERN, args, relax.TensorType((a2.ty.shape[0], n), "float32")
        )
    )
    if len(shape) != 2:
        y = relax.op.reshape(y, relax.ShapeExpr([*shape[:-1], n]))
    return y


@register_converter("GatherBlockQuantized", ("com.microsoft",))
class GatherBlockQuantized(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::GatherBlockQuantized`` with a constant table.

    The common layout (``gather_axis`` 0, ``quantize_axis`` the last axis of a table of rank 2 or
    more, ``block_size`` a power of 2 of at least 16, the last block possibly ragged; zero points
    absent, packed uint8 or float) stays packed: the uint8 rows, their scales and zero points are
    taken at run time (``packed_gather``) and only those rows are dequantized, by elementwise ops
    that TVM fuses into one kernel. Any other layout is dequantized at import into a float table,
    then a plain ``take``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        op = "GatherBlockQuantized"
        data = _known_array(inputs[0], params, op, "data")
        scales = _known_array(inputs[2], params, op, "scales")
        zp_in = _input(inputs, 3)
        zero_points = None if zp_in is None else _known_array(zp_in, params, op, "zero_points")
        bits = int(attr.get("bits", 4))
        block_size = int(attr.get("block_size", 128))
        gather_axis = int(attr.get("gather_axis", 0))
        quantize_axis = int(attr.get("quantize_axis", -1))
        if bits not in (4, 8) or data.dtype != np.uint8:
            raise CompileError(
                f"{op}: bits={bits} with {data.dtype} data is not supported by qiao (uint8 "
                "data, 4-bit packed or 8-bit). fix: re-quantize the table to that layout"
            )
        rank = data.ndim
        q_axis = quantize_axis % rank
        logical = data.shape[:-1] + (data.shape[-1] * (8 // bits),)
        if scales.shape[q_axis] != -(-logical[q_axis] // block_size):
            raise CompileError(
                f"{op}: scales {scales.shape} do not match data {logical} with "
                f"block_size={block_size} on axis {q_axis}. fix: re-quantize the table"
            )
        indices = inputs[1]
        # ONNX Gather semantics: negative indices count from the end.
        size = logical[gather_axis % rank]
        wrapped = relax.op.where(
            relax.op.less(indices, relax.const(0, indices.ty.dtype)),
            relax.op.add(indices, relax.const(size, indices.ty.dtype)),
            indices,
        )
        wrapped = bb.normalize(wrapped)
        covered = packed_gather_covers(
            data, scales, zero_points, bits, block_size, gather_axis, q_axis
        )
        if covered and getattr(wrapped.ty, "shape", None) is not None:
            source = inputs[0] if isinstance(inputs[0], tvm.ir.GenericConst) else None
            return packed_gather(bb, wrapped, data, scales, zero_points, bits, block_size, source)
        table = dequantize_table(data, scales, zero_points, bits, block_size, q_axis)
        return relax.op.take(relax.const(table), wrapped, axis=gather_axis % rank)


def dequantize_table(data, scales, zero_points, bits, block_size, q_axis) -> np.ndarray:
    """The float table of a ``GatherBlockQuantized`` node (layout in the module docstring), in
    the scales' dtype: ``(code - zero_point) * scale`` computed in float32."""
    packed = bits == 4
    codes = unpack_codes(data, bits, data.shape[-1] * (8 // bits)).astype(np.float32)
    if zero_points is None:
        zp = np.full(scales.shape, float(1 << (bits - 1)), np.float32)
    elif packed and zero_points.dtype == np.uint8:
        zp = unpack_codes(zero_points, 4, scales.shape[-1]).astype(np.float32)
    else:  # 8-bit: one zero point per byte; a float zero point is used as it is
        zp = zero_points.astype(np.float32)
    zp = zp.reshape(scales.shape)
    # Expand the per-block scale and zero point along the quantized axis.
    expand = np.arange(codes.shape[q_axis]) // block_size
    scale = np.take(scales.astype(np.float32), expand, axis=q_axis)
    zp = np.take(zp, expand, axis=q_axis)
    return ((codes - zp) * scale).astype(scales.dtype)


def packed_gather_covers(data, scales, zero_points, bits, block_size, gather_axis, q_axis) -> bool:
    """Whether a ``GatherBlockQuantized`` node keeps its table packed (``packed_gather``): rows
    gathered (``gather_axis`` 0) and blocks along the last axis of a table of rank 2 or more,
    4- or 8-bit uint8 codes, ``block_size`` a power of 2 of at least 16, float scales of the table's
    shape with ``ceil(columns / block_size)`` blocks per row, and zero points absent, uint8
    packed like the codes along the last axis, or float of the scales' shape."""
    rank = data.ndim
    if rank < 2 or gather_axis % rank != 0 or q_axis != rank - 1 or bits not in (4, 8):
        return False
    if block_size < 16 or block_size & (block_size - 1):
        return False
    columns = data.shape[-1] * (8 // bits)
    n_blocks = -(-columns // block_size)
    if scales.shape != data.shape[:-1] + (n_blocks,) or scales.dtype.kind != "f":
        return False
    if zero_points is None:
        return True
    if zero_points.dtype == np.uint8:
        zp_bytes = -(-n_blocks // 2) if bits == 4 else n_blocks
        return zero_points.shape == data.shape[:-1] + (zp_bytes,)
    return zero_points.dtype.kind == "f" and zero_points.shape == scales.shape


def packed_gather(bb, indices, data, scales, zero_points, bits, block_size, data_const=None):
    """``dequant(data)[indices]`` for the layout ``packed_gather_covers`` takes, with the table
    kept packed: ``take`` of the uint8 rows, their scales and zero points (constants, rows along
    axis 0), then elementwise on the gathered rows only: 4-bit codes unpacked low nibble first
    (``bitwise_and`` 15 / ``right_shift`` 4 of each byte, as ``unpack_codes``), each block's
    scale and zero point repeated along the row (cut to the row's length: a ragged last block),
    ``(code - zero_point) * scale`` in float32, cast to the scales' dtype. With 4-bit codes the
    arithmetic runs on ``[..., bytes, 2]`` (a byte's two codes share their block), reshaped to
    ``[..., columns]`` at the end (a view), so TVM fuses the unpacking and dequantization into
    one kernel after the row gathers. ``indices`` are already wrapped (no negative ones) and of
    known rank; ``data_const``, the node's own constant holding ``data`` (used instead of a
    copy), or None."""
    per = 8 // bits
    row_bytes = data.shape[-1]
    last = len(indices.ty.shape) + data.ndim - 2  # the rows' last axis (strided_slice: >= 0)

    def rows(array, const=None):
        const = relax.const(np.ascontiguousarray(array)) if const is None else const
        return bb.normalize(relax.op.take(const, indices, axis=0))

    def nibbles(packed_rows):  # uint8 [..., n] -> [..., n, 2]: low nibble, high nibble
        low = relax.op.bitwise_and(packed_rows, relax.const(15, "uint8"))
        high = relax.op.right_shift(packed_rows, relax.const(4, "uint8"))
        return relax.op.stack([low, high], axis=last + 1)

    def per_byte(per_block):  # [..., n_blocks] -> float32 [..., row_bytes] (+ [1] for 4-bit)
        wide = relax.op.repeat(relax.op.astype(per_block, "float32"), block_size // per, last)
        if -(-row_bytes * per // block_size) * block_size != row_bytes * per:
            wide = relax.op.strided_slice(wide, [last], [0], [row_bytes])
        return wide if per == 1 else relax.op.expand_dims(wide, last + 1)

    code = rows(data, data_const)
    code = relax.op.astype(nibbles(code) if per == 2 else code, "float32")
    if zero_points is None:
        zp = relax.const(float(1 << (bits - 1)), "float32")
    else:
        zp = rows(zero_points)
        if per == 2 and zero_points.dtype == np.uint8:
            # packed along the row; an odd block count leaves a padding nibble, cut here
            shape = list(zp.ty.shape)
            zp = relax.op.reshape(nibbles(zp), relax.ShapeExpr([*shape[:-1], shape[-1] * 2]))
            zp = relax.op.strided_slice(zp, [last], [0], [scales.shape[-1]])
        zp = per_byte(zp)
    y = relax.op.multiply(relax.op.subtract(code, zp), per_byte(rows(scales)))
    if scales.dtype != np.float32:
        y = relax.op.astype(y, str(scales.dtype))
    if per == 2:
        shape = list(bb.normalize(y).ty.shape)
        y = relax.op.reshape(y, relax.ShapeExpr([*shape[:-2], shape[-2] * 2]))
    return y


# ------------------------------------------------------------------------------------------------
# QMoE
# ------------------------------------------------------------------------------------------------
# QMoE's inputs, in order (ONNX Runtime 1.32's schema); the fp8/fp4 ones after router_weights are
# never present with quant_type='int', the only type qiao takes.
QMOE_INPUTS = (
    "input", "router_probs",
    "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
    "fc1_zero_points", "fc2_zero_points", "fc3_zero_points",
    "router_weights",
)  # fmt: skip
# Attributes of QMoE that are about the weights' storage: what remains is a MoE node's.
QMOE_ONLY_ATTRS = (
    "expert_weight_bits", "fc1_expert_weight_bits", "fc2_expert_weight_bits",
    "fc3_expert_weight_bits", "block_size", "quant_type", "weights_prepacked", "accuracy_level",
)  # fmt: skip


def quant_experts(
    weights: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    k: int,
    what: str = "fc",
):
    """One ``QMoE`` projection (quant_type 'int') checked and normalised: a
    ``qiao.compiler.kernels.quant_moe.QuantExperts`` (codes as stored, scales ``[E, N, n_blocks]``
    float32, zero points unpacked to uint8 ``[E, N, n_blocks]``; ``n_blocks`` 1 per column).

    Parameters
    ----------
    weights : np.ndarray
        uint8 ``[E, N, K * bits / 8]``: row ``n`` of expert ``e`` holds its K codes, low bits first
        (the ``MatMulNBits`` packing, without per-block padding).
    scales : np.ndarray
        ``[E, N]`` (per output column: one scale over all of K) or, with ``block_size``,
        ``[E, N, K / block_size]``.
    zero_points : np.ndarray or None
        uint8, packed like the weights: ``[E, ceil(N * bits / 8)]`` (per column: packed along N)
        or ``[E, N, ceil(K / block_size * bits / 8)]`` (block-wise); None: ``2^(bits - 1)``.
    bits : int
        2, 4 or 8.
    block_size : int
        0: per-column scales.
    k : int
        The input features (hidden size for fc1/fc3, intermediate size for fc2).
    """
    from qiao.compiler.kernels.quant_moe import QuantExperts

    where = f"QMoE {what}"
    if weights.ndim != 3 or weights.dtype != np.uint8 or weights.shape[2] * 8 != k * bits:
        raise CompileError(
            f"{where}: weights {weights.dtype}{list(weights.shape)} do not hold {k} {bits}-bit "
            f"codes per row (expected uint8 [E, N, {k * bits // 8}]). fix: re-quantize the "
            "experts with ONNX Runtime's quantize_matmul_4bits/8bits layout"
        )
    e, n = weights.shape[:2]
    if block_size:
        if k % block_size:
            raise CompileError(
                f"{where}: K={k} is not a multiple of block_size={block_size}. fix: QMoE needs "
                "the hidden and intermediate sizes divisible by the block size"
            )
        n_blocks = k // block_size
        if scales.size != e * n * n_blocks:
            raise CompileError(
                f"{where}: scales {list(scales.shape)}, expected [{e}, {n}, {n_blocks}]. fix: "
                "re-quantize the experts with this block_size"
            )
        zero = None
        if zero_points is not None:
            zero = unpack_codes(zero_points.reshape(e, n, -1), bits, n_blocks)
    else:
        if scales.size != e * n:
            raise CompileError(
                f"{where}: scales {list(scales.shape)}, expected [{e}, {n}] (no block_size: one "
                "scale per output column). fix: set block_size or re-quantize per column"
            )
        n_blocks = 1
        zero = None
        if zero_points is not None:
            zero = unpack_codes(zero_points.reshape(e, -1), bits, n).reshape(e, n, 1)
    return QuantExperts(
        codes=np.ascontiguousarray(weights),
        scales=np.ascontiguousarray(scales.astype(np.float32).reshape(e, n, n_blocks)),
        zero=None if zero is None else np.ascontiguousarray(zero, np.uint8),
        bits=bits,
        k=k,
    )


def _join_experts(fc1, fc3):
    """fc1 and fc3 experts as one projection with fc3's rows under fc1's (``swiglu_fusion=2``):
    None when their bits or blocks differ."""
    from qiao.compiler.kernels.quant_moe import QuantExperts

    if fc1.bits != fc3.bits or fc1.scales.shape[2] != fc3.scales.shape[2]:
        return None

    def zero(q):
        if q.zero is not None:
            return q.zero
        return np.full(q.scales.shape, 1 << (q.bits - 1), np.uint8)

    both_default = fc1.zero is None and fc3.zero is None
    return QuantExperts(
        codes=np.concatenate([fc1.codes, fc3.codes], axis=1),
        scales=np.concatenate([fc1.scales, fc3.scales], axis=1),
        zero=None if both_default else np.concatenate([zero(fc1), zero(fc3)], axis=1),
        bits=fc1.bits,
        k=fc1.k,
    )


def _float_experts(fc1, fc3) -> np.ndarray:
    return np.concatenate([fc1.dequantized(), fc3.dequantized()], axis=1)


@register_converter("QMoE", ("com.microsoft",))
class QMoE(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::QMoE`` with integer experts (2/4/8 bits, per column or block-wise, with or
    without zero points, every ``swiglu_fusion``): the node becomes the ``qiao.moe`` placeholder
    of the ``com.microsoft::MoE`` it quantizes (``frontend.moe``), holding the 4-/8-bit experts
    as they are stored (``MoE.quantized``); ``LowerMoE`` packs them for qiao's integer CPU
    kernels (``kernels.quant_moe``) or dequantizes them for other targets. 2-bit experts are
    dequantized here. Separate fc3 weights (``swiglu_fusion=0``) are joined under fc1
    (``swiglu_fusion=2``): the same computation, the layout qiao's kernels take.
    ``accuracy_level`` 4 selects int8 activations in the integer CPU kernels where the target
    has integer dot products (as ONNX Runtime); otherwise the exact float32 result."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        from qiao.compiler.frontend.moe import MoE

        attr = {k: v for k, v in attr.items() if k != "tvm_custom"}
        quant_type = attr.get("quant_type", "int")
        quant_type = quant_type.decode() if isinstance(quant_type, bytes) else str(quant_type)
        if quant_type != "int":
            raise CompileError(
                f"QMoE quant_type={quant_type!r} is not supported by qiao (integer experts only). "
                "fix: quantize the experts to int4/int8 (quant_type='int')"
            )
        prepacked = int(attr.get("weights_prepacked", -1))
        if prepacked == 1:
            raise CompileError(
                "QMoE weights_prepacked=1 (an execution provider's prepacked layout) is not "
                "supported. fix: export with weights_prepacked=0 (raw [E, N, K*bits/8] rows)"
            )
        if _input(inputs, 14) is not None or any(
            _input(inputs, i) is not None for i in range(15, len(inputs))
        ):
            raise CompileError(
                "QMoE with router_weights (or fp8/fp4 scale inputs) is not supported by qiao. "
                "fix: export without router_weights (router_probs both selects and weighs)"
            )
        bits = int(attr.get("expert_weight_bits", 4))
        block_size = int(attr.get("block_size", 0) or 0)
        if block_size and (block_size < 16 or block_size & (block_size - 1)):
            raise CompileError(
                f"QMoE block_size={block_size} must be a power of 2, at least 16. fix: "
                "re-quantize the experts with such a block size"
            )
        x = inputs[0]
        hidden = int(x.ty.shape[-1])
        quant = {}
        slots = {"fc1": (2, 3, 11), "fc2": (5, 6, 12), "fc3": (8, 9, 13)}  # weights, scales, zp
        for fc, (w_i, s_i, zp_i) in slots.items():
            if _input(inputs, w_i) is None:
                continue
            fc_bits = int(attr.get(f"{fc}_expert_weight_bits", bits))
            if fc_bits not in (2, 4, 8):
                raise CompileError(
                    f"QMoE {fc}: {fc_bits}-bit experts are not supported by qiao (2, 4 or 8). "
                    "fix: quantize the experts to 2, 4 or 8 bits"
                )
            if _input(inputs, s_i) is None:
                raise CompileError(
                    f"QMoE {fc}_scales is missing; integer experts need scales. fix: add them"
                )
            w = _known_array(inputs[w_i], params, "QMoE", f"{fc}_experts_weights")
            s = _known_array(inputs[s_i], params, "QMoE", f"{fc}_scales")
            zp_in = _input(inputs, zp_i)
            zp = None if zp_in is None else _known_array(zp_in, params, "QMoE", f"{fc}_zp")
            k = hidden if fc != "fc2" else w.shape[2] * 8 // fc_bits
            quant[fc] = quant_experts(w, s, zp, fc_bits, block_size, k, fc)
        moe_attr = {k: v for k, v in attr.items() if k not in QMOE_ONLY_ATTRS}
        biases = {}
        for fc, i in (("fc1", 4), ("fc2", 7), ("fc3", 10)):
            b = _input(inputs, i)
            biases[fc] = None if b is None else _known_array(b, params, "QMoE", f"{fc} bias")
        fc1, b1 = quant["fc1"], biases["fc1"]
        if "fc3" in quant:
            # [gate | up] rows: swiglu_fusion 0 computes exactly what 2 does with fc3 under fc1.
            joined = _join_experts(fc1, quant["fc3"])
            fc1 = joined if joined is not None else _float_experts(fc1, quant["fc3"])
            moe_attr["swiglu_fusion"] = 2
            if b1 is not None or biases["fc3"] is not None:
                rows = quant["fc1"].codes.shape[:2]
                zero = np.zeros(rows, "float32")
                b1 = np.concatenate(
                    [zero if b1 is None else b1, zero if biases["fc3"] is None else biases["fc3"]],
                    axis=1,
                )
        fc2, b2 = quant["fc2"], biases["fc2"]

        def const(a):
            return None if a is None else relax.const(np.ascontiguousarray(a, np.float32))

        if isinstance(fc1, np.ndarray) or 2 in (fc1.bits, fc2.bits) or fc1.bits != fc2.bits:
            # 2-bit codes, or projections quantized differently: float32 experts, exact
            fc1 = fc1 if isinstance(fc1, np.ndarray) else fc1.dequantized()
            float_inputs = [
                x,
                inputs[1],
                const(fc1),
                const(b1),
                const(fc2.dequantized()),
                const(b2),
            ]
            return MoE._impl_v1(bb, float_inputs, moe_attr, params)
        level = int(attr.get("accuracy_level", 0) or 0)
        return MoE.quantized(bb, x, inputs[1], moe_attr, fc1, const(b1), fc2, const(b2), level)
