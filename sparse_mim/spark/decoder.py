"""Step 4 of SparK: a light UNet-style decoder from the densified maps back to pixels.

Channels are ``[w, w/2, w/4, ...]`` (768 -> 24 with five blocks for a stride-32 encoder). Each block
doubles the resolution; the densified map of level i is added before block i (the last block has no
skip), and a 1x1 conv maps the final 24 channels to RGB. The output is in normalised-patch space.
BatchNorms are plain ``nn.BatchNorm2d``; the trainer converts them to SyncBN under DDP.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["DecoderBlock", "LightDecoder"]


class DecoderBlock(nn.Module):
    """2x transposed-conv upsampling, then conv3x3-BN-ReLU6-conv3x3-BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x))


class LightDecoder(nn.Module):
    """``log2(upsample_ratio)`` DecoderBlocks of halving width, then a 1x1 conv to ``out_channels``."""

    def __init__(self, width: int = 768, upsample_ratio: int = 32, out_channels: int = 3):
        super().__init__()
        num_blocks = round(math.log2(upsample_ratio))
        if 2 ** num_blocks != upsample_ratio:
            raise ValueError(f"upsample_ratio must be a power of two, got {upsample_ratio}")
        if width % 2 ** num_blocks:
            raise ValueError(f"decoder width {width} must be divisible by {2 ** num_blocks} "
                             f"({num_blocks} halvings)")
        self.width = width
        self.channels = [width // 2 ** i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(DecoderBlock(cin, cout)
                                    for cin, cout in zip(self.channels[:-1], self.channels[1:]))
        self.proj = nn.Conv2d(self.channels[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, dense_maps: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """``dense_maps[i]`` (B, channels[i], H/32 * 2**i, W/32 * 2**i), coarsest first; ``None`` or a
        short list skips levels (at least the first map must be given)."""
        if not dense_maps or dense_maps[0] is None:
            raise ValueError("the decoder needs the coarsest densified map (dense_maps[0])")
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(dense_maps) and dense_maps[i] is not None:
                x = x + dense_maps[i]
            x = block(x)
        return self.proj(x)
