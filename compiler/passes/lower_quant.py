"""``LowerQuant``: replace each ``qiao.matmul_nbits`` placeholder (from the ``MatMulNBits``
converter, ``qiao.compiler.frontend.convert_quant``) with qiao's packed int4/int8 kernel.

The placeholder is ``R.call_dps_packed("qiao.matmul_nbits", (a, B, scales, zero_points, bias,
config))``: ``a`` float32 ``[M, K]`` (``M`` may be symbolic), ``B`` uint8 ``[N, n_blocks * blob]``,
``scales`` float32 ``[N, n_blocks]`` and ``zero_points`` (uint8 packed or float ``[N, ...]``)
constants in ONNX Runtime's layout, ``bias`` ``[N]`` (or a ``(1,)`` placeholder), ``config`` the
JSON of ``k, n, bits, block_size, zero_points, bias, accuracy_level``; it returns ``[M, N]``.

CPU (any backend that is not a GPU one: ``Backend.is_gpu``, passed in by the phases): the
weights are repacked at compile time into the kernel's column-tiled layout
(``qiao.compiler.kernels.quant_gemm.pack_nbits``; still half a byte per 4-bit weight, they stay
constants of that size) and the call becomes

    a_pad = pad(a, K -> k_pad)                  only when K is not a multiple of the block size
    asum  = sum(reshape(a_pad, [M, n_blocks, block_size]), axis=2)
    y_pad = call_tir(quant_matmul, a_pad, asum, codes, scales, zero_points, bias)   [M, n_pad]
    y     = y_pad[:, :N]                        only when N is not a multiple of the tile

At ``accuracy_level`` 4, on a target with integer dot products (``quant_gemm.int8_dot``), the
activations are quantized to int8 per block first, as ONNX Runtime does, and the integer kernel
runs instead (``quantize_rows`` then ``quant_matmul_int8``, codes packed by ``pack_nbits_int8``).

Everything else (GPU targets; the kernels are CPU loop nests) takes the fallback: the weight is
dequantized here, at compile time, into a float32 constant and the call becomes ``matmul`` (+
``add``), which is exact and runs everywhere but reads four bytes per weight.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import contains_call, extern_symbol, rewrite_functions

MATMUL_NBITS_EXTERN = "qiao.matmul_nbits"


def is_matmul_nbits(call: Any) -> bool:
    """Whether ``call`` is the ``qiao.matmul_nbits`` placeholder."""
    return extern_symbol(call) == MATMUL_NBITS_EXTERN


def _value(expr) -> np.ndarray:
    return expr.value.numpy()


@mutator
class _QuantLowerer(PyExprMutator):
    def __init__(self, mod, target, packed: bool):
        super().__init__(mod)
        self.target = target
        self.packed = packed

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if not is_matmul_nbits(call):
            return call
        fields = call.args[1].fields
        cfg = json.loads(fields[-1].value)
        a, b, scales, zp, bias = fields[:-1]
        zero_points = None if cfg["zero_points"] == "default" else _value(zp)
        if self.packed:
            return self._packed(cfg, a, _value(b), _value(scales), zero_points, bias)
        return self._fallback(cfg, a, _value(b), _value(scales), zero_points, bias)

    def _fallback(self, cfg, a, b, scales, zero_points, bias):
        from qiao.compiler.frontend.convert_quant import dequantize_nbits

        k, n, bits, bs = cfg["k"], cfg["n"], cfg["bits"], cfg["block_size"]
        weight = dequantize_nbits(b, scales, zero_points, None, k, n, bits, bs)
        y = relax.op.matmul(a, relax.const(weight))
        return relax.op.add(y, bias) if cfg["bias"] else y

    def _packed(self, cfg, a, b, scales, zero_points, bias):
        from qiao.compiler.kernels.quant_gemm import (
            NBitsLayout,
            cpu_schedule,
            int8_dot,
            pack_nbits,
            pack_nbits_int8,
            quant_matmul,
            quant_matmul_int8,
            quantize_rows,
        )

        k, n, bs = cfg["k"], cfg["n"], cfg["block_size"]
        sched = cpu_schedule(self.target, bs)
        const_bias = cfg["bias"] and isinstance(bias, tvm.ir.GenericConst)
        layout = NBitsLayout(
            k, n, cfg["bits"], bs, sched.tile, cfg["zero_points"], bias=bool(const_bias)
        )
        level = cfg.get("accuracy_level", 0)
        dot = int8_dot(self.target, cfg["bits"]) if level == 4 else None
        if dot is not None and sched.tile % dot.lanes:
            dot = None
        pack = pack_nbits_int8 if dot is not None else pack_nbits
        arrays = pack(b, scales, zero_points, layout)
        bb = self.builder_
        rows = a.ty.shape[0]
        if layout.k_pad != k:
            a = bb.emit(relax.op.nn.pad(a, [0, 0, 0, layout.k_pad - k]))
        if const_bias:
            padded = np.zeros(layout.n_pad, np.float32)
            padded[:n] = _value(bias)
            bias_arg = relax.const(padded)
        else:
            bias_arg = relax.const(np.zeros((1,), "float32"))
        zp = arrays.get("zero_points", np.zeros((1,), "uint8"))
        weights = [relax.const(arrays["codes"]), relax.const(arrays["scales"]), relax.const(zp)]
        out = relax.TensorType((rows, layout.n_pad), "float32")
        if dot is None:
            blocks = relax.ShapeExpr([rows, layout.n_blocks, bs])
            asum = bb.emit(relax.op.sum(relax.op.reshape(a, blocks), axis=[2]))
            gv = bb.add_func(
                quant_matmul(layout, sched).without_attr("global_symbol"), "quant_matmul"
            )
            y = bb.emit(relax.call_tir(gv, [a, asum, *weights, bias_arg], out))
        else:
            per_block = relax.TensorType((rows, layout.n_blocks), "float32")
            quantize = bb.add_func(
                quantize_rows(layout.k_pad, bs).without_attr("global_symbol"), "quantize_rows"
            )
            qa = bb.emit(
                relax.call_tir(
                    quantize,
                    [a],
                    [relax.TensorType((rows, layout.k_pad // 4), "int32"), per_block, per_block],
                )
            )
            parts = [bb.emit(relax.TupleGetItem(qa, i)) for i in range(3)]
            kernel = quant_matmul_int8(layout, dot).without_attr("global_symbol")
            gv = bb.add_func(kernel, "quant_matmul_int8")
            y = bb.emit(relax.call_tir(gv, [*parts, *weights, bias_arg], out))
        if layout.n_pad != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
        if cfg["bias"] and not const_bias:
            y = relax.op.add(y, bias)
        return y


@tvm.transform.module_pass(opt_level=0, name="LowerQuant")
class LowerQuant:
    """Lower ``qiao.matmul_nbits`` placeholders: packed CPU kernels, or dequantized weights.

    Parameters
    ----------
    gpu : bool, optional
        The backend's ``is_gpu``: GPU targets take the dequantized fallback. Default: whether
        the current TVM target's keys say ``gpu``.
    """

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not contains_call(mod, is_matmul_nbits):
            return mod
        target = tvm.target.Target.current(allow_none=True)
        gpu = self.gpu
        if gpu is None:
            gpu = target is not None and "gpu" in target.keys
        # the CPU kernels are LLVM loop nests: every backend that is not a GPU one compiles for
        # an LLVM CPU target here (a hand-off backend never runs this pipeline)
        packed = not gpu and target is not None
        return rewrite_functions(mod, _QuantLowerer(mod, target, packed))


__all__ = ["LowerQuant", "MATMUL_NBITS_EXTERN", "is_matmul_nbits"]
