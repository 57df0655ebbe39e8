"""``read``, the converter's one reader: each layout a checkpoint can be written in comes back as the
same timm-named encoder, with what is known about the file; ``pretrain init_from=`` and ``finetune
weights=`` read through it."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from safetensors.torch import save_file

import sparse_mim.convert.reader as reader
from sparse_mim.convert import ConversionError, read, timm_to_fcmae, to_minkowski
from sparse_mim.convert.timm_keys import timm_encoder_shapes


@functools.lru_cache(maxsize=None)
def _encoder(arch: str) -> dict[str, torch.Tensor]:
    """Distinct random tensors with the keys and shapes of timm's `arch` encoder. Shared: do not modify."""
    torch.manual_seed(3)
    return {k: torch.randn(s) if s else torch.tensor(5) for k, s in timm_encoder_shapes(arch).items()}


def _assert_same(found: dict, expected: dict) -> None:
    assert list(found) == list(expected) or sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def _official_convnext_names(state: dict) -> dict:
    """timm ConvNeXt keys -> the official ConvNeXt names the official SparK's ConvNeXts use."""
    out = {}
    for k, v in state.items():
        k = k.replace("stem.0.", "downsample_layers.0.0.").replace("stem.1.", "downsample_layers.0.1.")
        k = re.sub(r"stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2.", k)
        k = re.sub(r"stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        out[k] = v
    return out


def test_our_pretraining_checkpoint_is_read_with_its_arch_and_method():
    encoder = _encoder("resnet18")
    model = {**{f"encoder.{k}": v for k, v in encoder.items()}, "mask_tokens.0": torch.zeros(1, 4, 1, 1)}
    ckpt = read({"format": reader.PRETRAIN_FORMAT, "arch": "resnet18", "epoch": 1, "step": 10,
                 "config": {"method": "spark"}, "model": model, "optimizer": {"state": {}, "param_groups": []}})
    _assert_same(ckpt.encoder, encoder)
    assert (ckpt.arch, ckpt.layout, ckpt.source, ckpt.method) == ("resnet18", "timm", "sparse-mim", "spark")
    assert ckpt.weights["mask_tokens.0"].shape == (1, 4, 1, 1) and ckpt.dropped["mask_tokens"] == 1


def test_our_fcmae_pretraining_checkpoint_records_its_method():
    checkpoint = {"format": reader.PRETRAIN_FORMAT, "arch": "resnet18", "config": {"method": "fcmae"},
                  "model": {f"encoder.{k}": v for k, v in _encoder("resnet18").items()}}
    assert read(checkpoint).method == "fcmae"


def test_an_encoder_export_is_a_state_dict_whose_arch_is_its_metadata(tmp_path):
    encoder = _encoder("resnet18")
    path = tmp_path / "encoder_resnet18.safetensors"
    save_file(encoder, str(path), metadata={"arch": "resnet18", "key_names": "timm"})
    ckpt = read(path)
    _assert_same(ckpt.encoder, encoder)
    assert (ckpt.arch, ckpt.layout, ckpt.source, ckpt.method, ckpt.dropped) == (
        "resnet18", "timm", "state-dict", None, {})


def test_the_official_spark_model_is_read_with_its_config_and_decoder():
    encoder = _encoder("resnet18")
    config = {"hierarchy": 4, "dense_decoder.width": 64}
    module = {**{f"sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()},
              "dense_decoder.dec.0.conv.weight": torch.zeros(2), "densify_norms.0.weight": torch.ones(2),
              "config": config}
    ckpt = read({"arch": "resnet18", "module": module, "optimizer": {"state": {}, "param_groups": []}})
    _assert_same(ckpt.encoder, encoder)
    assert (ckpt.layout, ckpt.source, ckpt.method, ckpt.spark_config) == ("timm", "official-spark", "spark", config)
    assert "dense_decoder.dec.0.conv.weight" in ckpt.weights and "config" not in ckpt.weights


def test_official_convnext_names_are_read_as_timm_names_for_the_arch():
    encoder = _encoder("convnext_tiny")
    ckpt = read({f"sparse_encoder.sp_cnn.{k}": v for k, v in _official_convnext_names(encoder).items()},
                "convnext_tiny")
    _assert_same(ckpt.encoder, encoder)
    assert ckpt.layout == "convnext-official" and ckpt.arch == "convnext_tiny"


def test_an_fcmae_checkpoint_is_read_as_timm_convnextv2_weights():
    encoder = _encoder("convnextv2_atto")
    model = {f"encoder.{k}": v for k, v in timm_to_fcmae(encoder).items()}
    model.update({"mask_token": torch.zeros(1, 320, 1, 1), "pred.weight": torch.zeros(48, 320, 1, 1)})
    ckpt = read({"model": model, "epoch": 799}, "convnextv2_atto")
    _assert_same(ckpt.encoder, encoder)
    assert (ckpt.layout, ckpt.source, ckpt.method) == ("fcmae", "state-dict", "fcmae")
    assert ckpt.dropped == {"mask_token": 1, "pred": 1}


def test_minkowski_layout_is_read_back_for_the_arch_the_file_records(tmp_path):
    encoder = _encoder("resnet18")
    path = tmp_path / "r18_me.pth"
    torch.save({"model": to_minkowski(encoder, "resnet18"), "arch": "resnet18"}, path)
    ckpt = read(path)
    _assert_same(ckpt.encoder, encoder)
    assert (ckpt.layout, ckpt.arch) == ("minkowski", "resnet18")


def test_a_file_of_another_arch_is_refused_naming_both():
    with pytest.raises(ConversionError, match="pretrained as resnet18, you asked for resnet50; pass --arch resnet18"):
        read({"model": _encoder("resnet18"), "arch": "resnet18"}, "resnet50")


def test_targets_take_dicts_and_name_the_reader_for_a_path(tmp_path):
    from sparse_mim.convert import to_timm

    with pytest.raises(TypeError, match=r"sparse_mim.convert.read\(path\)"):
        to_timm(tmp_path / "encoder.pth", "resnet18")


# ---------------------------------------------------------------------------------------------
# init_from= and weights= read through read()


@pytest.fixture
def files_read(monkeypatch):
    """The files ``read`` opened (its only way to open one)."""
    opened = []
    original = reader.read_file

    def spy(path):
        opened.append(str(path))
        return original(path)

    monkeypatch.setattr(reader, "read_file", spy)
    return opened


def test_finetune_weights_go_through_read(tmp_path, files_read):
    from sparse_mim.finetune.model import build_classifier

    encoder = _encoder("resnet18")
    path = tmp_path / "r18_me.pth"  # MinkowskiEngine layout: only the reader's layout adapters read it
    torch.save({"model": to_minkowski(encoder, "resnet18"), "arch": "resnet18"}, path)
    model, report = build_classifier("resnet18", 10, str(path))
    assert files_read == [str(path)] and report.loaded == len(encoder)
    _assert_same({k: v for k, v in model.state_dict().items() if k in encoder}, encoder)


def test_pretrain_init_from_goes_through_read(tmp_path, files_read):
    from sparse_mim.spark import build_spark
    from sparse_mim.train.init_from import init_from

    encoder = _encoder("resnet18")
    path = tmp_path / "r18_me.pth"
    torch.save({"model": to_minkowski(encoder, "resnet18"), "arch": "resnet18"}, path)
    model = build_spark("resnet18", decoder_width=64)
    report = init_from(model, path, "resnet18")
    assert files_read == [str(path)] and report.loaded == {"encoder": len(encoder)}
    _assert_same(model.encoder.state_dict(), encoder)


@pytest.mark.parametrize("config, message", [
    ({"hierarchy": 3}, "hierarchy=3"),
    ({"hierarchy": 4, "arch": "resnet50"}, "pretrained as resnet50, you asked for resnet18; pass model=resnet50"),
])
def test_init_from_checks_the_official_spark_config_like_convert(tmp_path, config, message):
    """init_from used to drop the config entry unchecked: a file of another hierarchy or arch loaded."""
    from sparse_mim.spark import build_spark
    from sparse_mim.train import ConfigError
    from sparse_mim.train.init_from import init_from

    module = {**{f"sparse_encoder.sp_cnn.{k}": v for k, v in _encoder("resnet18").items()}, "config": config}
    path = tmp_path / "resnet18_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"module": module}, path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        init_from(build_spark("resnet18", decoder_width=64), path, "resnet18")
