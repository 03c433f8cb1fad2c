"""Converters for losses: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import register_converter


def _loss_attrs(attr) -> tuple[str, int]:
    reduction = attr.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    # No ignore_index means none: pick a value no valid class index can take.
    return reduction, int(attr.get("ignore_index", -(2**31)))


@register_converter("NegativeLogLikelihoodLoss")
class NegativeLogLikelihoodLoss(tvm_onnx.OnnxOpConverter):
    """``-input[n, target[n, ...], ...]`` weighted and reduced; TVM has the Relax op
    (``nn.nll_loss``) but no ONNX converter."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        reduction, ignore_index = _loss_attrs(attr)
        return relax.op.nn.nll_loss(inputs[0], inputs[1], inputs[2], reduction, ignore_index)


@register_converter("SoftmaxCrossEntropyLoss")
class SoftmaxCrossEntropyLoss(tvm_onnx.OnnxOpConverter):
    """NLL loss of ``log_softmax(scores, axis=1)``, with the log-probabilities as optional second
    output; TVM has no converter."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        reduction, ignore_index = _loss_attrs(attr)
        log_prob = bb.normalize(relax.op.nn.log_softmax(inputs[0], axis=1))
        loss = relax.op.nn.nll_loss(log_prob, inputs[1], inputs[2], reduction, ignore_index)
        if attr["tvm_custom"]["num_outputs"] == 2:
            return relax.Tuple([bb.normalize(loss), log_prob])
        return loss
