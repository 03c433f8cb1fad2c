"""A small dense transformer decoder layer: RMSNorm, GQA attention with RoPE, SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from qiao.models import ModelSpec, register_model
from qiao.models.layers import Attention, RMSNorm, SwiGLU


class DecoderLayer(nn.Module):
    def __init__(
        self,
        hidden: int = 256,
        num_heads: int = 8,
        num_kv_heads: int = 2,
        intermediate: int = 688,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        head_dim = hidden // num_heads
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, num_heads, num_kv_heads, head_dim, rope_theta)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@register_model(
    "transformer",
    "dense decoder layer (hidden 256, 8 heads / 2 KV heads, RoPE, SwiGLU 688), dynamic batch, seq",
)
def build_transformer(
    batch: int = 1,
    seq: int = 16,
    hidden: int = 256,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    intermediate: int = 688,
    seed: int = 0,
) -> ModelSpec:
    torch.manual_seed(seed)
    module = DecoderLayer(hidden, num_heads, num_kv_heads, intermediate).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(batch, seq, hidden)
    return ModelSpec(
        name="transformer",
        module=module,
        example_inputs=(x,),
        input_names=["hidden_states"],
        output_names=["output"],
        dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}},
        rtol=1e-3,
        atol=1e-4,
        description="dense decoder layer",
    )
