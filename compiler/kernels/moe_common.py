"""What the MoE kernels share: the op's configuration, the buffer sizes of the dispatch, the gate/up
row layout, the activation epilogue and the attributes every MoE PrimFunc carries.

The MoE op (ONNX Runtime's ``com.microsoft::MoE`` semantics) for ``T`` tokens, ``E`` experts, hidden
size ``H``, expert intermediate size ``I`` and ``k`` experts per token::

    p      = softmax(router_logits[t, :])                  # over all E experts
    top    = the k largest p (ties: higher expert index first, as ONNX Runtime's CPU kernel)
    w      = p[top] / sum(p[top])  if normalize  else p[top]
    y[t]   = sum_j w[j] * fc2[top[j]] @ act(fc1[top[j]] @ x[t])

qiao lowers it in four stages (``moe_gating``, ``moe_align``, ``group_gemm``, ``moe_combine``) whose
intermediate buffers are sized here. Slots are the routed (token, expert) pairs sorted by expert,
each
expert's run padded to a multiple of ``block_m``::

    slots  S = (T * k) // block_m * block_m + E * block_m  >=  sum_e ceil(count_e / block_m) *
    block_m
    blocks B = S // block_m
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qiao.compiler.errors import QiaoError

ACTIVATIONS = ("swiglu", "silu", "relu", "gelu", "identity")
GATE_UP_LAYOUTS = ("interleaved", "concat")

# Attributes of every MoE PrimFunc: already scheduled (generic schedule rules skip it, in both the
# TVM 0.27 spelling and the older one), no aliasing between arguments (both spellings: one kernel
# without TVM 0.27's makes its LLVM code generation drop noalias for the whole module), opaque to
# operator fusion.
KERNEL_ATTRS = {
    "tirx.is_scheduled": True,
    "tir.is_scheduled": True,
    "tirx.noalias": True,
    "tir.noalias": True,
    "op_pattern": 8,
}


WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MoEConfig:
    """Static description of one MoE op.

    Parameters
    ----------
    num_experts, hidden, inter, top_k : int
        ``E``, ``H``, ``I`` (per-expert intermediate size) and ``k``.
    normalize : bool
        Renormalise the k routing weights to sum to 1 (Qwen3's ``norm_topk_prob``).
    activation : str
        One of ``ACTIVATIONS``; ``swiglu`` is gated (fc1 holds gate and up rows); ``gelu`` is the
        tanh approximation (what ONNX Runtime's MoE computes).
    gate_up_layout : str
        For ``swiglu``: ``interleaved`` (row 2i gate_i, row 2i+1 up_i; ONNX ``swiglu_fusion=1``) or
        ``concat`` (rows [gate | up]; ``swiglu_fusion=2``).
    alpha, beta, limit : float
        SwiGLU ``G * sigmoid(alpha * G) * (L + beta)`` with ``G = min(g, limit)`` and
        ``L = clamp(u, -limit, limit)`` when ``limit`` is set.
    fc1_bias, fc2_bias : bool
        Whether the expert layers carry biases (``[E, fc1_rows]``, ``[E, H]``).
    weight_dtype : str
        Dtype of ``fc1``/``fc2`` as the kernels read them (``WEIGHT_DTYPES``): float16/bfloat16
        experts are widened to float32 in registers (CPU kernels; ``--dtype``).
    weight_bits : int
        0: float experts of ``weight_dtype``; 4 or 8: integer experts (``QMoE``), which
        ``LowerMoE`` packs for ``kernels.quant_moe`` or dequantizes.
    accuracy_level : int
        ``QMoE``'s: 4 lets the integer experts' CPU kernels quantize the activations to int8 per
        block (ONNX Runtime's compute type); else the exact float32 result.
    """

    num_experts: int
    hidden: int
    inter: int
    top_k: int
    normalize: bool = True
    activation: str = "swiglu"
    gate_up_layout: str = "interleaved"
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None
    fc1_bias: bool = False
    fc2_bias: bool = False
    dtype: str = "float32"
    weight_dtype: str = "float32"
    weight_bits: int = 0
    accuracy_level: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise QiaoError(
                f"MoE activation {self.activation!r} is not supported. "
                f"fix: use one of {ACTIVATIONS}"
            )
        if self.gated and self.gate_up_layout not in GATE_UP_LAYOUTS:
            raise QiaoError(
                f"SwiGLU gate/up layout {self.gate_up_layout!r} is not supported. fix: use "
                f"{GATE_UP_LAYOUTS}"
            )
        for name in ("num_experts", "hidden", "inter", "top_k"):
            if getattr(self, name) <= 0:
                raise QiaoError(f"MoE {name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise QiaoError(
                f"MoE k={self.top_k} exceeds the number of experts {self.num_experts}. fix: export "
                "the model with k <= num_experts"
            )
        if self.dtype != "float32":
            raise QiaoError(f"MoE kernels support float32 only, got {self.dtype}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise QiaoError(
                f"MoE expert weights of dtype {self.weight_dtype} are not supported. fix: use "
                f"one of {WEIGHT_DTYPES}"
            )
        if self.weight_bits not in (0, 4, 8):
            raise QiaoError(
                f"MoE integer experts of {self.weight_bits} bits are not supported. fix: use 4 "
                "or 8 bits"
            )

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def fc1_rows(self) -> int:
        """Rows of one expert's fc1 weight: 2I for SwiGLU, else I."""
        return 2 * self.inter if self.gated else self.inter

    @property
    def units_per_row_group(self) -> int:
        """fc1 rows that produce one intermediate value (2 for gate+up, else 1)."""
        return 2 if self.gated else 1

    def fc1_row(self, unit, which: int):
        """Row of fc1 holding ``which`` (0 gate/plain, 1 up) of intermediate ``unit``."""
        if not self.gated:
            return unit
        if self.gate_up_layout == "interleaved":
            return unit * 2 + which
        return unit + which * self.inter

    def activation_expr(self, g, u=None):
        """The epilogue ``act(g, u)`` as a TIR expression (``u`` only for SwiGLU)."""
        from tvm import tirx

        f32 = "float32"
        if self.activation == "swiglu":
            if self.limit is not None:
                lim = tirx.const(self.limit, f32)
                g = tirx.min(g, lim)
                u = tirx.max(tirx.min(u, lim), -lim)
            alpha = tirx.const(self.alpha, f32)
            gate = g * tirx.sigmoid(g * alpha) if self.alpha != 1.0 else g * tirx.sigmoid(g)
            return gate * (u + tirx.const(self.beta, f32)) if self.beta != 0.0 else gate * u
        if self.activation == "silu":
            return g * tirx.sigmoid(g)
        if self.activation == "relu":
            return tirx.max(g, tirx.const(0.0, f32))
        if self.activation == "gelu":
            # tanh approximation, as ONNX Runtime's MoE kernels compute it
            c = tirx.const(math.sqrt(2.0 / math.pi), f32)
            inner = c * (g + tirx.const(0.044715, f32) * g * g * g)
            return tirx.const(0.5, f32) * g * (tirx.const(1.0, f32) + tirx.tanh(inner))
        return g


def num_slots(num_tokens, top_k: int, num_experts: int, block_m: int):
    """Slots of the aligned dispatch: an upper bound of sum_e ceil(count_e / block_m) * block_m."""
    return num_blocks(num_tokens, top_k, num_experts, block_m) * block_m


def num_blocks(num_tokens, top_k: int, num_experts: int, block_m: int):
    """``block_m``-row blocks of the aligned dispatch (``num_slots // block_m``)."""
    return (num_tokens * top_k) // block_m + num_experts


def pow2_divisor(n: int, limit: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``limit``."""
    v = 1
    while v * 2 <= limit and n % (v * 2) == 0:
        v *= 2
    return v


def divisor_at_most(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest divisor of ``n`` that is a multiple of ``multiple_of`` and at most ``limit``
    (``multiple_of`` itself when none is)."""
    best = multiple_of
    for d in range(multiple_of, min(n, max(limit, multiple_of)) + 1, multiple_of):
        if n % d == 0:
            best = d
    return best


def add_kernel(bb, kernels: dict | None, name: str, build, *args, **kwargs):
    """``bb.add_func`` of the kernel ``build(*args, **kwargs)`` under ``name`` (its global symbol
    dropped: kernels of different configs would clash; the builder names each one uniquely and
    shares an identical one, and the build's AttachGlobalSymbol gives it that name). ``kernels``
    (None: none) memoizes the built kernels by name and arguments: a model's MoE layers mostly
    share one config, and building a kernel (parsing its TVMScript) takes 0.1-0.8 s, which the
    builder's sharing of identical functions does not save."""
    key = (name, args, tuple(sorted(kwargs.items())))
    func = kernels.get(key) if kernels is not None else None
    if func is None:
        func = build(*args, **kwargs).without_attr("global_symbol")
        if kernels is not None:
            kernels[key] = func
    return bb.add_func(func, name)


__all__ = [
    "ACTIVATIONS",
    "GATE_UP_LAYOUTS",
    "KERNEL_ATTRS",
    "MoEConfig",
    "add_kernel",
    "divisor_at_most",
    "num_blocks",
    "num_slots",
    "pow2_divisor",
]
