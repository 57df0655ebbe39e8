"""``init_from``: a fresh run starts from weights in any format ``sparse-mim convert`` reads; wrong
architectures and shapes are errors listing the keys; resuming an existing output_dir wins."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from helpers.runs import TINY, make_images
from safetensors.torch import save_file

from sparse_mim.spark import build_spark
from sparse_mim.train import ConfigError, compose_config, pretrain
from sparse_mim.train.init_from import init_from

HEAD = ("densify_norms", "mask_tokens", "densify_projs", "decoder")


def _fresh(arch="resnet18", width=64):
    torch.manual_seed(123)
    return build_spark(arch, decoder_width=width)


def _source(arch="resnet18", width=64):
    """A SparK model whose every tensor differs from ``_fresh``'s."""
    torch.manual_seed(7)
    model = build_spark(arch, decoder_width=width)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    return model


def _assert_loaded(model, source, groups):
    ours, theirs = model.state_dict(), source.state_dict()
    for key, value in ours.items():
        same = torch.equal(value, theirs[key])
        if key.split(".", 1)[0] in groups:
            assert same, key
        elif value.is_floating_point() and value.numel() > 1 and "running_var" not in key:
            assert not same, f"{key} should have stayed fresh"


def _official_spark_layout(model, width, wrap):
    """The official SparK's ``SparK.state_dict(with_config=True)``: ``sparse_encoder.sp_cnn.*``,
    ``dense_decoder.dec.i.up_sample`` / ``.conv``, ``dense_decoder.proj``, three unused buffers and a
    ``config`` dict; ``wrap`` puts it under ``module`` as its training checkpoints do."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("encoder.", "sparse_encoder.sp_cnn.", 1) if key.startswith("encoder.") else key
        key = re.sub(r"^decoder\.blocks\.(\d+)\.upsample\.", r"dense_decoder.dec.\1.up_sample.", key)
        key = re.sub(r"^decoder\.blocks\.(\d+)\.", r"dense_decoder.dec.\1.", key)
        key = key.replace("decoder.proj.", "dense_decoder.proj.")
        state[key] = value.clone()
    state["sparse_encoder.sp_cnn.fc.weight"] = torch.randn(1000, 512)
    state["sparse_encoder.sp_cnn.fc.bias"] = torch.randn(1000)
    state.update(imn_m=torch.zeros(1, 3, 1, 1), imn_s=torch.ones(1, 3, 1, 1), norm_black=torch.zeros(1, 3, 64, 64))
    state["config"] = {"mask_ratio": 0.6, "densify_norm_str": "bn", "sbn": False, "hierarchy": 4,
                       "sparse_encoder.input_size": 64, "dense_decoder.width": width}
    if not wrap:
        return state
    return {"args": "...", "arch": "resnet18", "epoch": 9, "performance_desc": "0.4 0.4", "module": state,
            "optimizer": {"state": {}, "param_groups": []}, "is_pretrain": True}


def test_timm_state_dict_initialises_the_encoder_and_leaves_the_rest_fresh(tmp_path):
    dense = timm.create_model("resnet18")
    path = tmp_path / "resnet18_timm.pth"
    torch.save(dense.state_dict(), path)  # with its classifier, as timm saves it
    model = _fresh()
    report = init_from(model, path, "resnet18")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, dense.state_dict()[key]), key
    assert report.loaded == {"encoder": len(model.encoder.state_dict())}
    assert report.fresh == list(HEAD)


@pytest.mark.parametrize("wrap", [False, True], ids=["withdecoder_spark_style", "still_pretraining"])
def test_official_spark_files_load_encoder_densify_mask_tokens_and_decoder(tmp_path, wrap):
    source = _source()
    path = tmp_path / "resnet18_withdecoder_1kpretrained_spark_style.pth"
    torch.save(_official_spark_layout(source, 64, wrap), path)
    model = _fresh()
    report = init_from(model, path, "resnet18")
    _assert_loaded(model, source, ("encoder", *HEAD))
    assert report.fresh == [] and set(report.loaded) == {"encoder", *HEAD}
    assert report.spark_config["dense_decoder.width"] == 64


def test_our_pretraining_checkpoint_loads_everything(tmp_path):
    source = _source()
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": "sparse-mim/pretrain-v1", "model": source.state_dict(), "optimizer": {}, "epoch": 1,
                "step": 10, "config": {}, "arch": "resnet18", "rng": {}}, path)
    model = _fresh()
    init_from(model, path, "resnet18")
    _assert_loaded(model, source, ("encoder", *HEAD))


def test_our_encoder_export_loads_the_encoder_and_its_arch_is_checked(tmp_path):
    source = _source()
    path = tmp_path / "encoder_resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path),
              metadata={"arch": "resnet18", "key_names": "timm"})
    model = _fresh()
    assert init_from(model, path, "resnet18").fresh == list(HEAD)
    _assert_loaded(model, source, ("encoder",))
    with pytest.raises(ConfigError, match="pretrained as resnet18, you asked for resnet34"):
        init_from(_fresh("resnet34"), path, "resnet34")


def test_official_convnext_names_of_the_official_encoder_file_are_renamed(tmp_path):
    from test_convert import _official_convnext_names

    dense = timm.create_model("convnext_tiny")  # seeded 0 by conftest, the fresh model 123
    path = tmp_path / "convnext_tiny_1kpretrained_official_style.pth"
    torch.save(_official_convnext_names(dense.state_dict()), path)
    model = _fresh("convnext_tiny")
    init_from(model, path, "convnext_tiny")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, dense.state_dict()[key]), key


def test_another_architecture_is_refused_listing_the_keys_and_nothing_changes(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"(?s)init_from=.*resnet34.pth.*do not match timm 'resnet18'.*unexpected \(96\)"):
        init_from(model, path, "resnet18")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_decoder_of_another_width_is_refused_naming_the_width(tmp_path):
    path = tmp_path / "spark_style.pth"
    torch.save(_official_spark_layout(_source(width=128), 128, wrap=False), path)
    model = _fresh(width=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"wrong shape(.|\n)*decoder_width=128"):
        init_from(model, path, "resnet18")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_missing_file_is_a_config_error_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="init_from=.*nope.pth: no such file"):
        pretrain(compose_config([*TINY, f"init_from={tmp_path / 'nope.pth'}", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_pretrain_logs_what_init_from_loaded_and_a_resume_wins(tmp_path, capsys):
    images = tmp_path / "images"
    make_images(images, 4)
    source = timm.create_model("resnet18")
    weights = tmp_path / "r18.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "run"
    args = [*TINY, f"data.path={images}", f"output_dir={out}", f"init_from={weights}", "train.max_steps=1"]
    pretrain(compose_config(args))
    log = json.loads((out / "init_from.json").read_text())
    assert log["loaded"] == {"encoder": 120} and log["fresh"] == list(HEAD)
    printed = capsys.readouterr().out
    assert f"init_from {weights}: loaded encoder (120 tensors)" in printed
    assert "initialised fresh (not in the file): densify_norms, mask_tokens, densify_projs, decoder" in printed

    result = pretrain(compose_config(args))  # the checkpoint exists: resume, init_from is not used
    assert result.resumed_from == 1
    assert "not used: resuming" in capsys.readouterr().out


def test_an_arch_mismatch_names_the_model_setting_not_the_convert_option(tmp_path):
    path = tmp_path / "encoder_resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in _source().encoder.state_dict().items()}, str(path),
              metadata={"arch": "resnet18", "key_names": "timm"})
    with pytest.raises(ConfigError, match="pass model=resnet18") as e:
        init_from(_fresh("resnet34"), path, "resnet34")
    assert "--arch" not in str(e.value)


def test_a_key_mismatch_names_the_model_setting_not_the_convert_option(tmp_path):
    path = tmp_path / "encoder.safetensors"  # no arch recorded: the keys decide
    save_file({k: v.contiguous() for k, v in _source().encoder.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match=r"model=NAME\) is the one that was pretrained") as e:
        init_from(_fresh("resnet34"), path, "resnet34")
    assert "--arch" not in str(e.value)
