"""One optimisation step and one epoch of them, the same for every training mode.

A mode gives the epoch two functions: ``set_schedule(step)`` (sets this step's learning rate, and
weight decay, on the optimizer and returns them for the log) and ``batch_loss(batch, step)`` (moves
the batch to the device and returns the loss of the model on it, its forward under ``autocast``).
Everything else is here: the loss averaged over ranks and checked, backward, gradient averaging,
clipping, the gradient-norm check, the update, and the step's timings.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim import Optimizer

from .distributed import DistInfo, all_reduce_mean

__all__ = ["NonFiniteLossError", "OptimisationStep", "autocast", "train_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stops without saving."""

    def __init__(self, what: str, value: float, step: int, epoch: int):
        super().__init__(f"{what} is {value} at step {step} (epoch {epoch}); training stopped before "
                         f"the update, and the last checkpoint was left as it was. Resume from it with a "
                         f"lower train.base_lr, or check the data")
        self.step, self.epoch = step, epoch


def autocast(info: DistInfo, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled`` (the forward only); nothing on other devices."""
    if enabled and info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class OptimisationStep:
    """``loss`` -> update of ``model``'s trainable parameters: the loss averaged over ranks (for the
    log) and checked, backward, ``sync_gradients`` (when given: averages the gradients over ranks,
    for a bare model under several processes, ``distributed.average_gradients``), clipping to
    ``clip_grad`` (None: no clip), the gradient norm checked, the optimizer step.

    A NaN/inf loss or gradient norm raises ``NonFiniteLossError`` before the update, on every rank
    alike (both numbers are the same on every rank), so the last checkpoint stays the good one."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, clip_grad: Optional[float],
                 sync_gradients: Optional[Callable[[list], None]] = None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.max_norm = clip_grad if clip_grad is not None else float("inf")
        self.sync_gradients = sync_gradients

    def __call__(self, loss: torch.Tensor, step: int, epoch: int) -> Tuple[float, float]:
        """Update once; ``step``/``epoch`` (1-based) name the step in errors. Returns (loss, grad norm)."""
        loss_value = all_reduce_mean(loss.detach().float()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError("the loss", loss_value, step, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync_gradients is not None:
            self.sync_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError("the gradient norm", grad_norm, step, epoch)
        self.optimizer.step()
        return loss_value, grad_norm


def train_epoch(loader: Iterable, optimise: OptimisationStep, *, info: DistInfo, global_batch: int, epoch: int,
                step: int, stop_step: int, set_schedule: Callable[[int], Dict[str, float]],
                batch_loss: Callable[[Any, int], torch.Tensor], on_step: Callable[[Dict[str, float]], None],
                stop_requested: Callable[[], bool]) -> int:
    """Train from global ``step`` until the loader ends, ``stop_step`` is reached or a stop is
    requested; returns the step after the last update.

    ``on_step`` gets each step's metrics: ``step``, ``epoch``, ``loss`` (averaged over ranks), what
    ``set_schedule`` returned (``lr``, ...), ``grad_norm``, ``images_per_sec`` (``global_batch``
    over the step's time), ``data_s`` (this rank's wait for the batch), ``compute_s`` (the rest of
    the step up to the update) and ``data_wait`` (the waiting share of the two).
    """
    tic = time.perf_counter()
    for batch in loader:
        fetched = time.perf_counter()
        scheduled = set_schedule(step)
        loss = batch_loss(batch, step)
        loss_value, grad_norm = optimise(loss, step + 1, epoch + 1)
        step += 1

        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        toc = time.perf_counter()
        data_s, compute_s = fetched - tic, toc - fetched
        on_step({"step": step, "epoch": epoch + 1, "loss": loss_value, **scheduled, "grad_norm": grad_norm,
                 "images_per_sec": global_batch / max(toc - tic, 1e-9),
                 "data_s": data_s, "compute_s": compute_s, "data_wait": data_s / max(toc - tic, 1e-9)})
        if step >= stop_step or stop_requested():
            break
        tic = time.perf_counter()  # logging and step checkpoints count as neither data nor compute
    return step
