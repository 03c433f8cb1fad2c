"""Converters for the ai.onnx attention ops of opset 23+: ``Attention`` and ``RotaryEmbedding``."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, int_tensor


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
        root = const(np.sqrt(np.float32(scale)).astype(dtype), dtype)
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
        scores = cls._matmul(
            bb,
            relax.op.multiply(q, root),
            relax.op.multiply(relax.op.permute_dims(k, [0, 1, 3, 2]), root),
        )
        softcap = attr.get("softcap")
        if softcap is not None and softcap > 0:
            cap = const(softcap, dtype)
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
            fully_masked = relax.op.equal(row_max, const(-np.inf, dtype))
            probs = bb.normalize(relax.op.where(fully_masked, const(0, str(probs.ty.dtype)), probs))
        if mode == 3:
            qk_out = probs
        qk_out = bb.normalize(relax.op.astype(qk_out, dtype))
        probs = bb.normalize(relax.op.astype(probs, dtype))
        y = cls._matmul(bb, probs, v)
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
    def _matmul(bb, a, b):
        """``a @ b``; float16 products accumulate in float32 and round once, as NumPy's float16
        matmul (the reference) does; TVM's float16 matmul accumulates in float16."""
        a, b = bb.normalize(a), bb.normalize(b)
        if str(a.ty.dtype) != "float16":
            return bb.normalize(relax.op.matmul(a, b))
        wide = bb.normalize(relax.op.matmul(a, b, out_dtype="float32"))
        return bb.normalize(relax.op.astype(wide, "float16"))

    @staticmethod
    def _safe_softmax(bb, x):
        """Softmax over the last axis that gives 0 (not NaN) for a row of -inf."""
        dtype = str(x.ty.dtype)
        zero = const(0, dtype)
        row_max = relax.op.max(x, axis=-1, keepdims=True)
        row_max = relax.op.where(relax.op.equal(row_max, const(-np.inf, dtype)), zero, row_max)
        e = bb.normalize(relax.op.exp(relax.op.subtract(x, row_max)))
        if dtype == "float16":  # NumPy sums float16 in float32 and rounds once
            wide = relax.op.sum(relax.op.astype(e, "float32"), axis=-1, keepdims=True)
            total = relax.op.astype(wide, dtype)
        else:
            total = relax.op.sum(e, axis=-1, keepdims=True)
        total = relax.op.where(relax.op.equal(total, zero), const(1, dtype), total)
        return bb.normalize(relax.op.divide(e, total))

    @classmethod
    def _bias(cls, bb, attr, dtype, mask, nonpad, q_len, kv_len, past_len):
        """The additive bias ``(…, S, L)``: mask (padded to L), causal, window, KV padding."""
        zero, neg_inf = const(0, dtype), const(-np.inf, dtype)
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
            offset = bb.normalize(relax.op.subtract(nonpad, int_tensor(bb, q_len)))
        else:
            offset = int_tensor(bb, past_len)
        diff = bb.normalize(relax.op.subtract(relax.op.add(rows, offset), cols))  # i + off - j
        bias = mask if mask is not None else zero
        if causal:
            allowed = relax.op.greater_equal(diff, const(0, "int64"))
            bias = relax.op.add(bias, relax.op.where(allowed, zero, neg_inf))
        if left >= 0 or right >= 0:
            allowed = relax.op.ones_like(diff, "bool")
            if left >= 0:
                allowed = relax.op.logical_and(
                    allowed, relax.op.less_equal(diff, const(left, "int64"))
                )
            if right >= 0:
                allowed = relax.op.logical_and(
                    allowed,
                    relax.op.less_equal(relax.op.negative(diff), const(right, "int64")),
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


@register_converter("MultiHeadAttention", domain="com.microsoft")
class MultiHeadAttention(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::MultiHeadAttention`` in the form ONNX Runtime GenAI's builder writes for
    CPU float16 models (``-p fp16 -e cpu``, where ORT has no float16 GroupQueryAttention): query
    ``(B, S, H*D)``, key/value ``(B, T, H*D)`` already joined with the past and repeated to ``H``
    heads by standard ops, an additive ``attention_bias`` ``(B|1, H|1, S, T)`` carrying the mask,
    ``softmax(scale * Q Kᵀ + bias) V`` per head. Computed in float32 (scores, softmax, both
    products; float16/bfloat16 inputs widened), the output rounded to the inputs' dtype.

    Not supported (an error naming the input or attribute): packed QKV or 5-D key/value, the
    ``bias`` and ``key_padding_mask`` inputs, ``past_key``/``past_value`` inputs and ``present``
    outputs, ``unidirectional=1``.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        names = ("query", "key", "value", "bias", "key_padding_mask", "attention_bias")
        names += ("past_key", "past_value", "past_sequence_length", "cache_indirection")
        given = {n: inputs[i] for i, n in enumerate(names) if i < len(inputs)}
        for unsupported in ("bias", "key_padding_mask", "past_key", "past_value"):
            if given.get(unsupported) is not None:
                raise CompileError(
                    f"com.microsoft::MultiHeadAttention with a {unsupported} input is not "
                    "supported. fix: export the model with the attention mask as attention_bias "
                    "and the KV cache joined outside the op (ONNX Runtime GenAI's CPU fp16 form)"
                )
        if attr.get("unidirectional", 0):
            raise CompileError(
                "com.microsoft::MultiHeadAttention with unidirectional=1 is not supported. fix: "
                "pass the causal mask as attention_bias"
            )
        if attr["tvm_custom"]["num_outputs"] != 1:
            raise CompileError(
                "com.microsoft::MultiHeadAttention's present_key/present_value outputs are not "
                "supported. fix: keep the KV cache outside the op"
            )
        q, k, v, bias = given["query"], given.get("key"), given.get("value"), None
        if k is None or v is None or any(x.ty.ndim != 3 for x in (q, k, v)):
            raise CompileError(
                "com.microsoft::MultiHeadAttention needs 3-D query, key and value (B, S, H*D). "
                "fix: export unpacked Q/K/V projections"
            )
        bias = given.get("attention_bias")
        dtype = str(q.ty.dtype)
        heads = int(attr["num_heads"])

        def wide(x):
            return bb.normalize(relax.op.astype(x, "float32")) if dtype != "float32" else x

        qh = Attention._split_heads(bb, wide(q), heads)
        kh = Attention._split_heads(bb, wide(k), heads)
        vh = Attention._split_heads(bb, wide(v), heads)
        head_size = qh.ty.shape.values[3]
        if "scale" in attr and attr["scale"]:
            scale = float(attr["scale"])
        elif isinstance(head_size, tirx.IntImm):
            scale = 1.0 / np.sqrt(head_size.value)
        else:
            raise CompileError(
                "com.microsoft::MultiHeadAttention without a scale needs a static hidden size. "
                "fix: set the scale attribute"
            )
        scores = bb.normalize(relax.op.matmul(qh, relax.op.permute_dims(kh, [0, 1, 3, 2])))
        scores = bb.normalize(relax.op.multiply(scores, const(scale, "float32")))
        if bias is not None:
            bias = wide(bias)
            if not isinstance(getattr(bias.ty, "shape", None), relax.ShapeExpr):
                # a mask computed from run-time shapes (GenAI's chain): (B, H, S, T), checked
                # when the model runs
                bias = bb.match_cast(bias, relax.TensorType(scores.ty.shape, "float32"))
            # the bias's key length may be another name for the keys' (the mask's
            # total_sequence_length against past + new): cast to the scores' dims (except the
            # broadcast 1s), checked at run time
            dims = [
                d if isinstance(d, tirx.IntImm) and d.value == 1 else s_dim
                for d, s_dim in zip(bias.ty.shape.values, scores.ty.shape.values[-bias.ty.ndim :])
            ]
            bias = bb.match_cast(bias, relax.TensorType(dims, "float32"))
            scores = bb.normalize(relax.op.add(scores, bias))
        probs = bb.normalize(relax.op.nn.softmax(scores, axis=-1))
        y = bb.normalize(relax.op.matmul(probs, vh))
        y = bb.normalize(relax.op.permute_dims(y, [0, 2, 1, 3]))
        b, s, h, d = y.ty.shape.values
        y = bb.normalize(relax.op.reshape(y, relax.ShapeExpr([b, s, h * d])))
        return bb.normalize(relax.op.astype(y, dtype)) if dtype != "float32" else y


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
        rot = attr.get("rotary_embedding_dim", 0) or int(x.ty.shape.values[3])
        if positions is not None:
            cos = relax.op.take(cos, positions, axis=0)
            sin = relax.op.take(sin, positions, axis=0)
        rotated = apply_rotary(bb, x, cos, sin, bool(attr.get("interleaved", 0)), rot)
        if four_d:
            return relax.op.permute_dims(rotated, [0, 2, 1, 3])
        return relax.op.reshape(rotated, inputs[0].ty.shape)


def apply_rotary(bb, x, cos, sin, interleaved: bool, rot: int | None = None):
    """Rotate the leading channels of ``x`` ``(B, S, H, D)`` by per-token angles: ``cos``/``sin``
    ``(B, S, R/2)`` (already gathered by position); channels ``R..D`` pass through unchanged.

    Halves (``x[:R/2]`` with ``x[R/2:R]``) or interleaved pairs (``x[2i]`` with ``x[2i+1]``), as
    ONNX Runtime's and ONNX's RotaryEmbedding define them. ``rot`` (``R``) defaults to twice the
    cache width, which must then be static."""
    head = x.ty.shape.values[3]
    if rot is None:
        width = cos.ty.shape.values[-1]
        if not isinstance(width, tirx.IntImm):
            raise CompileError(
                "rotary cache width must be static. fix: export the cos/sin caches as constants"
            )
        rot = 2 * int(width)
    half = rot // 2
    cos = bb.normalize(relax.op.expand_dims(cos, 2))  # (B, S, 1, R/2)
    sin = bb.normalize(relax.op.expand_dims(sin, 2))
    rotate = bb.normalize(relax.op.strided_slice(x, [3], [0], [rot]))
    if interleaved:
        x1 = relax.op.strided_slice(rotate, [3], [0], [rot], [2])
        x2 = relax.op.strided_slice(rotate, [3], [1], [rot], [2])
    else:
        x1 = relax.op.strided_slice(rotate, [3], [0], [half])
        x2 = relax.op.strided_slice(rotate, [3], [half], [rot])
    x1, x2 = bb.normalize(x1), bb.normalize(x2)
    real = bb.normalize(relax.op.subtract(relax.op.multiply(x1, cos), relax.op.multiply(x2, sin)))
    imag = bb.normalize(relax.op.add(relax.op.multiply(x2, cos), relax.op.multiply(x1, sin)))
    if interleaved:
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
    return rotated
