"""Converter for ``com.microsoft::MoE`` (ONNX Runtime's contrib op): one node becomes one
placeholder call that ``qiao.compiler.passes.LowerMoE`` replaces with qiao's four-stage MoE kernels
for the target.

The placeholder is ``R.call_dps_packed("qiao.moe", (x, router_logits, fc1, fc1_bias, fc2, fc2_bias,
config))`` on 2-D tokens, ``config`` a JSON string of ``MoEConfig``; absent biases are ``(1,)`` zero
constants. Keeping the op whole until the pipeline knows the target is what lets every backend lower
it through the same stages with its own schedule.

Supported: ``activation_type`` swiglu (``swiglu_fusion`` 1 interleaved or 2 concatenated gate/up,
with
``activation_alpha``/``activation_beta``/``swiglu_limit``), silu, relu, gelu, identity; optional
fc1/fc2
biases; 2-D or 3-D input. Not supported (clear error): ``use_sparse_mixer``, separate fc3 weights
(``swiglu_fusion=0``), ``swiglu_limit_after_activation=1``, the CUDA-only ``relu2`` / ``geglu``
activations, non-float32 tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.kernels.moe_common import ACTIVATIONS, MoEConfig
from qiao.compiler.passes.lower_moe import MOE_EXTERN


def _attr_str(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _static_shape(expr, what: str, rank: int) -> list:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or len(shape) != rank:
        raise CompileError(
            f"com.microsoft::MoE: {what} must be a rank-{rank} tensor, got {expr.ty}. "
            "fix: export the "
            "MoE weights as [num_experts, rows, cols] float32 tensors"
        )
    return list(shape)


def _int(dim, what: str) -> int:
    try:
        return int(dim)
    except (TypeError, ValueError) as err:
        raise CompileError(
            f"com.microsoft::MoE: {what} must be a static dimension, got {dim}. "
            "fix: give the expert "
            "weights fixed shapes (only the token count may be symbolic)"
        ) from err


def moe_config_from_node(inputs, attr) -> MoEConfig:
    """Validate a ``com.microsoft::MoE`` node's inputs and attributes and describe it."""
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    x, logits, fc1, fc2 = get(0), get(1), get(2), get(4)
    if any(v is None for v in (x, logits, fc1, fc2)):
        raise CompileError(
            "com.microsoft::MoE needs input, router_probs, fc1_experts_weights and "
            "fc2_experts_weights. fix: re-export the MoE node with all four"
        )
    if get(6) is not None or get(7) is not None:
        raise CompileError(
            "com.microsoft::MoE with separate fc3 weights (swiglu_fusion=0) is not supported. fix: "
            "fuse gate and up into fc1 (swiglu_fusion=1, rows interleaved) when exporting"
        )
    if int(attr.get("use_sparse_mixer", 0)):
        raise CompileError(
            "com.microsoft::MoE with use_sparse_mixer=1 is not supported. fix: export with "
            "use_sparse_mixer=0 (softmax over all experts, then top-k)"
        )
    for name, v in (("input", x), ("router_probs", logits), ("fc1", fc1), ("fc2", fc2)):
        if str(v.ty.dtype) != "float32":
            raise CompileError(
                f"com.microsoft::MoE {name} is {v.ty.dtype}; qiao's MoE kernels take float32. fix: "
                "export the model in float32"
            )
    e1, rows, hidden = (_int(d, "fc1 dims") for d in _static_shape(fc1, "fc1_experts_weights", 3))
    e2, hidden2, inter = (_int(d, "fc2 dims") for d in _static_shape(fc2, "fc2_experts_weights", 3))
    activation = _attr_str(attr.get("activation_type"), "relu")
    fusion = int(attr.get("swiglu_fusion", 0))
    if activation not in ACTIVATIONS:
        # relu2 and geglu are CUDA-only in ONNX Runtime, and not in qiao's MoE kernels
        raise CompileError(
            f"com.microsoft::MoE activation_type={activation!r} is not supported. fix: export the "
            f"experts with one of {ACTIVATIONS}, or decompose the MoE into ordinary ops"
        )
    if int(attr.get("swiglu_limit_after_activation", 0)):
        raise CompileError(
            "com.microsoft::MoE with swiglu_limit_after_activation=1 (clamp of the activated gate) "
            "is not supported. fix: export with swiglu_limit_after_activation=0 (clamp of the gate "
            "input, GPT-OSS's SwiGLU)"
        )
    if activation == "swiglu":
        if fusion not in (1, 2):
            raise CompileError(
                f"com.microsoft::MoE swiglu with swiglu_fusion={fusion} is not supported. fix: use "
                "swiglu_fusion=1 (interleaved gate/up rows in fc1) or 2 (concatenated)"
            )
        expected_rows = 2 * inter
    else:
        expected_rows = inter
    if e1 != e2 or hidden != hidden2 or rows != expected_rows:
        raise CompileError(
            f"com.microsoft::MoE weight shapes disagree: fc1 {[e1, rows, hidden]}, fc2 "
            f"{[e2, hidden2, inter]} (activation {activation}). fix: fc1 must be [E, "
            f"{'2*' if activation == 'swiglu' else ''}I, H] and fc2 [E, H, I]"
        )
    limit = attr.get("swiglu_limit")
    return MoEConfig(
        num_experts=e1,
        hidden=hidden,
        inter=inter,
        top_k=int(attr.get("k", 1)),
        normalize=bool(int(attr.get("normalize_routing_weights", 0))),
        activation=activation,
        gate_up_layout="concat" if fusion == 2 else "interleaved",
        alpha=float(attr.get("activation_alpha", 1.0)),
        beta=float(attr.get("activation_beta", 0.0)),
        limit=None if limit is None else float(limit),
        fc1_bias=get(3) is not None,
        fc2_bias=get(5) is not None,
    )


@register_converter("MoE", domain="com.microsoft")
class MoE(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::MoE`` → the ``qiao.moe`` placeholder (lowered by ``LowerMoE``)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        cfg = moe_config_from_node(inputs, attr)
        x, logits = inputs[0], inputs[1]
        x_shape = list(x.ty.shape)
        if len(x_shape) not in (2, 3) or _int(x_shape[-1], "hidden") != cfg.hidden:
            raise CompileError(
                f"com.microsoft::MoE input must be [tokens, {cfg.hidden}] or [batch, seq, "
                f"{cfg.hidden}], got {x.ty}. fix: match the input to the expert weights"
            )
        tokens = x_shape[0] * x_shape[1] if len(x_shape) == 3 else x_shape[0]
        x2 = bb.normalize(relax.op.reshape(x, (tokens, cfg.hidden))) if len(x_shape) == 3 else x
        same = len(logits.ty.shape) == 2 and tvm.sym.Analyzer().can_prove_equal(
            logits.ty.shape[0], tokens
        )
        if not same:
            # (tokens, E) however the router output was declared; the VM checks the count at run
            # time
            logits = bb.normalize(relax.op.reshape(logits, (tokens, cfg.num_experts)))
        if _int(logits.ty.shape[-1], "num_experts") != cfg.num_experts:
            raise CompileError(
                f"com.microsoft::MoE router_probs has {logits.ty.shape[-1]} experts, the weights "
                f"{cfg.num_experts}. fix: export matching router and expert weights"
            )
        placeholder = relax.const(np.zeros((1,), "float32"))
        b1 = inputs[3] if len(inputs) > 3 and inputs[3] is not None else placeholder
        b2 = inputs[5] if len(inputs) > 5 and inputs[5] is not None else placeholder
        config = json.dumps(asdict(cfg), sort_keys=True)
        out = bb.emit(
            relax.call_dps_packed(
                MOE_EXTERN,
                [x2, logits, inputs[2], b1, inputs[4], b2, tvm.ir.StringImm(config)],
                relax.TensorType((tokens, cfg.hidden), "float32"),
            )
        )
        if len(x_shape) == 3:
            out = relax.op.reshape(out, x_shape)
        return out


__all__ = ["MOE_EXTERN", "MoE", "moe_config_from_node"]
