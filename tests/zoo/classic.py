"""Classic CNNs of the ONNX model zoo's Caffe2 era, written here at small widths (torchvision is
not importable beside the CPU torch wheel): AlexNet, ZFNet, VGG, SqueezeNet, GoogLeNet
(Inception v1), Inception v2 (BN-Inception), a ResNet-50-style bottleneck net, DenseNet and
ShuffleNet. They end in a softmax like the zoo files, and are exported with static shapes
(each size is its own file, as in the zoo), then rewritten Caffe2-style (``common.caffe2_style``).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo.common import Built, images

NAMES = ["data"]


def _built(module: nn.Module) -> Built:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)  # keeps deep ReLU stacks away from zero
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return Built(module.eval(), NAMES, images(), None)


def conv_bn(cin, cout, k, stride=1, pad=0, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class _Head(nn.Module):
    """Global average pool → Linear → Softmax (the zoo's ``softmax`` output)."""

    def __init__(self, cin, classes=10):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return torch.softmax(self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1)), 1)


def _fc_net(features: nn.Sequential, flat: int, hidden: int) -> nn.Module:
    """AlexNet / ZFNet / VGG classifier: Flatten → FC → ReLU → Dropout → FC → Softmax."""
    return nn.Sequential(
        features,
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, 10),
        nn.Softmax(1),
    )


def alexnet():
    features = nn.Sequential(
        nn.Conv2d(3, 16, 5, 2, 2),
        nn.ReLU(),
        nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(16, 24, 3, 1, 1, groups=2),
        nn.ReLU(),
        nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(24, 32, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(32, 24, 3, 1, 1, groups=2),
        nn.ReLU(),
    )
    return _built(_fc_net(features, 24 * 3 * 3, 64))  # 32x32 → 3x3


def zfnet():
    features = nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.LocalResponseNorm(3, 5e-5, 0.75, 2.0),
        nn.Conv2d(16, 32, 5, 2, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(32, 32, 3, 1, 1),
        nn.ReLU(),
    )
    return _built(_fc_net(features, 32 * 2 * 2, 64))  # 32x32 → 2x2


def vgg():
    def block(cin, cout, n):
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1), nn.ReLU()]
        return [*layers, nn.MaxPool2d(2, 2)]

    features = nn.Sequential(*block(3, 8, 2), *block(8, 16, 2), *block(16, 32, 3))
    return _built(_fc_net(features, 32 * 4 * 4, 64))  # 32x32 → 4x4


class _Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)


def squeezenet():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        _Fire(16, 4, 8),
        _Fire(16, 4, 8),
        nn.MaxPool2d(3, 2),
        _Fire(16, 8, 16),
        nn.Dropout(),
        nn.Conv2d(32, 10, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Softmax(1),
    )
    return _built(model)


class _Inception(nn.Module):
    """GoogLeNet's module (``bn``: BN-Inception's, with the 5x5 branch as two 3x3 and avg pool)."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool, bn=False):
        super().__init__()

        def conv(i, o, k):
            return (
                conv_bn(i, o, k, pad=k // 2)
                if bn
                else nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.ReLU())
            )

        self.b1 = conv(cin, c1, 1)
        self.b2 = nn.Sequential(conv(cin, c3r, 1), conv(c3r, c3, 3))
        second = [conv(c5r, c5, 3), conv(c5, c5, 3)] if bn else [conv(c5r, c5, 5)]
        self.b3 = nn.Sequential(conv(cin, c5r, 1), *second)
        pooling = nn.AvgPool2d(3, 1, 1, count_include_pad=False) if bn else nn.MaxPool2d(3, 1, 1)
        self.b4 = nn.Sequential(pooling, conv(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def googlenet():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0),
        nn.Conv2d(16, 24, 3, 1, 1),
        nn.ReLU(),
        _Inception(24, 8, 8, 12, 4, 4, 4),
        _Inception(28, 8, 8, 12, 4, 8, 8),
        nn.MaxPool2d(3, 2, 1),
        _Inception(36, 12, 8, 16, 4, 8, 8),
        nn.Dropout(0.4),
        _Head(44),
    )
    return _built(model)


def inception_v2():
    model = nn.Sequential(
        conv_bn(3, 16, 7, 2, 3),
        nn.MaxPool2d(3, 2, 1),
        conv_bn(16, 24, 3, 1, 1),
        _Inception(24, 8, 8, 12, 4, 4, 4, bn=True),
        _Inception(28, 8, 8, 12, 4, 8, 8, bn=True),
        nn.MaxPool2d(3, 2, 1),
        _Inception(36, 12, 8, 16, 4, 8, 8, bn=True),
        _Head(44),
    )
    return _built(model)


class _Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, 1), conv_bn(mid, cout, 1, relu=False)
        )
        self.short = (
            conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.short is None else self.short(x)))


def resnet50_style():
    model = nn.Sequential(
        conv_bn(3, 16, 7, 2, 3),
        nn.MaxPool2d(3, 2, 1),
        _Bottleneck(16, 8, 32, 1),
        _Bottleneck(32, 8, 32, 1),
        _Bottleneck(32, 16, 64, 2),
        _Bottleneck(64, 16, 64, 1),
        _Head(64),
    )
    return _built(model)


class _DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth),
            nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet():
    growth = 8
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    channels = 16
    for block in range(2):
        for _ in range(3):
            layers.append(_DenseLayer(channels, growth))
            channels += growth
        if block == 0:  # transition: BN → ReLU → 1x1 conv → 2x2 average pool
            layers += [
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels // 2, 1),
                nn.AvgPool2d(2, 2),
            ]
            channels //= 2
    layers += [nn.BatchNorm2d(channels), nn.ReLU(), _Head(channels)]
    return _built(nn.Sequential(*layers))


class _ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 → channel shuffle → depthwise 3x3 → grouped 1x1."""

    def __init__(self, cin, cout, groups, stride):
        super().__init__()
        mid = cout // 4
        self.groups, self.stride = groups, stride
        out = cout - cin if stride == 2 else cout
        self.g1 = conv_bn(cin, mid, 1, groups=groups)
        self.dw = conv_bn(mid, mid, 3, stride, 1, groups=mid, relu=False)
        self.g2 = conv_bn(mid, out, 1, groups=groups, relu=False)

    def forward(self, x):
        y = self.g1(x)
        n, c, h, w = y.shape
        y = y.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = self.g2(self.dw(y))
        if self.stride == 2:
            return torch.relu(torch.cat([nn.functional.avg_pool2d(x, 3, 2, 1), y], 1))
        return torch.relu(x + y)


def shufflenet():
    model = nn.Sequential(
        conv_bn(3, 12, 3, 2, 1),
        nn.MaxPool2d(3, 2, 1),
        _ShuffleUnit(12, 48, 3, 2),
        _ShuffleUnit(48, 48, 3, 1),
        _ShuffleUnit(48, 96, 3, 2),
        _Head(96),
    )
    return _built(model)
