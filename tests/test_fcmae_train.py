"""FCMAE in the trainer: ``method=fcmae`` runs through the same pretraining command and writes the same
files; checkpoints go both ways (official FCMAE in through ``init_from``, the whole model out through
``convert --to minkowski``); the config refuses what cannot work and the preset holds the official recipe."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from sparse_mim.convert.cli import main as convert_main
from sparse_mim.fcmae import build_fcmae
from sparse_mim.train import ConfigError, compose_config
from sparse_mim.train.config import validate_config
from sparse_mim.train.init_from import INIT_LOG_NAME
from sparse_mim.train.optim import build_optimizer

from conftest import shared_fixture
from helpers.runs import console_script, make_images, metrics, run

FIXTURE, _SEARCHED = shared_fixture("fcmae_pretrain", "model.pt")
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="official FCMAE step fixture not found: no "
                                   f"shared/fixtures/fcmae_pretrain/model.pt in {', '.join(_SEARCHED)}")
FCMAE_TINY = ("method=fcmae", "model=convnextv2_atto", "data.img_size=64", "fcmae.decoder_embed_dim=32",
              "train.batch_size=4", "data.num_workers=0", "train.vis_images=2")


@pytest.fixture(scope="module")
def fcmae_run(tmp_path_factory):
    """A 3-step ``sparse-mim pretrain method=fcmae`` run on 8 tiny images."""
    root = tmp_path_factory.mktemp("fcmae")
    make_images(root / "images", 8, size=72)
    out = root / "run"
    proc = run([console_script(), "pretrain", *FCMAE_TINY, f"data.path={root / 'images'}", "train.max_steps=3",
                f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_cli_fcmae_run_writes_checkpoint_export_metrics_and_pictures(fcmae_run):
    out, _ = fcmae_run
    for name in ("checkpoint.pth", "encoder_convnextv2_atto.safetensors", "metrics.jsonl", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert list((out / "reconstructions").glob("*.png"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["method"] == "fcmae" and "mask_token" in ckpt["model"]


def test_fcmae_encoder_export_loads_into_timm_with_only_the_head_missing(fcmae_run):
    out, _ = fcmae_run
    model = timm.create_model("convnextv2_atto", pretrained=False)
    result = model.load_state_dict(load_file(out / "encoder_convnextv2_atto.safetensors"), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]


def test_convert_to_minkowski_writes_the_whole_official_fcmae_model(fcmae_run, tmp_path, capsys):
    out, _ = fcmae_run
    target = tmp_path / "fcmae_official.pth"
    assert convert_main([str(out / "checkpoint.pth"), "--to", "minkowski", "--out", str(target)]) == 0
    written = torch.load(target, weights_only=True)["model"]
    ours = build_fcmae("convnextv2_atto", decoder_embed_dim=32)
    ours.load_state_dict(torch.load(out / "checkpoint.pth", weights_only=True)["model"])
    # the official module's keys: encoder + mask_token + proj + decoder + pred, each exactly once
    assert sorted(written) == sorted(ours.official_names().values())
    assert written["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
    assert written["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    assert written["decoder.0.grn.gamma"].shape == (1, 1, 1, 128) and written["mask_token"].shape == (1, 32, 1, 1)
    # round trip: loading the written file reproduces every parameter
    back = build_fcmae("convnextv2_atto", decoder_embed_dim=32)
    assert back.load_official_state_dict(written) == ([], [])
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@needs_fixture
def test_written_layout_matches_the_official_model_key_by_key_and_shape_by_shape():
    official = torch.load(FIXTURE / "model.pt", weights_only=True)
    config = json.loads((FIXTURE / "config.json").read_text())
    ours = build_fcmae(depths=config["depths"], dims=config["dims"], decoder_depth=config["decoder_depth"],
                       decoder_embed_dim=config["decoder_embed_dim"]).double()
    assert ours.load_official_state_dict(official) == ([], [])
    from sparse_mim.convert.layouts.fcmae import ours_to_official_fcmae

    written = ours_to_official_fcmae(ours.state_dict())
    assert list(written) == list(official) or sorted(written) == sorted(official)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in official.items()}
    for key, value in official.items():
        assert torch.equal(written[key], value), key


def test_init_from_an_official_fcmae_checkpoint_continues_encoder_and_decoder(tmp_path):
    from sparse_mim.convert.layouts.fcmae import ours_to_official_fcmae
    from sparse_mim.train.init_from import init_from

    source = build_fcmae("convnextv2_atto", decoder_embed_dim=32)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "checkpoint-799.pth"  # as the official main_pretrain.py saves it (official layout)
    torch.save({"model": ours_to_official_fcmae(source.state_dict()), "epoch": 799}, path)
    model = build_fcmae("convnextv2_atto", decoder_embed_dim=32)
    report = init_from(model, path, "convnextv2_atto")
    assert report.loaded == {"encoder": len(model.encoder.state_dict()), "mask_token": 1, "proj": 2,
                             "decoder": 10, "pred": 2}
    assert report.fresh == []
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    report.write(tmp_path)
    assert json.loads((tmp_path / INIT_LOG_NAME).read_text())["loaded"]["decoder"] == 10


def test_adamw_takes_the_official_no_decay_groups():
    model = build_fcmae("convnextv2_atto", decoder_embed_dim=32)
    optimizer = build_optimizer(model, lr=0.0, weight_decay=0.05, kind="adamw")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    # official: decay unless 1-D or *.bias in the official model, so GRN gamma/beta (1, C) and the token decay
    assert {"mask_token", "encoder.stages.0.blocks.0.mlp.grn.weight", "encoder.stages.0.blocks.0.mlp.grn.bias",
            "encoder.stem.0.weight", "decoder.0.mlp.grn.bias"} <= decay
    assert not {"encoder.stem.0.bias", "encoder.stages.1.downsample.1.bias", "encoder.stem.1.weight"} & decay


@pytest.mark.parametrize("overrides,message", [
    (["method=fcmae", "model=resnet50"], "FCMAE pretrains ConvNeXt V2 encoders; model=resnet50 is not one"),
    (["method=mae"], "method must be one of spark, fcmae"),
    (["method=fcmae", "model=convnextv2_atto", "fcmae.grn=image"], "fcmae.grn must be one of sample, batch"),
    (["method=fcmae", "model=convnextv2_atto", "data.img_size=100"], "multiple of 32"),
    (["train.optimizer=sgd"], "train.optimizer must be null"),
])
def test_invalid_fcmae_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides))


def test_unknown_fcmae_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown setting fcmae.decoder_width"):
        compose_config(["fcmae.decoder_width=3"])


def test_fcmae_imagenet_preset_holds_the_official_recipe():
    cfg = compose_config(["preset=fcmae_imagenet", "data.path=/tmp"])
    assert cfg.method == "fcmae" and cfg.mask_ratio == 0.6 and cfg.data.img_size == 224
    assert list(cfg.data.crop_scale) == [0.2, 1.0]
    t = cfg.train
    assert (t.optimizer, list(t.betas), t.base_lr, t.batch_size, t.warmup_epochs) == ("adamw", [0.9, 0.95], 1.5e-4,
                                                                                     4096, 40)
    assert t.weight_decay == t.weight_decay_end == 0.05 and t.clip_grad is None
    assert (cfg.fcmae.decoder_depth, cfg.fcmae.decoder_embed_dim, cfg.fcmae.grn) == (1, 512, "batch")
    validate_config(cfg)


def test_settings_of_the_other_method_are_ignored_with_a_note_when_changed():
    from omegaconf import OmegaConf

    from sparse_mim.train.config import CONFIG_DIR, to_plain
    from sparse_mim.train.methods import unused_setting_notes

    defaults = to_plain(OmegaConf.load(CONFIG_DIR / "pretrain.yaml"))
    fcmae = to_plain(compose_config(["method=fcmae", "model=convnextv2_atto", "decoder_width=768"]))
    assert unused_setting_notes(fcmae, defaults) == ["decoder_width=768 is not used by method=fcmae (ignored)"]
    spark = to_plain(compose_config(["fcmae.grn=sample"]))
    assert unused_setting_notes(spark, defaults) == ["fcmae.grn=sample is not used by method=spark (ignored)"]
    assert unused_setting_notes(to_plain(compose_config([])), defaults) == []


def test_resuming_under_another_method_or_decoder_shape_is_refused():
    from sparse_mim.train.config import to_plain
    from sparse_mim.train.trainer import _check_resumable

    fcmae = to_plain(compose_config(["method=fcmae", "model=convnextv2_atto"]))
    data = {"dataset_size": 8, "steps_per_epoch": 2}
    ckpt = {"arch": "convnextv2_atto", "config": fcmae, "rng": {"sampler": dict(data)}}
    assert _check_resumable(ckpt, fcmae, "ckpt", data) == []
    for overrides, clash in ((["method=spark"], "method: 'fcmae' -> 'spark'"),
                             (["method=fcmae", "fcmae.decoder_embed_dim=64"], "fcmae.decoder_embed_dim: 512 -> 64")):
        new = to_plain(compose_config([*overrides, "model=convnextv2_atto"]))
        with pytest.raises(ConfigError, match=clash):
            _check_resumable(ckpt, new, "ckpt", data)
    # a SparK checkpoint from before method= existed resumes as SparK
    spark = to_plain(compose_config(["model=convnextv2_atto"]))
    old = {k: v for k, v in spark.items() if k not in ("method", "fcmae")}
    notes = _check_resumable({**ckpt, "config": old}, spark, "ckpt", data)
    assert not any(note.startswith("method") for note in notes)


def test_torchrun_fcmae_with_per_image_grn_equals_one_process_on_the_global_batch(tmp_path):
    """The same trainer under torchrun: with per-image GRN, two processes compute what one computes.
    (Batch GRN, the official, takes its norm per process, as ``MinkowskiGRN`` under DDP.)"""
    import sys

    from test_distributed import torchrun

    images = tmp_path / "images"
    make_images(images, 8, size=72)
    args = (*FCMAE_TINY, f"data.path={images}", "train.max_steps=2", "train.deterministic=true", "fcmae.grn=sample")
    single = run([sys.executable, "-m", "sparse_mim", "pretrain", *args, f"output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-4000:]
    double = torchrun("-m", "sparse_mim", "pretrain", *args, f"output_dir={tmp_path / 'two'}")
    assert double.returncode == 0, double.stderr[-4000:]
    one, two = ([(r["loss"], r["grad_norm"]) for r in metrics(tmp_path / n)] for n in ("one", "two"))
    assert len(one) == len(two) == 2
    assert [x for step in two for x in step] == pytest.approx([x for step in one for x in step], rel=1e-5)
