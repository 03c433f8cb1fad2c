"""Converters for recent ONNX operators (opsets 24-28) and quantised integer kernels.

TVM's importer has no converter for any of these: SwiGLU, BitCast, TensorScatter,
CausalConvWithState, LinearAttention, FlexAttention (``ai.onnx.preview``), QLinearMatMul,
QLinearConv and ConvInteger. Each follows the ONNX reference implementation
(``onnx.reference.ops``), including its intermediate precisions, so results match it bit for bit
where the reference is exact (integer kernels) and to float rounding elsewhere.
"""

from __future__ import annotations

import math

import onnx
from tvm import relax, te, tirx, topi
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, static_dims


def _dtype(x) -> str:
    return str(x.ty.dtype)


def _attr_str(attr: dict, name: str, default: str) -> str:
    value = attr.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _silu_via_float32(bb, x):
    """``x * sigmoid(x)`` computed in float32 and cast back, as the reference does for SiLU."""
    dtype = _dtype(x)
    wide = bb.normalize(relax.op.astype(x, "float32")) if dtype != "float32" else x
    out = relax.op.multiply(wide, relax.op.sigmoid(wide))
    return relax.op.astype(out, dtype) if dtype != "float32" else out


@register_converter("SwiGLU")
class SwiGLU(tvm_onnx.OnnxOpConverter):
    """``A * sigmoid(alpha * A) * B`` (opset 28); the sigmoid in float32 for narrower floats."""

    @classmethod
    def _impl_v28(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        dtype = _dtype(a)
        alpha = float(attr.get("alpha", 1.0))
        wide = bb.normalize(relax.op.astype(a, "float32")) if dtype == "float16" else a
        compute = str(wide.ty.dtype)
        gate = relax.op.sigmoid(relax.op.multiply(wide, const(alpha, compute)))
        gate = relax.op.astype(gate, dtype) if compute != dtype else gate
        return relax.op.multiply(relax.op.multiply(a, gate), b)


@register_converter("BitCast")
class BitCast(tvm_onnx.OnnxOpConverter):
    """Reinterpret the bits of each element as another type of the same width (opset 26)."""

    @classmethod
    def _impl_v26(cls, bb, inputs, attr, params):
        x = inputs[0]
        src = _dtype(x)
        dst = str(onnx.helper.tensor_dtype_to_np_dtype(attr["to"]))
        if src == dst:
            return x
        # TIR's bool is one bit wide, so reinterpret refuses it; bool bytes are 0/1 in both the
        # NumPy reference and TVM's runtime, which a value cast reproduces.
        if src == "bool":
            return relax.op.astype(x, dst)
        if dst == "bool":
            return relax.op.not_equal(x, const(0, src))
        return bb.emit_te(topi.reinterpret, x, dst)


@register_converter("TensorScatter")
class TensorScatter(tvm_onnx.OnnxOpConverter):
    """Write ``update`` into ``past_cache`` along ``axis`` at a per-batch offset (opset 24).

    Computed as a gather: each cache position ``j`` of batch ``b`` takes
    ``update[j - write_indices[b]]`` (mod the cache length in ``circular`` mode) when that index
    is in range, else keeps the cache entry.
    """

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        cache, update, indices = inputs[0], inputs[1], inputs[2]
        circular = _attr_str(attr, "mode", "linear") == "circular"
        rank = cache.ty.ndim
        axis = attr.get("axis", -2) % rank
        if indices is None:
            batch = cache.ty.shape.values[0]
            indices = relax.op.zeros(relax.ShapeExpr([batch]), "int64")
        indices = bb.normalize(relax.op.astype(indices, "int64"))

        def scatter(cache, update, indices):
            length = update.shape[axis]
            capacity = cache.shape[axis]

            def at(*idx):
                offset = tirx.Cast("int64", idx[axis]) - indices[idx[0]]
                if circular:
                    offset = tirx.floormod(offset, tirx.Cast("int64", capacity))
                valid = tirx.all(offset >= 0, offset < tirx.Cast("int64", length))
                src = list(idx)
                src[axis] = tirx.Cast(str(idx[axis].ty), tirx.if_then_else(valid, offset, 0))
                return tirx.if_then_else(valid, update(*src), cache(*idx))

            return te.compute(cache.shape, at, name="tensor_scatter")

        return bb.emit_te(scatter, cache, update, indices)


@register_converter("CausalConvWithState")
class CausalConvWithState(tvm_onnx.OnnxOpConverter):
    """Depthwise causal 1-D convolution with a carried state (opset 27).

    ``padded = concat(past_state or zeros, input)`` along time; the output is the valid depthwise
    convolution of ``padded`` (plus bias, then SiLU for ``activation`` silu/swish) and the present
    state the last ``k - 1`` steps of ``padded``.
    """

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        x, weight = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        past = inputs[3] if len(inputs) > 3 else None
        activation = _attr_str(attr, "activation", "none")
        if activation not in ("none", "silu", "swish"):
            raise CompileError(
                f"CausalConvWithState: activation {activation!r} is not one of none, silu, swish. "
                "fix: re-export the model with a supported activation"
            )
        batch, channels, _ = x.ty.shape.values
        k = static_dims(weight)[2]
        if past is None:
            past = relax.op.zeros(relax.ShapeExpr([batch, channels, k - 1]), _dtype(x))
        padded = bb.normalize(relax.op.concat([past, x], axis=2))
        dtype = _dtype(x)
        # NumPy's float16 dot products accumulate in float32 and round once; so does this.
        acc = "float32" if dtype == "float16" else dtype
        out = relax.op.nn.conv1d(padded, weight, groups=int(channels), out_dtype=acc)
        if bias is not None:
            bias = bb.normalize(relax.op.astype(bias, acc)) if acc != dtype else bias
            out = relax.op.add(out, relax.op.reshape(bias, (1, -1, 1)))
        out = bb.normalize(relax.op.astype(out, dtype) if acc != dtype else out)
        if activation != "none":
            out = bb.normalize(_silu_via_float32(bb, out))
        total = padded.ty.shape.values[2]
        state = relax.op.strided_slice(padded, [2], [total - (k - 1)], [total])
        return relax.Tuple([out, bb.normalize(state)])


def _heads_first(bb, x, heads: int):
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, hd = static_dims(x)
    return bb.normalize(
        relax.op.permute_dims(relax.op.reshape(x, (b, t, heads, hd // heads)), [0, 2, 1, 3])
    )


@register_converter("LinearAttention")
class LinearAttention(tvm_onnx.OnnxOpConverter):
    """Recurrent linear attention (opset 27), unrolled over the (static) sequence length.

    Per step, with the state S of shape (B, H_kv, d_k, d_v) in float32: gating multiplies S by
    ``exp(decay)``, the delta rule replaces ``v`` by ``beta * (v - kᵀS)``, then ``S += k vᵀ`` and
    the output is ``scale * qᵀS`` (KV heads repeated for grouped queries). The scan's Loop body in
    the function-expanded form has no Relax lowering; a static unroll is the same arithmetic.
    """

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        query, key, value = inputs[0], inputs[1], inputs[2]
        past, decay, beta = (inputs[i] if len(inputs) > i else None for i in (3, 4, 5))
        rule = _attr_str(attr, "update_rule", "gated_delta")
        q_heads, kv_heads = int(attr["q_num_heads"]), int(attr["kv_num_heads"])
        dims = static_dims(query)
        if dims is None or static_dims(value) is None:
            raise CompileError(
                "LinearAttention is unrolled over the sequence and needs static query/key/value "
                "shapes. fix: compile with static input shapes (shape_dict)"
            )
        b, t, _ = dims
        d_k = dims[2] // q_heads
        d_v = static_dims(value)[2] // kv_heads
        group = q_heads // kv_heads
        out_dtype = _dtype(query)
        f32 = "float32"

        def wide(x):
            return bb.normalize(relax.op.astype(x, f32)) if _dtype(x) != f32 else x

        q4 = wide(_heads_first(bb, query, q_heads))
        k4 = wide(_heads_first(bb, key, kv_heads))
        v4 = wide(_heads_first(bb, value, kv_heads))
        gating = rule in ("gated", "gated_delta")
        delta = rule in ("delta", "gated_delta")
        if gating:
            # (B, T, H*d_k) or, per head, (B, T, H) -> (B, H, T, d_k or 1)
            decay4 = wide(_heads_first(bb, decay, kv_heads))
            decay4 = bb.normalize(relax.op.exp(decay4))
        if delta:
            beta4 = wide(_heads_first(bb, beta, static_dims(beta)[2]))  # (B, H or 1, T, 1)
        state_dtype = _dtype(past) if past is not None else out_dtype
        state = wide(past) if past is not None else relax.op.zeros((b, kv_heads, d_k, d_v), f32)
        user_scale = attr.get("scale", 0.0)
        scale = float(user_scale) if user_scale else 1.0 / math.sqrt(d_k)

        def step(x, i):  # (B, H, T, D) -> (B, H, D)
            return relax.op.squeeze(relax.op.strided_slice(x, [2], [i], [i + 1]), [2])

        outputs = []
        for i in range(t):
            k_t, v_t = step(k4, i), step(v4, i)
            if gating:
                state = relax.op.multiply(state, relax.op.expand_dims(step(decay4, i), -1))
            if delta:
                retrieved = relax.op.squeeze(
                    relax.op.matmul(relax.op.expand_dims(k_t, 2), state), [2]
                )  # (B, H, d_v)
                v_t = relax.op.multiply(step(beta4, i), relax.op.subtract(v_t, retrieved))
            outer = relax.op.multiply(relax.op.expand_dims(k_t, -1), relax.op.expand_dims(v_t, 2))
            state = bb.normalize(relax.op.add(state, outer))
            read = relax.op.repeat(state, group, axis=1) if group > 1 else state
            q_t = relax.op.expand_dims(step(q4, i), 2)  # (B, Hq, 1, d_k)
            outputs.append(relax.op.multiply(relax.op.matmul(q_t, read), const(scale, f32)))
        out = relax.op.concat(outputs, axis=2)  # (B, Hq, T, d_v)
        out = relax.op.reshape(relax.op.permute_dims(out, [0, 2, 1, 3]), (b, t, q_heads * d_v))
        out = relax.op.astype(out, out_dtype) if out_dtype != f32 else out
        state = relax.op.astype(state, state_dtype) if state_dtype != f32 else state
        return relax.Tuple([bb.normalize(out), bb.normalize(state)])


# FlexAttention arrived with default-domain opset 26; its modifier bodies use that domain.
_BODY_OPSET = 26


def _convert_body(bb, graph: onnx.GraphProto, args: list, params):
    """Convert the single-output subgraph ``graph`` applied to ``args`` with qiao's converters
    (FlexAttention's ``score_mod``/``prob_mod``); outer-scope names resolve through ``params``."""
    from qiao.compiler.frontend import _convert_map

    convert_map = _convert_map()
    names = dict(params[0]) if params else {}
    parse = tvm_onnx.ONNXGraphImporter._parse_attr
    for tensor in graph.initializer:
        names[tensor.name] = relax.const(onnx.numpy_helper.to_array(tensor))
    for value_info, arg in zip(graph.input, args):
        names[value_info.name] = arg
    for node in graph.node:
        attr = parse(None, node.attribute)
        attr["tvm_custom"] = {"name": node.name, "num_outputs": len(node.output)}
        node_inputs = tvm_onnx.onnx_input([names[i] if i else None for i in node.input])
        if node.op_type == "Constant":
            out = tvm_onnx.Constant.get_converter(1)(bb, node_inputs, attr, params)
        else:
            converter = convert_map[node.op_type].get_converter(_BODY_OPSET)
            out = converter(bb, node_inputs, attr, params)
        if isinstance(out, relax.Expr) and not isinstance(out, relax.Tuple):
            out = bb.normalize(out)
        if len(node.output) == 1:
            names[node.output[0]] = out
        else:
            for j, name in enumerate(node.output):
                names[name] = out[j]
    return names[graph.output[0].name]


@register_converter("FlexAttention", domain="ai.onnx.preview")
class FlexAttention(tvm_onnx.OnnxOpConverter):
    """``softmax(prob_mod)(score_mod(scale · Q Kᵀ)) V`` (``ai.onnx.preview`` opset 1).

    Q is (B, Hq, L, E), K (B, Hkv, S, E), V (B, Hkv, S, Ev); KV heads are repeated for grouped
    queries. Scores and softmax are in float32 for narrower inputs, as the function body casts.
    The optional ``score_mod``/``prob_mod`` graphs are converted inline with qiao's converters.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        q, k, v = inputs[0], inputs[1], inputs[2]
        dtype = _dtype(q)
        hq, e = static_dims(q)[1], static_dims(q)[3]
        hkv = static_dims(k)[1]
        user_scale = attr.get("scale")
        scale = float(user_scale) if user_scale is not None else 1.0 / math.sqrt(e)
        compute = "float32" if dtype in ("float16", "bfloat16") else dtype
        if hkv != hq:
            k = relax.op.repeat(k, hq // hkv, axis=1)
            v = relax.op.repeat(v, hq // hkv, axis=1)
        qc = relax.op.astype(q, compute) if compute != dtype else q
        kc = relax.op.astype(k, compute) if compute != dtype else k
        scores = relax.op.matmul(qc, relax.op.permute_dims(kc, [0, 1, 3, 2]))
        scores = bb.normalize(relax.op.multiply(scores, const(scale, compute)))
        if "score_mod" in attr:
            scores = _convert_body(bb, attr["score_mod"], [scores], params)
        probs = bb.normalize(relax.op.nn.softmax(scores, axis=-1))
        if "prob_mod" in attr:
            probs = _convert_body(bb, attr["prob_mod"], [probs], params)
        vc = relax.op.astype(v, compute) if compute != dtype else v
        out = relax.op.matmul(probs, vc)
        return relax.op.astype(out, dtype) if compute != dtype else out


# --- quantised integer kernels --------------------------------------------------------------------
def _minus_zero_point(bb, x, zero_point, axis_shape=None):
    """``int32(x) - int32(zero_point)``, the zero point reshaped to ``axis_shape`` if given."""
    x = relax.op.astype(x, "int32")
    if zero_point is None:
        return bb.normalize(x)
    zp = bb.normalize(relax.op.astype(zero_point, "int32"))
    if axis_shape is not None and zero_point.ty.ndim == 1:
        zp = relax.op.reshape(zp, axis_shape)
    return bb.normalize(relax.op.subtract(x, zp))


def _requantize(bb, acc, multiplier, zero_point, out_dtype: str):
    """``saturate(round_half_even(float64(acc) * multiplier + zero_point))`` as ``out_dtype``.

    NumPy promotes the int32 accumulator times a float32/float16 scale to float64, so float64 it
    is; the multiplier itself is computed in the scales' own dtype first, as in the reference.
    """
    value = relax.op.multiply(
        relax.op.astype(acc, "float64"), relax.op.astype(multiplier, "float64")
    )
    if zero_point is not None:
        value = relax.op.add(value, relax.op.astype(zero_point, "float64"))
    value = bb.normalize(value)
    info = {"uint8": (0, 255), "int8": (-128, 127)}[out_dtype]
    rounded = bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.nearbyint(t(*i))), value)
    return relax.op.astype(relax.op.clip(rounded, *info), out_dtype)


def _conv_attrs(attr: dict, rank: int) -> dict:
    spatial = rank - 2
    pads = list(attr.get("pads", [0] * 2 * spatial))
    if _attr_str(attr, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise CompileError(
            "ConvInteger/QLinearConv: auto_pad SAME_* is not supported. fix: re-export with "
            "explicit pads"
        )
    return {
        "strides": list(attr.get("strides", [1] * spatial)),
        "padding": pads,
        "dilation": list(attr.get("dilations", [1] * spatial)),
        "groups": int(attr.get("group", 1)),
    }


def _int_conv(bb, x, w, attr):
    """Convolution of int32 tensors with an int32 result (TVM's conv on int32 operands)."""
    conv = {3: relax.op.nn.conv1d, 4: relax.op.nn.conv2d, 5: relax.op.nn.conv3d}[x.ty.ndim]
    return bb.normalize(conv(x, w, out_dtype="int32", **_conv_attrs(attr, x.ty.ndim)))


@register_converter("ConvInteger")
class ConvInteger(tvm_onnx.OnnxOpConverter):
    """``conv(int32(X) - x_zero_point, int32(W) - w_zero_point)`` as int32 (opset 10); a per
    output channel ``w_zero_point`` is subtracted row-wise."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, w = inputs[0], inputs[1]
        x_zp = inputs[2] if len(inputs) > 2 else None
        w_zp = inputs[3] if len(inputs) > 3 else None
        rank = w.ty.ndim
        xi = _minus_zero_point(bb, x, x_zp)
        wi = _minus_zero_point(bb, w, w_zp, (-1,) + (1,) * (rank - 1))
        return _int_conv(bb, xi, wi, attr)


@register_converter("QLinearConv")
class QLinearConv(tvm_onnx.OnnxOpConverter):
    """Quantised convolution (opset 10): int32 convolution of the zero-point-corrected operands
    (plus the int32 bias), requantised by ``x_scale * w_scale / y_scale`` (per output channel when
    ``w_scale`` is a vector)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = inputs[:8]
        bias = inputs[8] if len(inputs) > 8 else None
        rank = w.ty.ndim
        channel = (-1,) + (1,) * (rank - 2)
        xi = _minus_zero_point(bb, x, x_zp)
        wi = _minus_zero_point(bb, w, w_zp, (-1,) + (1,) * (rank - 1))
        acc = _int_conv(bb, xi, wi, attr)
        if bias is not None:
            acc = bb.normalize(relax.op.add(acc, relax.op.reshape(bias, channel)))
        if w_scale.ty.ndim == 1 and static_dims(w_scale) != [1]:
            w_scale = relax.op.reshape(w_scale, channel)
        multiplier = relax.op.divide(relax.op.multiply(x_scale, w_scale), y_scale)
        out_dtype = _dtype(y_zp) if y_zp is not None else _dtype(x)
        return _requantize(bb, acc, multiplier, y_zp, out_dtype)


@register_converter("QLinearMatMul")
class QLinearMatMul(tvm_onnx.OnnxOpConverter):
    """Quantised matmul (opsets 10 and 21): int32 matmul of the zero-point-corrected operands,
    requantised by ``a_scale * b_scale / y_scale``."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
        ai = _minus_zero_point(bb, a, a_zp)
        bi = _minus_zero_point(bb, b, b_zp)
        acc = bb.normalize(relax.op.matmul(ai, bi, out_dtype="int32"))
        multiplier = relax.op.divide(relax.op.multiply(a_scale, b_scale), y_scale)
        out_dtype = _dtype(y_zp) if y_zp is not None else _dtype(a)
        return _requantize(bb, acc, multiplier, y_zp, out_dtype)
