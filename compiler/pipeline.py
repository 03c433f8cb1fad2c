"""The lowering pipeline: named phases, in order, with an optional IR dump between them.

Every backend returns its phases from ``Backend.phases(target)``; ``default_phases`` is the shape
they share (after TVM's ``relax/backend/<target>/pipeline.py``). A backend replaces single phases
(usually ``schedule``) rather than writing a pipeline of its own, and passes what depends on its
target (its schedule passes, ``gpu``, its MoE table keys); nothing here switches on the target
kind.

Phases:
  prepare           inference simplifications, qiao's graph rewrites (quantized GEMMs, MoE,
                    attention)
  library_dispatch  sorting/sampling dispatch to TVM's library kernels
  legalize          Relax ops → TIR, operator fusion
  schedule          per-target TIR schedules (CPU GEMM/conv rules, GPU dlight rules)
  lift_params       weight-only computations (packing) moved to ``main_transform_params``
  dataflow_lower    Relax dataflow → VM-ready form
  finalize          memory planning, VM lowering
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    """One named step of a lowering pipeline: a list of Relax/TIR module passes."""

    name: str
    passes: Sequence[Any]


def prepare_passes(
    target: Any,
    moe_schedule: Mapping[str, Any] | None = None,
    gpu: bool | None = None,
    moe_keys: Sequence[str] | None = None,
) -> list:
    """``moe_schedule`` overrides the MoE block sizes the per-device table gives for ``target``
    under ``moe_keys`` (the backend's ``tuning_keys``); ``gpu`` (the backend's ``is_gpu``) picks
    thread-bound MoE kernels. ``None``: derived from the TVM target (see ``LowerMoE``)."""
    from tvm import relax

    from qiao.compiler.passes import LowerAttention, LowerMoE, LowerQuant
    from qiao.compiler.passes.fold_padding import FoldPadding
    from qiao.compiler.passes.fold_weight_casts import FoldWeightCasts
    from qiao.compiler.passes.pad_conv_rows import PadConvRows
    from qiao.compiler.passes.subsample_pointwise import SubsamplePointwise
    from qiao.compiler.passes.widen_depthwise_rows import WidenDepthwiseRows

    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        # astype(float16/bfloat16 weight) folded into the GEMMs / MoE experts reading it
        FoldWeightCasts(gpu=gpu),
        # com.microsoft::MatMulNBits placeholders -> packed int4/int8 CPU kernels (or dequantized)
        LowerQuant(gpu=gpu),
        # com.microsoft::MoE -> qiao's gating / align / grouped-GEMM / combine kernels
        LowerMoE(
            target,
            overrides=moe_schedule,
            gpu=gpu,
            keys=list(moe_keys) if moe_keys is not None else None,
        ),
        # com.microsoft::GroupQueryAttention placeholders -> qiao's attention / KV append kernels
        LowerAttention(gpu=gpu),
        # an exported Pad before a convolution or pooling becomes its padding
        FoldPadding(),
        # CPU: depthwise rows of 7 or 14 computed as whole vectors (sliced in the kernel)
        WidenDepthwiseRows(gpu=gpu),
        # CPU: strided 1x1 convolutions as a subsampling copy, then a pointwise convolution
        SubsamplePointwise(gpu=gpu),
        # CPU: convolutions over maps no register tile divides compute an extra row, sliced off
        PadConvRows(gpu=gpu),
    ]


def library_dispatch_passes(target: Any) -> list:
    from tvm import relax

    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def legalize_passes(target: Any) -> list:
    from tvm import relax

    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def lift_params_passes(target: Any) -> list:
    """Move computations on weights only (the packing the schedules mark) into
    ``main_transform_params``, which the runner calls once at load."""
    from qiao.compiler.passes.lift_weight_packing import LiftWeightPacking

    return [LiftWeightPacking()]


def dataflow_lower_passes(target: Any) -> list:
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes(target: Any, dim_bounds: Mapping[str, int] | None = None) -> list:
    """``dim_bounds``: largest values of ``main``'s symbolic dimensions (the ``dim_ranges``
    compile option), so that memory planning reuses storage across them
    (``BoundSymbolicDims``)."""
    from tvm import relax

    from qiao.compiler.passes.bound_symbolic_dims import BoundSymbolicDims
    from qiao.compiler.passes.mark_host_funcs_no_alias import MarkHostFuncsNoAlias

    return [
        BoundSymbolicDims(dim_bounds or {}),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        # after VMShapeLower, which adds the shape functions (see the pass's docstring)
        MarkHostFuncsNoAlias(),
        relax.transform.AttachGlobalSymbol(),
    ]


def default_phases(
    target: Any,
    schedule: Sequence = (),
    moe_schedule: Mapping[str, Any] | None = None,
    lift_params: bool = False,
    gpu: bool | None = None,
    moe_keys: Sequence[str] | None = None,
    dim_bounds: Mapping[str, int] | None = None,
) -> list[Phase]:
    """The phases every TVM-based backend shares; ``schedule`` fills the schedule phase,
    ``moe_schedule`` (the compile option's MoE parameters) tunes the MoE lowering (its
    table entry looked up under ``moe_keys``, the backend's ``tuning_keys``), ``gpu`` (the
    backend's ``is_gpu``) makes its kernels thread-bound (``None`` for either: derived from the
    TVM target), and ``lift_params`` moves weight packing to load time (the artifact then has
    ``main_transform_params``, which ``TVMRunner`` calls once); ``dim_bounds`` bound ``main``'s
    symbolic dimensions for memory planning (``finalize_passes``)."""
    return [
        Phase("prepare", prepare_passes(target, moe_schedule, gpu, moe_keys)),
        Phase("library_dispatch", library_dispatch_passes(target)),
        Phase("legalize", legalize_passes(target)),
        Phase("schedule", list(schedule)),
        Phase("lift_params", lift_params_passes(target) if lift_params else []),
        Phase("dataflow_lower", dataflow_lower_passes(target)),
        Phase("finalize", finalize_passes(target, dim_bounds)),
    ]


def make_pipeline(phases: Sequence[Phase], target: Any, dump_dir: str | None = None):
    """One module pass running ``phases`` in order under ``target``; dumps the IR after each phase
    to ``dump_dir/NN-<phase>.py`` when given (also via ``QIAO_DUMP_IR=<dir>``)."""
    import tvm

    dump_dir = dump_dir or os.environ.get("QIAO_DUMP_IR") or None

    @tvm.transform.module_pass(opt_level=0, name="qiao_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            if dump_dir:
                os.makedirs(dump_dir, exist_ok=True)
                _dump(mod, dump_dir, 0, "imported")
            for i, phase in enumerate(phases, start=1):
                if phase.passes:
                    mod = tvm.transform.Sequential(list(phase.passes), name=phase.name)(mod)
                if dump_dir:
                    _dump(mod, dump_dir, i, phase.name)
        return mod

    return _pipeline


def _dump(mod, dump_dir: str, index: int, name: str) -> None:
    with open(os.path.join(dump_dir, f"{index:02d}-{name}.py"), "w") as f:
        f.write(mod.script(show_meta=False))
