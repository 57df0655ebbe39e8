"""Step checkpoints: due every N steps / M minutes, the last K kept beside checkpoint.pth, and a resume
from the newest good one (a truncated newest file is reported and skipped, never loaded in part)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.runs import TINY, make_images, metrics
from safetensors.torch import load_file

from sparse_mim.runtime.atomic import atomic_write
from sparse_mim.runtime.rotation import (SaveSchedule, keep_previous, newest_good_checkpoint, prune,
                                         step_checkpoint_name, step_checkpoints)
from sparse_mim.train import ConfigError, compose_config, load_checkpoint, pretrain


def test_a_checkpoint_is_due_every_n_steps_or_after_m_minutes():
    now = [0.0]
    by_steps = SaveSchedule(3, None, clock=lambda: now[0])
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = SaveSchedule(None, 2.0, clock=lambda: now[0])
    now[0] = 119.0
    assert not by_time.due(1)
    now[0] = 120.0
    assert by_time.due(2)
    by_time.saved()
    now[0] = 200.0
    assert not by_time.due(3)
    assert not any(SaveSchedule(None, None).due(s) for s in range(1, 50))


def test_rotation_keeps_checkpoint_pth_newest_and_the_k_minus_1_before_it(tmp_path):
    for step in (1, 2, 3, 4):
        if step > 1:
            keep_previous(tmp_path, step - 1)
        atomic_write(tmp_path / "checkpoint.pth", lambda tmp, step=step: Path(tmp).write_text(f"step {step}"))
        prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", step_checkpoint_name(2),
                                                           step_checkpoint_name(3)]
    assert [s for s, _ in step_checkpoints(tmp_path)] == [3, 2]
    assert (tmp_path / step_checkpoint_name(3)).read_text() == "step 3"
    prune(tmp_path, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_resume_point_is_the_newest_readable_file_and_bad_ones_are_listed(tmp_path):
    def load(path):
        text = path.read_text()
        if not text.startswith("good"):
            raise ValueError("truncated")
        return {"text": text}

    assert newest_good_checkpoint(tmp_path, load) is None
    (tmp_path / "checkpoint.pth").write_text("bad")
    (tmp_path / step_checkpoint_name(6)).write_text("bad")
    (tmp_path / step_checkpoint_name(4)).write_text("good 4")
    (tmp_path / step_checkpoint_name(2)).write_text("good 2")
    point = newest_good_checkpoint(tmp_path, load)
    assert point.path.name == step_checkpoint_name(4) and point.checkpoint == {"text": "good 4"}
    assert point.skipped == ["checkpoint.pth: truncated", f"{step_checkpoint_name(6)}: truncated"]
    for name in (step_checkpoint_name(4), step_checkpoint_name(2)):
        (tmp_path / name).write_text("bad")
    with pytest.raises(ValueError, match="no usable checkpoint(.|\n)*move these files away"):
        newest_good_checkpoint(tmp_path, load)


@pytest.mark.parametrize("override, message", [
    ("train.save_every_steps=0", "save_every_steps must be null or an integer >= 1"),
    ("train.save_every_minutes=-1", "save_every_minutes must be null or a number > 0"),
    ("train.keep_checkpoints=0", "keep_checkpoints must be an integer >= 1"),
    ("data.wait_warning=1.5", "wait_warning must be null or a share in"),
])
def test_invalid_checkpoint_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(compose_config([*TINY, override, f"output_dir={tmp_path / 'run'}"]))


def test_step_checkpoints_rotate_and_a_truncated_newest_is_skipped_on_resume(tmp_path, capsys):
    images = tmp_path / "images"
    make_images(images, 8)
    out = tmp_path / "run"
    args = [*TINY, f"data.path={images}", f"output_dir={out}", "train.save_every_steps=1",
            "train.keep_checkpoints=2", "train.deterministic=true"]
    pretrain(compose_config([*args, "train.max_steps=3"]))  # saves at steps 1, 2 (epoch end), 3
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth", step_checkpoint_name(2)]
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 3
    step2 = load_checkpoint(out / step_checkpoint_name(2))
    assert step2["step"] == 2

    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 2])  # a torn newest file
    capsys.readouterr()
    result = pretrain(compose_config([*args, "train.max_steps=3"]))
    printed = capsys.readouterr().out
    assert "skipped an unusable checkpoint: checkpoint.pth: could not read the checkpoint" in printed
    assert result.resumed_from == 2 and result.step == 3
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 3
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    # the encoder export is the checkpoint.pth it sits beside
    export = load_file(str(out / "encoder_resnet18.safetensors"))
    model = load_checkpoint(out / "checkpoint.pth")["model"]
    assert all(torch.equal(v, model[f"encoder.{k}"]) for k, v in export.items())


def test_data_wait_warning_fires_above_the_threshold_and_then_stays_quiet_for_a_while():
    from sparse_mim.runtime.throughput import DataWaitWatch

    watch = DataWaitWatch(0.2, window=2, quiet=3)
    fast, slow = {"data_s": 0.1, "compute_s": 0.9}, {"data_s": 0.5, "compute_s": 0.5}
    assert [watch.add(fast) for _ in range(2)] == [None, None]
    assert watch.add(slow) is None
    warning = watch.add(slow)
    assert warning.startswith("input pipeline: 50% of the last 2 steps' time was spent waiting for data")
    assert "data.num_workers" in warning
    assert all(watch.add(slow) is None for _ in range(4))  # windows 2 and 3 after the warning: quiet
    assert watch.add(slow) is None and watch.add(slow) is not None
    assert all(DataWaitWatch(None, window=1).add(slow) is None for _ in range(3))
