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

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers through /proc")

#: Generous: the test takes ~30 s on a quiet 2-core machine, 50-80 s at load 4, more on a busier one.
TIMEOUT = 900

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


def _steps_logged(output_dir: Path) -> list:
    try:
        return [r["step"] for r in metrics(output_dir)]
    except (OSError, ValueError):  # not written yet, or a line half written
        return []


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines() if "it/s" not in line)[-6000:]  # no progress bars


def _launch(output_dir: Path, images: Path, log) -> subprocess.Popen:
    # the log goes to a file, not a pipe: a full pipe would stall the workers; a session of its own
    # lets a test that gives up kill torchrun's workers with it
    return subprocess.Popen(_torchrun(output_dir, images), cwd=REPO, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(launcher: subprocess.Popen, deadline: float, log: Path) -> int:
    try:
        return launcher.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running after {TIMEOUT} s:\n" + _tail(log))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_bit_identical(images, tmp_path):
    uninterrupted, uninterrupted_log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
    with uninterrupted_log.open("w") as log:
        code = _wait(_launch(uninterrupted, images, log), time.monotonic() + TIMEOUT, uninterrupted_log)
    assert code == 0, f"the uninterrupted run failed (exit {code}):\n" + _tail(uninterrupted_log)

    out, killed_log = tmp_path / "killed", tmp_path / "killed.log"
    with killed_log.open("w") as log:
        launcher, killed = _launch(out, images, log), None
        deadline = time.monotonic() + TIMEOUT
        while killed is None and launcher.poll() is None and time.monotonic() < deadline:
            if any(step >= 3 for step in _steps_logged(out)):  # so the checkpoint of step 2 exists
                killed = _worker_of_rank(launcher.pid, 1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        code = _wait(launcher, deadline, killed_log)
    text = _tail(killed_log)
    assert killed is not None, "rank 1 was never seen running after the first step checkpoint:\n" + text
    assert code == 0, f"the restarted run did not finish by itself (exit {code}):\n{text}"
    assert launcher.returncode == 0, f"the restarted run did not finish (exit {launcher.returncode}):\n{text}"
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and "checkpoint" in resumed[0], ("the restarted group did not resume from a checkpoint "
                                                                   "(exactly once):\n" + text)

    assert [r["step"] for r in metrics(out)] == list(range(1, 9)), "metrics.jsonl is not one line per step"
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(uninterrupted)]
    ours = load_file(str(out / "encoder_resnet18.safetensors"))
    theirs = load_file(str(uninterrupted / "encoder_resnet18.safetensors"))
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} encoder tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


def _agree(port: int, world: int) -> list:
    """``_group_token`` of ranks 0..world-1, each in a thread with its own client of the store at ``port``."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    import torch.distributed as dist

    from sparse_mim.runtime.distributed import _group_token

    def rank(r: int) -> str:
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        return _group_token(client, r, world, timedelta(seconds=60))

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(rank, range(world)))


def test_a_restarted_group_agrees_on_a_new_token_despite_the_old_groups_keys():
    """torchrun keeps its store across restarts: the keys of the group before must not be read as
    this group's (that is what made gloo connect to the dead workers' ports)."""
    from datetime import timedelta

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    first = _agree(server.port, 3)
    assert len(set(first)) == 1
    second = _agree(server.port, 3)  # the same ranks again, on the same store, all keys of the first still there
    assert len(set(second)) == 1 and second[0] != first[0]
    server.set("hello/2", "a-nonce-nobody-waits-for")  # a rank that died after saying hello
    third = _agree(server.port, 3)
    assert len(set(third)) == 1 and third[0] not in (first[0], second[0])
