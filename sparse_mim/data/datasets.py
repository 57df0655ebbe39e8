"""Pretraining images from a folder: ImageNet-style ``train/<class>/*`` or any folder tree of images.

Labels are not needed for pretraining, so the layout only decides where to look: ``<path>/train``
when it exists, otherwise ``<path>`` itself, searched recursively. Every file whose extension is one
of ``IMAGE_EXTENSIONS`` (any case) is an image.

Unreadable files are not fatal: the item falls back to the next readable image and reports its own
index as unreadable, so the trainer can count distinct files per epoch and name the first few
instead of printing a line per file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "DataError", "AugmentedImages", "ImageFolder", "check_readable", "find_images",
           "first_readable", "sample_seed", "unreadable_error", "unreadable_reason"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: How many consecutive unreadable files one item may skip before the dataset gives up.
MAX_CONSECUTIVE_UNREADABLE = 50


class DataError(ValueError):
    """The data cannot be used for training (missing, empty or unreadable)."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of image ``index`` in ``epoch``: a well-mixed 32-bit hash."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def find_images(path: str | os.PathLike) -> Tuple[Path, List[Path]]:
    """``(root, sorted image paths)`` under ``path`` (or ``path/train`` if present), recursively."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path {str(root)!r} does not exist; pass data.path=<folder of images> "
                        f"(or data.path=null for the built-in demo images)")
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a folder; pass a folder of images, "
                        f"e.g. an ImageNet root holding train/<class>/*.JPEG")
    if (root / "train").is_dir():
        root = root / "train"
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        files.extend(Path(folder) / n for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"no images found in {str(root)!r} or its subfolders (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} in any case)")
    return root, files


def first_readable(index: int, n: int, make: Callable[[int], Any], describe: Callable[[], str],
                   name: Optional[Callable[[int], str]] = None) -> Tuple[Any, int]:
    """``(make(index), -1)``, or ``(make(j), index)`` for the first later ``j`` (cyclically) that ``make``
    does not fail on; ``DataError`` naming the files (``name(j)``) after ``MAX_CONSECUTIVE_UNREADABLE``
    failures in a row, or when no image at all can be read."""
    failures = []
    for skipped in range(min(n, MAX_CONSECUTIVE_UNREADABLE)):
        j = (index + skipped) % n
        try:
            item = make(j)
        except Exception as e:  # noqa: BLE001 -- Pillow reports broken files with many exception types
            where = name(j) if name else f"image {j}"
            failures.append(f"{where} ({unreadable_reason(e, where)})")
            continue
        return item, (index if skipped else -1)
    raise unreadable_error(failures, n, index, describe())


def unreadable_error(failures: List[str], n: int, index: int, description: str) -> DataError:
    """The error for ``failures`` ("file (why)") in a row from ``index`` among ``n`` images."""
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    if len(failures) == n:
        return DataError(f"no readable image in {description}: {shown}; check the files or data.path")
    return DataError(f"{len(failures)} consecutive images from index {index} could not be read ({description}): "
                     f"{shown}; check the files")


def unreadable_reason(error: Exception, path: Optional[str] = None) -> str:
    """Why a file could not be read, in one line, without the ``path`` Pillow repeats in its messages."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if path:
        text = text.replace(f" {str(path)!r}", "").replace(str(path), "the file")
    return text if len(text) <= 120 else text[:117] + "..."


def check_readable(dataset) -> None:
    """Raise ``DataError`` naming the files when none of the images ``dataset[0]`` may fall back to
    can be read: found before a run creates its output folder, not at its first step."""
    dataset[0]


class AugmentedImages(Dataset):
    """Base class: item ``i`` is ``(transform(image i), -1)``, or ``(transform(next readable image), i)``
    when file ``i`` cannot be read.

    The transform's randomness is seeded by ``(seed, epoch, i)``; call ``set_epoch`` before each
    epoch. Subclasses implement ``__len__``, ``load(i) -> PIL.Image`` and ``describe()``.
    """

    def __init__(self, transform: Callable, seed: int = 0):
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """How a log names item ``index`` (a file path for image folders)."""
        return f"image {index}"

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, unreadable = first_readable(index, len(self), self.load, self.describe, self.name)
        return self.transform(image, self.generator(index)), unreadable

    def generator(self, index: int) -> torch.Generator:
        """The generator of item ``index``'s augmentation in the current epoch."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))


class ImageFolder(AugmentedImages):
    """All images under a folder (see the module docstring for the accepted layouts)."""

    def __init__(self, path: str | os.PathLike, transform: Callable, seed: int = 0):
        super().__init__(transform, seed)
        self.root, files = find_images(path)
        # one numpy array instead of a million Python strings: loader workers share it instead of
        # copying it page by page as reference counts change
        self.files = np.array([os.fsencode(f.relative_to(self.root)) for f in files])

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.files[index])

    def name(self, index: int) -> str:
        return str(self.path(index))

    def load(self, index: int) -> Image.Image:
        with Image.open(self.path(index)) as image:
            return image.convert("RGB")

    def describe(self) -> str:
        return f"{len(self.files)} images under {self.root}"
