"""A whole fine-tuning / linear-probe / kNN run on the shared run machinery (``sparse_mim.runtime``).

    result = finetune(compose_finetune_config(["data.path=/data/imagenette", "weights=ckpt.pth"]))

Shared with pretraining: the torchrun/DDP setup, SyncBN, the resumable sampler, the optimisation step
(loss and gradient-norm checks), atomic checkpoints with every rank's generators, the resume check
(settings, dataset size, steps per epoch), SIGINT/SIGTERM handling, the progress bar, ``metrics.jsonl``
and TensorBoard. What is fine-tuning's own is here: the classifier, timm's optimizer / schedule /
augmentation / mixup, evaluation, ``summary.json`` and the confusion-matrix picture.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sparse_mim.data import build_loader, check_readable
from sparse_mim.runtime.atomic import atomic_write
from sparse_mim.runtime.checkpoint import FINETUNE_FORMAT, load_checkpoint, write_checkpoint
from sparse_mim.runtime.distributed import (DistInfo, barrier, env_world_size, init_distributed, shutdown, unwrap,
                                            wrap_model)
from sparse_mim.runtime.resume import check_resumable
from sparse_mim.runtime.run import RunResult, RunSpec, TrainingRun, prepare_output
from sparse_mim.runtime.run_control import seed_everything, set_determinism
from sparse_mim.runtime.run_folder import RunFolder, check_output_dir
from sparse_mim.runtime.step import OptimisationStep, autocast
from sparse_mim.configs import ConfigError, to_plain

from .config import effective_warmup, validate_finetune_config
from .data import LabelledImages, build_transforms, find_splits, label_subset
from .evaluate import accuracy_summary, knn_classify, run_over, save_confusion_png
from .model import LinearProbe, build_classifier, build_feature_extractor

__all__ = ["SUMMARY_NAME", "CONFUSION_NAME", "FinetuneResult", "finetune", "load_finetune_checkpoint"]

SUMMARY_NAME = "summary.json"
CONFUSION_NAME = "confusion.png"
#: Settings a resumed run must share with its checkpoint (besides the dataset size and steps per epoch).
RESUME_MUST_MATCH = ("model", "mode", "weights", "data.path", "data.img_size", "data.label_fraction",
                     "data.label_seed", "train.batch_size", "train.epochs", "train.seed")


@dataclass
class FinetuneResult(RunResult):
    """What ``finetune`` did (``sparse_mim.runtime.run.RunResult``) and ``summary.json``'s contents
    (None if stopped early)."""
    summary: Optional[Dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.summary is not None


def load_finetune_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        return load_checkpoint(path, FINETUNE_FORMAT, "fine-tuning")
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
    notes = prepare_output(cfg, output_dir, info)
    barrier()
    model = model.to(info.device).eval()
    if info.is_main:
        print("\n".join([*notes, report.describe()]), flush=True)
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
    return FinetuneResult(output_dir, 0, 0, None, [], time.perf_counter() - start, summary=summary)


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


def _train(cfg, config, classes, train_samples, val_samples, info: DistInfo, folder: RunFolder) -> FinetuneResult:
    from timm.scheduler import create_scheduler_v2

    start_time = time.perf_counter()
    data_cfg, train_cfg, arch, mode = config["data"], config["train"], config["model"], config["mode"]
    seed = train_cfg["seed"]
    output_dir = Path(config["output_dir"]).expanduser().resolve()
    summary_path = output_dir / SUMMARY_NAME
    run = TrainingRun(RunSpec(
        kind="fine-tuning", fmt=FINETUNE_FORMAT, config=config, output_dir=output_dir, title=f"{mode} {arch}",
        error=ConfigError, log_every=train_cfg["log_every"], curve_title=f"{mode}, {arch}",
        curve_ylabel="training loss (cross-entropy)",
        check_resumable=lambda ckpt, path, data: check_resumable(ckpt, config, path, data, RESUME_MUST_MATCH,
                                                                 ConfigError)), info, folder)

    set_determinism(False)
    seed_everything(seed + info.rank)
    model, load_note = _build_model(config, len(classes))
    model = model.to(info.device)
    model = wrap_model(model, info, sync_bn=train_cfg["sync_bn"] and mode == "finetune")
    bare = unwrap(model)
    peak_lr = train_cfg["base_lr"] * train_cfg["batch_size"] / 256
    optimizer = _optimizer(bare, config, peak_lr)
    optimise = OptimisationStep(model, optimizer, train_cfg["clip_grad"])

    train_tf, eval_tf = build_transforms(data_cfg, config["augment"])
    train_set = LabelledImages(train_samples, train_tf, seed, f"training images of {len(classes)} classes")
    val_set = LabelledImages(val_samples, eval_tf, seed, "validation images")
    loader = build_loader(train_set, train_cfg["batch_size"], info.world_size, info.rank, data_cfg["num_workers"], seed)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * train_cfg["epochs"]
    data_state = {"seed": seed, "dataset_size": len(train_set), "steps_per_epoch": steps_per_epoch}
    warmup_epochs, warmup_note = effective_warmup(train_cfg["warmup_epochs"], train_cfg["epochs"])
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=train_cfg["epochs"],
                                       warmup_epochs=warmup_epochs, warmup_lr=train_cfg["warmup_lr"],
                                       min_lr=train_cfg["min_lr"], step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    mixup, criterion = _criterion(config["augment"], len(classes))

    run.notes += [load_note, f"data: {train_set.describe()} (label_fraction {data_cfg['label_fraction']}), "
                             f"{val_set.describe()}; {steps_per_epoch} steps per epoch of {train_cfg['batch_size']}"]
    if warmup_note:
        run.notes.append(warmup_note)
    step, seconds_before = 0, 0.0
    resume_point = run.find_resume_point()
    if resume_point is not None:
        step = run.resume(resume_point, bare, optimizer, data_state, total_steps)
        seconds_before = resume_point.checkpoint["seconds"]
    run.prepare_output(cfg)  # after the checks: a refused resume leaves the folder as it was

    if step >= total_steps and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if info.is_main:
            print(f"already finished: {summary_path} (val top-1 {summary['top1']:.2f}%)", flush=True)
        return FinetuneResult(output_dir, step, total_steps, run.resumed_from, [], 0.0, summary=summary)

    def set_schedule(at_step: int) -> Dict[str, float]:
        scheduler.step_update(at_step)
        return {"lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)}

    def batch_loss(batch, at_step: int) -> torch.Tensor:
        images, labels, _ = batch
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        if mixup is not None:
            images, labels = mixup(images, labels)
        with autocast(info, train_cfg["autocast"]):
            return criterion(model(images), labels)

    def write(at_step: int, epoch: int, rng: Dict[str, Any]) -> None:
        write_checkpoint(output_dir, FINETUNE_FORMAT, model=bare, optimizer=optimizer, epoch=epoch, step=at_step,
                         config=config, arch=arch, rng=rng, classes=list(classes),
                         seconds=seconds_before + time.perf_counter() - start_time)

    def evaluate(at_step: int) -> Dict[str, Any]:
        model.eval()
        try:
            scores, labels = run_over(model, val_set, info, data_cfg["eval_batch_size"], data_cfg["num_workers"],
                                      train_cfg["autocast"])
        finally:
            model.train()
        result = accuracy_summary(scores, labels, classes)
        run.monitor.log_eval({"step": at_step, "epoch": at_step // steps_per_epoch,
                              "val_top1": result["top1"], "val_top5": result["top5"]})
        return result

    def end_of_epoch(epoch: int, at_step: int) -> None:
        epoch_done = at_step % steps_per_epoch == 0
        if epoch_done and at_step < total_steps and (at_step // steps_per_epoch) % train_cfg["eval_every"] == 0:
            evaluate(at_step)

    summary: Dict[str, Any] = {}

    def finish(at_step: int) -> None:
        seconds = seconds_before + time.perf_counter() - start_time
        summary.update(_finish(evaluate(at_step), classes, output_dir, config, f"{mode} {arch}", seconds,
                               {"train_images": len(train_set), "steps": at_step, "epochs": train_cfg["epochs"]},
                               info))

    result = run.train(model=model, loader=loader, optimise=optimise, step=step, total_steps=total_steps,
                       data_state=data_state, set_schedule=set_schedule, batch_loss=batch_loss,
                       write_checkpoint=write, end_of_epoch=end_of_epoch, finish=finish, result_type=FinetuneResult)
    result.summary = summary or None
    return result
