"""``LowerMoE``: replace each ``qiao.moe`` placeholder (from the ``com.microsoft::MoE`` converter)
with qiao's four MoE stages, scheduled for the target:

    moe_gating    softmax + top-k + renormalise          logits (T, E)       -> ids, weights (T, k)
    moe_align     counts, padded offsets, sorted slots    ids                 -> dispatch tables
    group_gemm_up gate/up GEMM + activation per slot      x (T, H), fc1       -> act (S, I)
                  (CPU, rows of x a multiple of 4 KB: read from ``moe_pad_rows(x)``, rows padded
                  by ``MoESchedule.x_pad`` floats so that they start in different L1 sets)
    group_gemm_down down GEMM x routing weight per pair   act, fc2            -> out (T, k, H)
    moe_combine   sum of the k rows of each token         out                 -> y (T, H)

The token count T stays symbolic: one artifact serves every T. Schedule parameters (block sizes,
micro-kernel shape) come from ``qiao.compiler.schedules.moe_table.lookup(target)``, with a backend's
overrides on top; the kernels are the same for every target family, only their schedule differs:
thread-bound for a GPU backend (``Backend.is_gpu``, passed in by the backend's phases), CPU loop
nests otherwise.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.errors import CompileError
from qiao.compiler.passes.placeholders import contains_call, rewrite_functions

MOE_EXTERN = "qiao.moe"
log = logging.getLogger(__name__)


def is_moe_placeholder(call: relax.Call) -> bool:
    """Whether ``call`` is the ``qiao.moe`` placeholder the MoE converter emits."""
    return (
        isinstance(call, relax.Call)
        and isinstance(call.op, tvm.ir.Op)
        and call.op.name == "relax.call_dps_packed"
        and isinstance(call.args[0], relax.ExternFunc)
        and call.args[0].global_symbol == MOE_EXTERN
    )


def _config(call: relax.Call):
    from qiao.compiler.kernels.moe_common import MoEConfig

    args = call.args[1].fields
    return MoEConfig(**json.loads(args[-1].value)), list(args[:-1])


@mutator
class _MoELowerer(PyExprMutator):
    def __init__(self, mod, target, schedule, gpu: bool):
        super().__init__(mod)
        self.target = target
        self.schedule = schedule
        self.gpu = gpu
        self.lowered = 0
        self.kernels = {}  # emit_moe's: a model's MoE layers of one config share their kernels

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if not is_moe_placeholder(call):
            return call
        self.lowered += 1
        cfg, args = _config(call)
        x, logits, fc1, b1, fc2, b2 = args[:6]
        quant = None
        if cfg.weight_bits:
            cfg, quant, fc1, fc2 = self._integer_experts(cfg, args)
        return emit_moe(
            self.builder_, cfg, self.schedule, x, logits, fc1, b1, fc2, b2, self.gpu, quant,
            kernels=self.kernels,
        )  # fmt: skip

    def _integer_experts(self, cfg, args):
        """Integer experts (``QMoE``): packed for ``kernels.quant_moe`` on a CPU target whose
        tiles fit the shapes, else dequantized here to float32 constants (exact)."""
        from qiao.compiler.kernels.quant_moe import QuantExperts, QuantMoE, float_config

        _x, _logits, c1, b1, c2, b2, s1, z1, s2, z2 = args
        experts = []
        for codes, scales, zero, k in ((c1, s1, z1, cfg.hidden), (c2, s2, z2, cfg.inter)):
            z = zero.value.numpy()
            experts.append(
                QuantExperts(
                    codes=codes.value.numpy(),
                    scales=scales.value.numpy(),
                    zero=z if z.ndim == 3 else None,
                    bits=cfg.weight_bits,
                    k=k,
                )
            )
        fc1, fc2 = experts
        if not self.gpu:
            bias1 = b1.value.numpy() if cfg.fc1_bias else None
            bias2 = b2.value.numpy() if cfg.fc2_bias else None
            packed, reason = QuantMoE.pack(cfg, self.target, fc1, bias1, fc2, bias2)
            if packed is not None:
                return cfg, packed, c1, c2
            log.info("MoE integer experts dequantized to float32: %s", reason)
        return (
            float_config(cfg),
            None,
            relax.const(fc1.dequantized()),
            relax.const(fc2.dequantized()),
        )


def emit_moe(
    bb: relax.BlockBuilder,
    cfg,
    schedule,
    x,
    logits,
    fc1,
    b1,
    fc2,
    b2,
    gpu: bool,
    quant=None,
    kernels: dict | None = None,
):
    """Emit the four MoE stages for ``cfg`` into ``bb``; returns ``y`` (T, H).

    Parameters
    ----------
    bb : relax.BlockBuilder
    cfg : qiao.compiler.kernels.moe_common.MoEConfig
    schedule : qiao.compiler.schedules.moe_table.MoESchedule
    x, logits, fc1, b1, fc2, b2 : relax.Expr
        (T, H), (T, E), (E, R, H), (E, R) or (1,), (E, H, I), (E, H) or (1,).
    gpu : bool
        Thread-bound kernels (CUDA, ROCm...) instead of the CPU schedule.
    quant : qiao.compiler.kernels.quant_moe.QuantMoE, optional
        Integer experts packed for the CPU: its grouped GEMMs replace ``group_gemm_*`` (``fc1``,
        ``fc2``, ``b1``, ``b2`` are then unused).
    kernels : dict, optional
        The kernels built so far, by name and arguments (``moe_common.add_kernel``), reused
        instead of built again.
    """
    from qiao.compiler.kernels.group_gemm import (
        group_gemm_down,
        group_gemm_up,
        pad_rows,
        up_row_floats,
    )
    from qiao.compiler.kernels.moe_align import moe_align
    from qiao.compiler.kernels.moe_combine import moe_combine
    from qiao.compiler.kernels.moe_common import add_kernel, num_blocks
    from qiao.compiler.kernels.moe_gating import moe_gating

    E, H, INTER, K, BM = cfg.num_experts, cfg.hidden, cfg.inter, cfg.top_k, schedule.block_m
    n = x.ty.shape[0]
    blocks = num_blocks(n, K, E, BM)
    i32, f32 = "int32", "float32"

    def tt(shape, dtype):
        return relax.TensorType(shape, dtype)

    add = functools.partial(add_kernel, bb, kernels)  # add(name, build, *args, **kwargs)

    gating = add("moe_gating", moe_gating, E, K, cfg.normalize, gpu=gpu)
    align = add("moe_align", moe_align, E, K, BM, gpu=gpu)
    combine = add("moe_combine", moe_combine, H, K, gpu=gpu, vector_lanes=schedule.vector_lanes)

    routed = bb.emit(relax.call_tir(gating, [logits], [tt((n, K), i32), tt((n, K), f32)]))
    ids, weights = bb.emit(relax.TupleGetItem(routed, 0)), bb.emit(relax.TupleGetItem(routed, 1))
    tables = bb.emit(
        relax.call_tir(
            align,
            [ids],
            [
                tt((E,), i32),  # counts
                tt((E + 1,), i32),  # offsets
                tt((E,), i32),  # active experts
                tt((1,), i32),  # number of active experts
                tt((blocks * BM,), i32),  # sorted pairs (slots)
                tt((blocks,), i32),  # block -> expert
                tt((1,), i32),  # used blocks
                tt((n, K), i32),  # pair -> slot
            ],
        )
    )
    t = [bb.emit(relax.TupleGetItem(tables, i)) for i in range(8)]
    counts, offsets, active, num_active, pairs, block_expert, num_used, pair_slot = t
    if quant is not None:
        act = quant.emit_up(bb, x, t, blocks * BM, kernels)
        out = quant.emit_down(bb, act, weights, t, n, kernels)
        return bb.emit(relax.call_tir(combine, [out], tt((n, H), f32)))
    up = add("group_gemm_up", group_gemm_up, cfg, schedule, gpu=gpu)
    down = add("group_gemm_down", group_gemm_down, cfg, schedule, gpu=gpu)
    dispatch = [ids, pairs, offsets, counts, active, num_active, block_expert, num_used, pair_slot]
    x_cols = up_row_floats(cfg, schedule, gpu=gpu)
    if x_cols != H:  # the tokens' rows set apart by a pad (``MoESchedule.x_pad``)
        pad = add("moe_pad_rows", pad_rows, H, x_cols, schedule.vector_lanes)
        x = bb.emit(relax.call_tir(pad, [x], tt((n, x_cols), f32)))
    act = bb.emit(relax.call_tir(up, [x, fc1, b1, *dispatch], tt((blocks * BM, INTER), f32)))
    out = bb.emit(
        relax.call_tir(down, [act, fc2, b2, ids, weights, *dispatch[1:]], tt((n, K, H), f32))
    )
    return bb.emit(relax.call_tir(combine, [out], tt((n, H), f32)))


@tvm.transform.module_pass(opt_level=0, name="LowerMoE")
class LowerMoE:
    """Lower ``qiao.moe`` placeholders to qiao's MoE kernels for ``target``.

    Parameters
    ----------
    target : tvm.target.Target, optional
        Default: the current target (the pipeline runs under ``with target``).
    overrides : Mapping, optional
        Schedule fields replacing the table's (the ``moe_schedule`` compile option).
    gpu : bool, optional
        Thread-bound GPU kernels instead of CPU loop nests: the backend's ``is_gpu``. Default:
        whether TVM's target keys say ``gpu`` (every GPU kind declares it).
    keys : list of str, optional
        MoE table keys, most specific first: the backend's ``tuning_keys``. Default:
        ``moe_table.device_keys(target)``.
    """

    def __init__(
        self,
        target: Any = None,
        overrides: Mapping[str, Any] | None = None,
        gpu: bool | None = None,
        keys: list[str] | None = None,
    ):
        self.target = target
        self.overrides = dict(overrides or {})
        self.gpu = gpu
        self.keys = list(keys) if keys is not None else None

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not contains_call(mod, lambda e: isinstance(e, relax.Call) and is_moe_placeholder(e)):
            return mod
        from qiao.compiler.schedules.moe_table import lookup

        target = self.target or tvm.target.Target.current(allow_none=True)
        if target is None:
            raise CompileError(
                "LowerMoE needs a target to pick the MoE schedule. fix: pass LowerMoE(target) or "
                "run the pipeline under `with target:`"
            )
        gpu = self.gpu if self.gpu is not None else "gpu" in target.keys
        schedule = lookup(target, self.overrides, keys=self.keys)
        lowerer = _MoELowerer(mod, target, schedule, gpu)
        return rewrite_functions(mod, lowerer)


__all__ = ["LowerMoE", "emit_moe", "is_moe_placeholder"]
