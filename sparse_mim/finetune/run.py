"""A whole fine-tuning / linear-probe / kNN run on the pretraining run's machinery.

    result = finetune(compose_finetune_config(["data.path=/data/imagenette", "weights=ckpt.pth"]))

Shared with ``sparse_mim.train``: the torchrun/DDP setup, SyncBN, the resumable sampler, atomic
checkpoints with every rank's generators, SIGINT/SIGTERM handling, the progress bar, ``metrics.jsonl``
and TensorBoard. What is new here is the classifier, timm's optimizer / schedule / augmentation /
mixup, evaluation, ``summary.json`` and the confusion-matrix picture.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from sparse_mim.convert.writers import atomic_write, remove_stale_temporaries
from sparse_mim.data import build_loader, check_readable, set_epoch
from sparse_mim.run_folder import RunFolder, check_output_dir
from sparse_mim.train.checkpoint import load_checkpoint, rank_rng_state, rng_state, set_rng_state
from sparse_mim.train.config import ConfigError, flatten, to_plain
from sparse_mim.train.distributed import (DistInfo, all_gather_objects, all_reduce_max, all_reduce_mean, barrier,
                                          env_world_size, init_distributed, shutdown, unwrap, wrap_model)
from sparse_mim.train.engine import NonFiniteLossError
from sparse_mim.train.monitor import LOSS_CURVE_NAME, Monitor, save_loss_curve
from sparse_mim.train.run_control import StopRequest, seed_everything, set_determinism

from .config import effective_warmup, validate_finetune_config
from .data import LabelledImages, build_transforms, find_splits, label_subset
from .evaluate import accuracy_summary, knn_classify, run_over, save_confusion_png
from .model import LinearProbe, build_classifier, build_feature_extractor

__all__ = ["FORMAT", "CHECKPOINT_NAME", "SUMMARY_NAME", "CONFUSION_NAME", "FinetuneResult", "finetune",
           "load_finetune_checkpoint"]

FORMAT = "sparse-mim/finetune-v1"
CHECKPOINT_NAME = "checkpoint.pth"
SUMMARY_NAME = "summary.json"
CONFUSION_NAME = "confusion.png"
#: Settings a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model", "mode", "weights", "data.path", "data.img_size", "data.label_fraction",
                     "data.label_seed", "train.batch_size", "train.epochs", "train.seed")


@dataclass
class FinetuneResult:
    output_dir: Path
    summary: Optional[Dict[str, Any]]   # summary.json's contents (None if stopped early)
    step: int
    total_steps: int
    resumed_from: Optional[int]
    losses: List[float]
    stopped_by: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.summary is not None


def load_finetune_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        return load_checkpoint(path, FORMAT, "fine-tuning")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _label_seed(config: Dict[str, Any]) -> int:
    seed = config["data"]["label_seed"]
    return config["train"]["seed"] if seed is None else seed


def finetune(cfg: DictConfig) -> FinetuneResult:
    """Run (or resume) the fine-tuning, linear probe or kNN evaluation described by ``cfg``."""
    validate_finetune_config(cfg, env_world_size())
    config = to_plain(cfg)
    check_output_dir(Path(config["output_dir"]).expanduser(), ConfigError)
    classes, train_samples, val_samples = find_splits(config["data"]["path"])
    for samples, what in ((train_samples, "training images"), (val_samples, "validation images")):
        check_readable(LabelledImages(samples, lambda image: image, description=what))  # names unreadable files
    keep = label_subset([label for _, label in train_samples], config["data"]["label_fraction"], _label_seed(config))
    info = init_distributed()
    try:
        runner = _knn if config["mode"] == "knn" else _train
        with RunFolder(Path(config["output_dir"]).expanduser(), active=info.is_main) as folder:
            return runner(cfg, config, classes, [train_samples[i] for i in keep], val_samples, info, folder)
    finally:
        shutdown()


def _prepare_output(cfg: DictConfig, output_dir: Path, info: DistInfo) -> None:
    """The run folder with config.yaml: made once everything that can fail at start-up has been checked."""
    if info.is_main:
        remove_stale_temporaries(output_dir)  # of saves a killed run left behind
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    barrier()


def _finish(summary: Dict[str, Any], classes, output_dir: Path, config: Dict[str, Any], title: str,
            seconds: float, extra: Dict[str, Any], info: DistInfo) -> Dict[str, Any]:
    summary = {"mode": config["mode"], "model": config["model"], "weights": config["weights"],
               **summary, **extra, "classes": list(classes), "wall_time_s": seconds, "config": config}
    if info.is_main:
        text = json.dumps(summary, indent=2)
        atomic_write(output_dir / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(text))
        save_confusion_png(summary, classes, output_dir / CONFUSION_NAME, title)
        print(f"{title}: val top-1 {summary['top1']:.2f}%, top-5 {summary['top5']:.2f}% "
              f"({summary['images']} images); summary: {output_dir / SUMMARY_NAME}", flush=True)
    barrier()
    return summary


# -- kNN ---------------------------------------------------------------------------------------------
def _knn(cfg, config, classes, train_samples, val_samples, info: DistInfo, folder: RunFolder) -> FinetuneResult:
    start = time.perf_counter()
    data_cfg, arch = config["data"], config["model"]
    output_dir = Path(config["output_dir"]).expanduser().resolve()
    torch.manual_seed(config["train"]["seed"])  # the random init of a scratch backbone
    model, report = build_feature_extractor(arch, config["weights"])
    _prepare_output(cfg, output_dir, info)
    model = model.to(info.device).eval()
    if info.is_main:
        print(report.describe(), flush=True)
    _, evaluate = build_transforms(data_cfg, config["augment"])
    batch, workers = data_cfg["eval_batch_size"], data_cfg["num_workers"]
    auto = config["train"]["autocast"]
    train_feats, train_labels = run_over(model, LabelledImages(train_samples, evaluate), info, batch, workers, auto)
    val_feats, val_labels = run_over(model, LabelledImages(val_samples, evaluate), info, batch, workers, auto)
    scores = knn_classify(train_feats, train_labels, val_feats, len(classes), config["knn"]["k"],
                          config["knn"]["temperature"])
    summary = accuracy_summary(scores, val_labels, classes)
    folder.started()
    summary = _finish(summary, classes, output_dir, config, f"kNN (k={config['knn']['k']}), {arch}",
                      time.perf_counter() - start, {"train_images": len(train_samples)}, info)
    return FinetuneResult(output_dir, summary, 0, 0, None, [])


# -- fine-tuning and linear probing ------------------------------------------------------------------
def _build_model(config: Dict[str, Any], num_classes: int) -> tuple[nn.Module, str]:
    arch, weights, train_cfg = config["model"], config["weights"], config["train"]
    if config["mode"] == "linear":
        backbone, report = build_feature_extractor(arch, weights)
        probe = LinearProbe(backbone, num_classes)
        report.fresh += [f"head.{name}" for name, _ in probe.head.named_parameters()]  # the probe's new head
        return probe, report.describe()
    model, report = build_classifier(arch, num_classes, weights, train_cfg["drop_path_rate"])
    return model, report.describe()


def _optimizer(model: nn.Module, config: Dict[str, Any], peak_lr: float) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    t = config["train"]
    layer_decay = t["layer_decay"] if config["mode"] == "finetune" and t["layer_decay"] not in (None, 1.0) else None
    return create_optimizer_v2(model, opt=t["opt"], lr=peak_lr, weight_decay=t["weight_decay"],
                               layer_decay=layer_decay)


def _criterion(augment: Dict[str, Any], num_classes: int):
    """(mixup or None, loss). timm's Mixup folds label smoothing into its soft targets."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    smoothing = augment["label_smoothing"]
    if augment["mixup"] > 0 or augment["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=augment["mixup"], cutmix_alpha=augment["cutmix"], label_smoothing=smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, (LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss())


def _check_resumable(ckpt: Dict[str, Any], config: Dict[str, Any], path: Path) -> None:
    old, new = flatten(ckpt["config"]), flatten(config)
    clashes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_MUST_MATCH if old.get(k) != new.get(k)]
    if clashes:
        raise ConfigError(f"cannot resume {path}: these differ from the checkpoint's run ("
                          + "; ".join(clashes) + "). Restore them, or use a new output_dir")


def _train(cfg, config, classes, train_samples, val_samples, info: DistInfo, folder: RunFolder) -> FinetuneResult:
    from timm.scheduler import create_scheduler_v2

    start_time = time.perf_counter()
    data_cfg, train_cfg, arch, mode = config["data"], config["train"], config["model"], config["mode"]
    seed = train_cfg["seed"]
    output_dir = Path(config["output_dir"]).expanduser().resolve()
    ckpt_path = output_dir / CHECKPOINT_NAME
    summary_path = output_dir / SUMMARY_NAME

    set_determinism(False)
    seed_everything(seed + info.rank)
    model, load_note = _build_model(config, len(classes))
    model = model.to(info.device)
    model = wrap_model(model, info, sync_bn=train_cfg["sync_bn"] and mode == "finetune")
    bare = unwrap(model)
    peak_lr = train_cfg["base_lr"] * train_cfg["batch_size"] / 256
    optimizer = _optimizer(bare, config, peak_lr)

    train_tf, eval_tf = build_transforms(data_cfg, config["augment"])
    train_set = LabelledImages(train_samples, train_tf, seed, f"training images of {len(classes)} classes")
    val_set = LabelledImages(val_samples, eval_tf, seed, "validation images")
    loader = build_loader(train_set, train_cfg["batch_size"], info.world_size, info.rank, data_cfg["num_workers"], seed)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * train_cfg["epochs"]
    warmup_epochs, warmup_note = effective_warmup(train_cfg["warmup_epochs"], train_cfg["epochs"])
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=train_cfg["epochs"],
                                       warmup_epochs=warmup_epochs, warmup_lr=train_cfg["warmup_lr"],
                                       min_lr=train_cfg["min_lr"], step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    mixup, criterion = _criterion(config["augment"], len(classes))

    notes = [load_note, f"data: {train_set.describe()} (label_fraction {data_cfg['label_fraction']}), "
                        f"{val_set.describe()}; {steps_per_epoch} steps per epoch of {train_cfg['batch_size']}"]
    if warmup_note:
        notes.append(warmup_note)
    step, seconds_before, resumed_from = 0, 0.0, None
    if ckpt_path.exists():
        ckpt = load_finetune_checkpoint(ckpt_path)
        _check_resumable(ckpt, config, ckpt_path)
        bare.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        saved_rng = rank_rng_state(ckpt["rng"], info.rank)
        if saved_rng is not None:
            set_rng_state(saved_rng)
        step = resumed_from = ckpt["step"]
        seconds_before = ckpt["seconds"]
        notes.append(f"resuming from {ckpt_path} at step {step} of {total_steps}")
    _prepare_output(cfg, output_dir, info)  # after the checks: a refused resume leaves the folder as it was

    if step >= total_steps and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if info.is_main:
            print(f"already finished: {summary_path} (val top-1 {summary['top1']:.2f}%)", flush=True)
        return FinetuneResult(output_dir, summary, step, total_steps, resumed_from, [])

    monitor = Monitor(output_dir, active=info.is_main, start_step=step, total_steps=total_steps,
                      description=f"{mode} {arch}")
    for note in notes:
        monitor.message(note)

    def save() -> None:
        states = all_gather_objects(rng_state())
        if info.is_main:
            ckpt = {"format": FORMAT, "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": step // steps_per_epoch, "step": step, "config": config, "arch": arch,
                    "classes": list(classes), "seconds": seconds_before + time.perf_counter() - start_time,
                    "rng": {**states[0], "other_ranks": states[1:]}}
            atomic_write(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
        barrier()

    def evaluate() -> Dict[str, Any]:
        model.eval()
        try:
            scores, labels = run_over(model, val_set, info, data_cfg["eval_batch_size"], data_cfg["num_workers"],
                                      train_cfg["autocast"])
        finally:
            model.train()
        return accuracy_summary(scores, labels, classes)

    params = [p for p in model.parameters() if p.requires_grad]
    use_autocast = train_cfg["autocast"] and info.device.type == "cuda"
    losses: List[float] = []
    stopped_by: Optional[int] = None
    summary = None
    folder.started()
    try:
        with StopRequest(announce=info.is_main) as stop:
            while step < total_steps and stopped_by is None:
                epoch = step // steps_per_epoch
                set_epoch(loader, epoch, start_batch=step % steps_per_epoch)
                monitor.set_description(f"{mode} {arch} epoch {epoch + 1}/{train_cfg['epochs']}")
                model.train()
                tic = time.perf_counter()
                for images, labels, _ in loader:
                    scheduler.step_update(step)
                    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                    images = images.to(info.device, non_blocking=True)
                    labels = labels.to(info.device, non_blocking=True)
                    if mixup is not None:
                        images, labels = mixup(images, labels)
                    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
                    with amp:
                        loss = criterion(model(images), labels)
                    loss_value = all_reduce_mean(loss.detach().float()).item()
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError("the loss", loss_value, step + 1, epoch + 1)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    max_norm = train_cfg["clip_grad"] if train_cfg["clip_grad"] is not None else float("inf")
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                    optimizer.step()
                    step += 1
                    toc = time.perf_counter()
                    losses.append(loss_value)
                    monitor.log_step({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                                      "grad_norm": grad_norm,
                                      "images_per_sec": train_cfg["batch_size"] / max(toc - tic, 1e-9)},
                                     write=step % train_cfg["log_every"] == 0 or step == total_steps)
                    tic = toc
                    signum = stop.signum or 0
                    if info.distributed:
                        signum = int(all_reduce_max(torch.tensor(signum, device=info.device)).item())
                    stopped_by = signum or None
                    if stopped_by is not None or step >= total_steps:
                        break
                epoch_done = step % steps_per_epoch == 0
                last = step >= total_steps
                if epoch_done and not last and (step // steps_per_epoch) % train_cfg["eval_every"] == 0:
                    result = evaluate()
                    monitor.log_eval({"step": step, "epoch": step // steps_per_epoch,
                                      "val_top1": result["top1"], "val_top5": result["top5"]})
                save()
                monitor.resume_progress()  # evaluation and saving are not training time
            if step >= total_steps:
                monitor.end_progress()
                result = evaluate()
                monitor.log_eval({"step": step, "epoch": step // steps_per_epoch,
                                  "val_top1": result["top1"], "val_top5": result["top5"]})
                seconds = seconds_before + time.perf_counter() - start_time
                summary = _finish(result, classes, output_dir, config, f"{mode} {arch}", seconds,
                                  {"train_images": len(train_set), "steps": step, "epochs": train_cfg["epochs"]},
                                  info)
    finally:
        monitor.close()
    if info.is_main:
        save_loss_curve(monitor.metrics_path, output_dir / LOSS_CURVE_NAME, f"{mode}, {arch}",
                        ylabel="training loss (cross-entropy)")
        if stopped_by:
            print(f"stopped by {signal.Signals(stopped_by).name} at step {step} of {total_steps}; "
                  f"checkpoint: {ckpt_path}", flush=True)
    return FinetuneResult(output_dir, summary, step, total_steps, resumed_from, losses, stopped_by)
