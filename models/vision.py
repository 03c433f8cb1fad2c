"""torchvision's ImageNet classifiers, written here module for module: ResNet-18, MobileNetV3-Small
and EfficientNet-B0.

torchvision's wheel does not import beside the CPU torch wheel (its C extension registers operators
this torch lacks), so the architectures are defined locally. Module names and parameter shapes
are torchvision's (checked against torchvision 0.28: same keys, identical outputs), so a
torchvision ``state_dict`` saved to a local file loads as it is (``weights=PATH``).

What they exercise: stride-2 7×7 and 3×3 stems, max pooling, residual adds (ResNet); depthwise
3×3 and 5×5 convolutions, squeeze-excitation blocks (global pool, 1×1 convolutions, hard-sigmoid
or sigmoid gate), hard-swish and SiLU, global pooling and linear heads (MobileNetV3,
EfficientNet).
"""

from __future__ import annotations

import torch
from torch import nn

from qiao.compiler.errors import InvalidModel
from qiao.models import ModelSpec, register_model

# --- building blocks ----------------------------------------------------------------------------


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of ``divisor``, never 10 % under."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → activation, 'same' padding (torchvision's
    ``Conv2dNormActivation``; children ``0``, ``1``, ``2`` as there)."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, activation=nn.ReLU, eps=1e-5):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Global average pool → 1×1 conv → activation → 1×1 conv → gate, times the input."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = gate()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# --- ResNet-18 ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        cin = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(
                self,
                f"layer{i + 1}",
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width)),
            )
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- MobileNetV3-Small --------------------------------------------------------------------------

# (input, kernel, expanded, output, squeeze-excite, hard-swish, stride): torchvision's table
_MOBILENET_V3_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, se, hardswish, stride):
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        norm = {"eps": 0.001}
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=act, **norm))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, expanded, act, **norm))
        if se:
            layers.append(
                SqueezeExcitation(expanded, _make_divisible(expanded // 4), gate=nn.Hardsigmoid)
            )
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None, **norm))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [
            ConvNormActivation(3, 16, 3, 2, activation=nn.Hardswish, eps=0.001)
        ]
        layers += [InvertedResidualV3(*row) for row in _MOBILENET_V3_SMALL]
        layers.append(ConvNormActivation(96, 576, 1, activation=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- EfficientNet-B0 ----------------------------------------------------------------------------

# (expand ratio, kernel, stride, input, output, layers): torchvision's B0 stages
_EFFICIENTNET_B0 = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class MBConv(nn.Module):
    def __init__(self, expand, kernel, stride, cin, cout):
        super().__init__()
        expanded = _make_divisible(cin * expand)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, expanded, nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)  # stochastic depth is the identity in eval mode
        return out + x if self.use_res_connect else out


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2, activation=nn.SiLU)]
        for expand, kernel, stride, cin, cout, repeats in _EFFICIENTNET_B0:
            stage = [
                MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout)
                for i in range(repeats)
            ]
            layers.append(nn.Sequential(*stage))
        layers.append(ConvNormActivation(320, 1280, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- registry -----------------------------------------------------------------------------------

ARCHITECTURES = {
    "resnet18": ResNet18,
    "mobilenet_v3_small": MobileNetV3Small,
    "efficientnet_b0": EfficientNetB0,
}


def init_weights(module: nn.Module) -> nn.Module:
    """torchvision-like random initialisation with non-trivial batch-norm statistics, so that
    validation exercises the folded normalisation and activations stay alive through deep stacks."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.1, 0.1)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.0)
            nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return module


def build_classifier(name: str, seed: int = 0, weights: str | None = None) -> nn.Module:
    """The architecture ``name`` in eval mode: seeded random weights, or a torchvision
    ``state_dict`` saved at ``weights`` (``torch.save(model.state_dict(), path)``)."""
    torch.manual_seed(seed)
    module = ARCHITECTURES[name]()
    with torch.no_grad():
        init_weights(module)
    if weights is not None:
        module.load_state_dict(_state_dict(name, weights))
    return module.eval()


def _state_dict(name: str, path: str) -> dict:
    """The tensors of a torchvision checkpoint for ``name``, checked against the architecture."""
    fix = (
        f"fix: pass weights= a file written by "
        f"torch.save(torchvision.models.{name}().state_dict(), PATH), or leave it out for seeded "
        "random weights"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:  # missing, unreadable, not a torch file
        raise InvalidModel(f"cannot read {name} weights {path!r}: {err}. {fix}") from None
    expected = {k: tuple(v.shape) for k, v in ARCHITECTURES[name]().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise InvalidModel(
            f"{path!r} is not a {name} state_dict (missing {missing}, unexpected "
            f"{sorted(set(got) - set(expected))[:3]}, other shapes for {wrong}). {fix}"
        )
    return state


def _spec(name: str, batch: int, image: int, seed: int, weights: str | None) -> ModelSpec:
    module = build_classifier(name, seed, weights)
    torch.manual_seed(seed + 1)
    return ModelSpec(
        name=name,
        module=module,
        example_inputs=(torch.randn(batch, 3, image, image),),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        rtol=1e-3,
        atol=1e-3,
        description=name,
    )


@register_model(
    "resnet18", "torchvision ResNet-18 (3×224×224, dynamic batch; weights=PATH loads a state_dict)"
)
def build_resnet18(
    batch: int = 1, image: int = 224, seed: int = 0, weights: str | None = None
) -> ModelSpec:
    return _spec("resnet18", batch, image, seed, weights)


@register_model(
    "mobilenet_v3_small",
    "torchvision MobileNetV3-Small (depthwise, squeeze-excite, hard-swish; 3×224², dynamic batch)",
)
def build_mobilenet_v3_small(
    batch: int = 1, image: int = 224, seed: int = 0, weights: str | None = None
) -> ModelSpec:
    return _spec("mobilenet_v3_small", batch, image, seed, weights)


@register_model(
    "efficientnet_b0",
    "torchvision EfficientNet-B0 (MBConv, squeeze-excite, SiLU; 3×224×224, dynamic batch)",
)
def build_efficientnet_b0(
    batch: int = 1, image: int = 224, seed: int = 0, weights: str | None = None
) -> ModelSpec:
    return _spec("efficientnet_b0", batch, image, seed, weights)
