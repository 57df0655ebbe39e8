"""Launched by torchrun from tests/test_distributed.py: one SparK forward/backward under DDP (gloo,
SyncBN) in float64 on this rank's share of a fixed global batch. Rank 0 saves the rank-averaged loss,
every rank's gradients and its BatchNorm running statistics to the file named on the command line."""
from __future__ import annotations

import sys

import torch

from sparse_mim.runtime.distributed import (all_gather_objects, all_reduce_mean, init_distributed, shutdown, unwrap,
                                            wrap_model)
from sparse_mim.spark import build_spark, random_patch_mask

GLOBAL_BATCH, IMG_SIZE = 4, 64


def global_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, IMG_SIZE, IMG_SIZE, generator=generator, dtype=torch.float64)
    active = random_patch_mask(GLOBAL_BATCH, (IMG_SIZE // 32, IMG_SIZE // 32), 0.6, generator)
    return images, active


def build_model():
    torch.manual_seed(0)
    return build_spark("resnet18", decoder_width=64).double()


def main(path: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    images, active = global_batch()
    model = wrap_model(build_model(), info, sync_bn=True)
    rank, world = info.rank, info.world_size
    loss = model(images[rank::world], active[rank::world]).loss
    loss.backward()
    bare = unwrap(model)
    grads = {n: p.grad.detach().clone() for n, p in bare.named_parameters()}
    all_grads = all_gather_objects(grads)
    mean_loss = all_reduce_mean(loss.detach())
    if info.is_main:
        stats = {n: b.clone() for n, b in bare.named_buffers() if "running_" in n}
        sync_bn = sorted({type(m).__name__ for m in bare.modules() if "BatchNorm" in type(m).__name__})
        torch.save({"world": world, "loss": mean_loss, "grads": all_grads, "stats": stats, "norms": sync_bn}, path)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
