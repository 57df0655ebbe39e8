"""Step 1 of SparK: choose which 32x32 patches of each image the encoder sees.

Every image keeps the same number of visible patches, ``len_keep = round(L * (1 - mask_ratio))``
(20 of 49 at 224 px with the default ratio 0.6), chosen uniformly at random per image. The mask is
a (B, H/32, W/32) bool tensor, True where a patch is visible.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from sparse_mim.engine import SparseInputError, check_image_size

__all__ = ["len_keep", "check_mask_ratio", "patch_grid", "random_patch_mask"]


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches out of ``num_patches`` (Python's ``round``, as SparK)."""
    return round(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float, num_patches: int) -> int:
    """Validate ``mask_ratio`` for a grid of ``num_patches`` patches; return the visible count."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
    keep = len_keep(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches} "
            f"(round({num_patches} * {1 - mask_ratio:.4g}) = 0); use a ratio of at most "
            f"{(num_patches - 1) / num_patches:.4g} or larger images")
    if keep >= num_patches:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no masked patch out of {num_patches} "
            f"(round({num_patches} * {1 - mask_ratio:.4g}) = {keep}), so there is nothing to "
            f"reconstruct; use a ratio of at least {1 / num_patches:.4g} or larger images")
    return keep


def patch_grid(images: torch.Tensor, patch_size: int = 32) -> Tuple[int, int]:
    """(H / patch_size, W / patch_size) of ``images`` (B, C, H, W), with a clear error otherwise."""
    check_image_size(images, patch_size)
    return images.shape[2] // patch_size, images.shape[3] // patch_size


def random_patch_mask(batch: int, grid_hw: Tuple[int, int], mask_ratio: float,
                      generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None, keep: Optional[int] = None) -> torch.Tensor:
    """(batch, h, w) bool, True = visible: each image keeps a uniform random ``len_keep`` patches
    (``keep`` when given: another recipe's count, e.g. FCMAE's rounding down).

    Sampling is ``rand(B, L).argsort(1)[:, :len_keep]`` with ``L = h * w``; pass a ``generator``
    for reproducible masks (noise is drawn on the generator's device, the mask returned on ``device``).
    """
    h, w = (int(v) for v in grid_hw)
    if batch < 1 or h < 1 or w < 1:
        raise SparseInputError(f"need a batch of at least one image and a non-empty patch grid, got "
                               f"batch={batch}, grid={h}x{w}")
    num_patches = h * w
    if keep is None:
        keep = check_mask_ratio(mask_ratio, num_patches)
    elif not 1 <= keep < num_patches:
        raise SparseInputError(f"{keep} visible patches of {num_patches}: need at least one visible and one masked")
    sample_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=sample_device)
    visible = noise.argsort(dim=1)[:, :keep]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask = mask.scatter_(1, visible, True).view(batch, h, w)
    return mask if device is None else mask.to(device)
