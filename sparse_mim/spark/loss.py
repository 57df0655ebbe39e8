"""Step 5 of SparK: the reconstruction loss on masked patches, with per-patch normalised targets.

Patch layout used throughout: ``patchify`` turns (B, C, H, W) into (B, L, p*p*C). Patches are in
raster order over the (H/p, W/p) grid (``l = py * (W/p) + px``, the order of a flattened patch
mask). Within a patch the last dimension is ordered (row in patch, column in patch, channel), i.e.
element ``(i * p + j) * C + c`` is pixel ``(py*p + i, px*p + j)`` of channel ``c`` (SparK's order).
"""
from __future__ import annotations

from typing import Tuple

import torch

from sparse_mim.engine import SparseInputError, check_image_size

__all__ = ["patchify", "unpatchify", "normalize_patches", "masked_patch_loss", "PATCH_NORM_EPS"]

#: Added to the unbiased per-patch variance before the square root.
PATCH_NORM_EPS = 1e-6


def patchify(images: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C) in the layout described in the module docstring."""
    check_image_size(images, patch_size)
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, grid_hw: Tuple[int, int], patch_size: int = 32) -> torch.Tensor:
    """Inverse of ``patchify``: (B, L, p*p*C) on an (h, w) patch grid -> (B, C, h*p, w*p)."""
    b, num, dim = patches.shape
    h, w = (int(v) for v in grid_hw)
    p = patch_size
    if num != h * w or dim % (p * p):
        raise SparseInputError(f"patches {tuple(patches.shape)} do not fit a {h}x{w} grid of "
                               f"{p}x{p} patches (expected (B, {h * w}, {p}*{p}*C))")
    c = dim // (p * p)
    x = patches.reshape(b, h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def normalize_patches(patches: torch.Tensor, eps: float = PATCH_NORM_EPS):
    """Per-patch normalisation of (B, L, D) patches: returns (normalised, mean, std).

    ``mean`` and ``std = sqrt(var_unbiased + eps)`` are (B, L, 1), over the D values of each patch.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, unbiased=True, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_loss(pred: torch.Tensor, images: torch.Tensor, active: torch.Tensor,
                      patch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """Mean squared error on the masked patches, targets normalised per patch (raw pixels with
    ``normalize=False``, FCMAE's ``norm_pix_loss=False``).

    ``pred`` (B, C, H, W) is the decoder output in normalised-patch space, ``images`` the input,
    ``active`` (B, H/p, W/p) bool (True = visible). Each patch's error is the mean over its p*p*C
    values; the loss is the sum over the masked patches of the whole batch divided by their number
    (not a per-image mean). Visible patches do not contribute. With no masked patch the loss is 0.
    Computed in at least float32 (half-precision predictions are upcast).
    """
    if pred.shape != images.shape:
        raise SparseInputError(f"prediction {tuple(pred.shape)} and images {tuple(images.shape)} differ in shape")
    grid = (images.shape[0], images.shape[2] // patch_size, images.shape[3] // patch_size)
    if tuple(active.shape) != grid or active.dtype != torch.bool:
        raise SparseInputError(f"active must be a bool patch mask of shape {grid} for images "
                               f"{tuple(images.shape)}, got {tuple(active.shape)} {active.dtype}")
    dtype = torch.promote_types(pred.dtype, torch.float32)  # per-patch statistics in >= float32 under AMP
    target = patchify(images.to(dtype), patch_size)
    if normalize:
        target, _, _ = normalize_patches(target)
    per_patch = (patchify(pred.to(dtype), patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
    masked = (~active).reshape(per_patch.shape).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp(min=1)
