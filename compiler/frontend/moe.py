"""Converter for ``com.microsoft::MoE`` (ONNX Runtime's contrib op): one node becomes one
placeholder call that ``qiao.compiler.passes.LowerMoE`` replaces with qiao's four-stage MoE kernels
for the target.

The placeholder is ``R.call_dps_packed("qiao.moe", (x, router_logits, fc1, fc1_bias, fc2, fc2_bias,
config))`` on 2-D tokens, ``config`` a JSON string of ``MoEConfig``; absent biases are ``(1,)`` zero
constants. Keeping the op whole until the pipeline knows the target is what lets every backend lower
it through the same stages with its own schedule.

The node is parsed by ``qiao.compiler.moe_op`` (the op's one definition: ONNX Runtime's defaults
and what the op refuses). On top of that qiao's kernels support: ``activation_type`` swiglu
(``swiglu_fusion`` 1 interleaved or 2 concatenated gate/up, with ``activation_alpha`` /
``activation_beta`` / ``swiglu_limit``), silu, relu, gelu, identity; optional fc1/fc2 biases; 2-D or
3-D input. Not supported (clear error): separate fc3 weights (``swiglu_fusion=0``),
``swiglu_limit_after_activation=1``, non-float32 tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler import moe_op
from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.kernels.moe_common import MoEConfig
from qiao.compiler.passes.lower_moe import MOE_EXTERN


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


def moe_config_from_node(inputs, attr, expert_shapes=None, weight_bits: int = 0) -> MoEConfig:
    """Validate a ``com.microsoft::MoE`` node's inputs and attributes (``moe_op`` parses them)
    and describe it for qiao's kernels. ``expert_shapes``: the logical ``(fc1, fc2)`` weight
    shapes of integer experts (``QMoE``), whose stored tensors are not float ``[E, rows, cols]``.
    """
    attrs = {k: v for k, v in attr.items() if k != "tvm_custom"}  # TVM's importer adds it
    spec = moe_op.spec_from_attributes(attrs, [v is not None for v in inputs])
    if spec.fc3:
        raise CompileError(
            "com.microsoft::MoE with separate fc3 weights (swiglu_fusion=0) is not supported. fix: "
            "fuse gate and up into fc1 (swiglu_fusion=1, rows interleaved) when exporting"
        )
    if spec.swiglu_limit_after_activation:
        raise CompileError(
            "com.microsoft::MoE with swiglu_limit_after_activation=1 (clamp of the activated gate) "
            "is not supported. fix: export with swiglu_limit_after_activation=0 (clamp of the gate "
            "input, GPT-OSS's SwiGLU)"
        )
    x, logits, fc1, fc2 = inputs[0], inputs[1], inputs[2], inputs[4]
    checked = [("input", x), ("router_probs", logits)]
    if expert_shapes is None:
        checked += [("fc1", fc1), ("fc2", fc2)]
    for name, v in checked:
        if str(v.ty.dtype) != "float32":
            raise CompileError(
                f"com.microsoft::MoE {name} is {v.ty.dtype}; qiao's MoE kernels take float32. fix: "
                "export the model in float32"
            )
    if expert_shapes is None:
        fc1_shape = [_int(d, "fc1 dims") for d in _static_shape(fc1, "fc1_experts_weights", 3)]
        fc2_shape = [_int(d, "fc2 dims") for d in _static_shape(fc2, "fc2_experts_weights", 3)]
    else:
        fc1_shape, fc2_shape = (list(s) for s in expert_shapes)
    num_experts, hidden, inter = moe_op.expert_dims(spec, fc1_shape, fc2_shape)
    return MoEConfig(
        num_experts=num_experts,
        hidden=hidden,
        inter=inter,
        top_k=spec.k,
        normalize=spec.normalize,
        activation=spec.activation_type,
        gate_up_layout=spec.layout or "interleaved",
        alpha=spec.activation_alpha,
        beta=spec.activation_beta,
        limit=spec.swiglu_limit,
        fc1_bias=spec.fc1_bias,
        fc2_bias=spec.fc2_bias,
        weight_bits=weight_bits,
    )


@register_converter("MoE", domain="com.microsoft")
class MoE(tvm_onnx.OnnxOpConverter):
    """``com.microsoft::MoE`` → the ``qiao.moe`` placeholder (lowered by ``LowerMoE``)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        cfg = moe_config_from_node(inputs, attr)
        return _placeholder(
            bb, cfg, inputs[0], inputs[1], [inputs[2], _opt(inputs, 3), inputs[4], _opt(inputs, 5)]
        )

    @classmethod
    def quantized(cls, bb, x, logits, attr, fc1, b1, fc2, b2, accuracy_level: int = 0):
        """The placeholder of a MoE with integer experts (``QMoE``): ``fc1``/``fc2`` are
        ``kernels.quant_moe.QuantExperts`` of the same bits, ``b1``/``b2`` float constants or
        None. Its weight arguments are ``(codes1, b1, codes2, b2, scales1, zero1, scales2,
        zero2)``; a ``(1,)`` uint8 zero stands for the default zero point."""
        shapes = ((*fc1.codes.shape[:2], fc1.k), (*fc2.codes.shape[:2], fc2.k))
        present = [x, logits, True, b1, True, b2]  # the experts are there, stored quantized
        cfg = moe_config_from_node(present, attr, expert_shapes=shapes, weight_bits=fc1.bits)
        cfg = dataclasses.replace(cfg, accuracy_level=accuracy_level)

        def zero(q):
            return relax.const(q.zero if q.zero is not None else np.zeros((1,), "uint8"))

        weights = [relax.const(fc1.codes), b1, relax.const(fc2.codes), b2]
        weights += [relax.const(fc1.scales), zero(fc1), relax.const(fc2.scales), zero(fc2)]
        return _placeholder(bb, cfg, x, logits, weights)


def _opt(inputs, i):
    return inputs[i] if len(inputs) > i and inputs[i] is not None else None


def _placeholder(bb, cfg: MoEConfig, x, logits, weights: list):
    """Emit the ``qiao.moe`` call for ``cfg`` on ``x`` (2-D or 3-D) and ``logits``; ``weights``
    after them, absent biases (None) as ``(1,)`` zero constants."""
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
        # (tokens, E) however the router output was declared; the VM checks the count at run time
        logits = bb.normalize(relax.op.reshape(logits, (tokens, cfg.num_experts)))
    if _int(logits.ty.shape[-1], "num_experts") != cfg.num_experts:
        raise CompileError(
            f"com.microsoft::MoE router_probs has {logits.ty.shape[-1]} experts, the weights "
            f"{cfg.num_experts}. fix: export matching router and expert weights"
        )
    placeholder = relax.const(np.zeros((1,), "float32"))
    weights = [placeholder if w is None else w for w in weights]
    config = json.dumps(asdict(cfg), sort_keys=True)
    out = bb.emit(
        relax.call_dps_packed(
            MOE_EXTERN,
            [x2, logits, *weights, tvm.ir.StringImm(config)],
            relax.TensorType((tokens, cfg.hidden), "float32"),
        )
    )
    if len(x_shape) == 3:
        out = relax.op.reshape(out, x_shape)
    return out


__all__ = ["MOE_EXTERN", "MoE", "moe_config_from_node"]
