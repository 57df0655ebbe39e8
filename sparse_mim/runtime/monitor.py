"""What a run shows and leaves behind (rank 0 only): the progress bar, ``metrics.jsonl``, TensorBoard
scalars and images, a reconstruction picture per epoch and the loss curve at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from sparse_mim.data import denormalize

__all__ = ["METRICS_NAME", "LOSS_CURVE_NAME", "RECONSTRUCTION_DIR", "Monitor", "read_metrics",
           "reconstruction_grid", "save_reconstruction_png", "save_loss_curve"]

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
RECONSTRUCTION_DIR = "reconstructions"
TENSORBOARD_DIR = "tensorboard"
ROWS = ("input", "masked", "reconstruction")


def read_metrics(path: str | Path) -> List[Dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Monitor:
    """Progress and logs of one run. Inactive (does nothing) on ranks other than 0.

    On a resume from step ``start_step``, lines of ``metrics.jsonl`` after that step (written by the
    interrupted run after its last checkpoint) are dropped, and TensorBoard purges them likewise.
    """

    def __init__(self, output_dir: str | Path, *, active: bool, start_step: int, total_steps: int,
                 description: str = "pretrain"):
        self.active = active
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_NAME
        self.tb = None
        self.bar = None
        if not active:
            return
        kept = [m for m in read_metrics(self.metrics_path) if m["step"] <= start_step]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self._metrics = open(self.metrics_path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="it", dynamic_ncols=True)

    def log_step(self, metrics: Dict[str, float], write: bool = True) -> None:
        """Advance the bar; with ``write``, append ``metrics`` to metrics.jsonl and TensorBoard."""
        if not self.active:
            return
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                   "img_s": f"{metrics['images_per_sec']:.1f}"}
        if "data_wait" in metrics:  # share of the step spent waiting for the batch
            postfix["data"] = f"{100 * metrics['data_wait']:.0f}%"
        self.bar.set_postfix(postfix, refresh=False)  # before update(), which draws: this step's numbers
        self.bar.update(1)
        if write:
            self._metrics.write(json.dumps(metrics) + "\n")
            self._metrics.flush()
            for key, value in metrics.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, metrics["step"])

    def log_eval(self, metrics: Dict[str, float]) -> None:
        """Append an evaluation record (``step`` plus ``val_*`` numbers) without advancing the bar."""
        if not self.active:
            return
        self._metrics.write(json.dumps(metrics) + "\n")
        self._metrics.flush()
        for key, value in metrics.items():
            if key not in ("step", "epoch"):
                self.tb.add_scalar(f"eval/{key}", value, metrics["step"])
        self.message(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def set_description(self, text: str) -> None:
        if self.active:
            self.bar.set_description(text)

    def message(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.active:
            tqdm.write(text)

    def log_reconstruction(self, pictures: Dict[str, torch.Tensor], name: str, step: int, title: str) -> Optional[Path]:
        if not self.active:
            return None
        grid = reconstruction_grid(pictures)
        self.tb.add_image("reconstruction", grid, step)
        self.tb.flush()
        return save_reconstruction_png(grid, len(pictures["input"]),
                                       self.output_dir / RECONSTRUCTION_DIR / f"{name}.png", title)

    def end_progress(self) -> None:
        """Draw the bar a last time and leave it (before a final evaluation, whose time is not a step's)."""
        if self.active:
            self.bar.close()

    def resume_progress(self) -> None:
        """After a pause (an evaluation between epochs): its time does not count into the bar's s/it."""
        if self.active and not self.bar.disable:
            self.bar.unpause()

    def close(self) -> None:
        if not self.active:
            return
        self.bar.close()  # a no-op after end_progress()
        self._metrics.close()
        self.tb.close()


def reconstruction_grid(pictures: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, H', W') RGB grid in [0, 1]: one row each of input, masked input and reconstruction."""
    from torchvision.utils import make_grid

    rows = torch.cat([denormalize(pictures[row].float().cpu()) for row in ROWS])
    return make_grid(rows, nrow=len(pictures["input"]), padding=2, pad_value=1.0)


def save_reconstruction_png(grid: torch.Tensor, columns: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = grid.shape[1:]
    fig, ax = plt.subplots(figsize=(max(4.0, width / 60 + 1.5), max(2.5, height / 60 + 0.8)), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    row_height = height / len(ROWS)
    ax.set_yticks([row_height * (i + 0.5) for i in range(len(ROWS))], list(ROWS))
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_loss_curve(metrics_path: str | Path, path: str | Path, title: str,
                    ylabel: str = "masked-patch MSE (normalised targets)") -> Optional[Path]:
    """Loss against step from ``metrics.jsonl`` (with a running average); None if nothing was logged."""
    metrics = [m for m in read_metrics(metrics_path) if "loss" in m]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    window = max(1, len(losses) // 20)
    smooth, total = [], 0.0
    for i, value in enumerate(losses):
        total += value - (losses[i - window] if i >= window else 0.0)
        smooth.append(total / min(i + 1, window))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if window > 1:
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
        ax.plot(steps, smooth, lw=1.8, label=f"mean of {window} steps")
    else:  # fewer than 40 points: the mean of one step is the loss itself
        ax.plot(steps, losses, lw=1.8, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if all(math.isfinite(v) and v > 0 for v in losses) and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
