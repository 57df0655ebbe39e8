"""The one way from (images, patch mask) to the engine's input tensor.

Backbones, the CUDA-graphed encoder, the benchmarks and the tests all start here, so the sparse run
and its masked-dense reference always see the same checks and the same active sites.
"""
from __future__ import annotations

from typing import Optional

import torch

from .coords import PatchCoordinateManager, SparseInputError
from .tensor import MaskedDenseTensor, SiteTensor, SparseTensor, check_image_size

__all__ = ["patch_input"]


def patch_input(images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None, patch_size: int = 32, *,
                dense_reference: bool = False, manager: Optional[PatchCoordinateManager] = None) -> SiteTensor:
    """``images`` (B, C, H, W) restricted to the visible patches of ``patch_mask`` (B, H/P, W/P) bool,
    True = visible, ``None`` = all visible: a ``SparseTensor`` of tile-major rows, or with
    ``dense_reference=True`` the ``MaskedDenseTensor`` of SparK's masked-dense simulation.

    The mask is checked here, with one host sync for "every image shows a patch". A caller that owns
    its coordinate manager (a fixed visible count for CUDA graphs, a timed one in the benchmarks, one
    reused across repeats) passes ``manager`` instead of the mask, and the manager's checks apply.
    """
    if manager is None:
        check_image_size(images, patch_size)
        grid = (images.shape[0], images.shape[2] // patch_size, images.shape[3] // patch_size)
        if patch_mask is None:
            patch_mask = torch.ones(grid, dtype=torch.bool, device=images.device)
        if tuple(patch_mask.shape) != grid:
            raise SparseInputError(f"patch mask shape {tuple(patch_mask.shape)} does not match images "
                                   f"{tuple(images.shape)}: expected {grid} (one entry per {patch_size}x"
                                   f"{patch_size} patch)")
        if patch_mask.dtype != torch.bool:
            raise SparseInputError(f"patch mask must be bool (True = visible), got {patch_mask.dtype}")
        empty = ~patch_mask.flatten(1).any(1)
        if bool(empty.any()):  # one host sync per batch, before the network
            raise SparseInputError(f"every patch of image(s) {empty.nonzero().flatten().tolist()} is masked: "
                                   "each image needs at least one visible patch")
        manager = PatchCoordinateManager(patch_mask, patch_size)
    elif patch_mask is not None:
        raise SparseInputError("pass either a patch mask or a manager, not both")
    else:
        check_image_size(images, manager.patch_size)
    if dense_reference:
        return MaskedDenseTensor(images * manager.mask(1, images.dtype), manager, 1)
    return SparseTensor(manager.rows_from_image(images), manager=manager, stride=1)
