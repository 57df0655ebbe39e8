"""``sparse-mim bench what=loader``: images/s of the pretraining input pipeline per worker count.

Ours is exactly what ``sparse-mim pretrain`` runs: ``sparse_mim.data`` (PIL decode, SparK's
RandomResizedCrop(0.67-1, bicubic) + flip + normalise with per-image seeds, collation, the
resumable sampler), with the default ``data.decode=pil`` and with ``data.decode=tensor``. The
baseline is plain torchvision doing the same augmentation:
``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``
with the default PIL loader and a plain shuffled ``DataLoader``. Both run in one process,
interleaved per worker count, and the order rotates between repeats (each loader first, then second,
...): a loader that runs right after another one runs measurably faster even on a quiet machine, so
a fixed order would favour one side. Each timing skips the first batch (worker start-up); the table reports
the median over repeats (use a multiple of 3).
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch.utils.data import DataLoader

__all__ = ["LOADERS", "loader_rows", "format_loader_table"]

LOADERS = ("sparse-mim", "sparse-mim tensor", "torchvision")
#: the loader the ratios divide by
BASELINE = "torchvision"


def _ours(path: str, img_size: int, batch: int, workers: int, decode: str = "pil") -> DataLoader:
    from sparse_mim.data import build_dataset, build_loader, build_transform

    return build_loader(build_dataset(path, build_transform(img_size), decode=decode), batch, num_workers=workers)


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


_BUILDERS: Dict[str, Callable[..., DataLoader]] = {
    "sparse-mim": _ours, "sparse-mim tensor": partial(_ours, decode="tensor"), "torchvision": _torchvision}


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
        names = list(loaders)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                speeds[name].append(_images_per_second(loaders[name], batches))
            log(f"  workers={w} repeat {r + 1}/{repeats}: "
                + ", ".join(f"{n} {s[-1]:.0f} img/s" for n, s in speeds.items()))
        median = {name: statistics.median(s) for name, s in speeds.items()}
        rows.append({"workers": w, "images_per_sec": median, "all": speeds,
                     "ratio": {name: median[name] / median[BASELINE] for name in names if name != BASELINE}})
    return rows


def format_loader_table(rows: List[Dict[str, Any]], path: str, img_size: int, batch: int) -> str:
    ours = [name for name in LOADERS if name != BASELINE]
    lines = [f"Loader throughput, {path}, {img_size} px crops, batch {batch} (median images/s, interleaved; "
             f"sparse-mim = data.decode=pil, sparse-mim tensor = data.decode=tensor)", "",
             "| workers | " + " | ".join(ours) + " | torchvision baseline | "
             + " | ".join(f"{name} / baseline" for name in ours) + " |",
             "|---:|" + "---:|" * (2 * len(ours) + 1)]
    for row in rows:
        s = row["images_per_sec"]
        lines.append(f"| {row['workers']} | " + " | ".join(f"{s[n]:.0f}" for n in ours) + f" | {s[BASELINE]:.0f} | "
                     + " | ".join(f"{row['ratio'][n]:.2f}x" for n in ours) + " |")
    return "\n".join(lines) + "\n"
