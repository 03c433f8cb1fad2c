"""Qwen3-MoE: the decoder (RMSNorm, grouped-query attention with per-head q/k RMSNorm and RoPE,
sparse MoE block) and one MoE block at Qwen3-30B-A3B's real size.

Built-in models:

- ``qwen3-moe-tiny``: 2 decoder layers, hidden 64, 8 experts, top-2 (tests);
- (``qwen3-moe-small``, the same sizes as ``SMALL``, is now the GenAI-layout decoder of
  ``qiao.models.qwen3``, built with transformers' own Qwen3-MoE and a KV cache);
- ``qwen3-moe-30b-a3b-block``: one MoE block, hidden 2048, 128 experts, top-8, expert intermediate
  768 (~2.4 GB of float32 weights).

Weights are seeded random, or read from a local Hugging Face checkpoint (``checkpoint=<path>``:
``.safetensors`` with the real parameter names — ``model.layers.N.mlp.gate.weight``,
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` or transformers 5.x's stacked
``mlp.experts.gate_up_proj``/``down_proj`` — and ``config.json`` when present).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from qiao.models import ModelSpec, register_model
from qiao.models.hf_checkpoint import CheckpointError, load_config, load_tensors, take
from qiao.models.layers import Attention, RMSNorm, SwiGLU
from qiao.models.moe import MoEBlock


@dataclass(frozen=True)
class Qwen3MoEConfig:
    """Qwen3-MoE hyper-parameters (names follow transformers' ``Qwen3MoeConfig``)."""

    vocab_size: int = 128
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    intermediate_size: int = 128  # dense MLP layers only (mlp_only_layers)
    norm_topk_prob: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False

    def replace(self, **changes) -> Qwen3MoEConfig:
        return dataclasses.replace(self, **changes)

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, d: dict) -> Qwen3MoEConfig:
        """From a transformers ``config.json`` dict (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if values.get("head_dim") is None:
            values["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        values["mlp_only_layers"] = tuple(values.get("mlp_only_layers", ()))
        return cls(**values)


TINY = Qwen3MoEConfig()
SMALL = Qwen3MoEConfig(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
)
QWEN3_30B_A3B = Qwen3MoEConfig(
    vocab_size=151936,
    hidden_size=2048,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    intermediate_size=6144,
)


def moe_block(cfg: Qwen3MoEConfig) -> MoEBlock:
    return MoEBlock(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.norm_topk_prob,
    )


class Qwen3MoEDecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoEConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rope_theta,
            qk_norm=True,
            eps=cfg.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            moe_block(cfg)
            if cfg.is_sparse(layer)
            else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoEForCausalLM(nn.Module):
    """Token ids (batch, seq) → logits (batch, seq, vocab)."""

    def __init__(self, cfg: Qwen3MoEConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3MoEDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def init_random(module: nn.Module, seed: int) -> None:
    """Seeded weights with unit-scale activations (so every expert matters in a comparison)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def block_weights_from_hf(tensors: dict, prefix: str, cfg: Qwen3MoEConfig) -> dict:
    """``MoEBlock`` state dict from HF tensors under ``prefix`` (e.g. ``model.layers.0.mlp.``):
    per-expert ``experts.E.{gate,up,down}_proj.weight`` or stacked ``experts.gate_up_proj`` /
    ``experts.down_proj``."""
    E, H, INTER = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    router = take(tensors, prefix + "gate.weight", (E, H))
    if prefix + "experts.gate_up_proj" in tensors:
        gate_up = take(tensors, prefix + "experts.gate_up_proj", (E, 2 * INTER, H))
        fc1 = MoEBlock.interleave(gate_up[:, :INTER], gate_up[:, INTER:])
        fc2 = take(tensors, prefix + "experts.down_proj", (E, H, INTER))
    else:

        def stack(kind, shape):
            return torch.stack(
                [take(tensors, f"{prefix}experts.{e}.{kind}_proj.weight", shape) for e in range(E)]
            )

        fc1 = MoEBlock.interleave(stack("gate", (INTER, H)), stack("up", (INTER, H)))
        fc2 = stack("down", (H, INTER))
    return {"gate.weight": router, "fc1": fc1.contiguous(), "fc2": fc2.contiguous()}


def causal_lm_weights_from_hf(tensors: dict, cfg: Qwen3MoEConfig) -> dict:
    """``Qwen3MoEForCausalLM`` state dict from HF ``Qwen3MoeForCausalLM`` tensor names."""
    H, V = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    sd = {
        "embed_tokens.weight": take(tensors, "model.embed_tokens.weight", (V, H)),
        "norm.weight": take(tensors, "model.norm.weight", (H,)),
    }
    head = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    sd["lm_head.weight"] = take(tensors, head, (V, H))
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for name, shape in (
            ("input_layernorm.weight", (H,)),
            ("post_attention_layernorm.weight", (H,)),
            ("self_attn.q_proj.weight", (q, H)),
            ("self_attn.k_proj.weight", (kv, H)),
            ("self_attn.v_proj.weight", (kv, H)),
            ("self_attn.o_proj.weight", (H, q)),
            ("self_attn.q_norm.weight", (cfg.head_dim,)),
            ("self_attn.k_norm.weight", (cfg.head_dim,)),
        ):
            sd[dst + name] = take(tensors, src + name, shape)
        if cfg.is_sparse(i):
            for name, t in block_weights_from_hf(tensors, src + "mlp.", cfg).items():
                sd[f"{dst}mlp.{name}"] = t
        else:
            for name, shape in (
                ("gate_proj", (cfg.intermediate_size, H)),
                ("up_proj", (cfg.intermediate_size, H)),
                ("down_proj", (H, cfg.intermediate_size)),
            ):
                sd[f"{dst}mlp.{name}.weight"] = take(tensors, f"{src}mlp.{name}.weight", shape)
    return sd


def _config(default: Qwen3MoEConfig, checkpoint, overrides: dict) -> Qwen3MoEConfig:
    cfg = default
    if checkpoint is not None:
        hf = load_config(checkpoint)
        if hf is not None:
            cfg = Qwen3MoEConfig.from_hf(hf)
    return cfg.replace(**overrides) if overrides else cfg


def build_causal_lm(cfg: Qwen3MoEConfig, checkpoint=None, seed: int = 0) -> Qwen3MoEForCausalLM:
    """A Qwen3-MoE causal LM with checkpoint weights, or seeded random ones."""
    model = Qwen3MoEForCausalLM(cfg)
    if checkpoint is None:
        init_random(model, seed)
    else:
        tensors = load_tensors(checkpoint)
        model.load_state_dict(causal_lm_weights_from_hf(tensors, cfg), strict=True)
    return model.eval()


def build_block(cfg: Qwen3MoEConfig, checkpoint=None, seed: int = 0, layer: int = 0) -> MoEBlock:
    """One MoE block with checkpoint weights (layer ``layer``), or seeded random ones."""
    block = moe_block(cfg)
    if checkpoint is None:
        init_random(block, seed)
    else:
        prefix = f"model.layers.{layer}.mlp."
        tensors = load_tensors(checkpoint, prefixes=[prefix])
        if not tensors:
            raise CheckpointError(
                f"checkpoint {checkpoint} has no tensors under {prefix!r}. "
                "fix: pass layer=<index of "
                "a sparse MoE layer>"
            )
        block.load_state_dict(block_weights_from_hf(tensors, prefix, cfg), strict=True)
    return block.eval()


def _lm_spec(
    name: str,
    default: Qwen3MoEConfig,
    batch: int,
    seq: int,
    seed: int,
    checkpoint,
    overrides: dict,
    description: str,
) -> ModelSpec:
    cfg = _config(default, checkpoint, overrides)
    model = build_causal_lm(cfg, checkpoint, seed)
    ids = torch.randint(
        0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1)
    )
    return ModelSpec(
        name=name,
        module=model,
        example_inputs=(ids,),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
        rtol=1e-3,
        atol=1e-4,
        description=description,
    )


@register_model(
    "qwen3-moe-tiny",
    "Qwen3-MoE decoder, 2 layers, hidden 64, 8 experts top-2 (q/k-norm GQA, RoPE), dynamic "
    "batch and sequence",
)
def build_qwen3_moe_tiny(
    batch: int = 1, seq: int = 8, seed: int = 0, checkpoint=None, **config
) -> ModelSpec:
    return _lm_spec(
        "qwen3-moe-tiny", TINY, batch, seq, seed, checkpoint, config, "Qwen3-MoE tiny decoder"
    )


@register_model(
    "qwen3-moe-30b-a3b-block",
    "one Qwen3-30B-A3B MoE block: hidden 2048, 128 experts top-8, intermediate 768 (2.4 GB "
    "fp32), dynamic token count",
)
def build_qwen3_30b_a3b_block(
    tokens: int = 4, seed: int = 0, checkpoint=None, layer: int = 0, **config
) -> ModelSpec:
    cfg = _config(QWEN3_30B_A3B, checkpoint, config)
    block = build_block(cfg, checkpoint, seed, layer)
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    return ModelSpec(
        name="qwen3-moe-30b-a3b-block",
        module=block,
        example_inputs=(x,),
        input_names=["hidden_states"],
        output_names=["output"],
        dynamic_axes={"hidden_states": {0: "tokens"}, "output": {0: "tokens"}},
        rtol=1e-3,
        atol=1e-4,
        description="Qwen3-30B-A3B MoE block",
    )


__all__ = [
    "QWEN3_30B_A3B",
    "Qwen3MoEConfig",
    "Qwen3MoEDecoderLayer",
    "Qwen3MoEForCausalLM",
    "block_weights_from_hf",
    "build_block",
    "build_causal_lm",
    "causal_lm_weights_from_hf",
]
