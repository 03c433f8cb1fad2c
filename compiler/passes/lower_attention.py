"""``LowerAttention``: replace the ``GroupQueryAttention`` converter's placeholders with qiao's
TIR kernels (``qiao.compiler.kernels.attention``), scheduled for the target:

    qiao.gqa_attention   (q, k_cache, v_cache, total, past, sink, config) -> out (B, S, Hq, D)
                         -> call_tir(gqa_attention)
    qiao.kv_append       (k_new, v_new, total, past, k_cache, v_cache, config)
                         -> (k_cache, v_cache), call_tir_inplace(kv_append): the outputs ARE
                            the cache arguments, written at rows [P_b, T_b)

``config`` is the JSON of an ``AttentionConfig``. Thread-bound kernels for a GPU backend
(``Backend.is_gpu``), CPU loop nests otherwise, as ``LowerMoE`` does.
"""

from __future__ import annotations

import json
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import contains_call, rewrite_functions

ATTENTION_EXTERN = "qiao.gqa_attention"
APPEND_EXTERN = "qiao.kv_append"
_EXTERNS = (ATTENTION_EXTERN, APPEND_EXTERN)


def placeholder_kind(call: Any) -> str | None:
    """``ATTENTION_EXTERN`` or ``APPEND_EXTERN`` for a placeholder call, else ``None``."""
    if (
        isinstance(call, relax.Call)
        and isinstance(call.op, tvm.ir.Op)
        and call.op.name == "relax.call_dps_packed"
        and isinstance(call.args[0], relax.ExternFunc)
        and call.args[0].global_symbol in _EXTERNS
    ):
        return str(call.args[0].global_symbol)
    return None


@mutator
class _AttentionLowerer(PyExprMutator):
    def __init__(self, mod, gpu: bool):
        super().__init__(mod)
        self.gpu = gpu

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        kind = placeholder_kind(call)
        if kind is None:
            return call
        from qiao.compiler.kernels.attention import AttentionConfig, gqa_attention, kv_append

        fields = call.args[1].fields
        cfg = AttentionConfig(**json.loads(fields[-1].value))
        args = list(fields[:-1])
        out = call.ty_args[0]
        if isinstance(out, relax.TupleType):
            out = list(out.fields)
        # Without a global_symbol the builder names each kernel uniquely (identical ones shared)
        if kind == ATTENTION_EXTERN:
            func = gqa_attention(cfg, gpu=self.gpu).without_attr("global_symbol")
            gv = self.builder_.add_func(func, "gqa_attention")
            return relax.call_tir(gv, args, out)
        func = kv_append(cfg, gpu=self.gpu).without_attr("global_symbol")
        gv = self.builder_.add_func(func, "kv_append")
        return relax.call_tir_inplace(gv, args, [4, 5], out)


@tvm.transform.module_pass(opt_level=0, name="LowerAttention")
class LowerAttention:
    """Lower ``qiao.gqa_attention`` / ``qiao.kv_append`` placeholders to TIR kernels.

    Parameters
    ----------
    gpu : bool, optional
        Thread-bound GPU kernels instead of CPU loop nests: the backend's ``is_gpu``. Default:
        whether the current TVM target's keys say ``gpu``.
    """

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not contains_call(mod, lambda e: placeholder_kind(e) is not None):
            return mod
        gpu = self.gpu
        if gpu is None:
            target = tvm.target.Target.current(allow_none=True)
            gpu = target is not None and "gpu" in target.keys
        lowerer = _AttentionLowerer(mod, bool(gpu))
        return rewrite_functions(mod, lowerer)


__all__ = ["APPEND_EXTERN", "ATTENTION_EXTERN", "LowerAttention", "placeholder_kind"]
