"""Converters for normalisations: LayerNormalization, RMSNormalization, LpNormalization."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const


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
            relax.op.divide(const(1, stash), relax.op.sqrt(relax.op.add(var, const(eps, stash))))
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
        rms = relax.op.sqrt(relax.op.add(mean_square, const(eps, stash)))
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
        zero = const(0, str(x.ty.dtype))
        is_zero = relax.op.equal(norm, zero)
        safe = relax.op.where(is_zero, const(1, str(x.ty.dtype)), norm)
        return relax.op.where(is_zero, zero, relax.op.divide(x, safe))


@register_converter("BatchNormalization")
class BatchNormalization(tvm_onnx.OnnxOpConverter):
    """BatchNormalization; in training mode (opset 14+) with batch statistics and the running
    mean/variance outputs ``running * momentum + batch * (1 - momentum)`` (batch variance
    unbiased=False, as the ONNX reference). TVM's converter computes inference mode regardless.
    Inference mode goes to TVM's converter."""

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        if not attr.get("training_mode", 0):
            return tvm_onnx.BatchNormalization._impl_v15(bb, inputs, attr, params)
        x, scale, bias, mean, var = inputs[:5]
        eps = float(attr.get("epsilon", 1e-5))
        momentum = float(attr.get("momentum", 0.9))
        dtype = str(x.ty.dtype)
        axes = [a for a in range(x.ty.ndim) if a != 1]
        channel = [-1] + [1] * (x.ty.ndim - 2)
        batch_mean = bb.normalize(relax.op.mean(x, axes))
        batch_var = bb.normalize(relax.op.variance(x, axes))
        inv_std = bb.normalize(relax.op.rsqrt(relax.op.add(batch_var, const(eps, dtype))))
        centered = relax.op.subtract(x, relax.op.reshape(batch_mean, channel))
        factor = bb.normalize(relax.op.multiply(inv_std, scale))
        y = relax.op.multiply(centered, relax.op.reshape(factor, channel))
        y = relax.op.add(y, relax.op.reshape(bias, channel))

        def running(old, batch):
            return relax.op.add(
                relax.op.multiply(old, const(momentum, dtype)),
                relax.op.multiply(batch, const(1 - momentum, dtype)),
            )

        count = attr["tvm_custom"]["num_outputs"]
        outs = [y, running(mean, batch_mean), running(var, batch_var)]
        return relax.Tuple([bb.normalize(o) for o in outs[:count]]) if count > 1 else y
