"""Sparse ResNets with timm's layer names (conv1, bn1, layer1.0.downsample.0, ...)."""
from __future__ import annotations

from typing import List, Sequence, Type

import torch.nn as nn

from sparse_mim.engine import (SparseBatchNorm2d, SparseConv2d, SparseDropPath, SparseMaxPool2d,
                               SparseReLU)

from .base import SparseBackbone
from .registry import register_backbone

__all__ = ["SparseResNet", "BasicBlock", "Bottleneck"]


def _drop(rate: float) -> nn.Module:
    return SparseDropPath(rate) if rate > 0 else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = SparseConv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = SparseBatchNorm2d(planes)
        self.act1 = SparseReLU(inplace=True)
        self.conv2 = SparseConv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = SparseBatchNorm2d(planes)
        self.act2 = SparseReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(self.drop_path(y) + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, drop_path: float = 0.0):
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = SparseConv2d(inplanes, width, 1, bias=False)
        self.bn1 = SparseBatchNorm2d(width)
        self.act1 = SparseReLU(inplace=True)
        self.conv2 = SparseConv2d(width, width, 3, stride, 1, bias=False)  # timm: stride in the 3x3
        self.bn2 = SparseBatchNorm2d(width)
        self.act2 = SparseReLU(inplace=True)
        self.conv3 = SparseConv2d(width, out, 1, bias=False)
        self.bn3 = SparseBatchNorm2d(out)
        self.act3 = SparseReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act3(self.drop_path(y) + shortcut)


class SparseResNet(SparseBackbone):
    """ResNet-B (timm ``resnetNN``): 7x7 stem, max-pool, four stages; outputs layer1..layer4."""

    norm_kind = "batch"

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = SparseConv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = SparseBatchNorm2d(64)
        self.act1 = SparseReLU(inplace=True)
        self.maxpool = SparseMaxPool2d(3, 2, 1)
        total = sum(layers)
        index = 0
        inplanes = 64
        self.feature_channels: List[int] = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                downsample = None
                if j == 0 and (s != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        SparseConv2d(inplanes, planes * block.expansion, 1, s, bias=False),
                        SparseBatchNorm2d(planes * block.expansion))
                rate = drop_path_rate * index / max(total - 1, 1)
                blocks.append(block(inplanes, planes, s, downsample, rate))
                inplanes = planes * block.expansion
                index += 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_channels.append(inplanes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    def forward_features(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def _resnet(block, layers, **kwargs) -> SparseResNet:
    return SparseResNet(block, layers, **kwargs)


@register_backbone
def resnet18(**kwargs) -> SparseResNet:
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_backbone
def resnet34(**kwargs) -> SparseResNet:
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet50(**kwargs) -> SparseResNet:
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet101(**kwargs) -> SparseResNet:
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_backbone
def resnet152(**kwargs) -> SparseResNet:
    return _resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_backbone
def resnet200(**kwargs) -> SparseResNet:
    return _resnet(Bottleneck, (3, 24, 36, 3), **kwargs)
