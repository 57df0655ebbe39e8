"""What is measured: the sparse SparK model and its masked-dense reference on the same weights and inputs.

``Workload`` holds both variants of one configuration (model x mask ratio):

* ``sparse``: SparK with the sparse encoder (the engine's native layout; ``execution`` picks its path).
* ``dense``:  a deep copy with ``dense_reference=True``: SparK's masked-dense simulation on identical
  weights; with ``channels_last`` its inputs and weights are channels_last, as a dense CNN would run.
* ``minkowski`` (only with ``backends`` naming it): a deep copy of ``sparse`` whose encoder runs on
  MinkowskiEngine (``backend="minkowski"``): same weights, same masks, same decoder side.

The decoder side (densify projections, LightDecoder) is dense in both and gets the same memory format
in both, so the step's difference is the encoder's. ``method="fcmae"`` wraps the same engine in ConvNeXt
V2's FCMAE instead (its variants are built the same way; the decoder is one dense ConvNeXt V2 block). ``iteration(variant, what, active)`` is one timed
unit: encoder forward+backward (``what="encoder"``) or a full pretraining step (``"step"``:
SparK forward + loss + backward; no optimizer). Gradients are cleared by ``prepare`` outside timing.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from sparse_mim.engine import use_settings
from sparse_mim.fcmae import build_fcmae, fcmae_len_keep
from sparse_mim.spark import SparK, build_spark, len_keep, random_patch_mask

__all__ = ["WorkloadSpec", "Workload", "VARIANTS", "feature_tensor"]

VARIANTS = ("sparse", "dense")  # always measured; "minkowski" joins them when asked for


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines one configuration (plain values: it also travels to subprocesses)."""

    model: str
    mask_ratio: float
    batch_size: int
    img_size: int
    device: str
    autocast: bool
    channels_last: bool
    execution: str
    decoder_width: int
    seed: int
    execution_depthwise: Optional[str] = None    # see sparse_mim.engine.EngineSettings
    execution_small_tiles: Optional[str] = None
    cuda_graph: bool = False    # sparse encoder replayed as a CUDA graph (sparse_mim.spark.graphed)
    backends: Tuple[str, ...] = ("native",)  # "minkowski" adds the MinkowskiEngine variant
    method: str = "spark"       # spark (SparK) or fcmae (ConvNeXt V2's FCMAE around the same engine)

    @property
    def variants(self) -> Tuple[str, ...]:
        return VARIANTS + (("minkowski",) if "minkowski" in self.backends else ())

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.img_size // 32, self.img_size // 32)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def len_keep(self) -> int:
        if self.method == "fcmae":
            return fcmae_len_keep(self.num_patches, self.mask_ratio)
        return len_keep(self.num_patches, self.mask_ratio)

    def random_mask(self, generator: torch.Generator, device=None) -> torch.Tensor:
        """One (B, H/32, W/32) visible-patch mask with the method's visible count."""
        return random_patch_mask(self.batch_size, self.grid, self.mask_ratio, generator=generator,
                                 device=device, keep=self.len_keep)

    @property
    def visible_fraction(self) -> float:
        """The ideal FLOP fraction: visible patches / all patches (SparK's rounding)."""
        return self.len_keep / self.num_patches


def feature_tensor(feature) -> torch.Tensor:
    """The tensor inside an encoder output (SparseTensor rows or a MaskedDenseTensor map)."""
    return feature.data


def _build(spec: WorkloadSpec) -> torch.nn.Module:
    """The sparse pretraining model (its encoder runs on our engine); FCMAE with the official
    settings (batch-wide GRN, one 512-wide decoder block, normalised-pixel loss)."""
    if spec.method == "fcmae":
        return build_fcmae(spec.model, mask_ratio=spec.mask_ratio)
    return build_spark(spec.model, mask_ratio=spec.mask_ratio, decoder_width=spec.decoder_width,
                       dense_reference=False)


class Workload:
    """Both variants of one configuration, ready to run; ``variants`` limits which are built."""

    def __init__(self, spec: WorkloadSpec, variants: Optional[Tuple[str, ...]] = None):
        self.spec = spec
        variants = spec.variants if variants is None else variants
        self.device = torch.device(spec.device)
        torch.manual_seed(spec.seed)
        sparse = _build(spec).to(self.device).train()
        images = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size,
                             generator=torch.Generator().manual_seed(spec.seed)).to(self.device)
        self.models: Dict[str, SparK] = {}
        self.graphs: Dict[str, object] = {}   # what -> captured sparse encoder (spec.cuda_graph)
        self.use_graphs = spec.cuda_graph     # FLOP counting switches them off: a replay is invisible to it
        self.images: Dict[str, torch.Tensor] = {}
        if "dense" in variants:
            dense = copy.deepcopy(sparse)
            dense.dense_reference = True
            dense_images = images
            if spec.channels_last:
                dense = dense.to(memory_format=torch.channels_last)
                dense_images = images.contiguous(memory_format=torch.channels_last)
            self.models["dense"], self.images["dense"] = dense, dense_images
        if spec.channels_last:  # the dense decoder side runs like the baseline's
            for name, child in sparse.named_children():
                if name != "encoder":
                    child.to(memory_format=torch.channels_last)
        if "minkowski" in variants:
            minkowski = copy.deepcopy(sparse)
            minkowski.encoder.backend = "minkowski"
            self.models["minkowski"], self.images["minkowski"] = minkowski, images
        if "sparse" in variants:
            self.models["sparse"], self.images["sparse"] = sparse, images

    # -- inputs ------------------------------------------------------------------------------------
    def masks(self, count: int, seed_offset: int = 1) -> List[torch.Tensor]:
        """``count`` random patch masks (one per iteration, shared by both variants), on the device."""
        g = torch.Generator().manual_seed(self.spec.seed + seed_offset)
        return [self.spec.random_mask(g).to(self.device) for _ in range(count)]

    # -- one unit of work -------------------------------------------------------------------------
    def context(self):
        """Precision and sparse execution path, entered around every forward."""
        stack = contextlib.ExitStack()
        stack.enter_context(use_settings(execution=self.spec.execution,
                                         execution_depthwise=self.spec.execution_depthwise,
                                         execution_small_tiles=self.spec.execution_small_tiles))
        if self.spec.autocast:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        return stack

    def forward(self, variant: str, what: str, active: torch.Tensor) -> torch.Tensor:
        """The scalar that ``backward`` starts from: the step's loss, or the sum of all encoder outputs."""
        model, images = self.models[variant], self.images[variant]
        with self.context():
            if variant == "sparse" and self.use_graphs:
                return self._graphed_forward(what, active)
            if what == "step":
                return model(images, active).loss
            features = model.encode(images, active)
            if self.spec.method == "fcmae":  # FCMAE's encoder output is its stride-32 stage
                features = [features]
            return sum(feature_tensor(f).sum() for f in features)

    def _graphed_forward(self, what: str, active: torch.Tensor) -> torch.Tensor:
        """As ``forward``, with the encoder (step: encoder + densify) replayed from a CUDA graph,
        captured on the first call (inside the harness's warm-up)."""
        from sparse_mim.spark.graphed import graph_encoder
        model, images = self.models["sparse"], self.images["sparse"]
        if what not in self.graphs:
            self.graphs[what] = graph_encoder(model, images, active, densify=what == "step")
        out = self.graphs[what](images, active)
        if what == "step":
            return model.forward_loss(images, model.decode(list(out)), active)
        return sum(o.sum() for o in out)

    @contextlib.contextmanager
    def eager(self):
        """The sparse variant runs eagerly inside the block, also with ``cuda_graph`` (a replay is
        invisible to the FLOP counter, and a graph allocates its memory once, at capture)."""
        graphs, self.use_graphs = self.use_graphs, False
        try:
            yield
        finally:
            self.use_graphs = graphs

    def iteration(self, variant: str, what: str, active: torch.Tensor) -> None:
        self.forward(variant, what, active).backward()

    def prepare(self, variant: str) -> None:
        """Untimed: drop the previous iteration's gradients so every iteration allocates them alike."""
        self.models[variant].zero_grad(set_to_none=True)
