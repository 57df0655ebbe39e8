"""The sparse encoder as one CUDA graph: forward and backward replayed without Python.

At batch 128 a sparse ResNet-50 encoder's GPU work is a fraction of the time Python and the kernel
launches of ~50 layers take (benchmarks/RESULTS.md), so the sparse engine is CPU bound. SparK masks
keep the same number of patches in every image, so every tensor shape of the encoder — rows, tiles,
maps — is the same from step to step. The maps are built from the mask inside the graph (see
``PatchCoordinateManager(visible_per_image=...)``), so a replay needs only the new images and mask.

    graphed = graph_encoder(spark, images, active)          # captures (warm-up + capture)
    features = graphed(images, active)                      # rows at strides 4..32, differentiable
    dense_maps = graph_encoder(spark, ..., densify=True)(images, active)   # encoder + densify
    out = GraphedSparK(spark)(images, active)               # SparK's forward; used by the trainer

Limits: CUDA only; ``active`` must show ``visible_per_image`` patches per image (checked each call,
one host sync); the module's train/eval mode and the autocast dtype are those of the capture. The
capture's warm-up passes leave BatchNorm statistics as they were, but they do draw random numbers
(drop path), so a graphed run is not bit-identical to an eager one.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from sparse_mim.engine import PatchCoordinateManager, SparseInputError, patch_input

__all__ = ["graph_encoder", "StaticShapeEncoder", "GraphedSparK"]


class StaticShapeEncoder(nn.Module):
    """Encoder (optionally + densify) of a SparK model with a fixed visible count: tensors in, tensors out."""

    def __init__(self, spark: nn.Module, visible_per_image: int, densify: bool = False):
        super().__init__()
        self.encoder = spark.encoder
        self.visible_per_image = int(visible_per_image)
        self.with_densify = densify
        if densify:  # registered so that their parameters get gradients through the graph
            self.densify_norms, self.mask_tokens = spark.densify_norms, spark.mask_tokens
            self.densify_projs = spark.densify_projs
        self._densify = spark.densify if densify else None

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = patch_input(images, manager=PatchCoordinateManager(active, self.encoder.downsample_ratio,
                                                               self.visible_per_image))
        features = self.encoder.forward_features(x)
        if self._densify is not None:
            return tuple(self._densify(features, active))
        return tuple(f.features for f in features)


def graph_encoder(spark: nn.Module, images: torch.Tensor, active: torch.Tensor, densify: bool = False,
                  warmup: int = 3):
    """Capture ``spark``'s sparse encoder (and densify) for inputs shaped like ``images`` / ``active``.

    Returns a callable ``(images, active) -> tuple of tensors`` with autograd support (parameter
    gradients accumulate as usual). Capture under the autocast you will train with; the capture
    disables autocast's weight cache itself, as CUDA graphs require.
    """
    if images.device.type != "cuda":
        raise ValueError(f"graph_encoder needs CUDA tensors, got images on {images.device}")
    if getattr(spark, "dense_reference", False):
        raise ValueError("graph_encoder captures the sparse encoder; this SparK runs the masked-dense reference")
    counts = active.flatten(1).sum(1)
    k = int(counts[0])
    if k == 0 or bool((counts != k).any()):
        raise SparseInputError("graph_encoder needs the same, non-zero number of visible patches in every image; "
                               f"got {sorted(set(counts.tolist()))}")
    module = StaticShapeEncoder(spark, k, densify).train(spark.training)
    # The graph's inputs are static buffers that every call copies into: own them, so that later
    # calls never overwrite the caller's tensors.
    images, active = images.clone(), active.clone()
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    buffers = {name: b.clone() for name, b in module.named_buffers()}  # warm-up must not count as steps
    with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(module, (images, active), num_warmup_iters=warmup,
                                                    allow_unused_input=True)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])

    def run(new_images: torch.Tensor, new_active: torch.Tensor):
        if tuple(new_images.shape) != tuple(images.shape) or tuple(new_active.shape) != tuple(active.shape):
            raise SparseInputError(f"the graph was captured for images {tuple(images.shape)} and mask "
                                   f"{tuple(active.shape)}, got {tuple(new_images.shape)} / {tuple(new_active.shape)}")
        if bool((new_active.flatten(1).sum(1) != k).any()):
            raise SparseInputError(f"the graph was captured for {k} visible patches per image; this mask differs")
        return graphed(new_images, new_active)
    return run


class GraphedSparK:
    """``spark(images, active)`` for training with encoder + densify replayed from a CUDA graph.

    One graph per input shape, captured the first time that shape is seen (the trainer's loader drops
    the last partial batch, so there is one). The decoder and the loss run eagerly; parameter
    gradients accumulate as in the eager model, so optimizers, clipping and checkpoints are unchanged.
    """

    def __init__(self, spark: nn.Module):
        self.spark = spark
        self.graphs = {}

    def __call__(self, images: torch.Tensor, active: torch.Tensor):
        from .model import SparKOutput
        key = (tuple(images.shape), tuple(active.shape), images.dtype)
        if key not in self.graphs:
            self.graphs[key] = graph_encoder(self.spark, images, active, densify=True)
        dense_maps = self.graphs[key](images, active)
        pred = self.spark.decode(list(dense_maps))
        return SparKOutput(self.spark.forward_loss(images, pred, active), pred, active)
