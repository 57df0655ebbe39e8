"""One pretraining epoch: forward with a random patch mask, loss check, backward, clip, LAMB step.

Randomness that decides the result is tied to the data, not to the process: the crop of each image
comes from ``(seed, epoch, index)`` (see ``sparse_mim.data``) and the patch masks of global batch
``step`` from ``(seed, step)``, drawn for the whole global batch and split like the images. A run
therefore sees the same (image, mask) pairs with any number of processes and after a resume.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from sparse_mim.spark.masking import patch_grid, random_patch_mask

from .distributed import DistInfo, all_reduce_mean, unwrap
from .schedules import Schedule, apply_schedule

__all__ = ["NonFiniteLossError", "global_batch_mask", "train_one_epoch"]

_MASK_STREAM = 1  # keeps mask seeds apart from the data's augmentation seeds


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stops without saving."""

    def __init__(self, what: str, value: float, step: int, epoch: int):
        super().__init__(f"{what} is {value} at step {step} (epoch {epoch}); training stopped before "
                         f"the update, and the last checkpoint was left as it was. Resume from it with a "
                         f"lower train.base_lr, or check the data")
        self.step, self.epoch = step, epoch


def global_batch_mask(seed: int, step: int, global_batch: int, grid: Tuple[int, int], mask_ratio: float,
                      info: DistInfo, keep: Optional[int] = None) -> torch.Tensor:
    """This rank's share of global batch ``step``'s patch mask (True = visible), on its device;
    ``keep``: visible patches per image, as the method counts them (its ``len_keep``)."""
    mask_seed = int(np.random.SeedSequence([seed, _MASK_STREAM, step]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(mask_seed)
    mask = random_patch_mask(global_batch, grid, mask_ratio, generator, keep=keep)
    return mask[info.rank::info.world_size].to(info.device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: Optimizer, schedule: Schedule, *,
                    info: DistInfo, epoch: int, step: int, stop_step: int, seed: int, mask_ratio: float,
                    clip_grad: Optional[float], autocast: bool, on_step: Callable[[Dict], None],
                    stop_requested: Callable[[], bool], forward: Optional[Callable] = None,
                    sync_gradients: Optional[Callable[[list], None]] = None) -> Tuple[int, Set[int]]:
    """Train from global ``step`` until the loader ends, ``stop_step`` is reached or a stop is
    requested. Returns ``(step after the last update, dataset indices of the unreadable files this
    rank replaced)``.

    ``on_step`` gets each step's metrics (loss averaged over ranks; ``data_s`` = this rank's wait for
    the batch, ``compute_s`` = the rest of the step up to the update, ``data_wait`` = the waiting
    share of the two, ``images_per_sec`` = global batch / their sum). A NaN/inf loss or gradient
    norm raises ``NonFiniteLossError`` before the update (on every rank alike). ``forward`` replaces
    ``model(images, active)`` (e.g. ``sparse_mim.spark.graphed.GraphedSparK``); ``sync_gradients``,
    when given, averages the gradients over ranks after backward (a bare model under several
    processes, ``distributed.average_gradients``) before they are clipped.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    global_batch = loader.batch_size * info.world_size
    use_autocast = autocast and info.device.type == "cuda"
    patch_size = unwrap(model).patch_size
    len_keep = unwrap(model).len_keep  # the method's visible count (SparK rounds, FCMAE rounds down)
    unreadable: Set[int] = set()
    tic = time.perf_counter()
    for images, bad in loader:
        fetched = time.perf_counter()
        unreadable.update(int(i) for i in bad.tolist() if i >= 0)
        lr, wd = schedule.lr(step), schedule.wd(step)
        apply_schedule(optimizer, lr, wd)

        images = images.to(info.device, non_blocking=True)
        grid = patch_grid(images, patch_size)
        active = global_batch_mask(seed, step, global_batch, grid, mask_ratio, info,
                                   keep=len_keep(grid[0] * grid[1]))
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with amp:
            loss = (forward or model)(images, active).loss
        loss_value = all_reduce_mean(loss.detach().float()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError("the loss", loss_value, step + 1, epoch + 1)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_gradients is not None:
            sync_gradients(params)
        max_norm = clip_grad if clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError("the gradient norm", grad_norm, step + 1, epoch + 1)
        optimizer.step()
        step += 1

        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        toc = time.perf_counter()
        data_s, compute_s = fetched - tic, toc - fetched
        on_step({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr, "wd": wd,
                 "grad_norm": grad_norm, "images_per_sec": global_batch / max(toc - tic, 1e-9),
                 "data_s": data_s, "compute_s": compute_s, "data_wait": data_s / max(toc - tic, 1e-9)})
        if step >= stop_step or stop_requested():
            break
        tic = time.perf_counter()  # logging and step checkpoints count as neither data nor compute
    return step, unreadable
