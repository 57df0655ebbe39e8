"""SparK's per-iteration schedules (docs/pretraining.md): learning rate and weight decay as functions of the step.

    peak_lr = base_lr * global_batch / 256
    lr:  linear warmup from 0.005 * peak_lr to peak_lr over the warmup epochs,
         then a half cosine from peak_lr down to 0.001 * peak_lr, reached at the last step
    wd:  a half cosine from weight_decay (0.04) *up* to weight_decay_end (0.2), reached at the last step

Both are evaluated every iteration; ``step`` counts from 0 (the first update) to ``total_steps - 1``.
With ``train.max_steps`` the run is that many steps and both cosines end at its last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch.optim import Optimizer

__all__ = ["WARMUP_START", "FINAL_LR", "peak_lr", "Schedule", "apply_schedule"]

WARMUP_START = 0.005  # warmup starts at this fraction of the peak lr
FINAL_LR = 0.001      # the cosine ends at this fraction of the peak lr


def peak_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: ``base_lr`` is the peak lr of a global batch of 256."""
    return base_lr * global_batch / 256


def _cosine(start: float, end: float, progress: float) -> float:
    """Half cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    weight_decay: float
    weight_decay_end: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def from_epochs(cls, *, base_lr: float, global_batch: int, epochs: int, warmup_epochs: float,
                    steps_per_epoch: int, weight_decay: float, weight_decay_end: float,
                    max_steps: Optional[int] = None) -> "Schedule":
        """``epochs`` epochs of ``steps_per_epoch`` steps, warming up for ``warmup_epochs`` of them.

        With ``max_steps`` (``train.max_steps``) the run is ``max_steps`` steps instead and the
        schedule spans them: warmup takes the same share ``warmup_epochs / epochs`` of the steps."""
        if max_steps is not None:
            return cls(peak_lr(base_lr, global_batch), weight_decay, weight_decay_end,
                       round(max_steps * warmup_epochs / epochs), max_steps)
        return cls(peak_lr(base_lr, global_batch), weight_decay, weight_decay_end,
                   round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            start = WARMUP_START * self.peak_lr
            return start + (self.peak_lr - start) * step / self.warmup_steps
        decay_steps = self.total_steps - 1 - self.warmup_steps
        progress = (step - self.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
        return _cosine(self.peak_lr, FINAL_LR * self.peak_lr, progress)

    def wd(self, step: int) -> float:
        progress = step / (self.total_steps - 1) if self.total_steps > 1 else 1.0
        return _cosine(self.weight_decay, self.weight_decay_end, progress)


def apply_schedule(optimizer: Optimizer, lr: float, wd: float) -> None:
    """Set every group's lr, and the weight decay of the groups that take weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = wd
