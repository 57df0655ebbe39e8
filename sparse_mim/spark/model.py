"""SparK: sparse masked modelling for CNNs, as one module whose methods are the paper's steps.

    active = model.mask(images)                       # 1. choose visible 32x32 patches
    features = model.encode(images, active)           # 2. sparse encoder, strides 4..32
    dense_maps = model.densify(features, active)      # 3. norm, mask tokens, projection
    pred = model.decode(dense_maps)                   # 4. light UNet decoder to pixels
    loss = model.forward_loss(images, pred, active)   # 5. MSE on masked, per-patch normalised patches

``dense_reference=True`` runs the encoder as SparK's masked-dense simulation (the benchmark
baseline); everything else is the same code, so both give the same loss and gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from backbones import SPARSIFY_PREFIX, create_backbone

from .decoder import LightDecoder
from .densify import densify_norm, densify_projection, fill_mask_token, mask_token, sites_of
from .loss import masked_patch_loss, normalize_patches, patchify, unpatchify
from .masking import check_mask_ratio, patch_grid, random_patch_mask

__all__ = ["SparK", "SparKOutput", "build_spark", "DEFAULT_DROP_PATH"]

#: Pretraining drop-path rate per backbone (SparK's ImageNet recipe); others default to 0.
DEFAULT_DROP_PATH = {"resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
                     "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4}


@dataclass
class SparKOutput:
    loss: torch.Tensor    # scalar: mean error over the batch's masked patches
    pred: torch.Tensor    # (B, 3, H, W) reconstruction in normalised-patch space
    active: torch.Tensor  # (B, H/32, W/32) bool patch mask, True = visible


class SparK(nn.Module):
    """Encoder + densify + LightDecoder. ``encoder`` follows the ``backbones`` contract:
    ``encoder(images, active, dense_reference=...)`` -> features at strides 4, 8, 16, 32, plus
    ``feature_channels``, ``downsample_ratio`` and ``norm_kind``.

    Densify parameters are lists indexed by level, level 0 being the coarsest (stride 32).
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6, decoder_width: int = 768,
                 dense_reference: bool = False):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
        self.encoder = encoder
        self.patch_size = int(encoder.downsample_ratio)
        self.mask_ratio = float(mask_ratio)
        self.dense_reference = bool(dense_reference)

        self.densify_norms = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        self.densify_projs = nn.ModuleList()
        for level, channels in enumerate(reversed(list(encoder.feature_channels))):
            self.densify_norms.append(densify_norm(encoder.norm_kind, channels))
            self.mask_tokens.append(mask_token(channels))
            self.densify_projs.append(densify_projection(channels, decoder_width // 2 ** level, level))

        self.decoder = LightDecoder(decoder_width, upsample_ratio=self.patch_size)

    def len_keep(self, num_patches: int) -> int:
        """Visible patches per image out of ``num_patches``: SparK rounds (checked: at least one of each)."""
        return check_mask_ratio(self.mask_ratio, num_patches)

    # -- the paper's steps ---------------------------------------------------------------------------
    def mask(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, H/32, W/32) bool, True = visible: a random patch mask for ``images``."""
        grid = patch_grid(images, self.patch_size)
        return random_patch_mask(images.shape[0], grid, self.mask_ratio, generator, images.device)

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> List:
        """Encoder features of the visible patches at strides 4, 8, 16, 32 (finest first)."""
        return self.encoder(images, active, dense_reference=self.dense_reference)

    def densify(self, features: List, active: torch.Tensor) -> List[torch.Tensor]:
        """Dense maps for the decoder, coarsest first: norm -> mask tokens -> projection."""
        dense_maps = []
        for level, feature in enumerate(reversed(features)):
            normed = self.densify_norms[level](feature)
            filled = fill_mask_token(normed, self.mask_tokens[level], active)
            dense_maps.append(self.densify_projs[level](filled))
        return dense_maps

    def decode(self, dense_maps: List[torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) prediction in normalised-patch space."""
        return self.decoder(dense_maps)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(pred, images, active, self.patch_size)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> SparKOutput:
        """One pretraining step's forward pass; draws a random mask unless ``active`` is given."""
        if active is None:
            active = self.mask(images)
        features = self.encode(images, active)
        pred = self.decode(self.densify(features, active))
        return SparKOutput(self.forward_loss(images, pred, active), pred, active)

    # -- visualisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: SparKOutput) -> Dict[str, torch.Tensor]:
        """Images for inspection, each (B, 3, H, W) in the input's value space: ``input``, ``masked``
        (masked patches zeroed) and ``reconstruction`` (the prediction un-normalised with each true
        patch's mean and std, with the visible patches pasted back from the input)."""
        grid = patch_grid(images, self.patch_size)
        _, mean, std = normalize_patches(patchify(images, self.patch_size))
        pred = unpatchify(patchify(out.pred.to(images.dtype), self.patch_size) * std + mean, grid, self.patch_size)
        visible = sites_of(out.active, images.shape[2:])
        return {"input": images,
                "masked": images * visible.to(images.dtype),
                "reconstruction": torch.where(visible, images, pred)}

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, "
                f"dense_reference={self.dense_reference}")


def build_spark(name: str, drop_path_rate: Optional[float] = None, mask_ratio: float = 0.6,
                decoder_width: int = 768, dense_reference: bool = False, **backbone_kwargs) -> SparK:
    """SparK around the sparse backbone ``name`` (see ``backbones.list_backbones()``).

    ``drop_path_rate`` defaults to SparK's pretraining value for ``name`` (``DEFAULT_DROP_PATH``).
    """
    if drop_path_rate is None:
        drop_path_rate = DEFAULT_DROP_PATH.get(name.removeprefix(SPARSIFY_PREFIX), 0.0)
    encoder = create_backbone(name, drop_path_rate=drop_path_rate, **backbone_kwargs)
    return SparK(encoder, mask_ratio=mask_ratio, decoder_width=decoder_width, dense_reference=dense_reference)
