"""Two processes under torchrun (gloo, SyncBN) compute what one process computes on the same global
batch: the same loss, the same gradients on every rank, and the same training run end to end."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_step import build_model, global_batch
from helpers.runs import REPO, TINY, env, make_images, metrics, run

from sparse_mim.train import load_checkpoint

HELPERS = Path(__file__).resolve().parent / "helpers"


def torchrun(*args: str, nproc: int = 2):
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    extra = dict(env(), PYTHONPATH=str(HELPERS.parent))
    return subprocess.run(cmd, cwd=REPO, env=extra, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_step(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "step.pt"
    proc = torchrun(str(HELPERS / "ddp_step.py"), str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def single_step():
    model = build_model()
    images, active = global_batch()
    loss = model(images, active).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    stats = {n: b for n, b in model.named_buffers() if "running_" in n}
    return loss.detach(), grads, stats


def test_every_rank_holds_identical_gradients_after_a_step(ddp_step):
    assert ddp_step["world"] == 2
    first, second = ddp_step["grads"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_batchnorms_are_synchronised_across_ranks(ddp_step):
    assert ddp_step["norms"] == ["SparseSyncBatchNorm"]


def test_two_process_loss_and_gradients_equal_one_process_on_the_global_batch(ddp_step, single_step):
    loss, grads, _ = single_step
    assert ddp_step["loss"].dtype == torch.float64
    assert torch.allclose(ddp_step["loss"], loss, rtol=0, atol=1e-12)
    ddp_grads = ddp_step["grads"][0]
    assert ddp_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_synced_running_statistics_equal_one_process_on_the_global_batch(ddp_step, single_step):
    _, _, stats = single_step
    assert ddp_step["stats"].keys() == stats.keys()
    for name, value in stats.items():
        torch.testing.assert_close(ddp_step["stats"][name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_torchrun_pretraining_matches_a_single_process_run(tmp_path):
    """Both gradient averagings: DDP's, and the flat all-reduce after backward that a CUDA-graphed
    encoder uses under torchrun (train.grad_sync=allreduce; the graph itself needs a GPU)."""
    images = tmp_path / "images"
    make_images(images, 8)
    args = (*TINY, f"data.path={images}", "train.max_steps=3", "train.deterministic=true")
    single = run([sys.executable, "-m", "sparse_mim", "pretrain", *args, f"output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-4000:]
    one = metrics(tmp_path / "one")
    for grad_sync in ("ddp", "allreduce"):
        out = tmp_path / grad_sync
        double = torchrun("-m", "sparse_mim", "pretrain", *args, f"train.grad_sync={grad_sync}", f"output_dir={out}")
        assert double.returncode == 0, double.stderr[-4000:]
        assert "FutureWarning" not in double.stderr, double.stderr[-4000:]

        two = metrics(out)
        assert [r["step"] for r in two] == [1, 2, 3]
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), grad_sync
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), grad_sync
            assert b["lr"] == a["lr"]
        ckpt = load_checkpoint(out / "checkpoint.pth")
        assert not any(k.startswith("module.") for k in ckpt["model"])
        assert len(ckpt["rng"]["other_ranks"]) == 1
    ddp, allreduce = (load_checkpoint(tmp_path / s / "checkpoint.pth")["model"] for s in ("ddp", "allreduce"))
    for name, value in ddp.items():
        torch.testing.assert_close(allreduce[name], value, rtol=1e-6, atol=1e-9, msg=name)
