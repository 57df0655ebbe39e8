"""Step 3 of SparK: turn the sparse encoder features into dense maps the decoder can read.

For each level i (i = 0 is the coarsest, stride 32; the encoder's stride-4..32 outputs are used in
reverse) the features are normalised over their active sites, every masked site is filled with a
learned mask token, and the dense map is projected to the decoder width ``d_i = width / 2**i``.
The same code runs on ``SparseTensor`` and ``MaskedDenseTensor`` features: the norm modules accept
both, and ``.dense()`` of either is zero at masked sites before the token fills them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sparse_mim.engine import SiteTensor, SparseBatchNorm2d, SparseInputError, SparseLayerNorm

__all__ = ["densify_norm", "mask_token", "densify_projection", "fill_mask_token", "sites_of"]


def densify_norm(kind: str, channels: int) -> nn.Module:
    """Norm over active sites: BatchNorm for ``kind="batch"`` (ResNets), LayerNorm over channels
    for ``kind="layer"`` (ConvNeXts)."""
    if kind == "batch":
        return SparseBatchNorm2d(channels)
    if kind == "layer":
        return SparseLayerNorm(channels, eps=1e-6, channels_first=True)
    raise ValueError(f"unknown densify norm kind {kind!r}: expected 'batch' (ResNets) or 'layer' (ConvNeXts); "
                     "set the encoder's norm_kind")


def mask_token(channels: int) -> nn.Parameter:
    """A learned (1, C, 1, 1) token, trunc_normal(std .02) clipped at +-.02."""
    token = nn.Parameter(torch.zeros(1, channels, 1, 1))
    nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
    return token


def densify_projection(channels: int, width: int, level: int) -> nn.Module:
    """Conv to the decoder width: 1x1 at level 0, 3x3 otherwise; Identity at level 0 if widths agree."""
    if level == 0 and channels == width:
        return nn.Identity()
    k = 1 if level == 0 else 3
    return nn.Conv2d(channels, width, k, padding=k // 2, bias=True)


def sites_of(active: torch.Tensor, spatial_shape) -> torch.Tensor:
    """(B, 1, H_s, W_s) bool: the patch mask ``active`` (B, h, w) repeated to a feature grid."""
    h, w = active.shape[1:]
    fy, fx = spatial_shape[0] // h, spatial_shape[1] // w
    if fy != fx or fy * h != spatial_shape[0] or fx * w != spatial_shape[1]:
        raise SparseInputError(f"feature grid {tuple(spatial_shape)} is not a whole multiple of the "
                               f"patch grid {(h, w)}")
    return active.repeat_interleave(fy, 1).repeat_interleave(fx, 2)[:, None]


def fill_mask_token(feature, token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Dense (B, C, H_s, W_s): ``feature`` at visible sites, ``token`` at masked ones.

    ``feature`` is a SparseTensor / MaskedDenseTensor (or an already dense map); ``active`` is the
    (B, h, w) patch mask.
    """
    dense = feature.dense() if isinstance(feature, SiteTensor) else feature
    visible = sites_of(active, dense.shape[2:])
    return torch.where(visible, dense, token.to(dense.dtype).expand_as(dense))
