"""qiao's converters for standard ONNX operators that TVM's importer lacks or gets wrong.

This module is the entry point: importing it imports the ``convert_*`` modules, one per op family,
whose converters register with ``register_converter``, then wraps the result as described below.
Each converter is an ``OnnxOpConverter`` subclass; keep one family of ops per ``convert_*`` module
(shared helpers in ``convert_common``) and say why TVM's own converter is not enough. A new family
module must be added to ``_FAMILIES`` below.

TVM's importer tracks shape arithmetic symbolically: ``Shape`` gives a ``relax.ShapeExpr``,
``Gather``/``Squeeze`` of one dimension a bare PrimExpr (``batch * 4``), and most converters accept
neither — exported PyTorch models (the dynamo exporter spells ``x.view(b * h, s, d)`` as Shape →
Squeeze → Mul → Reshape → Concat) then fail with "expects the input data to be a Tensor". Two
mechanisms fix that class of problem: converters that keep symbolic values symbolic where the
result is shape arithmetic (``Reshape``, ``Shape`` in ``convert_shape``), and, for every other TVM
converter, a wrapper defined here (``_SymbolicTolerant``) that retries a failed conversion with its
symbolic inputs materialised as int64 tensors.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.frontend import (
    _CONVERTERS,
    convert_attention,
    convert_control,
    convert_dynamic,
    convert_elementwise,
    convert_genai,
    convert_legacy,
    convert_loss,
    convert_norm,
    convert_quant,
    convert_recent,
    convert_reduce,
    convert_rnn,
    convert_scan,
    convert_shape,
    convert_signal,
    convert_slice,
)
from qiao.compiler.frontend.convert_common import is_symbolic_value, materialize, static_dims

# The modules whose import registers qiao's converters for standard ONNX ops.
_FAMILIES = (
    convert_shape,
    convert_slice,
    convert_attention,
    convert_reduce,
    convert_norm,
    convert_elementwise,
    convert_legacy,
    convert_scan,
    convert_loss,
    convert_rnn,
    convert_dynamic,
    convert_control,
    convert_recent,
    convert_signal,
    convert_genai,  # after convert_attention: its RotaryEmbedding serves both domains
    convert_quant,
)


# --- Symbolic-value tolerance for TVM's converters ------------------------------------------------
class _SymbolicTolerant(tvm_onnx.OnnxOpConverter):
    """Runs TVM's converter ``base``; when that fails on an input that is a ``ShapeExpr`` or a
    PrimExpr, runs it again with those inputs as int64 tensors.

    TVM's converters accept symbolic shape values only here and there (``Unsqueeze`` of a PrimExpr,
    ``Concat`` of ShapeExprs), so e.g. ``Sqrt(Cast(Shape(x)[-1]))`` or ``Equal(batch, 0)`` fails in
    type inference. The first attempt keeps the value symbolic where TVM can; the retry is plain
    tensor arithmetic, which is always right, only less foldable. Bindings the failed attempt
    emitted are unused and pure.
    """

    base: type = tvm_onnx.OnnxOpConverter

    @classmethod
    def get_converter(cls, opset):
        inner = cls.base.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if not any(is_symbolic_value(x) for x in inputs):
                return fold_small_constant(inputs, inner(bb, inputs, attr, params))
            try:
                out = inner(bb, inputs, dict(attr), params)
                return bb.normalize(out) if isinstance(out, relax.Expr) else out
            except Exception as first:  # noqa: BLE001 - retried, then re-raised
                tensors = tvm_onnx.onnx_input(materialize(bb, x) for x in inputs)
                try:
                    out = inner(bb, tensors, attr, params)
                    return bb.normalize(out) if isinstance(out, relax.Expr) else out
                except Exception:  # noqa: BLE001
                    raise first from None

        return convert


def fold_small_constant(inputs, out):
    """Evaluate ``out`` now when all its inputs are constants and it is a small integer or boolean
    tensor — shape arithmetic. TVM's converters fold some ops with NumPy but not others
    (``Not``, ``And``, ``Less``...), and a shape that is not a constant at import time sends
    ``Expand``/``Reshape``/``Slice`` down their dynamic-shape paths, which are slower to compile
    and, for TVM's ``Expand``, wrong. Float results are left to ``FoldConstant`` in the pipeline.
    """
    if not isinstance(out, relax.Call) or not all(
        x is None or isinstance(x, tvm.ir.GenericConst) for x in inputs
    ):
        return out
    if not any(isinstance(a, tvm.ir.GenericConst) for a in out.args):
        return out
    dims = static_dims(out) if hasattr(out, "ty") and out.ty is not None else None
    if dims is None:
        try:
            out = relax.BlockBuilder().normalize(out)
        except Exception:  # noqa: BLE001 - leave it to the importer's own normalisation
            return out
        dims = static_dims(out)
    dtype = str(getattr(out.ty, "dtype", ""))
    if dims is None or int(np.prod(dims)) > 4096 or not dtype.startswith(("int", "uint", "bool")):
        return out
    bb = relax.BlockBuilder()
    with bb.function("fold", []):
        bb.emit_func_output(bb.emit(out))
    mod = relax.transform.LegalizeOps()(bb.get())
    with tvm.target.Target({"kind": "llvm"}):
        mod = relax.transform.FoldConstant()(mod)
    body = mod["fold"].body
    folded = body.body if isinstance(body, relax.SeqExpr) else body
    return folded if isinstance(folded, tvm.ir.GenericConst) else out


# Converters of TVM's map that belong to com.microsoft: qiao decides separately which of those it
# supports (``find_unsupported_ops`` treats a registered com.microsoft op as supported).
_NOT_WRAPPED = {
    "FastGelu",
    "BiasGelu",
    "MatMulInteger16",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "Attention",
}


def _wrap_tvm_converters() -> None:
    """Register ``_SymbolicTolerant`` around every TVM converter qiao does not replace."""
    for op_type, base in tvm_onnx._get_convert_map().items():
        if op_type in _CONVERTERS or op_type in _NOT_WRAPPED:
            continue
        _CONVERTERS[op_type] = type(op_type, (_SymbolicTolerant,), {"base": base})


def _fold_qiao_converters() -> None:
    """Give every converter of the ``_FAMILIES`` modules the import-time folding
    ``_SymbolicTolerant`` applies to TVM's (qiao's converters delegate constant cases to TVM's,
    whose results would otherwise stay unfolded and send shape arithmetic down the dynamic-shape
    paths)."""
    families = {module.__name__ for module in _FAMILIES}
    for op_type, cls in list(_CONVERTERS.items()):
        if cls.__module__ not in families or issubclass(cls, _SymbolicTolerant):
            continue

        @classmethod
        def get_converter(folded, opset, _inner=cls.get_converter):
            convert = _inner(opset)

            def folding(bb, inputs, attr, params):
                return fold_small_constant(inputs, convert(bb, inputs, attr, params))

            return folding

        _CONVERTERS[op_type] = type(
            cls.__name__, (cls,), {"get_converter": get_converter, "__doc__": cls.__doc__}
        )


_fold_qiao_converters()
_wrap_tvm_converters()  # last: every converter registered by _FAMILIES takes precedence
