"""Fine-tuning, linear probe and kNN: tiny generated class folders, a few steps each."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from helpers.runs import env, metrics, run
from sparse_mim.finetune import (LabelledImages, compose_finetune_config, finetune, knn_classify, label_subset,
                                 load_finetune_checkpoint)
from sparse_mim.train import ConfigError
from sparse_mim.data import DataError
from sparse_mim.convert import ConversionError

CLASSES = ("apple", "berry", "cherry")


def _class_images(folder, label: int, count: int, size: int = 40, seed: int = 0):
    """Images of class ``label``: a smooth random texture tinted by the class (separable by colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, label])
    for i in range(count):
        coarse = rng.integers(0, 90, (size // 8, size // 8, 3)).astype(np.uint8)
        coarse[..., label] += 160
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{label}_{i:02d}.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    for label, name in enumerate(CLASSES):
        _class_images(root / "train" / name, label, 8)
        _class_images(root / "val" / name, label, 4, seed=1)
    return root


TINY = ("model=resnet18", "data.img_size=32", "train.batch_size=6", "train.epochs=2", "train.warmup_epochs=1",
        "data.eval_batch_size=12", "augment.crop_scale=[0.5,1.0]")


def _cfg(dataset, out, *overrides):
    return compose_finetune_config([*TINY, f"data.path={dataset}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def pretrained_export(tmp_path_factory):
    """A timm-keyed encoder file, as `sparse-mim pretrain` exports it."""
    from safetensors.torch import save_file
    torch.manual_seed(3)
    model = timm.create_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "encoder_resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"arch": "resnet18"})
    return path, model.state_dict()


# -- label subsets -------------------------------------------------------------------------------
def test_label_subset_is_deterministic_and_class_balanced():
    labels = [c for c in range(4) for _ in range(50)]
    first = label_subset(labels, 0.1, seed=7)
    assert first == label_subset(labels, 0.1, seed=7)
    assert first != label_subset(labels, 0.1, seed=8)
    assert np.bincount(np.asarray(labels)[first]).tolist() == [5, 5, 5, 5]
    assert label_subset(labels, 1.0, seed=7) == list(range(200))
    assert len(label_subset([0, 1], 0.01, seed=0)) == 2  # at least one image per class


# -- unreadable images ---------------------------------------------------------------------------
def test_an_unreadable_labelled_image_is_replaced_by_the_next_readable_one_with_its_label(tmp_path):
    _class_images(tmp_path, label=2, count=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images = LabelledImages([(str(broken), 0), (str(tmp_path / "2_00.png"), 2)], lambda image: image.size)
    assert images[0] == ((40, 40), 2, 0)
    assert images[1] == ((40, 40), 2, -1)


def test_labelled_images_none_readable_is_an_error_naming_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable image in 1 images: .*broken.png"):
        LabelledImages([(str(broken), 0)], lambda image: image)[0]


# -- kNN ----------------------------------------------------------------------------------------
def test_knn_on_a_separable_toy_set_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 5
    train_labels = torch.arange(5).repeat_interleave(30)
    train = centres[train_labels] + torch.randn(150, 16, generator=g)
    val_labels = torch.arange(5).repeat_interleave(10)
    val = centres[val_labels] + torch.randn(50, 16, generator=g)
    scores = knn_classify(train, train_labels, val, 5, k=20, temperature=0.07)
    assert (scores.argmax(1) == val_labels).all()


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_classify(train, labels, torch.tensor([[1.0, 0.0]]), 2, k=2, temperature=0.5)
    assert torch.allclose(scores, torch.tensor([[np.exp(1 / 0.5), np.exp(0.6 / 0.5)]], dtype=torch.float64))


def test_knn_mode_writes_a_summary_with_accuracies_and_a_confusion_matrix(dataset, tmp_path, pretrained_export):
    out = tmp_path / "knn"
    result = finetune(_cfg(dataset, out, "mode=knn", f"weights={pretrained_export[0]}"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary and summary["mode"] == "knn"
    assert summary["images"] == 12 and summary["train_images"] == 24
    assert set(summary["per_class_top1"]) == set(CLASSES)
    assert np.asarray(summary["confusion"]).sum() == 12
    assert 0 <= summary["top1"] <= summary["top5"] == 100.0
    assert (out / "confusion.png").stat().st_size > 0


# -- fine-tuning and linear probing ---------------------------------------------------------------
def test_finetune_trains_all_weights_from_the_pretrained_file_and_reports(dataset, tmp_path, pretrained_export):
    out = tmp_path / "ft"
    result = finetune(_cfg(dataset, out, f"weights={pretrained_export[0]}"))
    assert result.finished and result.step == 8  # 24 images / 6 per step x 2 epochs
    ckpt = load_finetune_checkpoint(out / "checkpoint.pth")
    trained = ckpt["model"]
    assert not torch.equal(trained["conv1.weight"], pretrained_export[1]["conv1.weight"])
    assert trained["fc.weight"].shape == (3, 512)
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "val_top1" in r] == [4, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["wall_time_s"] > 0 and summary["weights"] == str(pretrained_export[0])
    for name in ("confusion.png", "loss_curve.png", "config.yaml"):
        assert (out / name).is_file()


def test_the_loaded_weights_are_the_files_weights(dataset, tmp_path, pretrained_export):
    from sparse_mim.finetune import build_classifier
    model, report = build_classifier("resnet18", 3, str(pretrained_export[0]))
    for key, value in pretrained_export[1].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report.fresh == ["fc.bias", "fc.weight"]


def test_linear_probe_leaves_backbone_weights_and_bn_statistics_unchanged(dataset, tmp_path, pretrained_export):
    out = tmp_path / "linear"
    finetune(_cfg(dataset, out, "mode=linear", f"weights={pretrained_export[0]}", "train.base_lr=0.5"))
    trained = load_finetune_checkpoint(out / "checkpoint.pth")["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone.keys() == pretrained_export[1].keys()
    for key, value in pretrained_export[1].items():  # running_mean/var and num_batches_tracked included
        assert torch.equal(backbone[key], value), key
    assert trained["head.0.running_mean"].abs().sum() > 0  # the probe's own BN did learn statistics
    assert "head.0.weight" not in trained  # BN without affine


def test_scratch_arm_uses_random_init_seeded_by_train_seed(dataset, tmp_path):
    a = finetune(_cfg(dataset, tmp_path / "a", "mode=knn", "train.seed=1")).summary
    b = finetune(_cfg(dataset, tmp_path / "b", "mode=knn", "train.seed=1")).summary
    assert a["confusion"] == b["confusion"] and a["weights"] is None


def test_a_checkpoint_of_another_architecture_is_a_clear_error(dataset, tmp_path, pretrained_export):
    with pytest.raises(ConversionError, match="resnet18.*resnet50|resnet50.*resnet18"):
        finetune(_cfg(dataset, tmp_path / "x", "model=resnet50", f"weights={pretrained_export[0]}"))


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("mode=probe", "mode must be one of finetune, linear, knn"),
    ("data.label_fraction=0", r"data.label_fraction must lie in \(0, 1\]"),
    ("data.label_fraction=1.5", r"data.label_fraction must lie in \(0, 1\]"),
    ("weights=/nonexistent.pth", "weights: no file"),
    ("model=not_a_model", "not a timm model name"),
])
def test_bad_settings_are_refused_naming_them(dataset, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        finetune(_cfg(dataset, tmp_path / "x", override))


def test_missing_val_folder_is_refused(tmp_path):
    _class_images(tmp_path / "d" / "train" / "a", 0, 2)
    with pytest.raises(DataError, match="has no val/ folder"):
        finetune(_cfg(tmp_path / "d", tmp_path / "x"))


def test_different_class_folders_in_train_and_val_are_refused(tmp_path):
    _class_images(tmp_path / "d" / "train" / "a", 0, 2)
    _class_images(tmp_path / "d" / "train" / "b", 1, 2)
    _class_images(tmp_path / "d" / "val" / "a", 0, 2)
    _class_images(tmp_path / "d" / "val" / "c", 2, 2)
    with pytest.raises(DataError, match=r"different class folders \(only in train: \['b'\]; only in val: \['c'\]"):
        finetune(_cfg(tmp_path / "d", tmp_path / "x"))


def test_cli_reports_bad_input_in_one_line(dataset, tmp_path):
    proc = run(["python", "-m", "sparse_mim", "finetune", f"data.path={dataset}", "mode=probe",
                f"output_dir={tmp_path / 'x'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sparse-mim finetune: error: invalid config" in proc.stderr


# -- resume -------------------------------------------------------------------------------------
def test_killed_finetune_resumes_from_its_checkpoint_with_identical_losses(dataset, tmp_path):
    args = ["python", "-m", "sparse_mim", "finetune", *TINY, "train.epochs=3", f"data.path={dataset}"]
    uninterrupted = tmp_path / "uninterrupted"
    assert run([*args, f"output_dir={uninterrupted}"]).returncode == 0
    expected = [r["loss"] for r in metrics(uninterrupted) if "loss" in r]

    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"output_dir={out}"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 6 for r in metrics(out)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_finetune_checkpoint(out / "checkpoint.pth")["step"]
    assert saved in (4, 8), "the kill must land after a checkpoint and before the end"

    rerun = run([*args, f"output_dir={out}"])
    assert rerun.returncode == 0, rerun.stderr
    assert f"at step {saved} of 12" in rerun.stdout + rerun.stderr
    assert [r["loss"] for r in metrics(out) if "loss" in r] == expected


def test_finetune_resume_refuses_a_training_set_that_changed_size(tmp_path):
    data = tmp_path / "data"
    for label, name in enumerate(CLASSES):
        _class_images(data / "train" / name, label, 8)
        _class_images(data / "val" / name, label, 2, seed=1)
    out = tmp_path / "run"
    finetune(_cfg(data, out, "train.epochs=1"))
    before = (out / "checkpoint.pth").read_bytes()
    _class_images(data / "train" / CLASSES[0], 0, 14)  # 6 more images of the first class: 30 in all
    with pytest.raises(ConfigError, match=r"cannot resume .*dataset_size: 24 -> 30; steps_per_epoch: 4 -> 5\)"
                                          r"\. Restore them, or use a new output_dir"):
        finetune(_cfg(data, out, "train.epochs=1"))
    assert (out / "checkpoint.pth").read_bytes() == before


# -- the optimisation step -----------------------------------------------------------------------
def test_a_nan_gradient_stops_finetuning_in_one_line_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch,
                                                                                    capsys):
    from sparse_mim.cli import main
    from sparse_mim.finetune import run as run_module

    real_build_model = run_module._build_model

    def nan_gradient_from_step_5(config, num_classes):
        model, note = real_build_model(config, num_classes)
        calls = []

        def poison(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) >= 5 else grad

        model.fc.weight.register_hook(poison)  # the loss stays finite; only the gradient is NaN
        return model, note

    monkeypatch.setattr(run_module, "_build_model", nan_gradient_from_step_5)
    out = tmp_path / "run"
    code = main(["finetune", *TINY, f"data.path={dataset}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == ("sparse-mim finetune: error: the gradient norm is nan at step 5 (epoch 2); "
                                    "training stopped before the update, and the last checkpoint was left as it "
                                    "was. Resume from it with a lower train.base_lr, or check the data")
    assert load_finetune_checkpoint(out / "checkpoint.pth")["step"] == 4  # epoch 1's, not overwritten
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_finetune_metrics_log_the_data_wait_of_every_step(dataset, tmp_path):
    out = tmp_path / "run"
    finetune(_cfg(dataset, out, "train.epochs=1"))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["data_s"] >= 0 and r["compute_s"] > 0
        assert r["data_wait"] == pytest.approx(r["data_s"] / (r["data_s"] + r["compute_s"]))


# -- torchrun -----------------------------------------------------------------------------------
def test_torchrun_finetune_matches_one_process_and_gathers_the_whole_val_split(dataset, tmp_path):
    from test_distributed import torchrun

    args = (*TINY, "train.epochs=1", "train.warmup_epochs=0", f"data.path={dataset}")
    one = run(["python", "-m", "sparse_mim", "finetune", *args, f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-4000:]
    two = torchrun("-m", "sparse_mim", "finetune", *args, f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = ([r for r in metrics(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["images"] == 12 and np.asarray(s2["confusion"]).sum() == 12
    assert s2["top1"] == pytest.approx(s1["top1"], abs=100 / 12 + 1e-9)  # at most one image may flip
    assert not any(k.startswith("module.") for k in load_finetune_checkpoint(tmp_path / "two" / "checkpoint.pth")["model"])


def test_a_warmup_not_shorter_than_the_run_is_cut_to_half_of_it_and_said(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    result = finetune(_cfg(dataset, out, "train.epochs=1", "train.warmup_epochs=3"))
    assert result.finished
    assert ("train.warmup_epochs=3 is not shorter than the run (train.epochs=1): warming up for 0.5 epochs "
            "(half the run) instead") in capsys.readouterr().out
    lrs = [r["lr"] for r in metrics(out) if "lr" in r]  # 4 steps: 2 of warmup from 1e-6, then the cosine
    assert lrs[0] == pytest.approx(1e-6) and lrs[0] < lrs[1] and lrs[3] < lrs[2]


def test_the_linear_probe_reports_its_new_head_as_initialised_fresh(pretrained_export):
    from sparse_mim.finetune.run import _build_model

    config = {"model": "resnet18", "weights": str(pretrained_export[0]), "mode": "linear",
              "train": {"drop_path_rate": 0.0}}
    _, note = _build_model(config, 3)
    assert note.endswith("initialised fresh: head.1.weight, head.1.bias")
