"""The networks of bench_empirical_models.py (importable by the benchmark's worker processes).

* ``resnet18``: torchvision's ResNet-18 (He et al. 2016, Table 1) written out layer by layer, since torchvision
  does not install beside this torch: 7x7 stride-2 padding-3 stem convolution without bias, BatchNorm, ReLU,
  MaxPool(3, stride 2, padding 1), then layer1..layer4 of two BasicBlocks each (64/128/256/512 channels, strides
  1/2/2/2; a block's downsample is a 1x1 convolution of stride s + BatchNorm when the shape changes),
  AdaptiveAvgPool(1), fc(512, classes). 11.2 M parameters at 10 classes. On 32x32 inputs layer1 runs at 8x8,
  layer4 at 1x1.
* ``resnet18-cifar``: the CIFAR variant (3x3 stride-1 stem, no max-pooling: layer1 at 32x32), for comparison.
* ``transformer``: Embedding(10 000, 256), 4 nn.TransformerEncoderLayer(256, 4 heads, feed-forward 1024,
  dropout 0, GELU, batch first), mean over tokens, Linear(256, classes).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's architecture (``cifar=False``) or the CIFAR stem (``cifar=True``)."""

    def __init__(self, num_classes=10, cifar=False):
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Encoder(nn.Module):
    def __init__(self, vocab=10000, d=256, heads=4, layers=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def build(name: str, n: int, seed: int = 0):
    """(model in eval mode, inputs of n samples), float32, seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name in ("resnet18", "resnet18-cifar"):
        return ResNet18(cifar=name == "resnet18-cifar").eval(), torch.randn(n, 3, 32, 32, generator=gen)
    if name == "transformer":
        return Encoder().eval(), torch.randint(0, 10000, (n, 64), generator=gen)
    raise ValueError(f"unknown model {name!r}")
