"""Elastic restarts with torchrun's own machinery: a worker killed with SIGKILL after the first step
checkpoint makes torchrun restart the group, which resumes from the newest checkpoint and finishes
with the same encoder, bit for bit, as a run nobody interrupted (gloo, 2 processes, deterministic)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import REPO, TINY, env, make_images, metrics
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers through /proc"),
    # Not yet seen passing (issue 12): on a machine loaded 10x over its 2 cores the uninterrupted run
    # outlasted the timeout, and in a manual run the kill and torchrun's restart worked but the
    # restarted group's gloo init failed ("connectFullMesh ... Connection refused"). Unskip once it
    # passes on a quiet machine (it should take well under 90 s there).
    pytest.mark.skip(reason="elastic restart not yet verified (see the comment above)"),
]

# 16 images, global batch 4 over 2 processes: 4 steps per epoch, 8 in all; step checkpoints at 2, 6
ARGS = (*TINY, "train.epochs=2", "train.deterministic=true", "train.save_every_steps=2")


def _torchrun(output_dir: Path, images: Path) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--max-restarts=1", "-m", "sparse_mim", "pretrain", *ARGS, f"data.path={images}",
            f"output_dir={output_dir}"]


def _worker_of_rank(launcher: int, rank: int):
    """The pid of torchrun ``launcher``'s worker with ``RANK=rank``, or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("elastic_images")
    make_images(folder, 16)
    return folder


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_bit_identical(images, tmp_path):
    reference = subprocess.run(_torchrun(tmp_path / "uninterrupted", images), cwd=REPO, env=env(),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]

    out = tmp_path / "killed"
    launcher = subprocess.Popen(_torchrun(out, images), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and launcher.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(out)):  # checkpoint 2 exists
            killed = _worker_of_rank(launcher.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    log, _ = launcher.communicate(timeout=600)
    assert killed is not None, "rank 1 was never seen running after the first step checkpoint\n" + log[-4000:]
    assert launcher.returncode == 0, log[-4000:]
    assert "resuming from" in log and "at step " in log, log[-4000:]

    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "uninterrupted")]
    ours = load_file(str(out / "encoder_resnet18.safetensors"))
    theirs = load_file(str(tmp_path / "uninterrupted" / "encoder_resnet18.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
