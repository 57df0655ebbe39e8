"""A whole pretraining run: check the config, build data/model/optimizer, resume, loop, checkpoint.

    result = pretrain(compose_config(["train.epochs=2"]))

The run resumes by itself from the newest good checkpoint in ``output_dir`` (see ``rotation``); a
fresh run may start from existing weights with ``init_from`` (see ``init_from``). It checkpoints at
the end of every epoch, every ``train.save_every_steps`` steps / ``train.save_every_minutes``
minutes, at ``train.max_steps``, and on SIGINT/SIGTERM (after finishing the current step); a
NaN/inf loss stops it without touching the last checkpoint. Under ``torchrun --max-restarts=N`` a
restarted group resumes the same way. Every start removes the temporaries of saves that were killed
and re-exports the encoder if its export does not come from the checkpoint the run continues from.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from sparse_mim.data import (AugmentedImages, build_dataset, build_loader, build_transform, check_batch_fits,
                             check_readable, set_epoch)
from sparse_mim.run_folder import RunFolder, check_output_dir
from sparse_mim.spark.graphed import GraphedSparK

from sparse_mim.convert.writers import remove_stale_temporaries

from .checkpoint import (CHECKPOINT_NAME, encoder_export_name, load_checkpoint, rank_rng_state, refresh_encoder_export,
                         rng_state, save_checkpoint, set_rng_state)
from .config import CONFIG_DIR, ConfigError, flatten, resolve_grad_sync, to_plain, validate_config
from .distributed import (DistInfo, all_gather_objects, all_reduce_max, average_gradients, barrier, env_world_size,
                          init_distributed, shutdown, unwrap, wrap_model)
from .engine import train_one_epoch
from .init_from import init_from
from .methods import base_lr_of, build_pretrain_model, method_title, optimizer_of, unused_setting_notes
from .monitor import LOSS_CURVE_NAME, Monitor, save_loss_curve
from .optim import build_optimizer
from .run_control import StopRequest, seed_everything, set_determinism
from .rotation import ResumePoint, SaveSchedule, keep_previous, newest_good_checkpoint, prune
from .schedules import Schedule
from .throughput import DataWaitWatch

__all__ = ["RESUME_MUST_MATCH", "PretrainResult", "pretrain"]

#: Settings a resumed run must share with its checkpoint (others may change, with a note).
RESUME_MUST_MATCH = ("method", "model", "data.img_size", "mask_ratio", "decoder_width", "drop_path_rate",
                     "train.batch_size")
#: ... and, for method=fcmae, the decoder's shape.
FCMAE_RESUME_MUST_MATCH = ("fcmae.decoder_depth", "fcmae.decoder_embed_dim")


@dataclass
class PretrainResult:
    output_dir: Path
    step: int                  # optimizer steps done in total
    total_steps: int           # steps the run is meant to reach (epochs x steps per epoch, or max_steps)
    resumed_from: Optional[int]  # step of the checkpoint this run started from
    losses: List[float]        # losses of the steps run by this invocation
    seconds: float
    stopped_by: Optional[int] = None  # the signal that stopped the run early, if any

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def _check_resumable(ckpt: Dict[str, Any], config: Dict[str, Any], path: Path, data_state: Dict[str, int]) -> List[str]:
    """Raise ConfigError if ``ckpt`` cannot continue under ``config``; return the notes to print."""
    if ckpt["arch"] != config["model"]:
        raise ConfigError(f"{path} was pretrained with model={ckpt['arch']}, this run asks for "
                          f"model={config['model']}; pass model={ckpt['arch']} to resume it, or a new "
                          f"output_dir to start afresh")
    old, new = flatten(ckpt["config"]), flatten(config)
    old.setdefault("method", "spark")  # checkpoints from before method= existed are SparK's
    must_match = RESUME_MUST_MATCH + (FCMAE_RESUME_MUST_MATCH if new.get("method") == "fcmae" else ())
    clashes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in must_match if old.get(k) != new.get(k)]
    saved = ckpt["rng"]["sampler"]
    for key in ("dataset_size", "steps_per_epoch"):
        if saved[key] != data_state[key]:
            clashes.append(f"{key}: {saved[key]} -> {data_state[key]}")
    if clashes:
        raise ConfigError(f"cannot resume {path}: these differ from the checkpoint's run ("
                          + "; ".join(clashes) + "). Restore them, or use a new output_dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k != "init_from"]


def _find_resume_point(output_dir: Path) -> Optional[ResumePoint]:
    try:
        return newest_good_checkpoint(output_dir, load_checkpoint)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resume(point: ResumePoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any],
            data_state: Dict[str, int], rank: int, notes: List[str]) -> int:
    """Load model, optimizer and this rank's generators from ``point``; return the step to continue from."""
    path, ckpt = point.path, point.checkpoint
    for problem in point.skipped:
        notes.append(f"skipped an unusable checkpoint: {problem}")
    changed = _check_resumable(ckpt, config, path, data_state)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    saved_rng = rank_rng_state(ckpt["rng"], rank)
    if saved_rng is not None:  # a rank the checkpoint's run did not have keeps its fresh seed
        set_rng_state(saved_rng)
    step = ckpt["step"]
    epoch, batch = divmod(step, data_state["steps_per_epoch"])
    where = f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, after batch {batch}"
    notes.append(f"resuming from {path} at step {step} ({where})")
    if changed:
        notes.append("changed since the checkpoint: " + "; ".join(changed))
    return step


def _visual_batch(dataset: AugmentedImages, count: int, device: torch.device) -> torch.Tensor:
    count = max(1, min(count, len(dataset)))
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    collate = getattr(dataset, "collate_fn", None) or default_collate  # as the loader batches them
    images, _ = collate([dataset[int(i)] for i in indices])
    return images.to(device)


@torch.no_grad()
def _reconstruct(model: torch.nn.Module, images: torch.Tensor, seed: int) -> Dict[str, torch.Tensor]:
    """Input / masked / reconstruction of ``images`` under a fixed mask, in eval mode; touches no
    global random state, so it does not change the training run."""
    bare = unwrap(model)
    bare.eval()
    try:
        active = bare.mask(images, torch.Generator().manual_seed(seed)).to(images.device)
        return bare.reconstruct(images, bare(images, active))
    finally:
        bare.train()


def _mask_note(img_size: int, model, mask_ratio: float) -> str:
    """How many patches each image really hides: the method rounds the visible count (SparK: 0.6 of 2x2 is 2 of 4)."""
    n = (img_size // model.patch_size) ** 2
    hidden = n - model.len_keep(n)
    return (f"mask: {hidden} of {n} patches hidden per image (effective ratio {hidden / n:.2f}; "
            f"asked {mask_ratio:.2f})")


def pretrain(cfg: DictConfig) -> PretrainResult:
    """Run (or resume) the pretraining described by ``cfg`` (see configs/pretrain.yaml)."""
    validate_config(cfg, env_world_size())
    config = to_plain(cfg)
    output_dir = Path(config["output_dir"]).expanduser()
    check_output_dir(output_dir, ConfigError)
    data_cfg, train_cfg = config["data"], config["train"]
    dataset = build_dataset(data_cfg["path"], build_transform(data_cfg["img_size"], data_cfg["crop_scale"]),
                            seed=train_cfg["seed"],
                            decode=data_cfg["decode"])
    check_readable(dataset)
    check_batch_fits(dataset, train_cfg["batch_size"])
    info = init_distributed()
    try:
        with RunFolder(output_dir, active=info.is_main) as folder:
            return _run(cfg, config, dataset, info, folder)
    finally:
        shutdown()


def _run(cfg: DictConfig, config: Dict[str, Any], dataset: AugmentedImages, info: DistInfo,
         folder: RunFolder) -> PretrainResult:
    data_cfg, train_cfg = config["data"], config["train"]
    arch, seed = config["model"], train_cfg["seed"]
    output_dir = Path(config["output_dir"]).expanduser().resolve()
    ckpt_path = output_dir / CHECKPOINT_NAME
    start_time = time.perf_counter()

    set_determinism(train_cfg["deterministic"])
    seed_everything(seed + info.rank)
    model = build_pretrain_model(config)
    resume_point = _find_resume_point(output_dir)
    init_report = None
    if config.get("init_from") and resume_point is None:
        init_report = init_from(model, config["init_from"], arch)  # before DDP: every rank loads the same
    grad_sync = resolve_grad_sync(train_cfg)
    model = wrap_model(model.to(info.device), info, sync_bn=train_cfg["sync_bn"], grad_sync=grad_sync)
    bare = unwrap(model)
    graphed = GraphedSparK(bare) if train_cfg.get("cuda_graph") else None  # validated: CUDA
    sync_gradients = average_gradients if info.distributed and grad_sync == "allreduce" else None
    optimizer = build_optimizer(bare, lr=0.0, weight_decay=train_cfg["weight_decay"], betas=train_cfg["betas"],
                                kind=optimizer_of(config))

    loader = build_loader(dataset, train_cfg["batch_size"], info.world_size, info.rank, data_cfg["num_workers"], seed)
    steps_per_epoch = len(loader)
    schedule = Schedule.from_epochs(base_lr=base_lr_of(config), global_batch=train_cfg["batch_size"],
                                    epochs=train_cfg["epochs"], warmup_epochs=train_cfg["warmup_epochs"],
                                    steps_per_epoch=steps_per_epoch, weight_decay=train_cfg["weight_decay"],
                                    weight_decay_end=train_cfg["weight_decay_end"], max_steps=train_cfg["max_steps"])
    total_steps = schedule.total_steps
    epochs = -(-total_steps // steps_per_epoch)  # train.epochs, or as many as max_steps takes
    data_state = {"seed": seed, "dataset_size": len(dataset), "steps_per_epoch": steps_per_epoch}

    notes = [_mask_note(data_cfg["img_size"], bare, config["mask_ratio"]),
             f"data: {dataset.describe()}; {steps_per_epoch} step{'s' if steps_per_epoch != 1 else ''} per epoch "
             f"of {train_cfg['batch_size']} images"
             + (f" ({loader.batch_size} per process x {info.world_size})" if info.distributed else "")]
    notes += unused_setting_notes(config, to_plain(OmegaConf.load(CONFIG_DIR / "pretrain.yaml")))
    if info.is_main:
        removed = remove_stale_temporaries(output_dir)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) of interrupted saves: "
                         + ", ".join(p.name for p in removed))
    step = resumed_from = None
    if resume_point is not None:
        step = resumed_from = _resume(resume_point, bare, optimizer, config, data_state, info.rank, notes)
        if config.get("init_from"):
            notes.append(f"init_from={config['init_from']} not used: resuming {output_dir} wins (its checkpoint "
                         f"holds the run's own weights); use another output_dir to start from init_from")
    step = step or 0
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        if init_report is not None:
            notes += init_report.lines()
            notes.append(f"init_from: written to {init_report.write(output_dir)}")
        if resumed_from is not None:
            # the export must match the checkpoint the run continues from (also an older one
            # when the newest was unusable)
            refreshed = refresh_encoder_export(output_dir, bare.encoder, arch, step)
            if refreshed:
                notes.append(refreshed)
    barrier()

    monitor = Monitor(output_dir, active=info.is_main, start_step=step, total_steps=total_steps,
                      description=f"pretrain {arch}")
    for note in notes:
        monitor.message(note)
    visual = _visual_batch(dataset, train_cfg["vis_images"], info.device) if info.is_main else None

    keep = train_cfg["keep_checkpoints"]
    curve_title = f"{method_title(config)} pretraining, {arch}, {data_cfg['img_size']} px"
    schedule_saves = SaveSchedule(train_cfg["save_every_steps"], train_cfg["save_every_minutes"])
    # the step of the file now named checkpoint.pth, when it is a good one (it gets a step name on rotation)
    last_saved = resumed_from if resume_point is not None and resume_point.is_newest_name else None

    def save(at_step: int) -> None:
        nonlocal last_saved
        if at_step == last_saved:
            return
        states = all_gather_objects(rng_state())
        if info.is_main:
            epoch, batch_in_epoch = divmod(at_step, steps_per_epoch)
            rng = {**states[0], "other_ranks": states[1:],
                   "sampler": {**data_state, "epoch": epoch, "batch_in_epoch": batch_in_epoch}}
            if keep > 1 and last_saved is not None:
                keep_previous(output_dir, last_saved)
            save_checkpoint(output_dir, model=bare, optimizer=optimizer, epoch=epoch, step=at_step,
                            config=config, arch=arch, rng=rng)
            prune(output_dir, keep)
            pictures(at_step)
        last_saved = at_step
        schedule_saves.saved()
        barrier()

    def pictures(at_step: int) -> None:
        """The loss curve so far and a reconstruction, with every checkpoint (rank 0)."""
        save_loss_curve(monitor.metrics_path, output_dir / LOSS_CURVE_NAME, curve_title)
        epoch, batch_in_epoch = divmod(at_step, steps_per_epoch)
        if batch_in_epoch == 0:
            name, title = f"epoch_{epoch:04d}", f"{arch}, epoch {epoch}, step {at_step}"
        else:
            name, title = f"step_{at_step:07d}", f"{arch}, epoch {epoch + 1} (partial), step {at_step}"
        monitor.log_reconstruction(_reconstruct(model, visual, seed), name, at_step, title)

    losses: List[float] = []
    data_watch = DataWaitWatch(data_cfg["wait_warning"], window=min(50, steps_per_epoch))
    current = {"step": step}

    def on_step(metrics: Dict[str, float]) -> None:
        losses.append(metrics["loss"])
        current["step"] = metrics["step"]
        monitor.log_step(metrics, write=metrics["step"] % train_cfg["log_every"] == 0
                         or metrics["step"] == total_steps)
        warning = data_watch.add(metrics)
        if warning:
            monitor.message(warning)

    stopped_by: Optional[int] = None
    folder.started()
    try:
        with StopRequest(announce=info.is_main) as stop:
            def stop_requested() -> bool:
                """Whether any rank got a signal (then stop), else save if a step checkpoint is due
                (rank 0's clock decides); every rank gets the same answers at the same step."""
                nonlocal stopped_by
                at_step = current["step"]
                flags = [stop.signum or 0, int(info.is_main and at_step < total_steps and schedule_saves.due(at_step))]
                if info.distributed:
                    flags = all_reduce_max(torch.tensor(flags, device=info.device)).tolist()
                stopped_by = int(flags[0]) or None
                if stopped_by is None and flags[1]:
                    save(at_step)
                return stopped_by is not None

            while step < total_steps and stopped_by is None:
                epoch = step // steps_per_epoch
                set_epoch(loader, epoch, start_batch=step % steps_per_epoch)
                monitor.set_description(f"pretrain {arch} epoch {epoch + 1}/{epochs}")
                step, unreadable = train_one_epoch(
                    model, loader, optimizer, schedule, info=info, epoch=epoch, step=step, stop_step=total_steps,
                    seed=seed, mask_ratio=config["mask_ratio"], clip_grad=train_cfg["clip_grad"],
                    autocast=train_cfg["autocast"], on_step=on_step, stop_requested=stop_requested,
                    forward=graphed, sync_gradients=sync_gradients)
                unreadable = sorted(set().union(*all_gather_objects(unreadable)))
                if unreadable:
                    shown = ", ".join(dataset.name(i) for i in unreadable[:3])
                    more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
                    monitor.message(f"epoch {epoch + 1}: skipped {len(unreadable)} unreadable image(s), each "
                                    f"replaced by the next readable one: {shown}{more}")
                save(step)  # with the loss curve and a reconstruction picture
                monitor.resume_progress()  # saving is not training time
    finally:
        monitor.close()

    if info.is_main:
        save_loss_curve(monitor.metrics_path, output_dir / LOSS_CURVE_NAME, curve_title)
        how = f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "finished"
        print(f"{how} at step {step} of {total_steps}; checkpoint: {ckpt_path}; encoder: "
              f"{output_dir / encoder_export_name(arch)}", flush=True)
    return PretrainResult(output_dir, step, total_steps, resumed_from, losses, time.perf_counter() - start_time,
                          stopped_by)
