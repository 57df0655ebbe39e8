"""Weight conversion: exact outputs in timm/torchvision, complete Detectron2 key lists, every
accepted source, loud errors, and the MinkowskiEngine kernel layout."""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import pickle
import pickletools
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

from sparse_mim.convert import (
    ConversionError,
    dense_bias_to_me,
    dense_kernel_to_me,
    me_bias_to_dense,
    me_kernel_to_dense,
    read,
    to_detectron2,
    to_timm,
    to_torchvision,
)
from sparse_mim.convert.archs import ARCHS
from sparse_mim.engine.minkowski_layout import KernelLayoutError
from sparse_mim.convert.cli import main
from sparse_mim.convert.targets.detectron2 import (
    check_detectron2_weights,
    detectron2_config_hints,
    detectron2_key_shapes,
    detectron2_name,
)
from sparse_mim.convert.timm_keys import timm_encoder_shapes
from sparse_mim.runtime.atomic import atomic_write

CLASSIFIER = ("fc.", "head.")


# ---------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def randomized_timm_model(arch: str) -> torch.nn.Module:
    """A float64 eval-mode timm model whose every norm/layer-scale has distinct random values, so
    a swapped or misplaced tensor changes the output. Shared between tests: do not modify."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.empty_like(b).uniform_(0.5, 2.0))
    return model


def encoder_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER)}


def image(arch: str) -> torch.Tensor:
    """Small float64 input; rectangular so that height and width cannot be confused. ConvNeXts get
    the smallest size that leaves their last stage a 1x2 map (float64 depthwise convs are slow)."""
    size = (32, 64) if arch.startswith("convnext") else (64, 96)
    return torch.randn(2, 3, *size, dtype=torch.float64)


def meta_encoder_state_dict(arch: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return encoder_state_dict(timm.create_model(arch))


def small_encoder(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    """Real (CPU) tensors with the encoder's keys and shapes, quick to make."""
    torch.manual_seed(1)
    return {k: torch.randn(s) if s else torch.tensor(3) for k, s in timm_encoder_shapes(arch).items()}


def pretraining_checkpoint(encoder: dict[str, torch.Tensor], arch: str) -> dict:
    model = {f"encoder.{k}": v for k, v in encoder.items()}
    model.update({f"decoder.dec.{i}.weight": torch.randn(4) for i in range(5)})
    model.update({f"densify.norms.{i}.weight": torch.randn(4) for i in range(4)})
    model.update({f"mask_tokens.{i}": torch.randn(1, 4, 1, 1) for i in range(4)})
    optimizer = {"state": {i: {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)} for i in range(3)},
                 "param_groups": [{"lr": 1e-3, "params": [0, 1, 2]}]}
    return {"format": "sparse-mim/pretrain-v1", "model": model, "optimizer": optimizer,
            "epoch": 3, "step": 300, "config": {"lr": 1e-3}, "arch": arch}


# ---------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "convnext_tiny", "convnextv2_tiny"])
def test_to_timm_loads_with_only_the_classifier_missing_and_same_outputs(arch):
    source = randomized_timm_model(arch)
    converted = to_timm(encoder_state_dict(source), arch)

    target = timm.create_model(arch, pretrained=False, num_classes=10).double().eval()
    result = target.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(CLASSIFIER) for k in result.missing_keys)

    x = image(arch)
    with torch.no_grad():
        assert torch.equal(target.forward_features(x), source.forward_features(x))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_to_timm_accepts_the_key_list_of_every_supported_arch(arch):
    encoder = meta_encoder_state_dict(arch)
    assert list(to_timm(encoder, arch)) == list(encoder)


def test_to_timm_fills_absent_batchnorm_counters():
    encoder = {k: v for k, v in small_encoder().items() if not k.endswith("num_batches_tracked")}
    converted = to_timm(encoder, "resnet18")
    assert converted["layer1.0.bn1.num_batches_tracked"].item() == 0
    assert list(converted) == list(timm_encoder_shapes("resnet18"))


def test_unknown_arch_lists_the_supported_ones():
    with pytest.raises(ConversionError) as e:
        to_timm(small_encoder(), "resnet9000")
    assert "resnet9000" in str(e.value)
    assert all(name in str(e.value) for name in ARCHS)


def test_missing_extra_and_misshaped_keys_are_listed():
    encoder = small_encoder()
    del encoder["layer2.1.bn2.running_var"]
    encoder["layer4.9.conv1.weight"] = torch.zeros(1)
    encoder["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    with pytest.raises(ConversionError) as e:
        to_timm(encoder, "resnet18")
    msg = str(e.value)
    assert "missing (1):" in msg and "layer2.1.bn2.running_var" in msg
    assert "unexpected (1):" in msg and "layer4.9.conv1.weight" in msg
    assert "wrong shape (1):" in msg
    assert "layer3.0.conv1.weight: expected (256, 128, 3, 3), found (256, 128, 1, 1)" in msg


def test_long_key_lists_show_the_first_twenty_and_a_count():
    encoder = {k: v for k, v in small_encoder().items() if not k.startswith("layer4.")}
    n_missing = sum(k.startswith("layer4.") for k in timm_encoder_shapes("resnet18"))
    with pytest.raises(ConversionError) as e:
        to_timm(encoder, "resnet18")
    msg = str(e.value)
    assert f"missing ({n_missing}):" in msg
    assert f"... and {n_missing - 20} more" in msg


def test_weights_of_another_arch_are_refused_with_the_differences():
    with pytest.raises(ConversionError) as e:
        to_timm(small_encoder("resnet18"), "resnet50")
    msg = str(e.value)
    assert "layer1.0.conv3.weight" in msg and "wrong shape" in msg


# ---------------------------------------------------------------------------------------------
# torchvision


def test_to_torchvision_resnet50_gives_identical_logits():
    source = randomized_timm_model("resnet50")
    tv = torchvision.models.resnet50(weights=None, num_classes=10).double().eval()
    result = tv.load_state_dict(to_torchvision(encoder_state_dict(source), "resnet50"), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    tv.fc.load_state_dict(source.fc.state_dict())  # a shared classifier

    x = image("resnet50")
    with torch.no_grad():
        torch.testing.assert_close(tv(x), source(x), rtol=1e-12, atol=1e-12)


def test_to_torchvision_convnext_tiny_gives_identical_features_and_logits():
    source = randomized_timm_model("convnext_tiny")
    tv = torchvision.models.convnext_tiny(weights=None, num_classes=10).double().eval()
    result = tv.load_state_dict(to_torchvision(encoder_state_dict(source), "convnext_tiny"),
                                strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["classifier.0.bias", "classifier.0.weight",
                                           "classifier.2.bias", "classifier.2.weight"]
    # the shared classifier: timm's head.norm is torchvision's classifier.0, head.fc classifier.2
    tv.classifier[0].load_state_dict(source.head.norm.state_dict())
    tv.classifier[2].load_state_dict(source.head.fc.state_dict())

    x = image("convnext_tiny")
    with torch.no_grad():
        torch.testing.assert_close(tv.features(x), source.forward_features(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tv(x), source(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", [a for a in sorted(ARCHS) if ARCHS[a].in_torchvision])
def test_to_torchvision_matches_torchvision_key_lists(arch):
    converted = to_torchvision(meta_encoder_state_dict(arch), arch)
    with torch.device("meta"):
        tv = getattr(torchvision.models, arch)(weights=None).state_dict()
    classifier = "fc." if arch.startswith("resnet") else "classifier."
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in tv.items() if not k.startswith(classifier)
    }


@pytest.mark.parametrize("arch", ["resnet200", "convnextv2_tiny"])
def test_to_torchvision_refuses_archs_torchvision_lacks(arch):
    with pytest.raises(ConversionError) as e:
        to_torchvision(meta_encoder_state_dict(arch), arch)
    assert f"{arch!r} cannot be converted to torchvision" in str(e.value)
    assert "convnext_large" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Detectron2


@pytest.mark.parametrize("arch", [a for a in sorted(ARCHS) if a.startswith("resnet")])
def test_detectron2_renaming_covers_detectron2s_key_list(arch):
    renamed = {
        detectron2_name(k): s
        for k, s in timm_encoder_shapes(arch).items()
        if not k.endswith("num_batches_tracked")
    }
    assert renamed == detectron2_key_shapes(arch)


@pytest.mark.parametrize("arch, n_keys", [("resnet18", 100), ("resnet50", 265), ("resnet101", 520)])
def test_detectron2_key_list_has_the_expected_names(arch, n_keys):
    # stem: conv + 4 norm tensors = 5; per conv+norm 5 tensors; a shortcut where shapes change
    keys = detectron2_key_shapes(arch)
    assert len(keys) == n_keys
    assert keys["stem.conv1.weight"] == (64, 3, 7, 7)
    assert keys["stem.conv1.norm.running_var"] == (64,)
    assert "res3.0.shortcut.norm.running_mean" in keys and "res3.1.shortcut.weight" not in keys
    assert not any("num_batches_tracked" in k or k.startswith(("fc", "linear")) for k in keys)
    if arch == "resnet18":
        assert "res2.0.shortcut.weight" not in keys and "res2.0.conv3.weight" not in keys
    else:
        assert keys["res2.0.shortcut.weight"] == (256, 64, 1, 1)
        assert keys["res5.2.conv3.norm.bias"] == (2048,)
        assert keys["res4.0.conv2.weight"] == (256, 256, 3, 3)
    if arch == "resnet101":
        assert "res4.22.conv3.weight" in keys and "res4.23.conv1.weight" not in keys


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_to_detectron2_writes_a_complete_numpy_pickle(tmp_path, arch):
    encoder = small_encoder(arch)
    out = tmp_path / "d2" / f"{arch}.pkl"
    checkpoint = to_detectron2(encoder, arch, out)

    with open(out, "rb") as f:
        on_disk = pickle.load(f)
    assert on_disk["__author__"] == "sparse-mim" and on_disk["matching_heuristics"] is True
    assert set(on_disk["model"]) == set(detectron2_key_shapes(arch)) == set(checkpoint["model"])
    assert all(isinstance(v, np.ndarray) for v in on_disk["model"].values())
    pairs = {"layer1.0.bn1.running_var": "res2.0.conv1.norm.running_var",
             "layer3.2.conv2.weight": "res4.2.conv2.weight",
             "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
             "layer2.0.downsample.1.bias": "res3.0.shortcut.norm.bias",
             "bn1.weight": "stem.conv1.norm.weight",
             "conv1.weight": "stem.conv1.weight"}
    for timm_key, d2_key in pairs.items():
        np.testing.assert_array_equal(on_disk["model"][d2_key], encoder[timm_key].numpy())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_detectron2_check_lists_a_missing_key():
    weights = {k: np.zeros(s, dtype=np.float32) for k, s in detectron2_key_shapes("resnet50").items()}
    del weights["res4.5.conv2.norm.running_var"]
    with pytest.raises(ConversionError) as e:
        check_detectron2_weights(weights, "resnet50")
    assert "missing (1):" in str(e.value) and "res4.5.conv2.norm.running_var" in str(e.value)


def test_to_detectron2_refuses_an_incomplete_encoder_and_writes_nothing(tmp_path):
    encoder = small_encoder("resnet50")
    del encoder["layer3.5.bn2.running_var"]
    out = tmp_path / "r50.pkl"
    with pytest.raises(ConversionError, match=r"layer3\.5\.bn2\.running_var"):
        to_detectron2(encoder, "resnet50", out)
    assert not out.exists()


def test_detectron2_config_hints():
    hints = detectron2_config_hints("resnet18")
    assert hints["INPUT.FORMAT"] == "RGB"
    assert hints["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert hints["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert hints["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert hints["MODEL.RESNETS.DEPTH"] == 18 and hints["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert "MODEL.RESNETS.RES2_OUT_CHANNELS" not in detectron2_config_hints("resnet101")


def test_to_detectron2_refuses_convnext(tmp_path):
    with pytest.raises(ConversionError, match="cannot be converted to detectron2"):
        to_detectron2({}, "convnext_tiny", tmp_path / "x.pkl")


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    out = tmp_path / "weights.pth"
    out.write_bytes(b"previous")

    def fail_halfway(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, fail_halfway)
    assert out.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [out]


# ---------------------------------------------------------------------------------------------
# sources


def test_full_pretraining_checkpoint_keeps_the_encoder_and_reports_the_rest(tmp_path):
    encoder = small_encoder()
    path = tmp_path / "ckpt.pth"
    torch.save(pretraining_checkpoint(encoder, "resnet18"), path)

    ckpt = read(path)
    state_dict, dropped = ckpt.encoder, ckpt.dropped
    assert state_dict.keys() == encoder.keys()
    assert all(torch.equal(state_dict[k], encoder[k]) for k in encoder)
    assert dropped == {"decoder": 5, "densify": 4, "mask_tokens": 4, "optimizer": 6}


def test_ddp_prefixes_are_removed():
    encoder = small_encoder()
    wrapped = {"state_dict": {f"module.encoder.{k}": v for k, v in encoder.items()}}
    wrapped["state_dict"]["module.decoder.proj.weight"] = torch.zeros(1)
    ckpt = read(wrapped)
    state_dict, dropped = ckpt.encoder, ckpt.dropped
    assert state_dict.keys() == encoder.keys() and dropped == {"decoder": 1}

    bare_ddp = {f"module.{k}": v for k, v in encoder.items()}
    assert read(bare_ddp).encoder.keys() == encoder.keys()


def test_encoder_state_dict_wrapped_in_model_with_a_classifier():
    encoder = small_encoder()
    checkpoint = {"model": {**encoder, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}}
    ckpt = read(checkpoint)
    state_dict, dropped = ckpt.encoder, ckpt.dropped
    assert state_dict.keys() == encoder.keys() and dropped == {"classifier": 2}


def test_safetensors_source_and_its_arch_metadata(tmp_path):
    encoder = small_encoder()
    path = tmp_path / "enc.safetensors"
    save_file(encoder, str(path), metadata={"arch": "resnet18"})
    converted = to_timm(read(path, "resnet18").encoder, "resnet18")
    assert all(torch.equal(converted[k], encoder[k]) for k in encoder)
    with pytest.raises(ConversionError,
                       match="checkpoint was pretrained as resnet18, you asked for resnet50"):
        read(path, "resnet50")


def test_pretraining_checkpoint_with_the_wrong_arch_is_refused():
    checkpoint = pretraining_checkpoint(small_encoder(), "resnet18")
    with pytest.raises(ConversionError,
                       match="checkpoint was pretrained as resnet18, you asked for resnet34"):
        read(checkpoint, "resnet34")


def test_checkpoint_with_python_objects_falls_back_to_full_unpickling(tmp_path):
    checkpoint = pretraining_checkpoint(small_encoder(), "resnet18")
    checkpoint["config"] = pathlib.PurePosixPath("/runs/r18")  # not on the restricted unpickler's allowlist
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        state_dict = read(path, "resnet18").encoder
    assert len(state_dict) == len(timm_encoder_shapes("resnet18"))


def test_argparse_namespace_of_training_scripts_loads_without_the_unsafe_fallback(tmp_path):
    checkpoint = pretraining_checkpoint(small_encoder(), "resnet18")
    checkpoint["args"] = argparse.Namespace(lr=1e-3, model="resnet18", input_size=224)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state_dict = read(path, "resnet18").encoder
    assert len(state_dict) == len(timm_encoder_shapes("resnet18"))


def test_unreadable_sources_raise_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="checkpoint not found"):
        read(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 a torn zip")
    with pytest.raises(ConversionError, match="could not read checkpoint"):
        read(corrupt)
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        read({"format": "sparse-mim/pretrain-v9", "model": {}})
    with pytest.raises(ConversionError, match="no 'encoder.\\*' weights"):
        read({"format": "sparse-mim/pretrain-v1",
              "model": {"decoder.w": torch.zeros(1)}})


# ---------------------------------------------------------------------------------------------
# MinkowskiEngine layout


def me_conv2d(x: torch.Tensor, kernel: torch.Tensor, ks: int) -> torch.Tensor:
    """Apply an ME-layout kernel (K, C_in, C_out) the way ME does on a full grid: output site
    (h, w) sums in[h + dh, w + dw] @ K[k] over offsets, k = dh + ks * dw (dh fastest), zero
    outside the image."""
    n, c_in, height, width = x.shape
    r = ks // 2
    padded = F.pad(x, (r, r, r, r))
    out = torch.zeros(n, kernel.shape[-1], height, width, dtype=x.dtype)
    for k in range(ks * ks):
        dh, dw = k % ks - r, k // ks - r
        window = padded[:, :, r + dh:r + dh + height, r + dw:r + dw + width]
        out += torch.einsum("nihw,io->nohw", window, kernel[k])
    return out


def test_me_kernel_applied_by_offsets_equals_conv2d_with_the_dense_kernel():
    torch.manual_seed(0)
    ks, c_in, c_out = 3, 4, 5
    kernel = torch.randn(ks * ks, c_in, c_out, dtype=torch.float64)
    x = torch.randn(2, c_in, 6, 7, dtype=torch.float64)
    dense = me_kernel_to_dense(kernel, ks)
    assert dense.shape == (c_out, c_in, ks, ks)
    torch.testing.assert_close(F.conv2d(x, dense, padding=ks // 2), me_conv2d(x, kernel, ks))


def test_me_depthwise_kernel_equals_grouped_conv2d():
    torch.manual_seed(0)
    ks, c = 7, 3
    kernel = torch.randn(ks * ks, c, dtype=torch.float64)
    x = torch.randn(1, c, 9, 8, dtype=torch.float64)
    dense = me_kernel_to_dense(kernel, ks)
    assert dense.shape == (c, 1, ks, ks)
    # a depthwise kernel is a diagonal regular kernel
    diagonal = torch.diag_embed(kernel)
    torch.testing.assert_close(F.conv2d(x, dense, padding=ks // 2, groups=c), me_conv2d(x, diagonal, ks))


def test_me_layout_indexing_formula():
    kernel = torch.randn(9, 2, 3)
    dense = me_kernel_to_dense(kernel, 3)
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(dense[:, :, kh, kw], kernel[kh + 3 * kw].t())


def test_me_layout_round_trips():
    torch.manual_seed(0)
    regular = torch.randn(9, 4, 6)
    assert torch.equal(dense_kernel_to_me(me_kernel_to_dense(regular, 3)), regular)
    pointwise = torch.randn(4, 6)
    dense_pw = me_kernel_to_dense(pointwise, 1)
    assert dense_pw.shape == (6, 4, 1, 1) and torch.equal(dense_kernel_to_me(dense_pw), pointwise)
    strided_pw = dense_kernel_to_me(dense_pw, stride=2)  # ME keeps (1, C_in, C_out) for a strided 1x1 conv
    assert strided_pw.shape == (1, 4, 6) and torch.equal(me_kernel_to_dense(strided_pw, 1), dense_pw)
    depthwise = torch.randn(49, 8)
    assert torch.equal(dense_kernel_to_me(me_kernel_to_dense(depthwise, 7), depthwise=True), depthwise)
    weight = torch.randn(5, 3, 3, 3)
    assert torch.equal(me_kernel_to_dense(dense_kernel_to_me(weight), 3), weight)
    bias = torch.randn(1, 5)
    assert me_bias_to_dense(bias).shape == (5,) and torch.equal(dense_bias_to_me(me_bias_to_dense(bias)), bias)


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (3, 3), (7, 7), (2, 3), (7, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_me_layout_round_trips_are_exact_for_asymmetric_kernels(kernel, stride):
    torch.manual_seed(0)
    weight = torch.randn(5, 3, *kernel, dtype=torch.float64)
    me = dense_kernel_to_me(weight, stride=stride)
    assert me.shape == ((3, 5) if kernel == (1, 1) and stride == 1 else (kernel[0] * kernel[1], 3, 5))
    assert torch.equal(me_kernel_to_dense(me, kernel), weight)
    for a in range(kernel[0]):  # ME's offset index: first spatial axis fastest
        for b in range(kernel[1]):
            assert torch.equal(me.reshape(-1, 3, 5)[a + kernel[0] * b], weight[:, :, a, b].t())
    depthwise = torch.randn(4, 1, *kernel, dtype=torch.float64)
    me_dw = dense_kernel_to_me(depthwise, depthwise=True)
    assert me_dw.shape == (kernel[0] * kernel[1], 4)
    assert torch.equal(me_kernel_to_dense(me_dw, kernel, depthwise=True), depthwise)


def test_me_layout_rejects_inconsistent_shapes():
    with pytest.raises(KernelLayoutError, match="needs K = 9"):
        me_kernel_to_dense(torch.randn(8, 2, 3), 3)
    with pytest.raises(KernelLayoutError, match="depthwise"):
        me_kernel_to_dense(torch.randn(4, 6), 3, depthwise=False)
    with pytest.raises(KernelLayoutError, match=r"\(C, 1, kh, kw\)"):
        dense_kernel_to_me(torch.randn(4, 2, 3, 3), depthwise=True)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_exports_a_pretraining_checkpoint_to_timm_safetensors(tmp_path, capsys):
    source = randomized_timm_model("resnet18")
    ckpt = tmp_path / "pretrain.pth"
    torch.save(pretraining_checkpoint(encoder_state_dict(source), "resnet18"), ckpt)
    out = tmp_path / "resnet18.safetensors"

    assert main([str(ckpt), "--to", "timm", "--arch", "resnet18", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 120 tensors (timm names, resnet18) to {out}" in printed
    assert "decoder (5 tensors)" in printed and "mask_tokens (4 tensors)" in printed
    assert "optimizer (6 tensors)" in printed and "fc.weight, fc.bias" in printed

    target = timm.create_model("resnet18", pretrained=False, num_classes=10).double().eval()
    result = target.load_state_dict(load_file(str(out)), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    x = image("resnet18")
    with torch.no_grad():
        assert torch.equal(target.forward_features(x), source.forward_features(x))


@pytest.mark.parametrize("arch_flag", [True, False])
def test_cli_exports_a_sparsified_timm_model_by_its_timm_name(tmp_path, capsys, arch_flag):
    """`convert --to timm --arch efficientnet_b0`: any timm name pretrained through sparsify."""
    from backbones import create_backbone

    encoder = create_backbone("efficientnet_b0").state_dict()
    ckpt = tmp_path / "pretrain.pth"
    torch.save(pretraining_checkpoint(encoder, "efficientnet_b0"), ckpt)
    out = tmp_path / "e.safetensors"
    arch = ["--arch", "efficientnet_b0"] if arch_flag else []
    assert main([str(ckpt), "--to", "timm", *arch, "--out", str(out)]) == 0
    assert "(timm names, efficientnet_b0)" in capsys.readouterr().out
    exported = load_file(str(out))
    result = timm.create_model("efficientnet_b0", pretrained=False).load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    assert {k.split(".")[0] for k in result.missing_keys} == {"conv_head", "bn2", "classifier"}
    assert all(torch.equal(exported[k], v) for k, v in encoder.items())


def test_cli_exports_torchvision_pth_and_detectron2_pkl(tmp_path, capsys):
    ckpt = tmp_path / "enc.pth"
    torch.save(small_encoder("resnet18"), ckpt)

    tv_out = tmp_path / "tv.pth"
    assert main([str(ckpt), "--to", "torchvision", "--arch", "resnet18", "--out", str(tv_out)]) == 0
    tv = torchvision.models.resnet18(weights=None)
    result = tv.load_state_dict(torch.load(tv_out, weights_only=True), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]

    d2_out = tmp_path / "r18.pkl"
    assert main([str(ckpt), "--to", "detectron2", "--arch", "resnet18", "--out", str(d2_out)]) == 0
    printed = capsys.readouterr().out
    assert "MODEL.RESNETS.RES2_OUT_CHANNELS: 64" in printed and "INPUT.FORMAT: RGB" in printed
    with open(d2_out, "rb") as f:
        assert len(pickle.load(f)["model"]) == 100


def test_cli_reports_errors_on_stderr_with_exit_code_2(tmp_path, capsys):
    ckpt = tmp_path / "pretrain.pth"
    torch.save(pretraining_checkpoint(small_encoder(), "resnet18"), ckpt)
    out = tmp_path / "out.pth"

    assert main([str(ckpt), "--to", "timm", "--arch", "resnet50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint was pretrained as resnet18, you asked for resnet50" in err
    assert "Traceback" not in err and not out.exists()

    assert main([str(ckpt), "--to", "detectron2", "--arch", "resnet18", "--out", str(out)]) == 2
    assert "writes .pkl files" in capsys.readouterr().err

    assert main([str(ckpt), "--to", "detectron2", "--arch", "convnext_tiny",
                 "--out", str(tmp_path / "x.pkl")]) == 2
    assert "cannot be converted to detectron2" in capsys.readouterr().err

    assert main([str(ckpt), "--to", "onnx", "--arch", "resnet18", "--out", str(out)]) == 2
    assert "invalid choice" in capsys.readouterr().err


def _official_convnext_names(timm_state: dict) -> dict:
    """timm ConvNeXt keys -> the facebookresearch/ConvNeXt names the official SparK saves."""
    import re
    out = {}
    for k, v in timm_state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def test_official_spark_convnext_checkpoint_converts_to_timm_with_identical_features(tmp_path):
    """The official SparK's whole-model checkpoint ('module': SparK state, official ConvNeXt names)."""
    dense = timm.create_model("convnext_tiny").eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    encoder = {f"sparse_encoder.sp_cnn.{k}": v for k, v in _official_convnext_names(dense.state_dict()).items()}
    decoder = {"dense_decoder.dec.0.conv.weight": torch.zeros(8, 8, 3, 3), "densify_norms.0.weight": torch.ones(8)}
    path = tmp_path / "convnext_tiny_still_pretraining.pth"
    torch.save({"args": "...", "arch": "convnext_tiny", "epoch": 3, "performance_desc": "0.5 0.5",
                "module": {**encoder, **decoder}, "optimizer": {"state": {}, "param_groups": []}}, path)
    converted = to_timm(read(path, "convnext_tiny").encoder, "convnext_tiny")
    fresh = timm.create_model("convnext_tiny").eval()
    result = fresh.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and all(k.startswith("head.") for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh.forward_features(x), dense.forward_features(x))
    dropped = read(path, "convnext_tiny").dropped
    assert dropped["dense_decoder"] == 1 and dropped["densify_norms"] == 1 and dropped["classifier"] == 4


def test_official_convnext_names_need_the_arch():
    weights = _official_convnext_names(timm.create_model("convnext_tiny").state_dict())
    with pytest.raises(ConversionError, match="official ConvNeXt key names.*--arch convnext_small"):
        read(weights)
    with pytest.raises(ConversionError, match="arch asked for is 'resnet50'"):
        read(weights, "resnet50")


# ---------------------------------------------------------------------------------------------
# files for other stacks, other projects' layouts, foreign files, --arch inference

NUMPY1_PYTHON = Path(os.environ.get("SPARSE_MIM_NUMPY1_PYTHON", "/tmp/np126/bin/python"))


def _pickle_globals(data: bytes) -> set[str]:
    """Module names the pickle stream imports (GLOBAL, or STACK_GLOBAL after two strings)."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.split(" ")[0])
        elif op.name == "STACK_GLOBAL":
            names.add(strings[-2])
        if isinstance(arg, str):
            strings.append(arg)
    return names


def test_detectron2_pickle_names_only_modules_numpy_1_and_2_both_have(tmp_path):
    out = tmp_path / "r18.pkl"
    to_detectron2(small_encoder("resnet18"), "resnet18", out)
    data = out.read_bytes()
    protocol = next(arg for op, arg, _ in pickletools.genops(data) if op.name == "PROTO")
    assert protocol <= 4 and _pickle_globals(data) == {"numpy", "builtins"}
    assert b"numpy._core" not in data and b"numpy.core" not in data
    loaded = pickle.loads(data)["model"]["res2.0.conv1.weight"]
    assert loaded.flags.writeable and loaded.dtype == np.float32  # Detectron2 turns it into a tensor


@pytest.mark.skipif(not NUMPY1_PYTHON.is_file(), reason="needs a Python with numpy 1.x (benchmarks/detectron2_numpy1.sh)")
def test_detectron2_pickle_loads_under_numpy_1(tmp_path):
    out = tmp_path / "r18.pkl"
    weights = to_detectron2(small_encoder("resnet18"), "resnet18", out)["model"]
    script = ("import pickle, sys, numpy; m = pickle.load(open(sys.argv[1], 'rb'))['model']; "
              "print(numpy.__version__, len(m), float(sum(float(v.astype('float64').sum()) for v in m.values())))")
    proc = subprocess.run([str(NUMPY1_PYTHON), "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, count, total = proc.stdout.split()
    assert version.startswith("1.") and int(count) == len(weights)
    assert float(total) == pytest.approx(sum(float(v.astype(np.float64).sum()) for v in weights.values()), rel=1e-12)


def test_official_spark_state_dict_with_config_converts_and_its_config_checks_the_arch(tmp_path):
    """Official SparK's <model>_withdecoder_1kpretrained_spark_style.pth: 'module' holds
    SparK.state_dict(with_config=True), the tensors plus a 'config' dict."""
    encoder = small_encoder("resnet18")
    config = {"mask_ratio": 0.6, "densify_norm_str": "bn", "sbn": False, "hierarchy": 4,
              "sparse_encoder.input_size": 224, "dense_decoder.width": 768}
    module = {**{f"sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()},
              "dense_decoder.dec.0.conv.weight": torch.zeros(2), "config": config}
    path = tmp_path / "resnet18_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"args": "...", "input_size": 224, "arch": "resnet18", "epoch": 1599, "performance_desc": "0.5 0.5",
                "module": module, "optimizer": {"state": {}, "param_groups": []}, "is_pretrain": True}, path)
    converted = to_timm(read(path, "resnet18").encoder, "resnet18")
    assert all(torch.equal(converted[k], v) for k, v in encoder.items())
    with pytest.raises(ConversionError, match="hierarchy=3"):
        read({**module, "config": {**config, "hierarchy": 3}})
    with pytest.raises(ConversionError, match="pretrained as resnet50, you asked for resnet18"):
        read({**module, "config": {**config, "arch": "resnet50"}}, "resnet18")


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", bytes(range(101, 201)), b""],
                         ids=["text", "binary", "empty"])
def test_a_file_that_is_no_checkpoint_says_what_it_is_not_and_what_is_accepted(tmp_path, capsys, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    assert main([str(path), "--to", "timm", "--arch", "resnet18", "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a torch or safetensors checkpoint" in err and "accepted: torch.save files" in err
    assert len(err.strip().splitlines()) == 1


def test_convert_infers_the_arch_the_checkpoint_records_and_prints_an_absolute_weights_path(
        tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "pretrain.pth"
    torch.save(pretraining_checkpoint(small_encoder("resnet18"), "resnet18"), ckpt)
    monkeypatch.chdir(tmp_path)
    assert main([str(ckpt), "--to", "detectron2", "--out", "r18.pkl"]) == 0
    printed = capsys.readouterr().out
    assert "(detectron2 names, resnet18)" in printed and f"MODEL.WEIGHTS: {tmp_path / 'r18.pkl'}" in printed
    torch.save(small_encoder("resnet18"), tmp_path / "bare.pth")
    assert main([str(tmp_path / "bare.pth"), "--to", "timm", "--out", "x.safetensors"]) == 2
    assert "does not record its architecture; pass --arch NAME" in capsys.readouterr().err


def test_arch_help_lists_the_archs_of_each_target():
    from sparse_mim.convert.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    detectron2 = text.split("--to detectron2:")[1].split("--out")[0].split(";")[0]
    assert "resnet50" in detectron2 and "convnext" not in detectron2
    assert "convnext_tiny" in text.split("--to torchvision:")[1].split("--to detectron2")[0]
