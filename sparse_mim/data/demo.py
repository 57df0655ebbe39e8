"""A small built-in dataset that needs no download: tiles of scikit-image's sample photographs.

Used when ``data.path`` is null, so ``sparse-mim pretrain`` runs out of the box. The photographs ship
inside the scikit-image package; any that are missing from the installed version are left out.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
from PIL import Image

from .datasets import AugmentedImages, DataError

__all__ = ["DEMO_PHOTOS", "DemoImages", "demo_tiles"]

#: scikit-image sample photographs (``skimage.data.<name>``); grey ones are used as grey RGB.
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
               "retina", "camera", "coins", "moon", "clock", "brick", "grass", "gravel")


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype != np.uint8:
        array = (array.astype(np.float64) / max(array.max(), 1) * 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def demo_tiles(tile: int = 128, stride: int = 64) -> Tuple[List[Image.Image], List[str]]:
    """Tiles of every available demo photo: each photo is resized to a short side of ``2 * tile``,
    then cut into ``tile x tile`` crops every ``stride`` pixels. Returns (tiles, photo names)."""
    tiles, used = [], []
    for name in DEMO_PHOTOS:
        try:
            photo = _photo(name)
        except Exception:  # not shipped with this scikit-image, or needs a download
            continue
        scale = 2 * tile / min(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        for top in range(0, photo.height - tile + 1, stride):
            for left in range(0, photo.width - tile + 1, stride):
                tiles.append(photo.crop((left, top, left + tile, top + tile)))
        used.append(name)
    if not tiles:
        raise DataError("no scikit-image sample photo could be loaded for the demo dataset; "
                        "pass data.path=<folder of images>")
    return tiles, used


class DemoImages(AugmentedImages):
    """Tiles of scikit-image's sample photographs, augmented like any other pretraining data."""

    def __init__(self, transform: Callable, seed: int = 0, tile: int = 128, stride: int = 64):
        super().__init__(transform, seed)
        self.tiles, self.photos = demo_tiles(tile, stride)

    def __len__(self) -> int:
        return len(self.tiles)

    def load(self, index: int) -> Image.Image:
        return self.tiles[index]

    def describe(self) -> str:
        return f"{len(self.tiles)} demo tiles of {len(self.photos)} scikit-image photos"
