"""Sparse ConvNeXt (V1 and V2) with timm's layer names (stem.0, stages.N.blocks.M.conv_dw, ...)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from sparse_mim.engine import (SparseConv2d, SparseDropPath, SparseGELU, SparseGRN, SparseLayerNorm,
                               SparseLinear)

from .base import SparseBackbone
from .registry import register_backbone

__all__ = ["SparseConvNeXt", "ConvNeXtBlock"]


class Mlp(nn.Module):
    """fc1 -> GELU -> (GRN for V2) -> fc2, per site (timm ``Mlp`` / ``GlobalResponseNormMlp`` names).

    ``conv_mlp``: fc1/fc2 are 1x1 convs, as timm holds them for ConvNeXt V2 atto..nano (the same
    function; only the weights' shape, (out, in, 1, 1), follows timm).
    """

    def __init__(self, dim: int, hidden: int, use_grn: bool, conv_mlp: bool = False):
        super().__init__()
        fc = (lambda cin, cout: SparseConv2d(cin, cout, 1)) if conv_mlp else SparseLinear
        self.fc1 = fc(dim, hidden)
        self.act = SparseGELU()
        self.grn = SparseGRN(hidden) if use_grn else None
        self.fc2 = fc(hidden, dim)

    def forward(self, x):
        x = self.act(self.fc1(x))
        if self.grn is not None:
            x = self.grn(x)
        return self.fc2(x)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> MLP -> layer scale -> drop path -> residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: Optional[float] = 1e-6,
                 use_grn: bool = False, conv_mlp: bool = False):
        super().__init__()
        self.conv_dw = SparseConv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = SparseLayerNorm(dim, eps=1e-6, channels_first=conv_mlp)
        self.mlp = Mlp(dim, 4 * dim, use_grn, conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = SparseDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            y = y * self.gamma.view(-1, 1, 1)
        return self.drop_path(y) + x


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, rates: Sequence[float], ls_init_value, use_grn,
                 conv_mlp: bool = False):
        super().__init__()
        if in_dim != dim:
            self.downsample = nn.Sequential(SparseLayerNorm(in_dim, eps=1e-6, channels_first=True),
                                            SparseConv2d(in_dim, dim, 2, 2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, r, ls_init_value, use_grn, conv_mlp) for r in rates])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SparseConvNeXt(SparseBackbone):
    """ConvNeXt (V1: layer scale; V2: GRN, no layer scale); outputs stages 0..3."""

    norm_kind = "layer"

    def __init__(self, depths: Sequence[int], dims: Sequence[int], drop_path_rate: float = 0.0,
                 version: int = 1, conv_mlp: bool = False):
        super().__init__()
        use_grn = version == 2
        self.version = version
        ls = None if use_grn else 1e-6
        self.stem = nn.Sequential(SparseConv2d(3, dims[0], 4, 4),
                                  SparseLayerNorm(dims[0], eps=1e-6, channels_first=True))
        total = sum(depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # timm's linspace
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.Sequential(*[
            Stage(dims[0] if i == 0 else dims[i - 1], dims[i], depths[i],
                  rates[starts[i]:starts[i] + depths[i]], ls, use_grn, conv_mlp)
            for i in range(4)])
        self.feature_channels = list(dims)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


_V1 = dict(tiny=((3, 3, 9, 3), (96, 192, 384, 768)), small=((3, 3, 27, 3), (96, 192, 384, 768)),
           base=((3, 3, 27, 3), (128, 256, 512, 1024)), large=((3, 3, 27, 3), (192, 384, 768, 1536)))


@register_backbone
def convnext_tiny(**kwargs) -> SparseConvNeXt:
    return SparseConvNeXt(*_V1["tiny"], **kwargs)


@register_backbone
def convnext_small(**kwargs) -> SparseConvNeXt:
    return SparseConvNeXt(*_V1["small"], **kwargs)


@register_backbone
def convnext_base(**kwargs) -> SparseConvNeXt:
    return SparseConvNeXt(*_V1["base"], **kwargs)


@register_backbone
def convnext_large(**kwargs) -> SparseConvNeXt:
    return SparseConvNeXt(*_V1["large"], **kwargs)


#: ConvNeXt V2 sizes (timm's): (depths, dims, conv_mlp); timm keeps atto..nano's MLPs as 1x1 convs.
#: Other timm convnextv2 names (small, large, huge) run through ``sparsify``.
_V2 = dict(atto=((2, 2, 6, 2), (40, 80, 160, 320), True), femto=((2, 2, 6, 2), (48, 96, 192, 384), True),
           pico=((2, 2, 6, 2), (64, 128, 256, 512), True), nano=((2, 2, 8, 2), (80, 160, 320, 640), True),
           tiny=(*_V1["tiny"], False), base=(*_V1["base"], False))


def _convnextv2(size: str):
    depths, dims, conv_mlp = _V2[size]

    def build(**kwargs) -> SparseConvNeXt:
        return SparseConvNeXt(depths, dims, version=2, conv_mlp=conv_mlp, **kwargs)
    build.__name__ = f"convnextv2_{size}"
    return register_backbone(build)


for _size in _V2:
    _convnextv2(_size)
