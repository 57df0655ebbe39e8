"""Predictions over a whole split (sharded over processes), kNN classification and the accuracy summary."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from sparse_mim.runtime.distributed import DistInfo, all_gather_objects
from sparse_mim.runtime.step import autocast as autocast_on

__all__ = ["run_over", "knn_classify", "accuracy_summary", "save_confusion_png"]


@torch.no_grad()
def run_over(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, info: DistInfo, batch_size: int,
             num_workers: int, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(images) for every item, labels)`` in dataset order. Each process runs every
    ``world_size``-th item; the results are gathered on every process."""
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outputs, labels = [], []
    for images, targets, _ in loader:
        with autocast_on(info, autocast):
            outputs.append(fn(images.to(info.device, non_blocking=True)).float().cpu())
        labels.append(targets)
    mine = (torch.tensor(indices, dtype=torch.long), torch.cat(outputs), torch.cat(labels))
    order, out, lab = (torch.cat(parts) for parts in zip(*all_gather_objects(mine)))
    sort = order.argsort()
    return out[sort], lab[sort]


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``(N, num_classes)`` of DINO's weighted kNN: cosine similarity to the ``k`` nearest
    training features, each neighbour voting for its class with weight ``exp(similarity / T)``."""
    train = F.normalize(train_features.double(), dim=1)
    k = min(k, len(train))
    scores = []
    for part in F.normalize(features.double(), dim=1).split(chunk):
        similarity, neighbours = (part @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(part), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def accuracy_summary(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Dict:
    """Top-1 / top-5 accuracy (%), per-class top-1 and the confusion matrix (rows = true class)."""
    n = len(classes)
    top = scores.topk(min(5, n), dim=1).indices
    correct = top == labels[:, None]
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    per_class = {c: (100.0 * confusion[i, i].item() / max(confusion[i].sum().item(), 1)) for i, c in enumerate(classes)}
    return {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(1).float().mean().item(),
            "images": len(labels), "per_class_top1": per_class, "confusion": confusion.tolist()}


def save_confusion_png(summary: Dict, classes: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = torch.tensor(summary["confusion"], dtype=torch.float64)
    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n, 2 + 0.45 * n), dpi=100)
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\ntop-1 {summary['top1']:.1f}%", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
