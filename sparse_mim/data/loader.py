"""The pretraining DataLoader: one shard of every global batch per rank, resumable mid-epoch.

Global batch ``i`` of an epoch is positions ``[i*B, (i+1)*B)`` of the epoch's shuffled order, for any
world size: rank ``r`` holds positions ``i*B + r, i*B + r + world, ...`` (``DistributedSampler``'s
interleaving), so a per-sample quantity drawn for the whole global batch belongs to rank ``r`` as
``global[r::world]``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .datasets import AugmentedImages, DataError

__all__ = ["ResumableSampler", "build_loader", "check_batch_fits", "per_rank_batch", "set_epoch"]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(f"train.batch_size (the global batch) must be a positive multiple of the "
                         f"number of processes; got {global_batch} for {world_size} processes. "
                         f"Use e.g. train.batch_size={max(1, round(global_batch / world_size)) * world_size}")
    return global_batch // world_size


def check_batch_fits(dataset: AugmentedImages, global_batch: int) -> None:
    """An epoch drops the last incomplete batch, so the data must hold at least one global batch."""
    if len(dataset) < global_batch:
        raise DataError(f"{dataset.describe()}: fewer than one global batch of {global_batch}; "
                        f"lower train.batch_size or add images")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``start`` indices."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(dataset: AugmentedImages, global_batch: int, world_size: int = 1, rank: int = 0,
                 num_workers: int = 0, seed: int = 0) -> DataLoader:
    """Shuffled, ``drop_last`` loader of this rank's ``global_batch / world_size`` images per step."""
    batch = per_rank_batch(global_batch, world_size)
    check_batch_fits(dataset, global_batch)
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers, drop_last=True,
                      # data.decode=gpu's dataset brings its own (its items are still encoded)
                      collate_fn=getattr(dataset, "collate_fn", None),
                      # workers start afresh each epoch so they see the dataset's new epoch (its seeds)
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      # the loader's base seed comes from here, never from torch's global RNG
                      generator=torch.Generator().manual_seed(seed))


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Prepare ``loader`` for ``epoch``, skipping its first ``start_batch`` batches (for a resume)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start_batch * loader.batch_size
    loader.dataset.set_epoch(epoch)
