"""What every sparse backbone shares: turning (images, patch mask) into the engine's input tensor."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn as nn

from sparse_mim.engine import recompute
from sparse_mim.engine import MaskedDenseTensor, SparseInputError, SparseTensor, check_image_size, use_settings

__all__ = ["SparseBackbone"]


class SparseBackbone(nn.Module):
    """Base class: ``model(images, active)`` -> feature maps at strides 4, 8, 16, 32.

    ``active`` is a (B, H/32, W/32) bool patch mask (True = visible, ``None`` = all visible). With
    ``dense_reference=True`` the same weights run SparK's masked-dense simulation instead.
    """

    downsample_ratio = 32
    feature_strides = (4, 8, 16, 32)
    feature_channels: List[int]
    norm_kind: str  # "batch" (ResNets) or "layer" (ConvNeXts): what SparK's densify norms use
    backend = "native"  # who runs the sparse ops: "native" or "minkowski" (create_backbone(..., backend=))

    @property
    def feature_info(self) -> List[dict]:
        return [dict(num_chs=c, reduction=s) for c, s in zip(self.feature_channels, self.feature_strides)]

    def make_input(self, images: torch.Tensor, active: Optional[torch.Tensor], dense_reference: bool):
        check_image_size(images, self.downsample_ratio)
        grid = (images.shape[0], images.shape[2] // self.downsample_ratio, images.shape[3] // self.downsample_ratio)
        if active is None:
            active = torch.ones(grid, dtype=torch.bool, device=images.device)
        if tuple(active.shape) != grid:
            raise SparseInputError(f"patch mask shape {tuple(active.shape)} does not match images "
                                   f"{tuple(images.shape)}: expected {grid} (one entry per 32x32 patch)")
        if active.dtype != torch.bool:
            raise SparseInputError(f"patch mask must be bool (True = visible), got {active.dtype}")
        empty = ~active.flatten(1).any(1)
        if bool(empty.any()):  # one host sync per batch, before the network
            raise SparseInputError(f"every patch of image(s) {empty.nonzero().flatten().tolist()} is masked: "
                                   "each image needs at least one visible patch")
        if dense_reference:
            return MaskedDenseTensor.from_patch_mask(images, active, self.downsample_ratio)
        return SparseTensor.from_patch_mask(images, active, self.downsample_ratio)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None,
                dense_reference: bool = False):
        x = self.make_input(images, active, dense_reference)
        # the sparse encoder rebuilds BatchNorm -> ReLU outputs in backward instead of keeping them
        saving = contextlib.nullcontext() if dense_reference else recompute.saving()
        with use_settings(backend=self.backend), saving:
            return self.forward_features(x)

    def forward_features(self, x):
        raise NotImplementedError
