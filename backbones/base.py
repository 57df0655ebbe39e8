"""What every sparse backbone shares: ``model(images, patch mask)`` -> feature maps, the input built by
``engine.patch_input`` and run on the backbone's backend."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn as nn

from sparse_mim.engine import recompute
from sparse_mim.engine import patch_input, use_settings

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

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None,
                dense_reference: bool = False):
        x = patch_input(images, active, self.downsample_ratio, dense_reference=dense_reference)
        # the sparse encoder rebuilds BatchNorm -> ReLU outputs in backward instead of keeping them
        saving = contextlib.nullcontext() if dense_reference else recompute.saving()
        with use_settings(backend=self.backend), saving:
            return self.forward_features(x)

    def forward_features(self, x):
        raise NotImplementedError
