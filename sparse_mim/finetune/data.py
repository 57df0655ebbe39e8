"""Labelled data for fine-tuning, linear probing and kNN: ``<path>/train/<class>/*`` and ``<path>/val/<class>/*``.

Classes are the class folders in sorted order (torchvision ``ImageFolder``'s order); ``train`` and
``val`` must hold the same classes. ``label_fraction`` keeps that fraction of every class's training
images, chosen from a seed, so every arm of a comparison trains on the same subset.

Augmentations are timm's (``timm.data.create_transform``). They draw from torch's and Python's global
generators; each item seeds both from ``(seed, epoch, index)`` inside a forked state, so an image's
augmentation is the same for any number of loader workers or processes and again after a resume,
and the training process's own generators are left untouched.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes, make_dataset

from sparse_mim.data import IMAGE_EXTENSIONS, DataError, first_readable
from sparse_mim.data.datasets import sample_seed

__all__ = ["LabelledImages", "find_splits", "label_subset", "build_transforms"]


def _classes(folder: Path, split: str) -> Tuple[List[str], Dict[str, int]]:
    try:
        return find_classes(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder} holds no class folders; the {split} split needs one folder per class, "
                        f"e.g. {folder}/<class>/*.jpg") from None


def find_splits(path: str | os.PathLike) -> Tuple[List[str], List[Tuple[str, int]], List[Tuple[str, int]]]:
    """``(classes, train samples, val samples)`` of a dataset root with ``train/`` and ``val/`` class folders."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a folder; pass a folder holding train/<class>/* and "
                        f"val/<class>/*")
    folders = {split: root / split for split in ("train", "val")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"{root} has no {split}/ folder; fine-tuning needs {root}/train/<class>/* and "
                            f"{root}/val/<class>/* (ImageNet layout)")
    (classes, to_index), (val_classes, _) = (_classes(folders[s], s) for s in ("train", "val"))
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"train/ and val/ under {root} hold different class folders (only in train: "
                        f"{only_train[:5] or 'none'}; only in val: {only_val[:5] or 'none'}); both need the same "
                        f"classes")
    samples = {}
    for split, folder in folders.items():
        found = make_dataset(str(folder), to_index, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        empty = sorted({c for c in classes} - {classes[label] for _, label in found})
        if empty:
            raise DataError(f"{folder}: class folder(s) {empty[:5]} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples[split] = found
    return classes, samples["train"], samples["val"]


def label_subset(labels: Sequence[int], fraction: float, seed: int) -> List[int]:
    """Indices of ``fraction`` of each class's items (at least one per class), drawn from ``seed``.

    Deterministic and class-balanced: the same labels, fraction and seed give the same subset.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must lie in (0, 1], got {fraction!r}")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        keep.extend(rng.choice(members, size=count, replace=False).tolist())
    return sorted(keep)


class LabelledImages(Dataset):
    """``samples`` (path, label) through ``transform``; item ``i`` is ``(image, label, -1)``, or the next readable
    image with its label and ``i`` when file ``i`` cannot be read (as the pretraining datasets do)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable, seed: int = 0,
                 description: str = "images"):
        self.samples = list(samples)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.description = description

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe(self) -> str:
        return f"{len(self)} {self.description}"

    def _augment(self, image: Image.Image, index: int) -> torch.Tensor:
        seed = sample_seed(self.seed, self.epoch, index)
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                return self.transform(image)
        finally:
            random.setstate(state)

    def name(self, index: int) -> str:
        return str(self.samples[index][0])

    def load(self, index: int) -> Tuple[Image.Image, int]:
        """``(image, label)`` of sample ``index``."""
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        (image, label), unreadable = first_readable(index, len(self), self.load, self.describe, self.name)
        return self._augment(image, index), label, unreadable


def build_transforms(data_cfg: dict, augment_cfg: dict) -> Tuple[Callable, Callable]:
    """(train transform, eval transform) from timm's ``create_transform``."""
    from timm.data import create_transform

    size = data_cfg["img_size"]
    train = create_transform(size, is_training=True, scale=tuple(augment_cfg["crop_scale"]),
                             hflip=augment_cfg["hflip"], color_jitter=augment_cfg["color_jitter"] or 0.0,
                             auto_augment=augment_cfg["auto_augment"], interpolation="bicubic",
                             re_prob=augment_cfg["reprob"])
    evaluate = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=data_cfg["crop_pct"])
    return train, evaluate

