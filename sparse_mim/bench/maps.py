"""Time spent choosing masks and building coordinate maps, measured as its own line.

In a real step this work is spread through the encoder's forward: the coordinate manager builds each
map (active sets, tile gather indices, kernel maps, masks) the first time a layer asks for it and
caches it for the rest of the step (backward reuses them). To time it honestly we run the sparse
encoder forward on a fresh mask with a manager that clocks every *outermost* build (nested builds count
inside their caller), synchronising the device around each build so asynchronous CUDA work is
attributed to it. The total is

    random_patch_mask + manager construction + every map the network builds,

the median over ``repeats`` fresh masks. The forward runs without autograd: maps do not depend on it.
On CUDA the per-build synchronisation makes this an upper bound of the overhead in a real step, where
those kernels overlap with the host.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable

import torch

from sparse_mim.engine import PatchCoordinateManager, patch_input

from .timing import synchronizer
from .workload import Workload

__all__ = ["ClockedPatchManager", "map_building_ms", "minkowski_map_building_ms"]


class ClockedPatchManager(PatchCoordinateManager):
    """A ``PatchCoordinateManager`` that adds the time of each outermost map build to ``build_seconds``."""

    def __init__(self, patch_mask: torch.Tensor, patch_size: int, sync: Callable[[], None]):
        super().__init__(patch_mask, patch_size)
        self.build_seconds = 0.0
        self.builds = 0
        self._sync = sync
        self._depth = 0

    def cached(self, key: Hashable, build):
        if self._depth or self._cache.get(key) is not None:
            return super().cached(key, build)
        self._sync()
        start = time.perf_counter()
        self._depth += 1
        try:
            value = super().cached(key, build)
        finally:
            self._depth -= 1
        self._sync()
        self.build_seconds += time.perf_counter() - start
        self.builds += 1
        return value


def _one(workload: Workload, sync: Callable[[], None], generator: torch.Generator) -> float:
    spec, device = workload.spec, workload.device
    encoder = workload.models["sparse"].encoder
    images = workload.images["sparse"]
    sync()
    start = time.perf_counter()
    active = spec.random_mask(generator, device)
    manager = ClockedPatchManager(active, encoder.downsample_ratio, sync)
    sync()
    setup = time.perf_counter() - start
    x = patch_input(images, manager=manager)
    with torch.no_grad(), workload.context():
        encoder.forward_features(x)
    return setup + manager.build_seconds


def map_building_ms(workload: Workload, repeats: int) -> float:
    """Median milliseconds of mask + coordinate-map construction for one batch (see module docs)."""
    sync = synchronizer(workload.device)
    generator = torch.Generator(device=workload.device).manual_seed(workload.spec.seed + 7)
    return 1000.0 * statistics.median(_one(workload, sync, generator) for _ in range(repeats))


def _one_minkowski(workload: Workload, sync: Callable[[], None], generator: torch.Generator) -> float:
    """MinkowskiEngine builds its coordinate and kernel maps inside its own C++ calls, where no clock
    can reach; they are cached on its coordinate manager, so the build time is the first forward on a
    fresh batch minus a second forward on the same batch (same ME manager, every map cached)."""
    from sparse_mim.engine import use_settings

    spec, device = workload.spec, workload.device
    encoder = workload.models["minkowski"].encoder
    images = workload.images["minkowski"]
    start = time.perf_counter()
    active = spec.random_mask(generator, device)
    manager = PatchCoordinateManager(active, encoder.downsample_ratio)
    x = patch_input(images, manager=manager)
    passes = []
    with torch.no_grad(), workload.context(), use_settings(backend="minkowski"):
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            encoder.forward_features(x)
            sync()
            passes.append(time.perf_counter() - t0)
    setup = time.perf_counter() - start - sum(passes)
    return setup + max(0.0, passes[0] - passes[1])


def minkowski_map_building_ms(workload: Workload, repeats: int) -> float:
    """Median milliseconds of mask + MinkowskiEngine map construction for one batch (see ``_one_minkowski``)."""
    sync = synchronizer(workload.device)
    generator = torch.Generator(device=workload.device).manual_seed(workload.spec.seed + 7)
    return 1000.0 * statistics.median(_one_minkowski(workload, sync, generator) for _ in range(repeats))
