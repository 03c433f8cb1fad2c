"""Hugging Face GPTQ / AWQ int4 checkpoints → ``com.microsoft::MatMulNBits`` inputs, exactly.

A Hugging Face folder whose ``config.json`` has a ``quantization_config`` stores each quantized
linear ``prefix`` (``nn.Linear`` weight ``[N, K]``: N outputs, K inputs) as ``prefix.qweight``,
``prefix.qzeros``, ``prefix.scales`` (and for GPTQ ``prefix.g_idx``). The weight is
``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]`` with 4-bit codes ``q``, 4-bit zero points
``z`` and fp16 scales ``s`` per group of ``g`` input features. Supported layouts (anything else is
refused with one ``DecoderSourceError`` naming it and the fix):

- ``quant_method: "gptq"``, ``bits: 4``, ``checkpoint_format`` ``"gptq"`` (v1, AutoGPTQ and
  transformers/optimum: the stored zero points are ``z - 1``, read back as ``(stored + 1) & 15``)
  or ``"gptq_v2"`` (GPTQModel: stored as ``z``); ``sym`` true or false; ``group_size`` any
  multiple of 16 or -1 (one group per column); ``desc_act`` false, or true with a ``g_idx`` equal
  to ``k // group_size`` (act-order with a permuted ``g_idx`` is refused); no per-module
  ``dynamic`` overrides. ``qweight`` int32 ``[K / 8, N]`` packed along K (code ``k`` in bits
  ``4 * (k % 8)`` of row ``k // 8``, low bits first), ``qzeros`` int32 ``[G, N / 8]`` packed along
  N the same way, ``scales`` ``[G, N]``.
- ``quant_method: "awq"``, ``version: "gemm"`` (AutoAWQ's GEMM layout), ``bits`` / ``w_bit`` 4,
  ``zero_point`` true: ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]`` packed
  along N in AWQ's interleaved order (the 8 nibbles of word ``c``, low bits first, hold columns
  ``8c + [0, 2, 4, 6, 1, 3, 5, 7]``), zero points stored as ``z``, ``scales`` ``[G, N]``.

Quantized modules may be the attention q/k/v/o and dense MLP gate/up/down projections of every
layer and ``lm_head``; a quantized MoE expert is refused. The codes, the scales (fp16 → float32,
exact) and the zero points are carried over unchanged: ``MatMulNBits`` with ``block_size`` = the
group size (a group larger than 256 or not a power of 2 is split into blocks of the largest power
of 2 dividing it, up to 256, each repeating the group's scale and zero point: the same weight),
``accuracy_level`` 0 and uint8 zero points, so its dequantized weight is bit for bit
``(q - z) * s`` in float32 — nothing is re-quantized.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from qiao.compiler.export_genai import DecoderSourceError

BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
MAX_BLOCK = 256
_QUANTIZABLE = re.compile(
    r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head)$"
)
_FIX = (
    "fix: use a 4-bit GPTQ (checkpoint_format gptq/gptq_v2, no act-order) or AWQ GEMM "
    "checkpoint, or the float checkpoint with `qiao compile --quantize int4`"
)


@dataclass(frozen=True)
class QuantLinear:
    """One quantized linear: ``W[n, k] = (codes[n, k] - zeros[n, k // group]) * scales[n, k //
    group]`` (``nn.Linear`` layout, N outputs by K inputs)."""

    codes: np.ndarray  # uint8 [N, K], 0..15
    scales: np.ndarray  # float32 [N, G]
    zeros: np.ndarray  # uint8 [N, G], 0..15
    group: int

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1])

    def dequantized(self) -> np.ndarray:
        """float32 ``[N, K]``: ``(q - z) * s``."""
        idx = np.arange(self.k) // self.group
        diff = self.codes.astype(np.float32) - self.zeros[:, idx].astype(np.float32)
        return diff * self.scales[:, idx]

    def block_size(self) -> int:
        """``MatMulNBits``' block: the group, or the largest power of 2 (<= 256) dividing it."""
        block = self.group if self.group <= MAX_BLOCK else math.gcd(self.group, MAX_BLOCK)
        block = block & -block  # largest power of 2 dividing it
        if block < 16:
            raise DecoderSourceError(
                f"group_size {self.group} has no power-of-2 block of at least 16 dividing it "
                f"(MatMulNBits' blocks are powers of 2, 16-256). {_FIX}"
            )
        return block

    def nbits_inputs(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(block_size, B uint8 [N, n_blocks, block / 2], scales float32 [N * n_blocks],
        zero_points uint8 [N * ceil(n_blocks / 2)])``: ``MatMulNBits`` inputs of this weight."""
        from qiao.compiler.quantize import _pack_zero_points, pack_codes

        block = self.block_size()
        n_blocks = -(-self.k // block)
        codes = np.zeros((self.n, n_blocks * block), np.uint8)
        codes[:, : self.k] = self.codes
        group_of_block = (np.arange(n_blocks) * block) // self.group
        scales = np.ascontiguousarray(self.scales[:, group_of_block], np.float32)
        zeros = self.zeros[:, group_of_block]
        packed = pack_codes(codes, BITS).reshape(self.n, n_blocks, block * BITS // 8)
        return block, packed, scales.reshape(-1), _pack_zero_points(zeros, BITS)


def concat(linears: list[QuantLinear], what: str) -> QuantLinear:
    """Linears stacked along N (the packed QKV projection); they must share one group size."""
    groups = {q.group for q in linears}
    if len(groups) != 1:
        raise DecoderSourceError(
            f"{what}: the stacked projections have different group sizes {sorted(groups)}. {_FIX}"
        )
    return QuantLinear(
        np.concatenate([q.codes for q in linears]),
        np.concatenate([q.scales for q in linears]),
        np.concatenate([q.zeros for q in linears]),
        linears[0].group,
    )


def quantization_config(config: dict, where: str) -> dict | None:
    """The checked ``quantization_config`` of a config.json dict (None when absent) as
    ``{"method", "format", "bits", "group_size", "sym"}``; a ``DecoderSourceError`` names what
    is not supported."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise DecoderSourceError(
                f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 only). "
                f"{_FIX}"
            )
        if qc.get("dynamic"):
            raise DecoderSourceError(
                f"{where}: GPTQ per-module 'dynamic' overrides are not supported. {_FIX}"
            )
        group, sym = qc.get("group_size", 128), bool(qc.get("sym", True))
    elif method == "awq":
        fmt = str(qc.get("version", "gemm")).lower()
        if fmt != "gemm":
            raise DecoderSourceError(
                f"{where}: AWQ version {fmt!r} is not supported (gemm only). {_FIX}"
            )
        if not qc.get("zero_point", True):
            raise DecoderSourceError(f"{where}: AWQ with zero_point=false is not supported. {_FIX}")
        group, sym = qc.get("group_size", qc.get("q_group_size", 128)), False
        fmt = "awq_gemm"
    else:
        raise DecoderSourceError(
            f"{where}: quantization_config quant_method {qc.get('quant_method')!r} is not "
            f"supported (gptq, awq). {_FIX}"
        )
    if bits is None or int(bits) != BITS:
        raise DecoderSourceError(
            f"{where}: {method.upper()} bits={bits} is not supported (4-bit only). {_FIX}"
        )
    group = int(group)
    if group != -1 and group <= 0:
        raise DecoderSourceError(f"{where}: {method.upper()} group_size={group} is invalid. {_FIX}")
    return {"method": method, "format": fmt, "bits": BITS, "group_size": group, "sym": sym}


def _unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 ``[R, C]`` → uint8 ``[R * 8, C]``: nibble i of row r is row ``8r + i``."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    out = np.stack([(u >> (4 * i)) & 0xF for i in range(8)], axis=1)
    return out.reshape(-1, words.shape[1]).astype(np.uint8)


def _unpack_cols(words: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 ``[R, C]`` → uint8 ``[R, C * 8]``: nibble i of word c is column ``8c + order[i]``."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    out = np.empty((words.shape[0], words.shape[1], 8), np.uint8)
    for i, col in enumerate(order):
        out[:, :, col] = (u >> (4 * i)) & 0xF
    return out.reshape(words.shape[0], -1)


def _array(tensor) -> np.ndarray:
    import torch

    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()  # exact
    return tensor.numpy()


def read_linear(tensors: dict, prefix: str, info: dict, where: str) -> QuantLinear:
    """The ``QuantLinear`` of module ``prefix`` from its checkpoint tensors."""
    missing = [s for s in ("qweight", "qzeros", "scales") if f"{prefix}.{s}" not in tensors]
    if missing:
        raise DecoderSourceError(
            f"{where}: {prefix} has a qweight but no {', '.join(missing)}. fix: use a complete "
            f"{info['method'].upper()} checkpoint"
        )
    qweight = _array(tensors[f"{prefix}.qweight"])
    qzeros = _array(tensors[f"{prefix}.qzeros"])
    scales = _array(tensors[f"{prefix}.scales"]).astype(np.float32)
    if info["method"] == "gptq":
        codes = _unpack_rows(qweight)  # [K, N]
        zeros = _unpack_cols(qzeros)
        if info["format"] == "gptq":  # v1 stores z - 1
            zeros = ((zeros.astype(np.int16) + 1) & 0xF).astype(np.uint8)
    else:
        codes = _unpack_cols(qweight, AWQ_ORDER)
        zeros = _unpack_cols(qzeros, AWQ_ORDER)
    k, n = codes.shape
    group = k if info["group_size"] == -1 else info["group_size"]
    groups = -(-k // group)
    if scales.shape != (groups, n) or zeros.shape != (groups, n):
        raise DecoderSourceError(
            f"{where}: {prefix}: scales {tuple(scales.shape)} / qzeros (unpacked "
            f"{tuple(zeros.shape)}) do not fit qweight (K={k}, N={n}) with group_size "
            f"{info['group_size']} ({groups} groups). fix: check the checkpoint's "
            "quantization_config matches its tensors"
        )
    g_idx = tensors.get(f"{prefix}.g_idx")
    if g_idx is not None and not np.array_equal(
        _array(g_idx).astype(np.int64).reshape(-1), np.arange(k) // group
    ):
        raise DecoderSourceError(
            f"{where}: {prefix}: act-order (desc_act) g_idx is not k // group_size; permuted "
            f"groups are not supported. {_FIX}"
        )
    return QuantLinear(
        np.ascontiguousarray(codes.T),
        np.ascontiguousarray(scales.T),
        np.ascontiguousarray(zeros.T),
        group,
    )


def load_quantized(folder: str | os.PathLike, config: dict):
    """``(float state dict, {module: QuantLinear}, info)`` of a GPTQ / AWQ folder: every
    non-quantized tensor as float32 torch, each quantized module's ``.weight`` filled with its
    exact dequantized value (so a transformers model loads it whole), and the quantized modules."""
    import torch

    from qiao.models.hf_checkpoint import load_tensors

    folder = os.fspath(folder)
    info = quantization_config(config, folder)
    tensors = load_tensors(folder)
    prefixes = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    if not prefixes:
        raise DecoderSourceError(
            f"{folder}: config.json has a {info['method']} quantization_config but no tensor "
            "is named *.qweight. fix: drop quantization_config from config.json or use the "
            "quantized checkpoint's safetensors"
        )
    quantized: dict[str, QuantLinear] = {}
    for prefix in prefixes:
        if not _QUANTIZABLE.match(prefix):
            raise DecoderSourceError(
                f"{folder}: quantized module {prefix} is not supported (only attention q/k/v/o, "
                f"dense MLP gate/up/down and lm_head; not MoE experts). {_FIX}"
            )
        quantized[prefix] = read_linear(tensors, prefix, info, folder)
    state: dict = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf not in ("qweight", "qzeros", "scales", "g_idx"):
                state[name] = tensor.float()  # e.g. a bias: transformers checks it fits
            continue
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
    for prefix, q in quantized.items():
        state[f"{prefix}.weight"] = torch.from_numpy(q.dequantized())
    return state, quantized, dict(info, modules=len(quantized))


__all__ = ["QuantLinear", "concat", "load_quantized", "quantization_config", "read_linear"]
