"""``sparse-mim bench what=loader``: images/s of the pretraining input pipeline per worker count.

Ours is exactly what ``sparse-mim pretrain`` runs: ``sparse_mim.data`` (PIL decode, SparK's
RandomResizedCrop(0.67-1, bicubic) + flip + normalise with per-image seeds, collation, the
resumable sampler). The baseline is plain torchvision doing the same augmentation:
``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``
with the default PIL loader and a plain shuffled ``DataLoader``. Both run in one process,
interleaved per worker count, and the order alternates between repeats (ours first, then the baseline
first, ...): whichever loader runs second in a pair was measured up to 10% faster on a quiet machine, so a
fixed order would favour one side. Each timing skips the first batch (worker start-up); the table
reports the median over repeats (use an even number).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch.utils.data import DataLoader

__all__ = ["LOADERS", "loader_rows", "format_loader_table"]

LOADERS = ("sparse-mim", "torchvision")


def _ours(path: str, img_size: int, batch: int, workers: int) -> DataLoader:
    from sparse_mim.data import build_dataset, build_loader, build_transform

    return build_loader(build_dataset(path, build_transform(img_size)), batch, num_workers=workers)


def _torchvision(path: str, img_size: int, batch: int, workers: int) -> DataLoader:
    from torchvision import datasets, transforms

    from sparse_mim.data import IMAGENET_MEAN, IMAGENET_STD
    from sparse_mim.data.datasets import find_images

    root, _ = find_images(path)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available())


_BUILDERS: Dict[str, Callable[..., DataLoader]] = {"sparse-mim": _ours, "torchvision": _torchvision}


def _images_per_second(loader: DataLoader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not timed
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return batches * loader.batch_size / seconds


def loader_rows(path: str, img_size: int, batch: int, workers: Sequence[int], batches: int, repeats: int,
                log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """One row per worker count: images/s of every loader (median of ``repeats``), interleaved."""
    rows = []
    for w in workers:
        loaders = {name: build(path, img_size, batch, w) for name, build in _BUILDERS.items()}
        for name, loader in loaders.items():
            if len(loader) < batches + 1:
                raise ValueError(f"{path}: {len(loader)} batches of {batch}, need loader_batches + 1 = "
                                 f"{batches + 1}; lower loader_batches or batch_size")
        speeds: Dict[str, List[float]] = {name: [] for name in loaders}
        for r in range(repeats):
            order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
            for name in order:
                speeds[name].append(_images_per_second(loaders[name], batches))
            log(f"  workers={w} repeat {r + 1}/{repeats}: "
                + ", ".join(f"{n} {s[-1]:.0f} img/s" for n, s in speeds.items()))
        median = {name: statistics.median(s) for name, s in speeds.items()}
        rows.append({"workers": w, "images_per_sec": median, "all": speeds,
                     "ratio": median["sparse-mim"] / median["torchvision"]})
    return rows


def format_loader_table(rows: List[Dict[str, Any]], path: str, img_size: int, batch: int) -> str:
    lines = [f"Loader throughput, {path}, {img_size} px crops, batch {batch} (median images/s, interleaved)", "",
             "| workers | sparse-mim | torchvision baseline | ratio |", "|---:|---:|---:|---:|"]
    for row in rows:
        s = row["images_per_sec"]
        lines.append(f"| {row['workers']} | {s['sparse-mim']:.0f} | {s['torchvision']:.0f} | {row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"
