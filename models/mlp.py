"""A small multi-layer perceptron."""

from __future__ import annotations

import torch
from torch import nn

from qiao.models import ModelSpec, register_model


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.nn.functional.gelu(self.fc2(x))
        return self.fc3(x)


@register_model("mlp", "3-layer MLP (64 → 256 → 256 → 10), ReLU and GELU, dynamic batch")
def build_mlp(batch: int = 4, in_features: int = 64, hidden: int = 256, seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    module = MLP(in_features, hidden).eval()
    x = torch.randn(batch, in_features)
    return ModelSpec(
        name="mlp",
        module=module,
        example_inputs=(x,),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        description="3-layer MLP",
    )
