"""The plumbing every training run shares (SparK and FCMAE pretraining, fine-tuning, linear probing).

A mode builds its model, optimizer, data and schedule; the run does the rest the same way for all:

    run = TrainingRun(RunSpec(...), info, folder)
    point = run.find_resume_point()          # the newest good checkpoint.pth / checkpoint_step*.pth
    ...                                      # build model, optimizer, loader, schedule
    step = run.resume(point, bare, optimizer, data_state, total_steps) if point else 0
    run.prepare_output(cfg)                  # config.yaml, once every start-up check has passed
    result = run.train(...)                  # epochs of optimisation steps, checkpoints, monitor

``train`` polls for SIGINT/SIGTERM after every step (any rank's signal stops every rank after the
same step), saves at the end of every epoch, every ``save_every_steps`` / ``save_every_minutes`` and
when stopped, and leaves the loss curve and a one-line summary at the end. A NaN/inf loss or gradient
norm stops it (``NonFiniteLossError``) without touching the last checkpoint.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from sparse_mim.data import set_epoch

from .atomic import remove_stale_temporaries
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rank_rng_state, rng_state, set_rng_state
from .distributed import DistInfo, all_gather_objects, all_reduce_max, barrier
from .monitor import LOSS_CURVE_NAME, Monitor, save_loss_curve
from .resume import resume_position
from .rotation import ResumePoint, SaveSchedule, keep_previous, newest_good_checkpoint, prune
from .run_control import StopRequest
from .run_folder import RunFolder
from .step import OptimisationStep, train_epoch
from .throughput import DataWaitWatch

__all__ = ["RunSpec", "RunResult", "TrainingRun", "prepare_output"]


@dataclass
class RunSpec:
    """What a mode tells the shared run about itself."""
    kind: str                    # "pretraining" / "fine-tuning": names its checkpoints in messages
    fmt: str                     # the format string of its checkpoints (runtime.checkpoint)
    config: Dict[str, Any]       # the run's plain config (``config["model"]``: the arch)
    output_dir: Path
    title: str                   # what the progress bar says, e.g. "pretrain resnet18"
    error: Type[Exception]       # raised for a checkpoint that cannot be resumed (the mode's ConfigError)
    check_resumable: Callable[[Dict[str, Any], Path, Dict[str, int]], List[str]]  # (ckpt, path, data state)
    log_every: int               # write every n-th step's metrics (and the last)
    curve_title: str
    curve_ylabel: Optional[str] = None  # None: save_loss_curve's default (pretraining's loss)
    keep_checkpoints: int = 1
    save_every_steps: Optional[int] = None
    save_every_minutes: Optional[float] = None
    wait_warning: Optional[float] = None  # data-wait share that prints a warning (None: never)


@dataclass
class RunResult:
    output_dir: Path
    step: int                    # optimizer steps done in total
    total_steps: int             # steps the run is meant to reach
    resumed_from: Optional[int]  # step of the checkpoint this run started from
    losses: List[float]          # losses of the steps run by this invocation
    seconds: float               # wall time of this invocation
    stopped_by: Optional[int] = None  # the signal that stopped the run early, if any

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def prepare_output(cfg: DictConfig, output_dir: Path, info: DistInfo) -> List[str]:
    """The run folder with config.yaml (rank 0), made once everything that can fail at start-up has
    been checked; removes the temporaries of saves a killed run left behind. Returns notes to print."""
    if not info.is_main:
        return []
    removed = remove_stale_temporaries(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    if not removed:
        return []
    return [f"removed {len(removed)} temporary file(s) of interrupted saves: " + ", ".join(p.name for p in removed)]


class TrainingRun:
    """One resumable training run in ``spec.output_dir`` (see the module docstring)."""

    def __init__(self, spec: RunSpec, info: DistInfo, folder: RunFolder):
        self.spec, self.info, self.folder = spec, info, folder
        self.output_dir = Path(spec.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.notes: List[str] = []  # printed when training starts (above the progress bar)
        self.monitor: Optional[Monitor] = None
        self.resumed_from: Optional[int] = None
        self._last_saved: Optional[int] = None  # the step of the file named checkpoint.pth, if good
        self._start = time.perf_counter()

    # -- start-up ----------------------------------------------------------------------------------
    def load(self, path: Path) -> Dict[str, Any]:
        return load_checkpoint(path, self.spec.fmt, self.spec.kind)

    def find_resume_point(self) -> Optional[ResumePoint]:
        """The newest readable checkpoint of this run's folder (None: a fresh run)."""
        try:
            return newest_good_checkpoint(self.output_dir, self.load)
        except ValueError as e:
            raise self.spec.error(str(e)) from None

    def resume(self, point: ResumePoint, model: nn.Module, optimizer: torch.optim.Optimizer,
               data_state: Dict[str, int], total_steps: int) -> int:
        """Check ``point`` against this run (``spec.check_resumable``), then load the bare ``model``, the
        optimizer and this rank's generators from it; return the step to continue from."""
        path, ckpt = point.path, point.checkpoint
        for problem in point.skipped:
            self.notes.append(f"skipped an unusable checkpoint: {problem}")
        changed = self.spec.check_resumable(ckpt, path, data_state)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        saved_rng = rank_rng_state(ckpt["rng"], self.info.rank)
        if saved_rng is not None:  # a rank the checkpoint's run did not have keeps its fresh seed
            set_rng_state(saved_rng)
        step = self.resumed_from = ckpt["step"]
        self._last_saved = step if point.is_newest_name else None
        self.notes.append(f"resuming from {path} at "
                          f"{resume_position(step, total_steps, data_state['steps_per_epoch'])}")
        if changed:
            self.notes.append("changed since the checkpoint: " + "; ".join(changed))
        return step

    def prepare_output(self, cfg: DictConfig, also: Optional[Callable[[], None]] = None) -> None:
        """``prepare_output``, then ``also`` (rank 0: the mode's own start-up files), then every rank
        waits for rank 0."""
        self.notes += prepare_output(cfg, self.output_dir, self.info)
        if self.info.is_main and also is not None:
            also()
        barrier()

    # -- training ------------------------------------------------------------------------------------
    def train(self, *, model: nn.Module, loader, optimise: OptimisationStep, step: int, total_steps: int,
              data_state: Dict[str, int], set_schedule: Callable[[int], Dict[str, float]],
              batch_loss: Callable[[Any, int], torch.Tensor],
              write_checkpoint: Callable[[int, int, Dict[str, Any]], None],
              end_of_epoch: Optional[Callable[[int, int], None]] = None,
              after_save: Optional[Callable[[int], None]] = None,
              finish: Optional[Callable[[int], None]] = None,
              result_type: Type[RunResult] = RunResult, final_note: str = "") -> RunResult:
        """Train ``model`` (DDP-wrapped or bare) from ``step`` to ``total_steps``.

        ``set_schedule`` / ``batch_loss``: see ``step.train_epoch``. ``write_checkpoint(step, epoch,
        rng)`` writes the mode's checkpoint (rank 0; ``rng``: every rank's generators and the sampler
        state); ``after_save(step)`` runs after it (rank 0). ``end_of_epoch(epoch, step)`` runs on every
        rank after each epoch, before its checkpoint (an evaluation, a note); ``finish(step)`` once the
        run reaches ``total_steps`` (a final evaluation). ``final_note`` ends the last line printed.
        """
        spec, info = self.spec, self.info
        steps_per_epoch = data_state["steps_per_epoch"]
        epochs = -(-total_steps // steps_per_epoch)
        global_batch = loader.batch_size * info.world_size
        self.monitor = monitor = Monitor(self.output_dir, active=info.is_main, start_step=step,
                                         total_steps=total_steps, description=spec.title)
        for note in self.notes:
            monitor.message(note)
        save_schedule = SaveSchedule(spec.save_every_steps, spec.save_every_minutes)
        keep = spec.keep_checkpoints

        def save(at_step: int) -> None:
            if at_step == self._last_saved:
                return
            states = all_gather_objects(rng_state())
            if info.is_main:
                epoch, batch_in_epoch = divmod(at_step, steps_per_epoch)
                rng = {**states[0], "other_ranks": states[1:],
                       "sampler": {**data_state, "epoch": epoch, "batch_in_epoch": batch_in_epoch}}
                if keep > 1 and self._last_saved is not None:
                    keep_previous(self.output_dir, self._last_saved)
                write_checkpoint(at_step, epoch, rng)
                prune(self.output_dir, keep)
                if after_save is not None:
                    after_save(at_step)
            self._last_saved = at_step
            save_schedule.saved()
            barrier()

        losses: List[float] = []
        data_watch = DataWaitWatch(spec.wait_warning, window=min(50, steps_per_epoch))
        current = {"step": step}

        def on_step(metrics: Dict[str, float]) -> None:
            losses.append(metrics["loss"])
            current["step"] = metrics["step"]
            monitor.log_step(metrics, write=metrics["step"] % spec.log_every == 0 or metrics["step"] == total_steps)
            warning = data_watch.add(metrics)
            if warning:
                monitor.message(warning)

        stopped_by: Optional[int] = None
        self.folder.started()
        try:
            with StopRequest(announce=info.is_main) as stop:
                def stop_requested() -> bool:
                    """Whether any rank got a signal (then stop), else save if a step checkpoint is due
                    (rank 0's clock decides); every rank gets the same answers at the same step."""
                    nonlocal stopped_by
                    at_step = current["step"]
                    flags = [stop.signum or 0,
                             int(info.is_main and at_step < total_steps and save_schedule.due(at_step))]
                    if info.distributed:
                        flags = all_reduce_max(torch.tensor(flags, device=info.device)).tolist()
                    stopped_by = int(flags[0]) or None
                    if stopped_by is None and flags[1]:
                        save(at_step)
                    return stopped_by is not None

                while step < total_steps and stopped_by is None:
                    epoch = step // steps_per_epoch
                    set_epoch(loader, epoch, start_batch=step % steps_per_epoch)
                    monitor.set_description(f"{spec.title} epoch {epoch + 1}/{epochs}")
                    model.train()
                    step = train_epoch(loader, optimise, info=info, global_batch=global_batch, epoch=epoch,
                                       step=step, stop_step=total_steps, set_schedule=set_schedule,
                                       batch_loss=batch_loss, on_step=on_step, stop_requested=stop_requested)
                    if end_of_epoch is not None:
                        end_of_epoch(epoch, step)
                    save(step)
                    monitor.resume_progress()  # evaluating and saving are not training time
                if step >= total_steps:
                    monitor.end_progress()
                    if finish is not None:
                        finish(step)
        finally:
            monitor.close()

        if info.is_main:
            curve = {"ylabel": spec.curve_ylabel} if spec.curve_ylabel else {}
            save_loss_curve(monitor.metrics_path, self.output_dir / LOSS_CURVE_NAME, spec.curve_title, **curve)
            how = f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "finished"
            print(f"{how} at step {step} of {total_steps}; checkpoint: {self.checkpoint_path}{final_note}",
                  flush=True)
        return result_type(self.output_dir, step, total_steps, self.resumed_from, losses,
                           time.perf_counter() - self._start, stopped_by)
