"""Converters for the operators of ONNX Runtime GenAI's decoders: ``com.microsoft``
``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization`` and ``RotaryEmbedding``, and ONNX
Runtime's default-domain ``SimplifiedLayerNormalization``. TVM has none of them.

What ONNX Runtime GenAI 0.18's model builder emits for a Qwen3 (``python -m
onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu``; checked on a 2-layer random
``Qwen3ForCausalLM``, hidden 64, 4 heads, 2 KV heads, head 16, vocab 300):

- Files: ``model.onnx`` + ``model.onnx.data`` (external weights), ``genai_config.json``
  (``search.past_present_share_buffer: true``, ``context_length`` = ``max_length`` =
  ``max_position_embeddings``, input/output name patterns), tokenizer files copied.
- Opsets: ``ai.onnx`` 22 and ``com.microsoft`` 1.
- Inputs: ``input_ids`` int64 ``(batch_size, sequence_length)``, ``attention_mask`` int64
  ``(batch_size, total_sequence_length)``, then per layer ``past_key_values.{i}.key`` / ``.value``
  float ``(batch_size, kv_heads, past_sequence_length, kv_cache_dim)`` (BNSH; ``kv_cache_dim`` is a
  symbolic name for the head size).
- Outputs: ``logits`` ``(batch_size, sequence_length, vocab)``, ``present.{i}.key`` / ``.value``
  ``(batch_size, kv_heads, total_sequence_length, kv_cache_dim)``.
- Mask subgraph, shared by all layers: ``seqlens_k = int32(ReduceSum(attention_mask, 1) - 1)``,
  ``total_sequence_length = int32(Shape(attention_mask)[1])``.
- Per layer: ``SimplifiedLayerNormalization`` (default domain; epsilon 1e-6, stash_type 1) → one
  ``MatMul`` for packed QKV → ``Split`` → Qwen3's q/k norms as ``Reshape (0,-1,16)`` →
  ``SimplifiedLayerNormalization`` → ``Reshape (0,-1,H*16)`` (not fused into GQA on the CPU) →
  ``GroupQueryAttention`` (separate q, k, v; ``do_rotary=1``, ``rotary_interleaved=0``,
  ``scale=1/sqrt(head)``, ``softcap=0``, ``local_window_size=-1``; ``cos_cache``/``sin_cache``
  initializers ``(max_position_embeddings, head/2)``; inputs 9-11 empty) → ``MatMul`` o_proj →
  ``SkipSimplifiedLayerNormalization`` (outputs 0 and 3: normed and residual sum) → SwiGLU as
  ``MatMul``, ``Sigmoid``, ``Mul``, ``Mul``, ``MatMul``. The final norm is the last layer's
  ``SkipSimplifiedLayerNormalization``; ``lm_head`` a ``MatMul`` whose output is ``logits``.
- ``onnx.checker`` rejects the file (``SimplifiedLayerNormalization`` is not an ONNX op), hence
  ``contrib_schemas``.

``GroupQueryAttention`` (ONNX Runtime 1.32's contract, checked against its CPU kernel): per batch
entry ``b``, ``T_b = seqlens_k[b] + 1`` tokens are in the cache after the step, ``Q_b =
query_seqlens[b]`` (default ``min(S, T_b)``) of the ``S`` query rows are valid, and ``P_b = T_b -
Q_b`` tokens were cached before. Query row ``s`` sits at absolute position ``P_b + s`` (causal
mask, local window, rotary). ``present`` has length ``max(total_sequence_length, past length)``:
the past's first ``P_b`` rows, the new rows at ``[P_b, T_b)``, zeros after. Both cache layouts
are the same formula: a past of exactly the previous length (``present`` grows by ``S``) and
GenAI's shared buffer of the context length (``present`` keeps that length; the caller may alias
it to ``past``). The cache update has two modes (the ``kv_cache`` compile option, set for one
import by ``gqa_lowering``):

- ``copy`` (default): ``present`` is a new tensor, written whole (one gather of ``[past, new]``
  per layer and step: O(cache) copies per decode step). Its length is a run-time dim
  (``gqa_present_len``, shared by all layers); the manifest keeps the builder's declared name
  ``total_sequence_length``, which is true only for the growing layout.
- ``inplace``: the new rows are written into the past buffers at ``[P_b, T_b)``
  (``qiao.kv_append``, lowered to ``call_tir_inplace``) and ``present`` IS the past buffer: the
  shared buffer only (a buffer shorter than ``T_b`` fails at run time).

Attention itself is qiao's TIR kernel in both modes (``qiao.gqa_attention``, see
``qiao.compiler.kernels.attention``: it reads only the cache rows each entry uses), lowered by
``qiao.compiler.passes.LowerAttention``; with ``attention_bias`` it is Relax ops over the first
``total`` cache rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import convert_attention, register_converter
from qiao.compiler.frontend.convert_common import (
    const,
    int_tensor,
    integral_prim,
    runtime_shape,
    scalar,
)


def _unsupported(op: str, what: str, fix: str) -> CompileError:
    return CompileError(f"{op}: {what} is not supported by qiao. fix: {fix}")


def _static(dim, what: str) -> int:
    if isinstance(dim, tirx.IntImm):
        return int(dim.value)
    raise CompileError(f"{what} must be a static dimension, got {dim}. fix: export it static")


@dataclass(frozen=True)
class GQALowering:
    """How ``GroupQueryAttention`` is imported (``gqa_lowering`` sets it for one import).

    Parameters
    ----------
    kv_cache : {"copy", "inplace"}
        ``copy``: ``present`` is a new tensor (a gather of past and new rows); ``inplace``: the
        new rows are written into the past buffers, which are ``present`` (needs past buffers of
        at least ``T_b`` rows: GenAI's shared buffer; a shorter one is a run-time error).
    kernel : bool
        Attention by qiao's TIR kernel (``qiao.compiler.kernels.attention``), which reads only
        the cache rows each entry uses; ``False``: Relax ops over the first ``total`` rows (what
        ``attention_bias`` always takes).
    """

    kv_cache: str = "copy"
    kernel: bool = True


KV_CACHE_MODES = ("copy", "inplace")
_LOWERING: contextvars.ContextVar[GQALowering | None] = contextvars.ContextVar(
    "qiao_gqa_lowering", default=None
)


@contextlib.contextmanager
def gqa_lowering(kv_cache: str | None = None, kernel: bool | None = None):
    """Import ``GroupQueryAttention`` nodes with ``kv_cache`` and the attention kernel
    (``kernel``) inside the ``with`` block; ``None`` keeps the enclosing block's choice (outside
    any: ``"copy"`` and the kernel). ``kernel=False`` (Relax ops) exists to compare the two.

    Parameters
    ----------
    kv_cache : {"copy", "inplace"}, optional
    kernel : bool, optional
    """
    outer = _LOWERING.get() or GQALowering()
    kv_cache = kv_cache or outer.kv_cache
    if kv_cache not in KV_CACHE_MODES:
        raise CompileError(
            f"kv_cache={kv_cache!r} is not a mode. fix: use one of {', '.join(KV_CACHE_MODES)}"
        )
    token = _LOWERING.set(GQALowering(kv_cache, outer.kernel if kernel is None else bool(kernel)))
    try:
        yield
    finally:
        _LOWERING.reset(token)


def _config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


# Symbolic dims bound at run time, per BlockBuilder (one import), so that every layer's
# GroupQueryAttention of a decoder shares them: bound once per node, the bindings are identical,
# CommonSubexprElim merges them and the later nodes' dims end up never defined ("PrimExpr ... has
# not been computed" in VM shape lowering).
_RUNTIME_DIMS: dict = {"bb": None, "dims": {}}


def _dim_key(value):
    # PrimExpr overloads == (it builds an expression): key those by their text, relax
    # expressions (graph values shared between nodes) by identity.
    return ("prim", str(value)) if tvm.ir.is_prim_expr(value) else ("expr", value)


def _runtime_dim(bb: relax.BlockBuilder, key, make):
    """The dim ``make()`` binds, made once per ``(bb, key)``."""
    if _RUNTIME_DIMS["bb"] is not bb:
        _RUNTIME_DIMS.update(bb=bb, dims={})
    dims = _RUNTIME_DIMS["dims"]
    if key not in dims:
        dims[key] = make()
    return dims[key]


def _as_length(bb: relax.BlockBuilder, value, prefix: str):
    """A scalar length input (int32/int64 tensor, constant, or symbolic shape value) as an int64
    PrimExpr; a run-time tensor becomes a symbolic dim bound to its value."""
    known = scalar(value)
    if known is not None:
        as_int = integral_prim(known)
        if as_int is not None:
            return as_int

    def bind():
        tensor = relax.op.astype(relax.op.reshape(value, relax.ShapeExpr([1])), "int64")
        return runtime_shape(bb, bb.normalize(tensor), 1, prefix).values[0]

    return _runtime_dim(bb, (prefix, _dim_key(value)), bind)


def _gather_cache(bb, cache, positions):
    """Rows ``positions`` ``(B, S)`` int64 of a ``(max_pos, R/2)`` cache: ``(B, S, R/2)``. Indices
    are clipped (padding rows may point past the cache; their results are unspecified)."""
    return bb.normalize(relax.op.take(cache, positions, axis=0, mode="clip"))


def _split_heads(bb, x, heads: int, head_size: int):
    """``(B, S, heads*head_size)`` -> ``(B, S, heads, head_size)``."""
    b, s = x.ty.shape.values[:2]
    return bb.normalize(relax.op.reshape(x, relax.ShapeExpr([b, s, heads, head_size])))


# --- com.microsoft::GroupQueryAttention ----------------------------------------------------------
@register_converter("GroupQueryAttention", domain="com.microsoft")
class GroupQueryAttention(tvm_onnx.OnnxOpConverter):
    """Grouped-query attention with a KV cache, as ONNX Runtime defines it (module docstring).

    Supported: separate or packed QKV; past/present in both layouts; ``seqlens_k``,
    ``total_sequence_length`` and ``query_seqlens``; rotary inside the op (``do_rotary``,
    ``rotary_interleaved``, ``position_ids``); ``attention_bias``; ``head_sink`` and
    ``smooth_softmax``; ``softcap``; ``local_window_size``; ``causal`` 0/1; ``scale``. Not
    supported (an error naming them): quantised caches (``k_scale``, ``v_scale``), fused q/k norms
    (``q_norm_weight``/``k_norm_weight``, which ONNX Runtime's CPU kernel rejects as well),
    ``sliding_window_cache`` and the ``output_qk`` output.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        op = "GroupQueryAttention"
        query, key, value, past_k, past_v = (inputs[i] for i in range(5))
        seqlens_k, total_len, cos, sin, position_ids = (inputs[i] for i in range(5, 10))
        bias, sink = inputs[10], inputs[11]
        if inputs[12] is not None or inputs[13] is not None:
            raise _unsupported(op, "a quantised KV cache (k_scale/v_scale)", "use a float cache")
        if inputs[14] is not None or inputs[15] is not None:
            raise _unsupported(
                op,
                "q_norm_weight/k_norm_weight",
                "keep Qwen3's q/k norms as SimplifiedLayerNormalization nodes (the CPU builder's "
                "form)",
            )
        query_seqlens = inputs[16]
        if attr.get("sliding_window_cache", 0):
            raise _unsupported(op, "sliding_window_cache=1", "use a full-length cache")
        if attr.get("qk_output", 0) or attr["tvm_custom"]["num_outputs"] > 3:
            raise _unsupported(op, "the output_qk output", "do not request it")
        if (past_k is None) != (past_v is None):
            raise CompileError(f"{op}: past_key and past_value must both be given or both absent")
        q_heads, kv_heads = int(attr["num_heads"]), int(attr["kv_num_heads"])
        if q_heads % kv_heads:
            raise CompileError(f"{op}: num_heads {q_heads} is not a multiple of {kv_heads}")
        batch, seq = query.ty.shape.values[:2]
        width = _static(query.ty.shape.values[2], f"{op} query hidden size")
        if key is None:  # packed QKV
            head = width // (q_heads + 2 * kv_heads)
            q = bb.normalize(relax.op.strided_slice(query, [2], [0], [q_heads * head]))
            k = relax.op.strided_slice(query, [2], [q_heads * head], [(q_heads + kv_heads) * head])
            v = relax.op.strided_slice(query, [2], [(q_heads + kv_heads) * head], [width])
            k, v = bb.normalize(k), bb.normalize(v)
        else:
            head = width // q_heads
            q, k, v = query, key, value
        if past_k is not None:
            # The builder declares the cache's head dim symbolic ("kv_cache_dim") and its batch
            # under the same name as the query's: bind both to the query's (checked at run time).
            past_shape = [batch, kv_heads, past_k.ty.shape.values[2], head]
            past_k = bb.match_cast(past_k, relax.TensorType(past_shape, str(past_k.ty.dtype)))
            past_v = bb.match_cast(past_v, relax.TensorType(past_shape, str(past_v.ty.dtype)))
        q = _split_heads(bb, q, q_heads, head)  # (B, S, Hq, D)
        k = _split_heads(bb, k, kv_heads, head)
        v = _split_heads(bb, v, kv_heads, head)

        # Per-entry lengths, int64 (B,): total T_b, valid new rows Q_b, cached before P_b.
        seq_t = int_tensor(bb, seq)
        total_b = bb.normalize(relax.op.add(relax.op.astype(seqlens_k, "int64"), const(1, "int64")))
        if query_seqlens is not None:
            valid_b = bb.normalize(relax.op.astype(query_seqlens, "int64"))
        else:
            valid_b = bb.normalize(relax.op.minimum(total_b, seq_t))
        past_b = bb.normalize(relax.op.subtract(total_b, valid_b))
        rows = bb.normalize(relax.op.arange(0, seq, 1, "int64"))  # (S,)
        absolute = bb.normalize(  # (B, S): the position of each query row
            relax.op.add(relax.op.expand_dims(past_b, 1), relax.op.expand_dims(rows, 0))
        )

        if attr.get("do_rotary", 0):
            if cos is None or sin is None:
                raise CompileError(f"{op}: do_rotary=1 needs cos_cache and sin_cache")
            positions = absolute if position_ids is None else position_ids
            positions = bb.normalize(relax.op.astype(positions, "int64"))
            cos_g, sin_g = _gather_cache(bb, cos, positions), _gather_cache(bb, sin, positions)
            interleaved = bool(attr.get("rotary_interleaved", 0))
            q = convert_attention.apply_rotary(bb, q, cos_g, sin_g, interleaved)
            k = convert_attention.apply_rotary(bb, k, cos_g, sin_g, interleaved)
        total = _as_length(bb, total_len, "gqa_total")
        scale = float(attr.get("scale", 0.0)) or 1.0 / float(np.sqrt(head))
        mode = _LOWERING.get() or GQALowering()
        if mode.kv_cache == "inplace" and past_k is not None:
            # The new rows go into the past buffers at [P_b, T_b); present.* are those buffers.
            present_k, present_v = cls._append_inplace(
                bb, k, v, total_b, past_b, past_k, past_v, q_heads, kv_heads, head, scale
            )
        else:
            present_k, present_v = cls._present_copy(
                bb, k, v, past_k, past_v, past_b, total_b, total, seq
            )
        if mode.kernel and bias is None:
            out = cls._kernel_attention(
                bb, attr, q, present_k, present_v, total_b, past_b, sink, kv_heads, scale
            )
        else:
            q = bb.normalize(relax.op.permute_dims(q, [0, 2, 1, 3]))  # (B, Hq, S, D)
            out = cls._relax_attention(
                bb,
                attr,
                q,
                present_k,
                present_v,
                total,
                absolute,
                total_b,
                bias,
                sink,
                kv_heads,
                scale,
            )
        count = attr["tvm_custom"]["num_outputs"]
        return out if count == 1 else relax.Tuple([out, present_k, present_v][:count])

    @staticmethod
    def _append_inplace(bb, k, v, total_b, past_b, past_k, past_v, q_heads, kv_heads, head, scale):
        """The ``qiao.kv_append`` placeholder: the caches with rows ``[P_b, T_b)`` replaced by
        the new ``k``/``v`` ``(B, S, Hkv, D)``, written in place once lowered."""
        from qiao.compiler.kernels.attention import AttentionConfig
        from qiao.compiler.passes.lower_attention import APPEND_EXTERN

        cfg = AttentionConfig(q_heads, kv_heads, head, scale, dtype=str(past_k.ty.dtype))
        dtype = str(past_k.ty.dtype)
        k, v = (
            bb.normalize(relax.op.astype(t, dtype)) if str(t.ty.dtype) != dtype else t
            for t in (k, v)
        )
        both = bb.normalize(
            relax.call_dps_packed(
                APPEND_EXTERN,
                [k, v, total_b, past_b, past_k, past_v, tvm.ir.StringImm(_config_json(cfg))],
                [past_k.ty, past_v.ty],
            )
        )
        return bb.normalize(relax.TupleGetItem(both, 0)), bb.normalize(relax.TupleGetItem(both, 1))

    @classmethod
    def _present_copy(cls, bb, k, v, past_k, past_v, past_b, total_b, total, seq):
        """Functional ``present`` ``(B, Hkv, max(T, past), D)`` from the new ``k``/``v``
        ``(B, S, Hkv, D)``."""
        k = bb.normalize(relax.op.permute_dims(k, [0, 2, 1, 3]))  # (B, Hkv, S, D)
        v = bb.normalize(relax.op.permute_dims(v, [0, 2, 1, 3]))
        past_len = past_k.ty.shape.values[2] if past_k is not None else tirx.IntImm("int64", 0)
        if past_k is None:
            present_len = total
        else:
            # max(T, past) as a fresh dim bound at run time: TVM fails on compound shape
            # expressions downstream (FuseTIR's "VarRemapGet(source) == nullptr", VM shape
            # lowering's "has not been computed").

            def bind():
                longest = relax.op.maximum(int_tensor(bb, total), int_tensor(bb, past_len))
                longest = bb.normalize(relax.op.reshape(longest, relax.ShapeExpr([1])))
                return runtime_shape(bb, longest, 1, "gqa_present_len").values[0]

            key = ("gqa_present_len", _dim_key(total), _dim_key(past_len))
            present_len = _runtime_dim(bb, key, bind)
        positions_all = bb.normalize(relax.op.arange(0, present_len, 1, "int64"))
        present_k = cls._present(bb, past_k, k, positions_all, past_b, total_b, past_len, seq)
        present_v = cls._present(bb, past_v, v, positions_all, past_b, total_b, past_len, seq)
        return present_k, present_v

    @staticmethod
    def _kernel_attention(bb, attr, q, keys, vals, total_b, past_b, sink, kv_heads, scale):
        """The ``qiao.gqa_attention`` placeholder (qiao's TIR kernel once lowered): ``q``
        ``(B, S, Hq, D)`` against the cache buffers' rows ``[0, T_b)``; ``(B, S, Hq*D)``."""
        from qiao.compiler.kernels.attention import AttentionConfig
        from qiao.compiler.passes.lower_attention import ATTENTION_EXTERN

        batch, seq, q_heads, head = q.ty.shape.values
        q_heads, head = int(q_heads), int(head)
        dtype = str(keys.ty.dtype)
        if str(q.ty.dtype) != dtype:
            q = bb.normalize(relax.op.astype(q, dtype))
        use_sink = sink is not None or bool(attr.get("smooth_softmax", 0))
        if sink is not None:
            sink = bb.normalize(relax.op.astype(sink, "float32"))
            sink = bb.normalize(relax.op.reshape(sink, relax.ShapeExpr([q_heads])))
        else:  # smooth_softmax: a sink logit of 0; neither: unused by the kernel
            sink = relax.const(np.zeros(q_heads, np.float32))
        cfg = AttentionConfig(
            q_heads,
            kv_heads,
            head,
            scale,
            softcap=float(attr.get("softcap", 0.0)),
            window=int(attr.get("local_window_size", -1)),
            causal=bool(attr.get("causal", 1)),
            sink=use_sink,
            dtype=dtype,
        )
        out = bb.normalize(
            relax.call_dps_packed(
                ATTENTION_EXTERN,
                [q, keys, vals, total_b, past_b, sink, tvm.ir.StringImm(_config_json(cfg))],
                relax.TensorType([batch, seq, q_heads, head], dtype),
            )
        )
        return bb.normalize(relax.op.reshape(out, relax.ShapeExpr([batch, seq, q_heads * head])))

    @classmethod
    def _relax_attention(
        cls,
        bb,
        attr,
        q,
        present_k,
        present_v,
        total,
        absolute,
        total_b,
        bias,
        sink,
        kv_heads,
        scale,
    ):
        """Attention as Relax ops over the first ``total`` cache rows (``attention_bias``
        needs it): ``q`` ``(B, Hq, S, D)``; returns ``(B, S, Hq*D)``."""
        batch, q_heads, seq, head = q.ty.shape.values
        group = int(q_heads) // kv_heads
        dtype = str(q.ty.dtype)
        # Attention reads the first T columns of the cache (T bounds every T_b).
        keys = bb.normalize(relax.op.strided_slice(present_k, [2], [0], [total], None, True))
        vals = bb.normalize(relax.op.strided_slice(present_v, [2], [0], [total], None, True))
        work = "float32" if dtype in ("float16", "bfloat16") else dtype
        q, keys, vals = (
            bb.normalize(relax.op.astype(t, work)) if str(t.ty.dtype) != work else t
            for t in (q, keys, vals)
        )
        q5 = bb.normalize(relax.op.reshape(q, relax.ShapeExpr([batch, kv_heads, group, seq, head])))
        k5 = bb.normalize(relax.op.expand_dims(relax.op.permute_dims(keys, [0, 1, 3, 2]), 2))
        scores = bb.normalize(relax.op.matmul(q5, k5))  # (B, Hkv, G, S, T)
        scores = bb.normalize(relax.op.multiply(scores, const(scale, work)))
        softcap = float(attr.get("softcap", 0.0))
        if softcap > 0:
            cap = const(softcap, work)
            scores = bb.normalize(
                relax.op.multiply(relax.op.tanh(relax.op.divide(scores, cap)), cap)
            )
        if bias is not None:
            bias = cls._bias_5d(bb, bias, work, kv_heads, seq, total)
            scores = bb.normalize(relax.op.add(scores, bias))
        allowed = cls._allowed(bb, attr, absolute, total_b, total)  # (B, 1, 1, S, T)
        scores = bb.normalize(relax.op.where(allowed, scores, const(-np.inf, work)))
        probs = cls._softmax(bb, attr, scores, sink, work, kv_heads, group)
        out = bb.normalize(relax.op.matmul(probs, relax.op.expand_dims(vals, 2)))  # (B,Hkv,G,S,D)
        out = relax.op.reshape(out, relax.ShapeExpr([batch, q_heads, seq, head]))
        out = bb.normalize(relax.op.permute_dims(out, [0, 2, 1, 3]))
        out = bb.normalize(relax.op.reshape(out, relax.ShapeExpr([batch, seq, q_heads * head])))
        if work != dtype:
            out = bb.normalize(relax.op.astype(out, dtype))
        return out

    @staticmethod
    def _present(bb, past, new, positions, past_b, total_b, past_len, seq):
        """``(B, H, L, D)``: row ``j`` is ``past[j]`` below ``P_b``, ``new[j - P_b]`` in
        ``[P_b, T_b)``, zero from ``T_b`` on — one gather from ``[past, new, 0]``."""
        b, h, _, d = new.ty.shape.values
        zero = relax.op.zeros(relax.ShapeExpr([b, h, 1, d]), str(new.ty.dtype))
        parts = ([past] if past is not None else []) + [new, zero]
        stacked = bb.normalize(relax.op.concat(parts, axis=2))  # length past_len + S + 1
        j = relax.op.expand_dims(positions, 0)  # (1, L)
        start, end = relax.op.expand_dims(past_b, 1), relax.op.expand_dims(total_b, 1)
        past_len_t, seq_t = int_tensor(bb, past_len), int_tensor(bb, seq)
        from_new = relax.op.add(past_len_t, relax.op.subtract(j, start))
        zero_row = relax.op.add(past_len_t, seq_t)
        index = relax.op.where(
            relax.op.less(j, start), j, relax.op.where(relax.op.less(j, end), from_new, zero_row)
        )
        # Clamped: inconsistent lengths (P_b above the past's length) read a wrong row, never
        # out of bounds.
        index = relax.op.minimum(relax.op.maximum(index, const(0, "int64")), zero_row)
        index = bb.normalize(index)
        length = positions.ty.shape.values[0]
        index = bb.normalize(relax.op.reshape(index, relax.ShapeExpr([b, 1, length, 1])))
        index = bb.normalize(relax.op.broadcast_to(index, relax.ShapeExpr([b, h, length, d])))
        return bb.normalize(relax.op.gather_elements(stacked, index, axis=2))

    @staticmethod
    def _allowed(bb, attr, absolute, total_b, total):
        """Which keys each query row sees, ``(B, 1, 1, S, T)`` bool."""
        cols = relax.op.reshape(relax.op.arange(0, total, 1, "int64"), [1, 1, total])
        cols = bb.normalize(cols)
        pos = bb.normalize(relax.op.expand_dims(absolute, 2))  # (B, S, 1)
        ok = relax.op.less(cols, relax.op.expand_dims(total_b, [1, 2]))
        if attr.get("causal", 1):
            ok = relax.op.logical_and(ok, relax.op.less_equal(cols, pos))
            window = int(attr.get("local_window_size", -1))
            if window > 0:
                # W keys, the query's own included (ONNX Runtime 1.32's CPU kernel; its
                # older kernels let a row see W + 1).
                lowest = relax.op.subtract(pos, const(window - 1, "int64"))
                ok = relax.op.logical_and(ok, relax.op.greater_equal(cols, lowest))
        ok = bb.normalize(ok)
        return bb.normalize(relax.op.expand_dims(ok, [1, 2]))

    @staticmethod
    def _bias_5d(bb, bias, work, kv_heads, seq, total):
        """``attention_bias`` ``(B|1, Hq|1, S, T)`` as ``(B|1, Hkv|1, G|1, S, T)``."""
        bias = bb.normalize(relax.op.astype(bias, work)) if str(bias.ty.dtype) != work else bias
        b, h = bias.ty.shape.values[:2]
        # Its last dims are S and total_sequence_length by contract: a run-time check binds them
        # to the dims the scores have (their symbolic names differ).
        bias = bb.match_cast(bias, relax.TensorType([b, h, seq, total], work))
        s, t = seq, total
        if isinstance(h, tirx.IntImm) and int(h) == 1:
            return bb.normalize(relax.op.expand_dims(bias, 2))
        shape = relax.ShapeExpr([b, kv_heads, tirx.floordiv(h, kv_heads), s, t])
        return bb.normalize(relax.op.reshape(bias, shape))

    @staticmethod
    def _softmax(bb, attr, scores, sink, work, kv_heads, group):
        """Softmax over keys; with ``head_sink`` (or ``smooth_softmax``, sink 0) an extra logit
        per head joins the denominator: ``exp(x - m) / (sum exp(x - m) + exp(sink - m))`` with
        ``m`` the maximum of the row and the sink."""
        if sink is None and not attr.get("smooth_softmax", 0):
            return bb.normalize(relax.op.nn.softmax(scores, axis=-1))
        if sink is None:
            sink5 = const(0.0, work)
        else:
            sink = bb.normalize(relax.op.astype(sink, work))
            sink5 = bb.normalize(
                relax.op.reshape(sink, relax.ShapeExpr([1, kv_heads, group, 1, 1]))
            )
        top = bb.normalize(relax.op.maximum(relax.op.max(scores, axis=-1, keepdims=True), sink5))
        e = bb.normalize(relax.op.exp(relax.op.subtract(scores, top)))
        denom = relax.op.add(
            relax.op.sum(e, axis=-1, keepdims=True), relax.op.exp(relax.op.subtract(sink5, top))
        )
        return bb.normalize(relax.op.divide(e, denom))


# --- normalisations ------------------------------------------------------------------------------
def _rms_norm(bb, x, scale, axis: int, eps: float, stash: str):
    """``(y, inv_std_var)``: ``x / sqrt(mean(x^2) + eps) * scale`` over axes ``axis..``, computed
    in ``stash``; ``inv_std_var`` keeps the reduced dims (size 1)."""
    rank = x.ty.ndim
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    dtype = str(x.ty.dtype)
    wide = bb.normalize(relax.op.astype(x, stash)) if stash != dtype else x
    mean_square = relax.op.mean(relax.op.multiply(wide, wide), axes, keepdims=True)
    inv_std = bb.normalize(relax.op.rsqrt(relax.op.add(mean_square, const(eps, stash))))
    normed = bb.normalize(relax.op.multiply(wide, inv_std))
    if stash != str(scale.ty.dtype):
        normed = bb.normalize(relax.op.astype(normed, str(scale.ty.dtype)))
    return bb.normalize(relax.op.multiply(normed, scale)), inv_std


@register_converter("SimplifiedLayerNormalization")
class SimplifiedLayerNormalization(tvm_onnx.OnnxOpConverter):
    """ONNX Runtime's RMS norm in the default domain (outputs ``Y`` and ``inv_std_var``)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        stash = tvm_onnx.get_type(attr.get("stash_type", 1))
        y, inv_std = _rms_norm(
            bb, inputs[0], inputs[1], attr.get("axis", -1), attr.get("epsilon", 1e-5), stash
        )
        count = attr["tvm_custom"]["num_outputs"]
        return y if count == 1 else relax.Tuple([y, inv_std])


@register_converter("SkipSimplifiedLayerNormalization", domain="com.microsoft")
class SkipSimplifiedLayerNormalization(tvm_onnx.OnnxOpConverter):
    """``s = input + skip (+ bias)``, RMS-normalised over the last axis times ``gamma``.

    Outputs: ``output``, ``mean`` and ``inv_std_var`` (float32, ``(…, 1)``; the RMS norm has no
    mean, and ONNX Runtime's CPU kernel does not write it: qiao gives zeros) and
    ``input_skip_bias_sum`` ``s``.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, skip, gamma, beta = inputs[0], inputs[1], inputs[2], inputs[3]
        total = bb.normalize(relax.op.add(x, skip))
        if beta is not None:
            total = bb.normalize(relax.op.add(total, beta))
        y, inv_std = _rms_norm(bb, total, gamma, -1, attr.get("epsilon", 1e-12), "float32")
        mean = bb.normalize(relax.op.zeros_like(inv_std))
        count = attr["tvm_custom"]["num_outputs"]
        return y if count == 1 else relax.Tuple([y, mean, inv_std, total][:count])


# --- RotaryEmbedding: com.microsoft and ai.onnx ---------------------------------------------------
@register_converter("RotaryEmbedding", domain=("", "com.microsoft"))
class RotaryEmbedding(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::RotaryEmbedding`` (input, position_ids, cos_cache, sin_cache) and, by
    the type of the second input (int positions vs float cache), ONNX's opset-23 op (qiao's
    ``convert_attention`` converter). Both domains share the op type, which TVM's importer keys
    converters by.

    The contrib op: input ``(B, S, hidden)`` or ``(B, H, S, D)``; ``position_ids`` ``(B, S)``, or
    ``(1,)``: an offset, row ``s`` at ``offset + s``; ``rotary_embedding_dim`` (needs
    ``num_heads``) rotates a prefix; ``interleaved``. ``is_packed_batching`` is not supported.

    Only ``_impl_v1`` exists, so it serves every opset (TVM's importer passes the default
    domain's opset even for contrib ops) and dispatches itself.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if not str(inputs[1].ty.dtype).startswith("int"):
            return convert_attention.RotaryEmbedding._impl_v23(bb, inputs, attr, params)
        if attr.get("is_packed_batching", 0):
            raise _unsupported("RotaryEmbedding", "is_packed_batching=1", "use padded batches")
        x, position_ids, cos, sin = inputs[0], inputs[1], inputs[2], inputs[3]
        four_d = x.ty.ndim == 4
        if four_d:
            x = bb.normalize(relax.op.permute_dims(x, [0, 2, 1, 3]))  # (B, S, H, D)
        else:
            hidden = _static(x.ty.shape.values[2], "RotaryEmbedding hidden size")
            heads = int(attr.get("num_heads", 0))
            if not heads:  # ONNX Runtime: the head size is the cache's full rotation
                heads = hidden // (2 * _static(cos.ty.shape.values[1], "cos_cache width"))
            x = _split_heads(bb, x, heads, hidden // heads)
        batch, seq = x.ty.shape.values[:2]
        positions = bb.normalize(relax.op.astype(position_ids, "int64"))
        if positions.ty.ndim == 1:  # one offset for every row
            rows = relax.op.arange(0, seq, 1, "int64")
            positions = relax.op.add(relax.op.reshape(positions, relax.ShapeExpr([1, 1])), rows)
            positions = bb.normalize(
                relax.op.broadcast_to(positions, relax.ShapeExpr([batch, seq]))
            )
        rot = int(attr.get("rotary_embedding_dim", 0))
        cos_g, sin_g = _gather_cache(bb, cos, positions), _gather_cache(bb, sin, positions)
        if rot and rot // 2 != _static(cos.ty.shape.values[1], "cos_cache width"):
            cos_g = bb.normalize(relax.op.strided_slice(cos_g, [2], [0], [rot // 2]))
            sin_g = bb.normalize(relax.op.strided_slice(sin_g, [2], [0], [rot // 2]))
        out = convert_attention.apply_rotary(bb, x, cos_g, sin_g, bool(attr.get("interleaved", 0)))
        if four_d:
            return relax.op.permute_dims(out, [0, 2, 1, 3])
        return relax.op.reshape(out, inputs[0].ty.shape)
