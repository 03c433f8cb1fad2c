"""Qwen3 / Qwen3-MoE decoders → an ONNX Runtime GenAI folder, written by qiao.

The folder is what ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu`` writes for a Qwen3
(see ``qiao.compiler.frontend.convert_genai``'s docstring): ``model.onnx`` with every weight in
``model.onnx.data`` (streamed tensor by tensor, so models over 2 GB never pass through one
protobuf), ``genai_config.json`` (``past_present_share_buffer: true``) and the tokenizer files. The
graph is written node by node as the builder does: ``Gather`` embedding,
``SimplifiedLayerNormalization``, one packed QKV ``MatMul`` + ``Split``, Qwen3's per-head q/k RMS
norms, ``GroupQueryAttention`` (``do_rotary=1`` with cos/sin caches), o_proj,
``SkipSimplifiedLayerNormalization``, then a SwiGLU MLP — or, for a sparse Qwen3-MoE layer, the
router ``MatMul`` and ONE ``com.microsoft::MoE`` node (``qiao.compiler.moe_op``: softmax routing,
top-k, ``normalize_routing_weights`` = ``norm_topk_prob``, SwiGLU experts with interleaved fc1
rows) — the final norm and ``lm_head`` (the embedding's transpose when the embeddings are tied).
The builder cannot make Qwen3-MoE at all; ONNX Runtime GenAI runs this export.

Sources: a transformers model object (``export_model``), a local Hugging Face folder
(``export_hf_folder``: ``config.json`` + ``*.safetensors``, nothing downloaded), or a built-in
``qiao.models.DecoderSpec``. ``decoder_folder`` returns a cached export (``$QIAO_CACHE_DIR/genai``,
keyed by the content hash of the config, weights or seed, and this exporter's version).

A Hugging Face folder with GPTQ or AWQ int4 weights (``quantization_config`` in config.json;
the layouts ``qiao.compiler.hf_quant`` lists) keeps them: its quantized linears are written as
``com.microsoft::MatMulNBits`` with the checkpoint's exact codes, scales and zero points
(``accuracy_level`` 0), and ``qiao_weights.json`` beside ``genai_config.json`` (which ONNX
Runtime GenAI parses strictly) says where they came from (the manifest's ``decoder.weights``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler import moe_op
from qiao.compiler.errors import InvalidModel

# Bump when the exported graph changes: cached exports of older versions are then rebuilt.
EXPORT_VERSION = 1
MODEL_FILE, DATA_FILE, CONFIG_FILE = "model.onnx", "model.onnx.data", "genai_config.json"
# Where the weights came from when not float (GPTQ / AWQ): beside genai_config.json, because ONNX
# Runtime GenAI refuses unknown keys in it; ``decoder_manifest`` reports it as ``weights``.
WEIGHTS_FILE = "qiao_weights.json"
_WEIGHTS_KEY = "_qiao_weights"  # read_genai_folder's config -> decoder_manifest, never written
# Tokenizer files copied from a source folder (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
OPSET = 22
_ALIGN = 64  # byte alignment of each tensor in model.onnx.data (ORT may mmap it)


class DecoderSourceError(InvalidModel):
    """A decoder folder (GenAI or Hugging Face) is broken or of an unsupported architecture."""


# ------------------------------------------------------------------------------------------------
# Graph writing
# ------------------------------------------------------------------------------------------------
class _GraphWriter:
    """Nodes, value names and initializers of one graph; float initializers are streamed into the
    external data file as they are added (only their offsets stay in memory)."""

    def __init__(self, data_path: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._data = open(data_path, "wb")
        self._location = os.path.basename(data_path)
        self._offset = 0
        self._consts: dict[tuple, str] = {}

    def close(self) -> None:
        self._data.close()

    def weight(self, name: str, array, dtype=np.float32) -> str:
        """An initializer (float32 unless ``dtype`` says otherwise) written to the external data
        file; ``array`` a torch tensor or a NumPy array."""
        if hasattr(array, "detach"):
            array = array.detach().to("cpu").float().contiguous().numpy()
        array = np.ascontiguousarray(array, dtype=dtype)
        pad = -self._offset % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(memoryview(array).cast("B"))
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = TensorProto(name=name, data_type=elem, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._location),
            ("offset", str(self._offset)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def ints(self, values) -> str:
        """An int64 1-D constant (shared by value), inline in the model file."""
        key = tuple(int(v) for v in values)
        if key not in self._consts:
            name = f"/model/constants/INT64/{list(key)}"
            self.initializers.append(numpy_helper.from_array(np.array(key, np.int64), name))
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, value: int) -> str:
        key = ("scalar", int(value))
        if key not in self._consts:
            name = f"/model/constants/INT64/{int(value)}"
            self.initializers.append(numpy_helper.from_array(np.array(value, np.int64), name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str, outputs=None, domain: str = "", **attrs):
        """Add a node named ``name``; returns its output names (a str when there is one)."""
        outputs = outputs or [f"{name}/output_0"]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), list(outputs), name=name, domain=domain, **attrs
            )
        )
        return outputs[0] if len(outputs) == 1 else outputs


def _rope_caches(head: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, head/2)`` cos and sin tables computed as transformers' default RoPE does
    (float32 inverse frequencies times float32 positions), so both agree bit for bit."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head, 2, dtype=torch.int64).float() / head))
    angles = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return angles.cos().numpy(), angles.sin().numpy()


def _check_config(cfg, where: str) -> None:
    """Refuse what the graph below does not compute, with the fix."""
    arch = list(getattr(cfg, "architectures", None) or [])
    if not set(arch) & set(ARCHITECTURES):
        raise DecoderSourceError(
            f"{where}: architecture {arch or '(none)'} is not supported by qiao's GenAI export. "
            f"fix: use a model with architectures {list(ARCHITECTURES)}, or export it with "
            "`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu` and "
            "compile the folder it writes"
        )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise DecoderSourceError(
            f"{where}: rope_type {rope.get('rope_type')!r} is not supported (default RoPE only). "
            "fix: drop rope_scaling from config.json"
        )
    if getattr(cfg, "use_sliding_window", False):
        raise DecoderSourceError(
            f"{where}: use_sliding_window=true is not supported. fix: set it to false"
        )
    if getattr(cfg, "attention_bias", False):
        raise DecoderSourceError(
            f"{where}: attention_bias=true is not supported (Qwen3 has none). fix: set it to false"
        )


def _config_value(cfg, name: str, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def write_graph(model, out_dir: str, context_length: int, quantized: Mapping | None = None) -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` for a transformers Qwen3 / Qwen3-MoE model.

    Parameters
    ----------
    model : transformers.Qwen3ForCausalLM or transformers.Qwen3MoeForCausalLM
        Float32 weights (other dtypes are converted tensor by tensor).
    out_dir : str
        Existing directory.
    context_length : int
        Rows of the cos/sin caches (the longest sequence the model runs).
    quantized : Mapping[str, qiao.compiler.hf_quant.QuantLinear], optional
        Modules (``model.layers.0.self_attn.q_proj``, ``lm_head``, ...) written as
        ``com.microsoft::MatMulNBits`` with these exact int4 codes instead of a float ``MatMul``
        (a GPTQ / AWQ checkpoint's).

    Returns
    -------
    dict
        The ``model.decoder`` section of ``genai_config.json`` (names, head counts, sizes).
    """
    cfg = model.config
    _check_config(cfg, type(model).__name__)
    sd = model.state_dict()
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head = int(_config_value(cfg, "head_dim", hidden // heads))
    vocab, eps = int(cfg.vocab_size), float(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", _config_value(cfg, "rope_theta", 10000.0)))
    quantized = dict(quantized or {})
    # a quantized lm_head is its own weight even when tied (the table stays the float embedding)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and "lm_head" not in quantized

    g = _GraphWriter(os.path.join(out_dir, DATA_FILE))
    try:
        # Mask subgraph (the builder's): seqlens_k = sum(mask) - 1, total = mask width, int32.
        mask = "/model/attn_mask_reformat/attn_mask_subgraph"
        one = g.ints([1])
        red = g.op("ReduceSum", ["attention_mask", one], f"{mask}/ReduceSum", keepdims=0)
        sub = g.op("Sub", [red, g.scalar(1)], f"{mask}/Sub")
        seqlens = g.op("Cast", [sub], f"{mask}/Sub/Cast", to=TensorProto.INT32)
        shape = g.op("Shape", ["attention_mask"], f"{mask}/Shape")
        width = g.op("Gather", [shape, g.scalar(1)], f"{mask}/Gather", axis=0)
        total = g.op("Cast", [width], f"{mask}/Gather/Cast", to=TensorProto.INT32)

        embed = sd["model.embed_tokens.weight"]
        if tied:  # one copy of the table: lm_head [H, V]; the embedding is its transpose
            lm_head = g.weight("lm_head.MatMul.weight", embed.T)
            table = g.op("Transpose", [lm_head], "/model/embed_tokens/Transpose", perm=[1, 0])
        else:
            table = g.weight("model.embed_tokens.weight", embed)
        x = g.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")

        cos, sin = _rope_caches(head, theta, context_length)
        cos_cache, sin_cache = g.weight("cos_cache", cos), g.weight("sin_cache", sin)
        norm_attrs = dict(axis=-1, epsilon=eps, stash_type=1)
        residual, pending = x, None  # pending: the previous block's output, not yet added
        for i in range(layers):
            src, base = f"model.layers.{i}.", f"/model/layers.{i}"
            w_in = g.weight(f"{src}input_layernorm.weight", sd[f"{src}input_layernorm.weight"])
            if pending is None:
                normed = g.op(
                    "SimplifiedLayerNormalization",
                    [residual, w_in],
                    f"{base}/input_layernorm/LayerNorm",
                    **norm_attrs,
                )
            else:
                normed, residual = _skip_norm(
                    g, residual, pending, w_in, f"{base}/input_layernorm", eps
                )
            attn = _attention(
                g,
                sd,
                quantized,
                i,
                normed,
                seqlens,
                total,
                cos_cache,
                sin_cache,
                heads,
                kv_heads,
                head,
                eps,
            )
            w_post = f"{src}post_attention_layernorm.weight"
            normed, residual = _skip_norm(
                g,
                residual,
                attn,
                g.weight(w_post, sd[w_post]),
                f"{base}/post_attention_layernorm",
                eps,
            )
            sparse = f"{src}mlp.gate.weight" in sd  # a router: transformers made it sparse
            pending = _moe(g, sd, cfg, i, normed) if sparse else _mlp(g, sd, quantized, i, normed)
        w_norm = g.weight("model.norm.weight", sd["model.norm.weight"])
        final = g.op(
            "SkipSimplifiedLayerNormalization",
            [residual, pending, w_norm],
            f"/model/layers.{layers}/final_norm_layernorm/SkipLayerNorm",
            domain=moe_op.DOMAIN,
            epsilon=eps,
        )
        if tied:
            g.op("MatMul", [final, lm_head], "/lm_head/MatMul", outputs=["logits"])
        else:
            _linear(g, sd, quantized, final, ["lm_head"], "lm_head.MatMul", "/lm_head", "logits")
    finally:
        g.close()

    batch, seq, past, total_len = (
        "batch_size",
        "sequence_length",
        "past_sequence_length",
        "total_sequence_length",
    )
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total_len]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, vocab])]
    for i in range(layers):
        for kv in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", TensorProto.FLOAT, [batch, kv_heads, past, head]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kv}", TensorProto.FLOAT, [batch, kv_heads, total_len, head]
                )
            )
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, initializer=g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(moe_op.DOMAIN, 1)],
        producer_name="qiao.export_genai",
    )
    proto.ir_version = 10
    # the graph only (a few hundred KB): every weight is already in model.onnx.data
    onnx.save_model(proto, os.path.join(out_dir, MODEL_FILE))
    return {
        "filename": MODEL_FILE,
        "head_size": head,
        "hidden_size": hidden,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
    }


def _skip_norm(g: _GraphWriter, residual: str, add: str, weight: str, name: str, eps: float):
    """``SkipSimplifiedLayerNormalization``: (normed, residual + add)."""
    out = [f"{name}/output_0", "", "", f"{name}/output_3"]
    normed, _, _, summed = g.op(
        "SkipSimplifiedLayerNormalization",
        [residual, add, weight],
        f"{name}/SkipLayerNorm",
        outputs=out,
        domain=moe_op.DOMAIN,
        epsilon=eps,
    )
    return normed, summed


def _linear(g, sd, quantized, x, modules, weight, base, output=None) -> str:
    """``x @ W.T`` for the ``nn.Linear`` ``modules`` stacked along their outputs: a ``MatMul``
    on the float weights, or — when the modules are in ``quantized`` (a GPTQ / AWQ checkpoint)
    — one ``com.microsoft::MatMulNBits`` holding their exact int4 codes, float32 scales and
    uint8 zero points (``accuracy_level`` 0: the float32 result of the dequantized weight)."""
    import torch

    from qiao.compiler import hf_quant

    found = [quantized.get(m) for m in modules]
    outputs = [output] if output else None
    if not any(found):
        w = torch.cat([sd[f"{m}.weight"] for m in modules], dim=0).T
        return g.op("MatMul", [x, g.weight(f"{weight}.weight", w)], f"{base}/MatMul", outputs)
    if not all(found):
        raise DecoderSourceError(
            f"{', '.join(modules)}: only some of these stacked projections are quantized. fix: "
            "quantize all of q/k/v_proj (or none) in the GPTQ / AWQ checkpoint"
        )
    lin = found[0] if len(found) == 1 else hf_quant.concat(found, ", ".join(modules))
    block, packed, scales, zeros = lin.nbits_inputs()
    inputs = [
        x,
        g.weight(f"{weight}.weight_Q4", packed, np.uint8),
        g.weight(f"{weight}.weight_scales", scales),
        g.weight(f"{weight}.weight_zp", zeros, np.uint8),
    ]
    return g.op(
        "MatMulNBits",
        inputs,
        f"{base}/MatMulNBits",
        outputs,
        domain=moe_op.DOMAIN,
        K=lin.k,
        N=lin.n,
        bits=hf_quant.BITS,
        block_size=block,
        accuracy_level=0,
    )


def _attention(g, sd, quantized, i, x, seqlens, total, cos, sin, heads, kv_heads, head, eps):
    """Packed QKV, q/k RMS norms, GroupQueryAttention writing ``present.{i}.*``, o_proj."""
    src, base = f"model.layers.{i}.self_attn.", f"/model/layers.{i}/attn"
    qkv = _linear(
        g,
        sd,
        quantized,
        x,
        [f"{src}{p}_proj" for p in "qkv"],
        f"model.layers.{i}.attn.qkv_proj.MatMul",
        f"{base}/qkv_proj",
    )
    sizes = g.ints([heads * head, kv_heads * head, kv_heads * head])
    q, k, v = g.op(
        "Split",
        [qkv, sizes],
        f"{base}/qkv_proj/Split",
        outputs=[f"{base}/qkv_proj/Split/output_{j}" for j in range(3)],
        axis=-1,
    )
    normed = {}
    for name, value, n in (("q", q, heads), ("k", k, kv_heads)):
        w = g.weight(
            f"model.layers.{i}.attn.{name}_norm.layernorm.weight", sd[f"{src}{name}_norm.weight"]
        )
        per_head = g.op("Reshape", [value, g.ints([0, -1, head])], f"{base}/{name}_norm/Reshape_1")
        rms = g.op(
            "SimplifiedLayerNormalization",
            [per_head, w],
            f"{base}/{name}_norm/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
        normed[name] = g.op(
            "Reshape", [rms, g.ints([0, -1, n * head])], f"{base}/{name}_norm/Reshape_2"
        )
    out = g.op(
        "GroupQueryAttention",
        [
            normed["q"],
            normed["k"],
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            seqlens,
            total,
            cos,
            sin,
        ],
        f"{base}/GroupQueryAttention",
        outputs=[f"{base}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain=moe_op.DOMAIN,
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=float(1.0 / np.sqrt(head)),
        softcap=0.0,
        local_window_size=-1,
    )[0]
    o_name = f"model.layers.{i}.attn.o_proj.MatMul"
    return _linear(g, sd, quantized, out, [f"{src}o_proj"], o_name, f"{base}/o_proj")


def _mlp(g, sd, quantized, i, x) -> str:
    """SwiGLU as the builder writes it: gate/up MatMuls, Sigmoid, Mul, Mul, down MatMul."""
    src, base = f"model.layers.{i}.mlp.", f"/model/layers.{i}/mlp"

    def proj(p, inp):
        name = f"{src}{p}_proj"
        return _linear(g, sd, quantized, inp, [name], f"{name}.MatMul", f"{base}/{p}_proj")

    gate, up = proj("gate", x), proj("up", x)
    sig = g.op("Sigmoid", [gate], f"{base}/act_fn/Sigmoid")
    act = g.op("Mul", [gate, sig], f"{base}/act_fn/Mul")
    h = g.op("Mul", [act, up], f"{base}/Mul")
    return proj("down", h)


def _moe(g, sd, cfg, i, x) -> str:
    """Router ``MatMul`` → logits ``(tokens, E)``, then one ``com.microsoft::MoE`` node."""
    import torch

    src, base = f"model.layers.{i}.mlp.", f"/model/layers.{i}/moe"
    experts, inter = int(cfg.num_experts), int(cfg.moe_intermediate_size)
    router = g.weight(f"{src}gate.MatMul.weight", sd[f"{src}gate.weight"].T)
    logits = g.op("MatMul", [x, router], f"{base}/router/MatMul")
    logits2d = g.op("Reshape", [logits, g.ints([-1, experts])], f"{base}/router/Reshape")
    if f"{src}experts.gate_up_proj" in sd:  # transformers 5.x: stacked [E, 2I, H], gate | up
        gate_up = sd[f"{src}experts.gate_up_proj"]
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        down = sd[f"{src}experts.down_proj"]
    else:  # transformers 4.x: one module per expert

        def stack(kind):
            return torch.stack([sd[f"{src}experts.{e}.{kind}_proj.weight"] for e in range(experts)])

        gate, up, down = stack("gate"), stack("up"), stack("down")
    # fc1 rows interleaved (2i gate_i, 2i+1 up_i): swiglu_fusion=1, as ORT's GenAI builder writes
    fc1 = torch.stack((gate, up), dim=2).reshape(experts, 2 * inter, -1)
    fc1_name = g.weight(f"{src}experts.fc1", fc1)
    del fc1
    fc2_name = g.weight(f"{src}experts.fc2", down)
    spec = moe_op.MoESpec(
        k=int(cfg.num_experts_per_tok),
        activation_type="swiglu",
        normalize_routing_weights=int(bool(getattr(cfg, "norm_topk_prob", False))),
        swiglu_fusion=1,
        name=f"{base}/MoE",
    ).validate()
    out = f"{base}/MoE/output_0"
    g.nodes.append(moe_op.make_node(spec, (x, logits2d, fc1_name, "", fc2_name), out))
    return out


# ------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------
def genai_config(
    decoder: dict, hf_config: Mapping[str, Any], context_length: int, vocab_size: int
) -> dict:
    """``genai_config.json`` as ONNX Runtime GenAI 0.18 reads it (the builder's fields)."""
    eos = _ids(hf_config.get("eos_token_id"))
    pad = hf_config.get("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    bos = hf_config.get("bos_token_id")
    model: dict[str, Any] = {
        "context_length": int(context_length),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            **decoder,
        },
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "type": "qwen3",
        "vocab_size": int(vocab_size),
    }
    if bos is not None:  # Qwen has none; GenAI then leaves the prompt as given
        model["bos_token_id"] = int(bos)
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": int(context_length),
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


def export_model(
    model,
    out_dir: str | os.PathLike,
    *,
    context_length: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    write_tokenizer=None,
    quantized: Mapping | None = None,
    weights: Mapping[str, Any] | None = None,
) -> str:
    """Write a GenAI folder for a transformers ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``.

    Parameters
    ----------
    model : transformers model
        The decoder (float32).
    out_dir : str or os.PathLike
        Folder to create (or fill).
    context_length : int, optional
        GenAI's ``context_length`` and the cos/sin cache length; default the config's
        ``max_position_embeddings``.
    tokenizer_dir : str or os.PathLike, optional
        Folder whose tokenizer files (``TOKENIZER_FILES``) are copied.
    write_tokenizer : callable, optional
        ``write_tokenizer(out_dir)`` writes the tokenizer files instead.
    quantized : Mapping, optional
        ``write_graph``'s: modules written as ``MatMulNBits`` with their GPTQ / AWQ codes.
    weights : Mapping, optional
        Where the weights came from (``{"method": "gptq", ...}``): written to ``WEIGHTS_FILE``
        and the ONNX model's ``qiao.weights`` metadata.

    Returns
    -------
    str
        ``out_dir``.
    """
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    cfg = model.config
    context = int(context_length or cfg.max_position_embeddings)
    decoder = write_graph(model, out, context, quantized)
    if weights:
        path = os.path.join(out, MODEL_FILE)
        proto = onnx.load(path, load_external_data=False)
        helper.set_model_props(proto, {"qiao.weights": json.dumps(dict(weights), sort_keys=True)})
        onnx.save_model(proto, path)
        with open(os.path.join(out, WEIGHTS_FILE), "w") as f:
            json.dump(dict(weights), f, indent=4, sort_keys=True)
    hf = cfg.to_dict()
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.eos_token_id is not None:
        # generation_config.json's list (Qwen3: <|im_end|> and <|endoftext|>) is what stops
        # generation; config.json often names only one of them
        hf["eos_token_id"] = generation.eos_token_id
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(genai_config(decoder, hf, context, int(cfg.vocab_size)), f, indent=4)
    if write_tokenizer is not None:
        write_tokenizer(out)
    elif tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            path = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(path):
                shutil.copy2(path, os.path.join(out, name))
    return out


def read_hf_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a Hugging Face folder, checked to be a Qwen3 / Qwen3-MoE causal LM with
    safetensors weights; ``DecoderSourceError`` naming the problem and the fix otherwise."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise DecoderSourceError(
            f"{folder}: cannot read config.json ({err}). fix: pass a Hugging Face model folder "
            "(config.json + *.safetensors) or an ONNX Runtime GenAI folder (genai_config.json + "
            "model.onnx)"
        ) from err
    arch = config.get("architectures") or []
    if not set(arch) & set(ARCHITECTURES):
        raise DecoderSourceError(
            f"{folder}: architecture {arch or '(none)'} is not supported by qiao's decoder "
            f"export ({', '.join(ARCHITECTURES)}). fix: export it with `python -m "
            "onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu` and compile OUT"
        )
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise DecoderSourceError(
            f"{folder}: no *.safetensors weights next to config.json. fix: save the model with "
            "save_pretrained(..., safe_serialization=True) (qiao never downloads weights)"
        )
    return config


def export_hf_folder(
    folder: str | os.PathLike, out_dir: str | os.PathLike, context_length: int | None = None
) -> str:
    """Export a local Hugging Face Qwen3 / Qwen3-MoE folder (no network) to a GenAI folder."""
    from transformers import AutoModelForCausalLM

    folder = os.fspath(folder)
    config = read_hf_config(folder)
    if config.get("quantization_config"):
        return _export_quantized(folder, config, out_dir, context_length)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype="float32"
        ).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise DecoderSourceError(
            f"{folder}: transformers cannot load the checkpoint ({type(err).__name__}: {err}). "
            "fix: check config.json matches the *.safetensors files and the files are complete"
        ) from err
    return export_model(model, out_dir, context_length=context_length, tokenizer_dir=folder)


def _export_quantized(folder: str, config: dict, out_dir, context_length: int | None) -> str:
    """A GPTQ / AWQ int4 folder (``qiao.compiler.hf_quant``): the transformers model is built
    from the config and loaded with the float tensors plus each quantized linear's exactly
    dequantized weight; those linears are written as ``MatMulNBits`` with the stored codes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qiao.compiler import hf_quant

    state, quantized, info = hf_quant.load_quantized(folder, config)
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights are loaded here, not by a quantizer
        model = AutoModelForCausalLM.from_config(cfg, dtype="float32").eval()
        if cfg.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise DecoderSourceError(
            f"{folder}: the {info['method'].upper()} checkpoint does not fit its config.json "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). fix: check config.json "
            "matches the *.safetensors files and the files are complete"
        ) from err
    return export_model(
        model,
        out_dir,
        context_length=context_length,
        tokenizer_dir=folder,
        quantized=quantized,
        weights=info,
    )


def is_genai_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def is_hf_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_genai_folder(folder: str | os.PathLike) -> tuple[str, dict]:
    """``(model file path, genai_config dict)`` of a GenAI folder, checked: the config parses,
    names a decoder file that exists, and has the fields the ``decoder`` manifest needs."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config = json.load(f)
        decoder = config["model"]["decoder"]
        for key in ("num_hidden_layers", "num_key_value_heads", "head_size"):
            int(decoder[key])
        int(config["model"]["vocab_size"])
        filename = decoder.get("filename", MODEL_FILE)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DecoderSourceError(
            f"{folder}: {CONFIG_FILE} is unreadable or lacks a field ({type(err).__name__}: "
            f"{err}). fix: regenerate the folder (ONNX Runtime GenAI's model builder or "
            "qiao.compiler.export_genai) so model.decoder has filename, num_hidden_layers, "
            "num_key_value_heads, head_size and model.vocab_size"
        ) from err
    weights = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(weights):
        with open(weights) as f:
            config[_WEIGHTS_KEY] = json.load(f)
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise DecoderSourceError(
            f"{folder}: {CONFIG_FILE} names the decoder {filename!r}, which is not in the folder. "
            "fix: copy the model file (and its .data file) next to genai_config.json"
        )
    return path, config


def decoder_manifest(config: Mapping[str, Any], tokenizer: str | None) -> dict:
    """The artifact manifest's ``decoder`` section (issue 12's contract; ``kv_cache`` is set by
    the driver) from a ``genai_config.json`` dict."""
    weights = config.get(_WEIGHTS_KEY)
    config = {k: v for k, v in config.items() if k != _WEIGHTS_KEY}
    model = config["model"]
    decoder = model["decoder"]
    eos = _ids(model.get("eos_token_id"))
    bos = model.get("bos_token_id")
    extra = {"weights": dict(weights)} if weights else {}
    return {
        "context_length": int(model.get("context_length") or config["search"]["max_length"]),
        "eos_token_id": eos,
        "pad_token_id": int(model.get("pad_token_id", eos[0] if eos else 0)),
        "bos_token_id": None if bos is None else int(bos),
        "num_layers": int(decoder["num_hidden_layers"]),
        "kv_heads": int(decoder["num_key_value_heads"]),
        "head_size": int(decoder["head_size"]),
        "vocab_size": int(model["vocab_size"]),
        "tokenizer": tokenizer,
        "genai_config": dict(config),
        **extra,
    }


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, "tokenizer.json"))


def copy_tokenizer(folder: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of ``folder`` into ``dest`` (created); their names."""
    os.makedirs(dest, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(folder, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dest, name))
            copied.append(name)
    return copied


def example_feeds(
    inputs: list[dict], decoder: Mapping[str, Any], seed: int = 0, batch: int = 2, prompt: int = 5
) -> dict[str, np.ndarray]:
    """Inputs of one prefill step of a decoder artifact (``inputs``: the manifest's input specs,
    ``decoder``: its ``decoder`` section): ``batch`` prompts of ``prompt`` seeded tokens (no
    padding, so every output row is defined) and zero KV buffers long enough for an in-place
    cache. Seeded random masks and caches (``random_inputs``) would not be a valid step."""
    rng = np.random.default_rng(seed)
    buffer = min(int(decoder["context_length"]), max(16, prompt))
    kv_shape = (batch, int(decoder["kv_heads"]), buffer, int(decoder["head_size"]))
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        name, dtype = spec["name"], np.dtype(spec["dtype"])
        if name == "input_ids":
            vocab = int(decoder["vocab_size"])
            feeds[name] = rng.integers(0, vocab, (batch, prompt)).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, prompt), dtype)
        elif name.startswith("past_key_values."):
            feeds[name] = np.zeros(kv_shape, dtype)
        else:
            raise DecoderSourceError(
                f"decoder input {name!r} is not one of GenAI's (input_ids, attention_mask, "
                "past_key_values.*). fix: pass the inputs explicitly (--inputs file.npz)"
            )
    return feeds


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def cache_root() -> str:
    """``$QIAO_CACHE_DIR/genai`` (``~/.cache/qiao/genai`` by default)."""
    from qiao.compiler.schedules.tuning import cache_dir

    return os.path.join(cache_dir(), "genai")


def _cached(name: str, key: Mapping[str, Any], make) -> str:
    """The folder ``make(tmp_dir)`` writes, cached under ``cache_root()`` by the hash of ``key``."""
    from qiao.compiler.content_cache import cached_folder

    key = dict(key, export_version=EXPORT_VERSION)
    return cached_folder(cache_root(), name, key, make, is_genai_folder, "qiao_export.json")


def builtin_folder(spec) -> str:
    """The cached GenAI folder of a built-in ``qiao.models.DecoderSpec``."""

    def make(tmp: str) -> None:
        model = spec.build()
        export_model(
            model, tmp, context_length=spec.context_length, write_tokenizer=spec.write_tokenizer
        )

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:  # trained in milliseconds: hash what it writes
        spec.write_tokenizer(tmp)
        tokenizer = _files_sha256(tmp, memoise=False)
    key = {
        "builtin": spec.name,
        "config": spec.config,
        "seed": spec.seed,
        "context_length": spec.context_length,
        "tokenizer": tokenizer,
        # the seeded weights are drawn through transformers' modules, in torch
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return _cached(spec.name, key, make)


_SOURCE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _file_sha256(path: str, memo: dict) -> str:
    """sha256 of a file, memoised by (path, size, mtime): a checkpoint of tens of GB is read once,
    not at every compile."""
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        memo[key] = digest.hexdigest()
    return memo[key]


def _files_sha256(folder: str, memoise: bool = True) -> str:
    """One hash over the files of a Hugging Face folder that the export reads."""
    memo_path = os.path.join(cache_root(), "hf-file-hashes.json")
    memo: dict = {}
    if memoise:
        try:
            with open(memo_path) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            pass
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name in _SOURCE_FILES or name.endswith(".safetensors"):
            digest.update(f"{name}:{_file_sha256(os.path.join(folder, name), memo)}".encode())
    if not memoise:
        return digest.hexdigest()
    os.makedirs(cache_root(), exist_ok=True)
    tmp = f"{memo_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(memo, f)
    os.replace(tmp, memo_path)
    return digest.hexdigest()


def hf_folder(folder: str | os.PathLike, context_length: int | None = None) -> str:
    """The cached GenAI export of a local Hugging Face folder (keyed by its files' content and
    ``context_length``; default the config's ``max_position_embeddings``, 40960 for Qwen3: pass
    less to keep the shared KV buffers small)."""
    folder = os.path.abspath(os.fspath(folder))
    read_hf_config(folder)
    name = os.path.basename(folder.rstrip(os.sep)) or "model"
    key = {"hf_sha256": _files_sha256(folder), "context_length": context_length}
    return _cached(name, key, lambda tmp: export_hf_folder(folder, tmp, context_length))


__all__ = [
    "ARCHITECTURES",
    "DecoderSourceError",
    "builtin_folder",
    "example_feeds",
    "copy_tokenizer",
    "decoder_manifest",
    "export_hf_folder",
    "export_model",
    "genai_config",
    "hf_folder",
    "is_genai_folder",
    "is_hf_folder",
    "read_genai_folder",
    "read_hf_config",
    "write_graph",
]
