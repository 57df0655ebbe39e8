"""What a pretraining step computes before the shared optimisation step: the patch masks of the
global batch and the masked-image loss of SparK / FCMAE on this rank's share.

Randomness that decides the result is tied to the data, not to the process: the crop of each image
comes from ``(seed, epoch, index)`` (see ``sparse_mim.data``) and the patch masks of global batch
``step`` from ``(seed, step)``, drawn for the whole global batch and split like the images. A run
therefore sees the same (image, mask) pairs with any number of processes and after a resume.
"""
from __future__ import annotations

from typing import Callable, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn

from sparse_mim.runtime.distributed import DistInfo, unwrap
from sparse_mim.runtime.step import autocast
from sparse_mim.spark.masking import patch_grid, random_patch_mask

__all__ = ["global_batch_mask", "MaskedImageLoss"]

_MASK_STREAM = 1  # keeps mask seeds apart from the data's augmentation seeds


def global_batch_mask(seed: int, step: int, global_batch: int, grid: Tuple[int, int], mask_ratio: float,
                      info: DistInfo, keep: Optional[int] = None) -> torch.Tensor:
    """This rank's share of global batch ``step``'s patch mask (True = visible), on its device;
    ``keep``: visible patches per image, as the method counts them (its ``len_keep``)."""
    mask_seed = int(np.random.SeedSequence([seed, _MASK_STREAM, step]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(mask_seed)
    mask = random_patch_mask(global_batch, grid, mask_ratio, generator, keep=keep)
    return mask[info.rank::info.world_size].to(info.device, non_blocking=True)


class MaskedImageLoss:
    """The pretraining ``batch_loss`` of ``sparse_mim.runtime.step.train_epoch``: a batch ``(images,
    replaced indices)`` -> the loss of ``model(images, active)`` under this rank's share of the global
    batch's mask. ``forward`` replaces ``model(images, active)`` (e.g.
    ``sparse_mim.spark.graphed.GraphedSparK``). Collects the dataset indices of the unreadable files the
    loader replaced (``take_unreadable``)."""

    def __init__(self, model: nn.Module, info: DistInfo, *, seed: int, mask_ratio: float, global_batch: int,
                 autocast: bool, forward: Optional[Callable] = None):
        self.model, self.info, self.forward = model, info, forward or model
        self.seed, self.mask_ratio, self.global_batch, self.autocast = seed, mask_ratio, global_batch, autocast
        self.patch_size = unwrap(model).patch_size
        self.len_keep = unwrap(model).len_keep  # the method's visible count (SparK rounds, FCMAE rounds down)
        self.unreadable: Set[int] = set()

    def __call__(self, batch, step: int) -> torch.Tensor:
        images, bad = batch
        self.unreadable.update(int(i) for i in bad.tolist() if i >= 0)
        images = images.to(self.info.device, non_blocking=True)
        grid = patch_grid(images, self.patch_size)
        active = global_batch_mask(self.seed, step, self.global_batch, grid, self.mask_ratio, self.info,
                                   keep=self.len_keep(grid[0] * grid[1]))
        with autocast(self.info, self.autocast):
            return self.forward(images, active).loss

    def take_unreadable(self) -> Set[int]:
        """The indices collected since the last call."""
        found, self.unreadable = self.unreadable, set()
        return found
