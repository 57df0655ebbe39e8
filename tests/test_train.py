"""Pretraining: SparK's schedules and optimizer, config checks before training, checkpoints, NaN
handling, exact resume after a kill or a signal, and the ``sparse-mim pretrain`` command."""
from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import time

import pytest
import timm
import torch
from helpers.runs import TINY, console_script, env, make_images, metrics, pretrain_cmd, run
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from backbones import create_backbone
from sparse_mim.data import DataError
from sparse_mim.spark import SparK, build_spark
from sparse_mim.runtime.step import NonFiniteLossError
from sparse_mim.train import (ConfigError, Schedule, apply_schedule, build_optimizer, compose_config, lamb_betas,
                              load_checkpoint, peak_lr, pretrain)
from sparse_mim.train.checkpoint import export_step


# -- schedules ----------------------------------------------------------------------------------
@pytest.fixture
def schedule():
    # 4 epochs x 5 steps, 1 warmup epoch: warmup steps 0-4, cosine over steps 5-19
    return Schedule.from_epochs(base_lr=2e-4, global_batch=4096, epochs=4, warmup_epochs=1, steps_per_epoch=5,
                                weight_decay=0.04, weight_decay_end=0.2)


def test_peak_lr_scales_base_lr_by_global_batch_over_256():
    assert peak_lr(2e-4, 4096) == pytest.approx(3.2e-3)
    assert peak_lr(4e-4, 2048) == pytest.approx(3.2e-3)


def test_lr_warms_up_linearly_from_half_a_percent_of_the_peak(schedule):
    peak = 3.2e-3
    assert schedule.lr(0) == pytest.approx(0.005 * peak)
    assert schedule.lr(2) == pytest.approx(0.005 * peak + 0.995 * peak * 2 / 5)
    assert schedule.lr(5) == pytest.approx(peak)


def test_lr_follows_a_cosine_to_a_thousandth_of_the_peak_at_the_last_step(schedule):
    peak, final = 3.2e-3, 3.2e-6
    assert schedule.lr(12) == pytest.approx((peak + final) / 2)  # halfway through steps 5..19
    assert schedule.lr(8) == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * 3 / 14)))
    assert schedule.lr(19) == pytest.approx(final)
    lrs = [schedule.lr(s) for s in range(5, 20)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_follows_a_cosine_from_0_04_up_to_0_2(schedule):
    assert schedule.wd(0) == pytest.approx(0.04)
    assert schedule.wd(19) == pytest.approx(0.2)
    assert schedule.wd(7) == pytest.approx(0.2 + (0.04 - 0.2) * 0.5 * (1 + math.cos(math.pi * 7 / 19)))


# -- optimizer ----------------------------------------------------------------------------------
def test_lamb_uses_resnet_betas_eps_1e6_and_schedules_weight_decay_of_decaying_groups_only():
    model = build_spark("resnet18", decoder_width=64)
    optimizer = build_optimizer(model, lr=0.0, weight_decay=0.04)
    assert type(optimizer).__name__ == "Lamb"
    decay, no_decay = optimizer.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-6
    assert all(p.ndim > 1 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_tokens.0", "encoder.bn1.weight", "encoder.bn1.bias"} <= skipped
    apply_schedule(optimizer, lr=1e-3, wd=0.1)
    assert (decay["lr"], decay["weight_decay"]) == (1e-3, 0.1)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (1e-3, 0.0)


def test_lamb_betas_come_from_the_backbone_family():
    assert lamb_betas(create_backbone("resnet50")) == (0.9, 0.95)
    assert lamb_betas(create_backbone("convnext_tiny")) == (0.9, 0.999)


# -- in-process runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 8)
    return folder


def _config(images, output_dir, *overrides):
    return compose_config([*TINY, f"data.path={images}", f"output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    """One epoch (2 steps) of the tiny run, in this process."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = pretrain(_config(images, out, "train.epochs=1"))
    return out, result


@pytest.mark.parametrize("overrides, message", [
    (["data.img_size=48"], "multiple of 32"),
    (["mask_ratio=0"], "strictly between 0 and 1"),
    (["mask_ratio=1.0"], "strictly between 0 and 1"),
    (["mask_ratio=0.9"], "leaves no visible patch"),  # 64 px: 4 patches, round(0.4) = 0 visible
    (["mask_ratio=0.1"], "leaves no masked patch"),   # round(3.6) = 4 visible
    (["model=resnet51"], "unknown model 'resnet51'"),
    (["train.batch_size=0"], "positive integer"),
    (["train.warmup_epochs=5", "train.epochs=2"], "warmup_epochs"),
])
def test_invalid_settings_are_refused_before_anything_runs(images, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(_config(images, tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_global_batch_not_divisible_by_the_world_size_is_refused(images, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="divide evenly over the 3 processes"):
        pretrain(_config(images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_data_path_is_refused_naming_it(tmp_path, make):
    data = tmp_path / "data"
    if make == "empty":
        data.mkdir()
    with pytest.raises(DataError, match="does not exist" if make == "missing" else "no images found") as e:
        pretrain(_config(data, tmp_path / "run"))
    assert str(data) in str(e.value) and not (tmp_path / "run").exists()


def test_a_run_leaves_checkpoint_encoder_export_metrics_and_pictures(finished_run):
    out, result = finished_run
    assert result.finished and result.step == 2 and len(result.losses) == 2
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"checkpoint.pth", "encoder_resnet18.safetensors", "metrics.jsonl", "loss_curve.png", "config.yaml",
            "reconstructions/epoch_0001.png"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert not [n for n in names if n.endswith(".tmp")]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "wd", "grad_norm", "images_per_sec", "data_s",
                            "compute_s", "data_wait"}
    assert Image.open(out / "reconstructions" / "epoch_0001.png").size[0] > 100


def test_checkpoint_holds_plain_resumable_state_readable_without_pickle(finished_run):
    out, _ = finished_run
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "sparse-mim/pretrain-v1" and ckpt["arch"] == "resnet18"
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert ckpt["config"]["train"]["batch_size"] == 4 and isinstance(ckpt["config"], dict)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert {"encoder.conv1.weight", "mask_tokens.0", "decoder.head.weight"} & set(ckpt["model"])
    assert {"torch", "cuda", "numpy", "python", "sampler"} <= set(ckpt["rng"])
    assert ckpt["rng"]["sampler"]["steps_per_epoch"] == 2 and ckpt["optimizer"]["state"]


def test_encoder_export_has_timm_keys_and_loads_into_timm(finished_run):
    out, _ = finished_run
    path = out / "encoder_resnet18.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["arch"] == "resnet18"
    weights = load_file(str(path))
    model = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert torch.equal(weights["conv1.weight"], ckpt["model"]["encoder.conv1.weight"])


def test_resuming_with_another_model_is_refused_and_the_checkpoint_kept(finished_run):
    out, _ = finished_run
    before = hashlib.sha256((out / "checkpoint.pth").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="pretrained with model=resnet18"):
        pretrain(compose_config([*TINY, "model=resnet34", f"output_dir={out}", "train.epochs=3",
                                 f"data.path={load_checkpoint(out / 'checkpoint.pth')['config']['data']['path']}"]))
    with pytest.raises(ConfigError, match="train.batch_size"):
        pretrain(compose_config([*TINY, "train.batch_size=8", f"output_dir={out}", "train.epochs=3",
                                 f"data.path={load_checkpoint(out / 'checkpoint.pth')['config']['data']['path']}"]))
    assert hashlib.sha256((out / "checkpoint.pth").read_bytes()).hexdigest() == before


def test_nan_loss_stops_naming_step_and_epoch_and_keeps_the_last_good_checkpoint(images, tmp_path, monkeypatch):
    real_forward = SparK.forward
    calls = []

    def forward(self, images, active=None):
        out = real_forward(self, images, active)
        if self.training:
            calls.append(1)
            if len(calls) == 2:  # one step per epoch: step 2 is epoch 2
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SparK, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 \(epoch 2\)"):
        pretrain(_config(images, out, "train.batch_size=8", "train.epochs=3"))
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 1  # epoch 1's, not overwritten
    assert [r["step"] for r in metrics(out)] == [1]


def test_unreadable_images_are_counted_as_distinct_files_once_per_epoch_and_named(images, tmp_path, capsys):
    data = tmp_path / "data"
    make_images(data, 8)
    for name in ("img_003.png", "img_004.png"):  # consecutive: item 3 falls back past 4 to 5
        (data / name).write_bytes(b"broken")
    pretrain(_config(data, tmp_path / "run", "train.batch_size=8", "train.epochs=2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    names = f"{data / 'img_003.png'}, {data / 'img_004.png'}"
    assert lines == [f"epoch {e}: skipped 2 unreadable image(s), each replaced by the next readable one: {names}"
                     for e in (1, 2)]


def test_a_kill_between_checkpoint_and_export_is_repaired_by_the_rerun(images, tmp_path, monkeypatch, capsys):
    """Fault injected between the two writes of the final save: the checkpoint is at step 2, the
    export still at step 1. The rerun finds the run finished and re-exports from the checkpoint."""
    from sparse_mim.train import checkpoint as checkpoint_module
    real_save_encoder = checkpoint_module.save_encoder

    def killed_at_step_2(encoder, path, arch, step=None):
        if step == 2:
            raise KeyboardInterrupt("killed between the checkpoint and the export")
        return real_save_encoder(encoder, path, arch, step)

    monkeypatch.setattr(checkpoint_module, "save_encoder", killed_at_step_2)
    out = tmp_path / "run"
    config = _config(images, out, "train.batch_size=8", "train.epochs=2")  # 1 step per epoch
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    export = out / "encoder_resnet18.safetensors"
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 2 and export_step(export) == 1
    monkeypatch.undo()
    capsys.readouterr()

    result = pretrain(config)
    printed = capsys.readouterr().out
    assert result.finished and result.losses == [] and export_step(export) == 2
    assert "re-exported encoder_resnet18.safetensors from the checkpoint at step 2 (the export was from step 1)" in printed
    assert "1 step per epoch" in printed and "at step 2 (end of epoch 2)" in printed
    ckpt = load_checkpoint(out / "checkpoint.pth")
    weights = load_file(str(export))
    assert weights.keys() == {k.removeprefix("encoder.") for k in ckpt["model"] if k.startswith("encoder.")}
    assert all(torch.equal(v, ckpt["model"][f"encoder.{k}"]) for k, v in weights.items())


def test_a_start_removes_the_temporaries_of_killed_saves_and_only_those(finished_run, capsys):
    out, _ = finished_run
    ours = [out / ".checkpoint.pth.0123456789ab.tmp", out / ".encoder_resnet18.safetensors.ba9876543210.tmp"]
    theirs = [out / ".notes.tmp", out / "draft.0123456789ab.tmp", out / ".checkpoint.pth.xyz.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"left over")
    config = load_checkpoint(out / "checkpoint.pth")["config"]
    pretrain(_config(config["data"]["path"], out, "train.epochs=1"))
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert "removed 2 temporary file(s) of interrupted saves" in capsys.readouterr().out
    for path in theirs:
        path.unlink()


def test_exports_get_the_mode_of_other_outputs(finished_run):
    out, _ = finished_run
    mode = (out / "checkpoint.pth").stat().st_mode & 0o777
    assert (out / "encoder_resnet18.safetensors").stat().st_mode & 0o777 == mode
    assert mode & 0o044  # group/others may read, as the umask allows (not the library's 0600)


def test_output_dir_that_is_a_file_is_a_config_error(images, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="output_dir is a file, not a folder"):
        pretrain(_config(images, path))
    with pytest.raises(ConfigError, match="output_dir's parent .* is a file"):
        pretrain(_config(images, path / "run"))


def test_max_steps_sizes_warmup_and_cosine_to_the_run(images, tmp_path):
    """20 epochs of 2 steps with 5 warmup epochs, cut to 4 steps: warmup is 4 * 5/20 = 1 step, the
    cosine reaches its end (a thousandth of the peak) at step 4."""
    result = pretrain(_config(images, tmp_path / "run", "train.epochs=20", "train.warmup_epochs=5",
                              "train.max_steps=4"))
    peak = 0.05 * 4 / 256
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert result.total_steps == 4 and len(lrs) == 4
    assert lrs[0] == pytest.approx(0.005 * peak) and lrs[1] == pytest.approx(peak)
    assert lrs[3] == pytest.approx(0.001 * peak)


def test_first_ctrl_c_says_the_run_stops_after_this_step(capfd):
    from sparse_mim.runtime.run_control import StopRequest

    with StopRequest(announce=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
    assert "stopping after this step and saving a checkpoint (Ctrl-C again to abort)" in capfd.readouterr().err


def test_loss_curve_of_a_short_run_names_loss_once(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from sparse_mim.runtime.monitor import save_loss_curve
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "loss": {1.0 / i}}}\n' for i in (1, 2, 3)))
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    save_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png", "short")
    assert figures[0].axes[0].get_legend_handles_labels()[1] == ["loss"]


# -- resume (subprocesses) ----------------------------------------------------------------------
RESUME_ARGS = ("train.epochs=5", "train.deterministic=true")  # 10 steps, checkpoints at steps 2, 4, ...


@pytest.fixture(scope="module")
def uninterrupted_losses(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run(pretrain_cmd(*TINY, *RESUME_ARGS, f"data.path={images}", f"output_dir={out}"))
    assert proc.returncode == 0, proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    return [r["loss"] for r in rows]


def _start_and_stop_after(cmd, out, step, send):
    """Start ``cmd``, wait until metrics.jsonl shows ``step``, then ``send(process)``."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(out)):
            send(proc)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout + stderr


def test_killed_run_resumes_from_its_last_checkpoint_with_identical_losses(images, tmp_path, uninterrupted_losses):
    out = tmp_path / "run"
    cmd = pretrain_cmd(*TINY, *RESUME_ARGS, f"data.path={images}", f"output_dir={out}")
    code, log = _start_and_stop_after(cmd, out, 3, lambda p: p.kill())  # epoch 2 is running
    assert code == -signal.SIGKILL, log
    saved = load_checkpoint(out / "checkpoint.pth")["step"]
    assert saved in (2, 4, 6, 8), "the kill must land after a checkpoint and before the end"

    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {out / 'checkpoint.pth'} at step {saved}" in proc.stdout + proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == uninterrupted_losses


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_rerun_continues_exactly(
        images, tmp_path, uninterrupted_losses):
    out = tmp_path / "run"
    cmd = pretrain_cmd(*TINY, *RESUME_ARGS, f"data.path={images}", f"output_dir={out}")
    code, log = _start_and_stop_after(cmd, out, 3, lambda p: p.send_signal(signal.SIGTERM))
    assert code == 128 + signal.SIGTERM, log
    saved = load_checkpoint(out / "checkpoint.pth")["step"]
    assert 3 <= saved < 10 and saved == metrics(out)[-1]["step"]

    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert [r["loss"] for r in metrics(out)] == uninterrupted_losses


# -- the command --------------------------------------------------------------------------------
def test_cli_pretrain_with_defaults_writes_checkpoint_export_metrics_and_pictures(tmp_path):
    out = tmp_path / "run"
    proc = run([console_script(), "pretrain", "train.max_steps=3", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint.pth", "encoder_resnet18.safetensors", "metrics.jsonl", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert list((out / "reconstructions").glob("*.png"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    proc = run(pretrain_cmd("data.img_size=100", f"output_dir={tmp_path / 'run'}"))
    assert proc.returncode == 2
    assert "sparse-mim pretrain: error:" in proc.stderr and "multiple of 32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_the_commands():
    from sparse_mim.cli import main

    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graph_is_refused_without_cuda_or_with_ddp_gradient_sync(images, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="needs a CUDA device") as err:
        pretrain(_config(images, tmp_path / "run", "train.cuda_graph=true", "train.grad_sync=ddp"))
    assert "not ddp" in str(err.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.grad_sync must be auto, ddp or allreduce"):
        pretrain(_config(images, tmp_path / "run", "train.grad_sync=nccl"))


def test_grad_sync_auto_averages_after_backward_exactly_when_the_encoder_is_graphed():
    from sparse_mim.train.config import resolve_grad_sync
    assert resolve_grad_sync({"cuda_graph": True, "grad_sync": "auto"}) == "allreduce"
    assert resolve_grad_sync({"cuda_graph": False, "grad_sync": "auto"}) == "ddp"
    assert resolve_grad_sync({"cuda_graph": False, "grad_sync": "allreduce"}) == "allreduce"


def test_cuda_graph_runs_every_training_step_through_the_graphed_forward(images, tmp_path, monkeypatch):
    """The wiring: with train.cuda_graph the trainer's steps go through GraphedSparK (faked eagerly here)."""
    from sparse_mim.train import trainer as trainer_module
    calls = []

    class EagerStandIn:  # what GraphedSparK returns, computed eagerly (no CUDA here)
        def __init__(self, spark):
            self.spark = spark

        def __call__(self, images, active):
            calls.append(tuple(images.shape))
            return self.spark(images, active)

    monkeypatch.setattr(trainer_module, "GraphedSparK", EagerStandIn)
    monkeypatch.setattr("sparse_mim.train.config._cuda_available", lambda: True)
    out = tmp_path / "run"
    pretrain(_config(images, out, "train.batch_size=8", "train.epochs=2", "train.cuda_graph=true"))
    assert len(calls) == 2 and [r["step"] for r in metrics(out)] == [1, 2]


# -- any timm model ---------------------------------------------------------------------------------
def test_a_timm_model_without_stochastic_depth_pretrains_and_says_the_rate_is_ignored(images, tmp_path):
    out = tmp_path / "run"
    proc = run(pretrain_cmd(*TINY, f"data.path={images}", f"output_dir={out}", "model=dla34", "drop_path_rate=0.1",
                            "train.epochs=2", "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("dla34 has no stochastic depth") == 1 and "drop_path_rate=0.1 is ignored" in proc.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert (out / "encoder_dla34.safetensors").exists()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_sparsify_prefixed_run_converts_like_timms_model_with_the_same_weights(images, tmp_path, one_thread):
    import pickle

    from sparse_mim.convert import to_detectron2
    from sparse_mim.convert.cli import main as convert_main

    out = tmp_path / "run"
    pretrain(_config(images, out, "model=sparsify:resnet50", "train.max_steps=1"))
    export = out / "encoder_sparsify-resnet50.safetensors"
    assert export.exists() and not any(":" in p.name for p in out.iterdir())
    timm_model = timm.create_model("resnet50", pretrained=False)
    timm_model.load_state_dict(load_file(str(export)), strict=False)
    to_detectron2({k: v for k, v in timm_model.state_dict().items() if not k.startswith("fc.")}, "resnet50",
                  tmp_path / "timm.pkl")
    expected = pickle.loads((tmp_path / "timm.pkl").read_bytes())["model"]
    for i, arch in enumerate((["--arch", "resnet50"], [])):
        target = tmp_path / f"ours{i}.pkl"
        assert convert_main([str(out / "checkpoint.pth"), "--to", "detectron2", *arch, "--out", str(target)]) == 0
        written = pickle.loads(target.read_bytes())["model"]
        assert written.keys() == expected.keys()
        assert all((written[k] == expected[k]).all() for k in expected)
    assert convert_main([str(export), "--to", "timm", "--out", str(tmp_path / "timm.safetensors")]) == 0


def _bar_states(stderr: str) -> list:
    """(steps done, loss shown) of every progress bar drawing in ``stderr``."""
    import re

    return [(int(m[1]), float(m[2])) for m in re.finditer(r"\| (\d+)/\d+ \[[^\]]*loss=([0-9.]+)", stderr)]


def test_the_progress_bar_shows_each_steps_own_loss_to_the_end(images, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(_config(images, out, "train.max_steps=3"))
    shown = _bar_states(capsys.readouterr().err)
    logged = {r["step"]: round(r["loss"], 4) for r in metrics(out)}
    assert shown and shown[-1][0] == 3
    assert all(loss == logged[step] for step, loss in shown if step > 0), (shown, logged)


def test_loss_curve_and_reconstruction_are_written_with_every_checkpoint(images, tmp_path, monkeypatch):
    """4 steps per epoch, a checkpoint every 2 steps; the run breaks at step 3, before any epoch end."""
    from sparse_mim.runtime.monitor import Monitor

    log_step = Monitor.log_step

    def breaks_at_step_3(self, metrics, write=True):
        if metrics["step"] == 3:
            raise RuntimeError("killed at step 3")
        log_step(self, metrics, write)

    monkeypatch.setattr(Monitor, "log_step", breaks_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed at step 3"):
        pretrain(_config(images, out, "train.batch_size=2", "train.max_steps=3", "train.save_every_steps=2"))
    assert (out / "loss_curve.png").stat().st_size > 0
    assert [p.name for p in (out / "reconstructions").iterdir()] == ["step_0000002.png"]


def test_the_effective_mask_ratio_is_printed_once_at_the_start(images, tmp_path, capsys):
    pretrain(_config(images, tmp_path / "run", "train.max_steps=1", "mask_ratio=0.6"))
    printed = capsys.readouterr().out
    assert printed.count("mask: ") == 1
    assert "mask: 2 of 4 patches hidden per image (effective ratio 0.50; asked 0.60)" in printed
