"""A whole pretraining run: check the config, build data/model/optimizer, resume, loop, checkpoint.

    result = pretrain(compose_config(["train.epochs=2"]))

The run resumes by itself from the newest good checkpoint in ``output_dir`` (see
``sparse_mim.runtime.rotation``); a fresh run may start from existing weights with ``init_from`` (see
``init_from``). It checkpoints at the end of every epoch, every ``train.save_every_steps`` steps /
``train.save_every_minutes`` minutes, at ``train.max_steps``, and on SIGINT/SIGTERM (after finishing
the current step); a NaN/inf loss or gradient norm stops it without touching the last checkpoint.
Under ``torchrun --max-restarts=N`` a restarted group resumes the same way. Every start removes the
temporaries of saves that were killed and re-exports the encoder if its export does not come from the
checkpoint the run continues from. The plumbing is ``sparse_mim.runtime.run``'s; what is
pretraining's own is here: the model of ``method=``, LAMB / AdamW with their schedule, the masks, the
encoder export and the reconstruction pictures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from sparse_mim.data import (AugmentedImages, build_dataset, build_loader, build_transform, check_batch_fits,
                             check_readable)
from sparse_mim.runtime.checkpoint import PRETRAIN_FORMAT
from sparse_mim.runtime.distributed import (DistInfo, all_gather_objects, average_gradients, env_world_size,
                                            init_distributed, shutdown, unwrap, wrap_model)
from sparse_mim.runtime.monitor import LOSS_CURVE_NAME, save_loss_curve
from sparse_mim.runtime.resume import check_resumable
from sparse_mim.runtime.run import RunResult, RunSpec, TrainingRun
from sparse_mim.runtime.run_control import seed_everything, set_determinism
from sparse_mim.runtime.run_folder import RunFolder, check_output_dir
from sparse_mim.runtime.step import OptimisationStep
from sparse_mim.spark.graphed import GraphedSparK

from .checkpoint import encoder_export_name, refresh_encoder_export, save_checkpoint
from .config import CONFIG_DIR, ConfigError, resolve_grad_sync, to_plain, validate_config
from .init_from import init_from
from .methods import base_lr_of, build_pretrain_model, method_title, optimizer_of, unused_setting_notes
from .optim import build_optimizer
from .pretrain_step import MaskedImageLoss
from .schedules import Schedule, apply_schedule

__all__ = ["RESUME_MUST_MATCH", "PretrainResult", "pretrain"]

#: Settings a resumed run must share with its checkpoint (others may change, with a note).
RESUME_MUST_MATCH = ("method", "model", "data.img_size", "mask_ratio", "decoder_width", "drop_path_rate",
                     "train.batch_size")
#: ... and, for method=fcmae, the decoder's shape.
FCMAE_RESUME_MUST_MATCH = ("fcmae.decoder_depth", "fcmae.decoder_embed_dim")


@dataclass
class PretrainResult(RunResult):
    """What ``pretrain`` did (``sparse_mim.runtime.run.RunResult``)."""


def _check_resumable(ckpt: Dict[str, Any], config: Dict[str, Any], path: Path, data_state: Dict[str, int]) -> List[str]:
    """Raise ConfigError if ``ckpt`` cannot continue under ``config``; return the notes to print."""
    if ckpt["arch"] != config["model"]:
        raise ConfigError(f"{path} was pretrained with model={ckpt['arch']}, this run asks for "
                          f"model={config['model']}; pass model={ckpt['arch']} to resume it, or a new "
                          f"output_dir to start afresh")
    saved = {"method": "spark", **ckpt["config"]}  # checkpoints from before method= existed are SparK's
    must_match = RESUME_MUST_MATCH + (FCMAE_RESUME_MUST_MATCH if config.get("method") == "fcmae" else ())
    return check_resumable({**ckpt, "config": saved}, config, path, data_state, must_match, ConfigError,
                           quiet=("init_from",))


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
    run = TrainingRun(RunSpec(
        kind="pretraining", fmt=PRETRAIN_FORMAT, config=config, output_dir=output_dir, title=f"pretrain {arch}",
        error=ConfigError, check_resumable=lambda ckpt, path, data: _check_resumable(ckpt, config, path, data),
        log_every=train_cfg["log_every"],
        curve_title=f"{method_title(config)} pretraining, {arch}, {data_cfg['img_size']} px",
        keep_checkpoints=train_cfg["keep_checkpoints"], save_every_steps=train_cfg["save_every_steps"],
        save_every_minutes=train_cfg["save_every_minutes"], wait_warning=data_cfg["wait_warning"]), info, folder)

    set_determinism(train_cfg["deterministic"])
    seed_everything(seed + info.rank)
    model = build_pretrain_model(config)
    resume_point = run.find_resume_point()
    init_report = None
    if config.get("init_from") and resume_point is None:
        init_report = init_from(model, config["init_from"], arch)  # before DDP: every rank loads the same
    grad_sync = resolve_grad_sync(train_cfg)
    model = wrap_model(model.to(info.device), info, sync_bn=train_cfg["sync_bn"], grad_sync=grad_sync)
    bare = unwrap(model)
    graphed = GraphedSparK(bare) if train_cfg.get("cuda_graph") else None  # validated: CUDA
    optimizer = build_optimizer(bare, lr=0.0, weight_decay=train_cfg["weight_decay"], betas=train_cfg["betas"],
                                kind=optimizer_of(config))
    optimise = OptimisationStep(model, optimizer, train_cfg["clip_grad"],
                                average_gradients if info.distributed and grad_sync == "allreduce" else None)

    loader = build_loader(dataset, train_cfg["batch_size"], info.world_size, info.rank, data_cfg["num_workers"], seed)
    steps_per_epoch = len(loader)
    schedule = Schedule.from_epochs(base_lr=base_lr_of(config), global_batch=train_cfg["batch_size"],
                                    epochs=train_cfg["epochs"], warmup_epochs=train_cfg["warmup_epochs"],
                                    steps_per_epoch=steps_per_epoch, weight_decay=train_cfg["weight_decay"],
                                    weight_decay_end=train_cfg["weight_decay_end"], max_steps=train_cfg["max_steps"])
    total_steps = schedule.total_steps
    data_state = {"seed": seed, "dataset_size": len(dataset), "steps_per_epoch": steps_per_epoch}

    run.notes += [_mask_note(data_cfg["img_size"], bare, config["mask_ratio"]),
                  f"data: {dataset.describe()}; {steps_per_epoch} step{'s' if steps_per_epoch != 1 else ''} "
                  f"per epoch of {train_cfg['batch_size']} images"
                  + (f" ({loader.batch_size} per process x {info.world_size})" if info.distributed else "")]
    run.notes += unused_setting_notes(config, to_plain(OmegaConf.load(CONFIG_DIR / "pretrain.yaml")))
    step = 0
    if resume_point is not None:
        step = run.resume(resume_point, bare, optimizer, data_state, total_steps)
        if config.get("init_from"):
            run.notes.append(f"init_from={config['init_from']} not used: resuming {output_dir} wins (its "
                             f"checkpoint holds the run's own weights); use another output_dir to start from "
                             f"init_from")

    def startup_files() -> None:
        if init_report is not None:
            run.notes.extend(init_report.lines())
            run.notes.append(f"init_from: written to {init_report.write(output_dir)}")
        if run.resumed_from is not None:
            # the export must match the checkpoint the run continues from (also an older one
            # when the newest was unusable)
            refreshed = refresh_encoder_export(output_dir, bare.encoder, arch, step)
            if refreshed:
                run.notes.append(refreshed)

    run.prepare_output(cfg, also=startup_files)
    visual = _visual_batch(dataset, train_cfg["vis_images"], info.device) if info.is_main else None
    batch_loss = MaskedImageLoss(model, info, seed=seed, mask_ratio=config["mask_ratio"],
                                 global_batch=loader.batch_size * info.world_size, autocast=train_cfg["autocast"],
                                 forward=graphed)

    def set_schedule(at_step: int) -> Dict[str, float]:
        lr, wd = schedule.lr(at_step), schedule.wd(at_step)
        apply_schedule(optimizer, lr, wd)
        return {"lr": lr, "wd": wd}

    def write_checkpoint(at_step: int, epoch: int, rng: Dict[str, Any]) -> None:
        save_checkpoint(output_dir, model=bare, optimizer=optimizer, epoch=epoch, step=at_step, config=config,
                        arch=arch, rng=rng)

    def pictures(at_step: int) -> None:
        """The loss curve so far and a reconstruction, with every checkpoint (rank 0)."""
        save_loss_curve(run.monitor.metrics_path, output_dir / LOSS_CURVE_NAME, run.spec.curve_title)
        epoch, batch_in_epoch = divmod(at_step, steps_per_epoch)
        if batch_in_epoch == 0:
            name, title = f"epoch_{epoch:04d}", f"{arch}, epoch {epoch}, step {at_step}"
        else:
            name, title = f"step_{at_step:07d}", f"{arch}, epoch {epoch + 1} (partial), step {at_step}"
        run.monitor.log_reconstruction(_reconstruct(model, visual, seed), name, at_step, title)

    def report_unreadable(epoch: int, at_step: int) -> None:
        unreadable = sorted(set().union(*all_gather_objects(batch_loss.take_unreadable())))
        if unreadable:
            shown = ", ".join(dataset.name(i) for i in unreadable[:3])
            more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
            run.monitor.message(f"epoch {epoch + 1}: skipped {len(unreadable)} unreadable image(s), each "
                                f"replaced by the next readable one: {shown}{more}")

    return run.train(model=model, loader=loader, optimise=optimise, step=step, total_steps=total_steps,
                     data_state=data_state, set_schedule=set_schedule, batch_loss=batch_loss,
                     write_checkpoint=write_checkpoint, end_of_epoch=report_unreadable, after_save=pictures,
                     result_type=PretrainResult, final_note=f"; encoder: {output_dir / encoder_export_name(arch)}")
