"""Weight-only round-to-nearest quantization of an ONNX model (``--quantize int4|int8``).

``quantize_model(proto, scheme)`` rewrites a float32 (or float16) ONNX model into the ONNX Runtime
contrib ops that ``qiao.compiler.frontend.convert_quant`` imports, so that ONNX Runtime runs the
very same quantized graph as the reference qiao validates against:

- ``MatMul`` with a constant 2-D ``[K, N]`` weight, and ``Gemm`` (``transA=0``, ``alpha=1``, a
  constant ``B`` and optional constant 1-D/``[1, N]`` ``C``) -> ``com.microsoft::MatMulNBits``
  (``block_size`` along K, symmetric or with uint8 zero points; ``accuracy_level`` 0 by default:
  ONNX Runtime then computes in float32, the exact dequantize-then-float result; 4 on request,
  int8 activations, the fast path both engines share);
- ``com.microsoft::MoE`` with constant experts -> ``com.microsoft::QMoE`` (``swiglu_fusion=1``,
  the only SwiGLU layout ONNX Runtime's CPU kernel runs: concatenated or separate gate/up rows are
  interleaved, an exact permutation). 4-bit experts are block-wise (``block_size`` along K, when
  it divides the hidden and intermediate sizes, else per output column); 8-bit experts are per
  output column, because ONNX Runtime's CPU kernel computes block-wise 8-bit experts with int8
  activations at every accuracy level (about 1e-2 off the exact result), which would make the
  reference inexact;
- ``Gather`` (axis 0) of a constant 2-D table (embeddings) ->
  ``com.microsoft::GatherBlockQuantized`` (blocks along the last axis).

The router (a MatMul/Gemm whose output is a MoE node's ``router_probs``) stays float: routing is a
discrete top-k choice that a perturbed router can flip. Weights with K < 16 stay float (nothing to
gain). Round to nearest, per block of ``block_size`` input features:

- symmetric (no zero points, ONNX Runtime's default zero point ``2^(bits-1)``): the scale is the
  block's largest-magnitude value over ``-2^(bits-1)`` (so that value is exactly representable,
  the convention of ONNX Runtime's MLAS quantizer; the scale may be negative);
- asymmetric (uint8 zero points): ``scale = (max(w, 0) - min(w, 0)) / (2^bits - 1)``, ``zero_point
  = round(-min(w, 0) / scale)``.

For MatMul weights this is bit for bit what ONNX Runtime's ``MatMulNBitsQuantizer`` writes (codes,
scales, zero points, padding; checked in tests/test_quantize.py).

On CPU targets qiao compiles the ``MatMulNBits`` nodes to its packed int4/int8 kernels
(``qiao.compiler.kernels.quant_gemm``: the artifact keeps the codes, half a byte per int4 weight;
at ``accuracy_level=0`` the exact float32 kernels), and the ``QMoE`` experts to its packed
grouped GEMMs (``qiao.compiler.kernels.quant_moe``; experts whose sizes its tiles do not fit are
dequantized to float32 at compile time). ``GatherBlockQuantized`` tables stay packed on every
target: the gathered rows are dequantized at run time (``convert_quant.packed_gather``). On GPU
targets ``MatMulNBits`` and ``QMoE`` are dequantized at compile time into float32 weights.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qiao.compiler.errors import QiaoError

MS_DOMAIN = "com.microsoft"
MIN_K = 16  # weights with fewer input features stay float
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only quantization scheme.

    Parameters
    ----------
    bits : int
        4 or 8.
    block_size : int
        Input features per scale (a power of 2, at least 16); default 32, as ONNX Runtime GenAI's
        int4 builder and MLC-LLM's q4f16_1.
    symmetric : bool
        No zero points (the scale spans the largest magnitude) when True; uint8 zero points (the
        block's [min, max] range) when False (default).
    accuracy_level : int
        ``accuracy_level`` (0-4) of the ``MatMulNBits`` and ``QMoE`` nodes. 0 (default): the exact
        dequantize-then-float32 result, in qiao and ONNX Runtime alike. 4: activations quantized to
        int8 per block and integer dot products (VNNI / ``pmaddubsw``), ONNX Runtime's fastest CPU
        path and what ONNX Runtime GenAI's ``-p int4`` builder writes; about 1 % of max|y| off the
        exact result (both engines). 1-3 compute as 0 in qiao.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 0

    def check(self) -> QuantScheme:
        """``self`` when valid, else ``QiaoError`` with the fix."""
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise QiaoError(f"quantize bits={self.bits!r}: fix: use 4 (int4) or 8 (int8)")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise QiaoError(
                f"quantize block_size={bs!r} is not a power of 2 >= 16. fix: use 16, 32, 64, "
                "128 or 256"
            )
        if not isinstance(self.symmetric, bool):
            raise QiaoError(f"quantize symmetric={self.symmetric!r}: fix: pass True or False")
        level = self.accuracy_level
        if isinstance(level, bool) or level not in (0, 1, 2, 3, 4):
            raise QiaoError(
                f"quantize accuracy_level={level!r}: fix: use 0 (exact float32) to 4 (int8 "
                "activations, the fastest)"
            )
        return self

    @classmethod
    def parse(cls, value: Any) -> QuantScheme:
        """A scheme from ``"int4"``/``"int8"``, a mapping of its fields
        or a ``QuantScheme``; ``QiaoError`` naming the valid forms otherwise."""
        if isinstance(value, QuantScheme):
            return value.check()
        if isinstance(value, str):
            bits = {"int4": 4, "int8": 8}.get(value.lower())
            if bits is None:
                raise QiaoError(f"quantize={value!r}: fix: use 'int4' or 'int8'")
            return cls(bits=bits).check()
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise QiaoError(
                    f"quantize has unknown key(s) {unknown}. fix: use bits, block_size, "
                    "symmetric, accuracy_level"
                )
            return cls(**value).check()
        raise QiaoError(
            f"quantize={value!r}: fix: pass 'int4', 'int8' or "
            "{'bits': 4|8, 'block_size': 32, 'symmetric': False, 'accuracy_level': 0}"
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Round to nearest
# ------------------------------------------------------------------------------------------------
def quantize_rows(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest quantization of ``w`` ``[..., N, K]`` along its last axis.

    Parameters
    ----------
    w : np.ndarray
        Float weights; row ``n`` holds the K input features of output ``n``.
    bits : int
        2, 4 or 8.
    block_size : int
        Features per scale; 0: one scale per row. K is zero-padded to whole blocks.
    symmetric : bool
        No zero points (see the module docstring).

    Returns
    -------
    codes : np.ndarray
        uint8 ``[..., N, n_blocks * block_size]`` (padding included, as code 0).
    scales : np.ndarray
        float32 ``[..., N, n_blocks]``.
    zero_points : np.ndarray or None
        uint8 ``[..., N, n_blocks]``; None when symmetric.
    """
    w = np.asarray(w, np.float32)
    k = w.shape[-1]
    block = block_size or k
    n_blocks = -(-k // block)
    padded = np.zeros((*w.shape[:-1], n_blocks * block), np.float32)
    padded[..., :k] = w
    blocks = padded.reshape(*w.shape[:-1], n_blocks, block)
    top = (1 << bits) - 1
    if symmetric:
        idx = np.abs(blocks).argmax(-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, -1)[..., 0]
        scales = (extreme / -float(1 << (bits - 1))).astype(np.float32)
        zp = np.full(scales.shape, 1 << (bits - 1), np.float32)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = ((hi - lo) / top).astype(np.float32)
        safe = np.where(scales == 0, 1.0, scales)
        zp = np.clip(np.round(-lo / safe), 0, top).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    codes = np.clip(np.round(blocks / safe[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    codes = codes.reshape(*w.shape[:-1], n_blocks * block)
    codes[..., k:] = 0  # padding codes are never read; 0 as ONNX Runtime's quantizer writes them
    return codes, scales, None if symmetric else zp.astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``codes`` ``8 // bits`` to a byte, low bits first (zero-padded
    to whole bytes): the inverse of ``convert_quant.unpack_codes``."""
    per = 8 // bits
    width = -(-codes.shape[-1] // per) * per
    padded = np.zeros((*codes.shape[:-1], width), np.uint8)
    padded[..., : codes.shape[-1]] = codes
    out = np.zeros((*codes.shape[:-1], width // per), np.uint8)
    for i in range(per):
        out |= (padded[..., i::per] << (i * bits)).astype(np.uint8)
    return out


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """``MatMulNBits`` zero points ``[N, n_blocks]``, packed per row; a row's padding holds the
    default zero point ``2^(bits-1)``, as ONNX Runtime's quantizer writes it (never read)."""
    per = 8 // bits
    pad = (-zp.shape[-1]) % per
    padded = np.pad(zp, ((0, 0), (0, pad)), constant_values=1 << (bits - 1))
    return pack_codes(padded, bits).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Graph rewriting
# ------------------------------------------------------------------------------------------------
class _Rewriter:
    def __init__(self, proto: onnx.ModelProto, scheme: QuantScheme):
        self.proto = proto
        self.scheme = scheme
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.made: dict[tuple, list[str]] = {}  # cache: a shared weight is quantized once
        self.counts: Counter = Counter()
        self.kept: list[str] = []
        self.experts: dict[str, Any] = {}
        self.routers = {
            n.input[1] for n in self.graph.node if n.domain == MS_DOMAIN and n.op_type == "MoE"
        }

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None or t.data_type not in FLOAT_TYPES:
            return None
        return numpy_helper.to_array(t)

    def add(self, name: str, array: np.ndarray) -> str:
        base, i = name, 0
        while name in self.inits or any(t.name == name for t in self.new_inits):
            i += 1
            name = f"{base}_{i}"
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    # MatMul / Gemm -> MatMulNBits ---------------------------------------------------------------
    def nbits_weights(self, key: tuple, w_nk: np.ndarray, dtype, prefix: str) -> list[str]:
        if key in self.made:
            return self.made[key]
        s = self.scheme
        n, k = w_nk.shape
        codes, scales, zp = quantize_rows(w_nk, s.bits, s.block_size, s.symmetric)
        n_blocks = scales.shape[-1]
        packed = pack_codes(codes, s.bits).reshape(n, n_blocks, -1)
        names = [
            self.add(f"{prefix}_q{s.bits}", packed),
            self.add(f"{prefix}_scales", scales.astype(dtype).reshape(-1)),
            "" if zp is None else self.add(f"{prefix}_zp", _pack_zero_points(zp, s.bits)),
        ]
        self.made[key] = names
        return names

    def matmul(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if len(node.input) != 2 or node.input[0] in self.inits:
            return None
        w = self.const(node.input[1])
        if w is None or w.ndim != 2:
            return None
        return self.to_nbits(node, w.T, w.dtype, node.input[1], None, (node.input[1], "kn"))

    def gemm(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or node.input[0] in self.inits:
            return None
        w = self.const(node.input[1])
        if w is None or w.ndim != 2:
            return None
        trans_b = attrs.get("transB", 0)
        w_nk = w if trans_b else w.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            n = w_nk.shape[0]
            if c is None or c.size != n or (c.ndim == 2 and c.shape[0] != 1):
                return None  # a C that is not a per-output bias: leave the Gemm as it is
            bias = self.add(f"{node.input[2]}_bias", (c.reshape(n) * attrs.get("beta", 1.0)))
        return self.to_nbits(node, w_nk, w.dtype, node.input[1], bias, (node.input[1], trans_b))

    def to_nbits(self, node, w_nk, dtype, wname, bias, key) -> list[onnx.NodeProto] | None:
        n, k = w_nk.shape
        if node.output[0] in self.routers:
            self.kept.append(f"{wname} (MoE router)")
            return None
        if k < MIN_K:
            self.kept.append(f"{wname} (K={k} < {MIN_K})")
            return None
        s = self.scheme
        b, scales, zp = self.nbits_weights(key, w_nk, dtype, wname.replace("/", "_"))
        inputs = [node.input[0], b, scales, zp]
        if bias is not None:
            inputs += ["", bias]
        while not inputs[-1]:
            inputs.pop()
        self.counts["MatMulNBits"] += 1
        return [
            helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=node.name or None,
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=s.bits,
                block_size=s.block_size,
                accuracy_level=s.accuracy_level,
            )
        ]

    # Gather -> GatherBlockQuantized ---------------------------------------------------------------
    def gather(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = self.const(node.input[0])
        if table is None or table.ndim != 2 or attrs.get("axis", 0) != 0:
            return None
        s = self.scheme
        key = (node.input[0], "gather")
        if key not in self.made:
            v, h = table.shape
            codes, scales, zp = quantize_rows(table, s.bits, s.block_size, s.symmetric)
            codes = codes[:, :h]
            prefix = node.input[0].replace("/", "_")
            self.made[key] = [
                self.add(f"{prefix}_q{s.bits}", pack_codes(codes, s.bits)),
                self.add(f"{prefix}_scales", scales.astype(table.dtype)),
                "" if zp is None else self.add(f"{prefix}_zp", pack_codes(zp, s.bits)),
            ]
        data, scales, zp = self.made[key]
        inputs = [data, node.input[1], scales] + ([zp] if zp else [])
        self.counts["GatherBlockQuantized"] += 1
        return [
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                list(node.output),
                name=node.name or None,
                domain=MS_DOMAIN,
                bits=s.bits,
                block_size=s.block_size,
                gather_axis=0,
                quantize_axis=1,
            )
        ]

    # MoE -> QMoE ----------------------------------------------------------------------------------
    def moe(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        from qiao.compiler import moe_op

        spec = moe_op.spec_from_node(node)
        names = (list(node.input) + [""] * 8)[:8]
        w = {key: (self.const(n) if n else None) for key, n in zip(moe_op.INPUTS, names)}
        fc1, fc2 = w["fc1_experts_weights"], w["fc2_experts_weights"]
        fc3 = w["fc3_experts_weights"]
        if fc1 is None or fc2 is None or (spec.fc3 and fc3 is None):
            self.kept.append(f"{node.name or node.output[0]} (MoE experts are not constants)")
            return None
        for bias_key, name in (("fc1_experts_bias", names[3]), ("fc3_experts_bias", names[7])):
            if name and w[bias_key] is None:
                self.kept.append(f"{node.name or node.output[0]} (MoE bias is not a constant)")
                return None
        _, hidden, inter = moe_op.expert_dims(
            spec, fc1.shape, fc2.shape, None if fc3 is None else fc3.shape
        )
        b1, b3 = w["fc1_experts_bias"], w["fc3_experts_bias"]
        if spec.gated and spec.layout != "interleaved":
            # ONNX Runtime's CPU QMoE runs interleaved rows only: [g0, u0, g1, u1, ...].
            if spec.layout == "concat":
                gate, up = fc1[:, :inter], fc1[:, inter:]
                bg, bu = (None, None) if b1 is None else (b1[:, :inter], b1[:, inter:])
            else:
                gate, up, bg, bu = fc1, fc3, b1, b3
            fc1 = np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * inter, hidden)
            if bg is not None or bu is not None:
                zero = np.zeros((gate.shape[0], inter), fc1.dtype)
                bg = zero if bg is None else bg
                bu = zero if bu is None else bu
                b1 = np.stack([bg, bu], axis=2).reshape(gate.shape[0], 2 * inter)
        s = self.scheme
        block = s.block_size if s.bits == 4 else 0
        if block and (hidden % block or inter % block):
            block = 0
        self.experts = {"bits": s.bits, "block_size": block or None}
        prefix = (node.name or node.output[0]).replace("/", "_")
        quantized = {}
        for fc, weight in (("fc1", fc1), ("fc2", fc2)):
            codes, scales, zp = quantize_rows(weight, s.bits, block, s.symmetric)
            scales = scales.astype(weight.dtype)
            if not block:  # per column: [E, N] scales, zero points packed along N
                scales = scales[..., 0]
                zp = None if zp is None else pack_codes(zp[..., 0], s.bits)
            else:
                zp = None if zp is None else pack_codes(zp, s.bits)
            quantized[fc] = [
                self.add(f"{prefix}_{fc}_q{s.bits}", pack_codes(codes, s.bits)),
                self.add(f"{prefix}_{fc}_scales", scales),
                "" if zp is None else self.add(f"{prefix}_{fc}_zp", zp),
            ]
        bias1 = "" if b1 is None else self.add(f"{prefix}_fc1_bias", b1)
        inputs = [names[0], names[1], *quantized["fc1"][:2], bias1, *quantized["fc2"][:2]]
        inputs += [names[5], "", "", "", quantized["fc1"][2], quantized["fc2"][2]]
        while not inputs[-1]:
            inputs.pop()
        attrs = dataclasses.replace(spec, swiglu_fusion=1 if spec.gated else 0).attributes()
        if block:
            attrs["block_size"] = block
        self.counts["QMoE"] += 1
        return [
            helper.make_node(
                "QMoE",
                inputs,
                list(node.output),
                name=node.name or None,
                domain=MS_DOMAIN,
                expert_weight_bits=s.bits,
                weights_prepacked=0,
                accuracy_level=s.accuracy_level,
                **attrs,
            )
        ]

    def run(self) -> onnx.ModelProto:
        nodes = []
        for node in self.graph.node:
            new = None
            if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
                new = self.matmul(node)
            elif node.domain in ("", "ai.onnx") and node.op_type == "Gemm":
                new = self.gemm(node)
            elif node.domain in ("", "ai.onnx") and node.op_type == "Gather":
                new = self.gather(node)
            elif node.domain == MS_DOMAIN and node.op_type == "MoE":
                new = self.moe(node)
            nodes.extend([node] if new is None else new)
        # Copy everything but the nodes and initializers, then only the initializers still read:
        # the float weights that were quantized are never copied (gigabytes for an LLM).
        out = onnx.ModelProto()
        _copy_fields(self.proto, out, skip=("graph",))
        _copy_fields(self.graph, out.graph, skip=("node", "initializer"))
        out.graph.node.extend(nodes)
        used = _used_names(out.graph)
        out.graph.initializer.extend(
            [t for t in self.graph.initializer if t.name in used] + self.new_inits
        )
        if not any(o.domain == MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return out


def with_accuracy_level(proto: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of ``proto`` whose ``MatMulNBits`` and ``QMoE`` nodes compute at ``accuracy_level``
    ``level`` (ONNX Runtime: 0 float32, 4 int8 activations); ``proto`` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for node in out.graph.node:
        if node.domain == MS_DOMAIN and node.op_type in ("MatMulNBits", "QMoE"):
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, helper.make_attribute("accuracy_level", level)])
    return out


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy the set fields of protobuf message ``src`` into ``dst``, except those in ``skip``."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field (protobuf's upb has no field.label)
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node reads (subgraphs included) or the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _used_names(sub)
    return used


def quantize_model(
    proto: onnx.ModelProto, scheme: QuantScheme | str | Mapping
) -> tuple[onnx.ModelProto, dict]:
    """Quantize the weights of ``proto`` (module docstring); ``proto`` is not modified.

    Parameters
    ----------
    proto : onnx.ModelProto
        A float32 or float16 model (weights as initializers).
    scheme : QuantScheme, str or mapping
        ``"int4"``, ``"int8"``, ``{"bits", "block_size", "symmetric", "accuracy_level"}`` or a
        ``QuantScheme``.

    Returns
    -------
    model : onnx.ModelProto
        The quantized model (ONNX Runtime contrib ops).
    summary : dict
        The scheme and what became of the weights (the artifact manifest's ``quantization``).

    Raises
    ------
    QiaoError
        The scheme is invalid, or the model has no weight to quantize.
    """
    scheme = QuantScheme.parse(scheme)
    rewriter = _Rewriter(proto, scheme)
    out = rewriter.run()
    if not rewriter.counts:
        raise QiaoError(
            "--quantize found no weight to quantize (constant 2-D MatMul/Gemm weights with K >= "
            f"{MIN_K}, com.microsoft::MoE experts, Gather tables)"
            + (f"; kept float: {', '.join(rewriter.kept)}" if rewriter.kept else "")
            + ". fix: compile without --quantize, or store the weights as initializers"
        )
    summary = {
        **scheme.to_json(),
        "method": "weight-only round to nearest",
        "ops": dict(sorted(rewriter.counts.items())),
        "experts": rewriter.experts or None,
        "kept_float": rewriter.kept,
        "weights_in_artifact": (
            "MatMulNBits, QMoE: packed codes on CPU targets (qiao's int4/int8 kernels; experts "
            "the MoE kernels' tiles do not fit: float32), float32 on GPU targets; "
            "GatherBlockQuantized: packed codes on every target (rows dequantized at run time)"
        ),
    }
    return out, summary


__all__ = [
    "QuantScheme",
    "pack_codes",
    "quantize_model",
    "quantize_rows",
]
