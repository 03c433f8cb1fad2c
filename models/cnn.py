"""A small convolutional network: conv, batch norm, ReLU, pooling, residual add, linear head."""

from __future__ import annotations

import torch
from torch import nn

from qiao.models import ModelSpec, register_model


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.down = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def _randomise_batchnorm(module: nn.Module) -> None:
    # Fresh BN layers are the identity; give them real statistics so validation tests the folding.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@register_model(
    "cnn", "small CNN (conv, batch norm, pooling, residual), 3×32×32 input, dynamic batch"
)
def build_cnn(batch: int = 2, channels: int = 16, image: int = 32, seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    module = SmallCNN(channels)
    with torch.no_grad():
        _randomise_batchnorm(module)
    module.eval()
    x = torch.randn(batch, 3, image, image)
    return ModelSpec(
        name="cnn",
        module=module,
        example_inputs=(x,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        description="small CNN",
    )
