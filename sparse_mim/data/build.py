"""Which pretraining dataset a data config asks for: an image folder or the demo images, decoded by PIL
or as tensors. Its own module because it names every dataset class, and those classes build on
``datasets``: kept there, ``datasets`` and the modules that extend it would import each other."""
from __future__ import annotations

from typing import Callable, Optional

from .datasets import ImageFolder
from .demo import DemoImages
from .tensor_decode import DECODERS, EncodedImages, TensorDecodedImages

__all__ = ["build_dataset"]


def build_dataset(path: Optional[str], transform: Callable, seed: int = 0, decode: str = "pil"):
    """``ImageFolder(path)``, or the built-in demo images when ``path`` is None; decoded with PIL
    (``decode="pil"``) or through ``tensor_decode`` (``"tensor"``: in the workers, ``"gpu"``: when the
    batch moves to the GPU)."""
    images = DemoImages(transform, seed) if path is None else ImageFolder(path, transform, seed)
    if decode == "pil":
        return images
    if decode not in DECODERS:
        raise ValueError(f"data.decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    return (TensorDecodedImages if decode == "tensor" else EncodedImages)(images, transform)
