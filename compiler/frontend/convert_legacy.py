"""Converters for the experimental operators of ONNX's first opsets (removed in opset 10) that
older exporters wrote, Caffe2's converter above all: ImageScaler, ScaledTanh, Affine,
ParametricSoftplus. TVM's importer has none of them; each is a few elementwise ops.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const


def _scalar(x, value: float):
    return const(value, str(x.ty.dtype))


@register_converter("ImageScaler")
class ImageScaler(tvm_onnx.OnnxOpConverter):
    """``y = scale * x + bias[c]`` over NCHW input (``bias`` one value per channel)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(x.ty.dtype)
        y = relax.op.multiply(x, _scalar(x, float(attr.get("scale", 1.0))))
        bias = attr.get("bias")
        if bias is not None:
            y = relax.op.add(y, const(np.asarray(bias).reshape(1, -1, 1, 1), dtype))
        return y


@register_converter("ScaledTanh")
class ScaledTanh(tvm_onnx.OnnxOpConverter):
    """``y = alpha * tanh(beta * x)``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        inner = relax.op.multiply(x, _scalar(x, float(attr.get("beta", 1.0))))
        return relax.op.multiply(relax.op.tanh(inner), _scalar(x, float(attr.get("alpha", 1.0))))


@register_converter("Affine")
class Affine(tvm_onnx.OnnxOpConverter):
    """``y = alpha * x + beta``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        scaled = relax.op.multiply(x, _scalar(x, float(attr.get("alpha", 1.0))))
        return relax.op.add(scaled, _scalar(x, float(attr.get("beta", 0.0))))


@register_converter("ParametricSoftplus")
class ParametricSoftplus(tvm_onnx.OnnxOpConverter):
    """``y = alpha * ln(exp(beta * x) + 1)``, computed without overflow for large ``beta * x``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        bx = relax.op.multiply(x, _scalar(x, float(attr.get("beta", 1.0))))
        # softplus(z) = max(z, 0) + log1p(exp(-|z|))
        soft = relax.op.add(
            relax.op.maximum(bx, _scalar(x, 0.0)),
            relax.op.log(
                relax.op.add(relax.op.exp(relax.op.negative(relax.op.abs(bx))), _scalar(x, 1.0))
            ),
        )
        return relax.op.multiply(soft, _scalar(x, float(attr.get("alpha", 1.0))))
