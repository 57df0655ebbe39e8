"""ConvNeXt V2 FCMAE checkpoints: the official fixture reproduces its features through timm, the
decoder side is reported as dropped, bad checkpoints are listed, and `--to minkowski` writes the
layout the official fine-tuning code reads (checked against the documented layout, not our own)."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt

from sparse_mim.convert import ConversionError, read
from sparse_mim.convert.cli import main

from conftest import shared_fixture

FIXTURE, _SEARCHED = shared_fixture("fcmae", "fcmae_tiny.pt")
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="FCMAE fixture not found: no "
                                   f"shared/fixtures/fcmae/fcmae_tiny.pt in {', '.join(_SEARCHED)}")

DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 32, 64)


def _fixture_model() -> dict:
    return torch.load(FIXTURE / "fcmae_tiny.pt", map_location="cpu", weights_only=False)["model"]


@needs_fixture
def test_fcmae_fixture_reproduces_the_official_features_through_timm():
    model = ConvNeXt(depths=DEPTHS, dims=DIMS, use_grn=True, ls_init_value=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read with the restricted unpickler, no unsafe fallback
        result = model.load_state_dict(read(FIXTURE / "fcmae_tiny.pt").encoder, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == [
        "head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]

    images = torch.load(FIXTURE / "input.pt", weights_only=True)
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    with torch.no_grad():
        x = model.stem(images)
        for i, stage in enumerate(model.stages):
            x = stage(x)
            torch.testing.assert_close(x, expected["stages"][i], rtol=1e-4, atol=1e-5, msg=f"stage {i}")
        features = model.forward_head(x, pre_logits=True)
    torch.testing.assert_close(features, expected["features"], rtol=1e-4, atol=1e-5)


@needs_fixture
def test_fcmae_decoder_side_is_dropped_and_reported():
    ckpt = read(FIXTURE / "fcmae_tiny.pt")
    state_dict, dropped = ckpt.encoder, ckpt.dropped
    assert len(state_dict) == 66
    assert {g: dropped[g] for g in ("mask_token", "proj", "decoder", "pred")} == {
        "mask_token": 1, "proj": 2, "decoder": 10, "pred": 2}


@needs_fixture
def test_truncated_or_wrong_size_fcmae_checkpoints_list_the_keys(tmp_path):
    model = _fixture_model()
    del model["encoder.stages.2.1.grn.gamma"]
    model["encoder.stages.0.0.dwconv.kernel"] = torch.zeros(9, 8)
    with pytest.raises(ConversionError) as e:
        read({"model": model})
    msg = str(e.value)
    assert "missing (1):" in msg and "stages.2.1.grn.gamma" in msg
    assert "stages.0.0.dwconv.kernel: expected (49, 8), found (9, 8)" in msg

    cut = tmp_path / "cut.pt"
    data = (FIXTURE / "fcmae_tiny.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="could not read checkpoint"):
        read(cut)


@needs_fixture
def test_cli_refuses_an_fcmae_checkpoint_of_another_size(tmp_path, capsys):
    out = tmp_path / "atto.safetensors"
    assert main([str(FIXTURE / "fcmae_tiny.pt"), "--to", "timm", "--arch", "convnextv2_atto", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not match a ConvNeXt V2 with timm 'convnextv2_atto'" in err and "wrong shape" in err
    assert "Traceback" not in err and not out.exists()


# ---------------------------------------------------------------------------------------------
# a registered arch, in the layout the fixture's README documents (written here by explicit loops)


def official_fcmae_model(timm_encoder: dict) -> dict:
    """timm ConvNeXt V2 weights -> an FCMAE `model` dict, following the fixture README's layout:
    kernel[h + k*w, c, o] = conv.weight[o, c, h, w], dwconv kernel[h + 7*w, c] = weight[c, 0, h, w],
    (1, C) biases and GRN parameters, `.ln.` / `.linear.` wrappers, nn.Linear MLP weights."""
    out = {"mask_token": torch.zeros(1, 4, 1, 1), "proj.weight": torch.zeros(4, 8, 1, 1)}
    for key, v in timm_encoder.items():
        parts = key.split(".")
        if parts[0] == "stem":
            out[f"encoder.downsample_layers.0.{parts[1]}.{parts[2]}"] = v
        elif parts[2] == "downsample":
            s, layer, param = parts[1], parts[3], parts[4]
            if layer == "0":
                out[f"encoder.downsample_layers.{s}.0.ln.{param}"] = v
            elif param == "weight":
                c_out, c_in, k, _ = v.shape
                kernel = torch.empty(k * k, c_in, c_out)
                for h in range(k):
                    for w in range(k):
                        kernel[h + k * w] = v[:, :, h, w].t()
                out[f"encoder.downsample_layers.{s}.1.kernel"] = kernel
            else:
                out[f"encoder.downsample_layers.{s}.1.bias"] = v.reshape(1, -1)
        else:
            s, b, rest = parts[1], parts[3], ".".join(parts[4:])
            pre = f"encoder.stages.{s}.{b}."
            if rest == "conv_dw.weight":
                kernel = torch.empty(49, v.shape[0])
                for h in range(7):
                    for w in range(7):
                        kernel[h + 7 * w] = v[:, 0, h, w]
                out[pre + "dwconv.kernel"] = kernel
            elif rest == "conv_dw.bias":
                out[pre + "dwconv.bias"] = v.reshape(1, -1)
            elif rest.startswith("norm."):
                out[pre + "norm.ln." + parts[-1]] = v
            elif rest.startswith("mlp.fc"):
                out[pre + f"pwconv{rest[6]}.linear.{parts[-1]}"] = v.reshape(v.shape[0], -1) if v.dim() > 1 else v
            elif rest.startswith("mlp.grn."):
                out[pre + ("grn.gamma" if parts[-1] == "weight" else "grn.beta")] = v.reshape(1, -1)
            else:
                raise AssertionError(key)
    return out


def _random_atto() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_cli_converts_an_fcmae_convnextv2_atto_checkpoint_to_timm_conv_mlp(tmp_path, capsys):
    source = _random_atto()
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert encoder["stages.1.blocks.0.mlp.fc1.weight"].dim() == 4  # timm's atto: conv_mlp=True
    ckpt = tmp_path / "checkpoint-0.pth"
    torch.save({"model": official_fcmae_model(encoder), "epoch": 0, "optimizer": {"state": {}, "param_groups": []}},
               ckpt)
    out = tmp_path / "atto.pth"
    assert main([str(ckpt), "--to", "timm", "--arch", "convnextv2_atto", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mask_token (1 tensor)" in printed and "proj (1 tensor)" in printed

    target = timm.create_model("convnextv2_atto", pretrained=False).eval()
    result = target.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("head.") for k in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target.forward_features(x), source.forward_features(x))


def test_cli_to_minkowski_writes_the_documented_fcmae_layout(tmp_path):
    source = _random_atto()
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    timm_file, me_file = tmp_path / "atto.safetensors", tmp_path / "atto_me.pth"
    from safetensors.torch import save_file
    save_file(encoder, str(timm_file))
    assert main([str(timm_file), "--to", "minkowski", "--arch", "convnextv2_atto", "--out", str(me_file)]) == 0
    written = torch.load(me_file, weights_only=True)
    official = {k: v for k, v in official_fcmae_model(encoder).items() if k.startswith("encoder.")}
    assert written["model"].keys() == official.keys() and written["arch"] == "convnextv2_atto"
    for k, v in official.items():
        assert torch.equal(written["model"][k], v), k


def test_minkowski_layout_of_a_resnet_round_trips_and_keeps_strided_1x1_kernels_3d(tmp_path):
    from sparse_mim.convert.timm_keys import timm_encoder_shapes
    torch.manual_seed(0)
    encoder = {k: torch.randn(s) if s else torch.tensor(3) for k, s in timm_encoder_shapes("resnet50").items()}
    src, me_file, back = tmp_path / "r50.pth", tmp_path / "r50_me.pth", tmp_path / "r50_back.pth"
    torch.save(encoder, src)
    assert main([str(src), "--to", "minkowski", "--arch", "resnet50", "--out", str(me_file)]) == 0
    me = torch.load(me_file, weights_only=True)["model"]
    assert me["encoder.conv1.kernel"].shape == (49, 3, 64)
    assert me["encoder.layer1.0.downsample.0.kernel"].shape == (64, 256)        # 1x1, stride 1
    assert me["encoder.layer2.0.downsample.0.kernel"].shape == (1, 256, 512)    # 1x1, stride 2
    assert me["encoder.layer2.0.conv2.kernel"].shape == (9, 128, 128)
    assert main([str(me_file), "--to", "timm", "--arch", "resnet50", "--out", str(back)]) == 0
    restored = torch.load(back, weights_only=True)
    assert restored.keys() == encoder.keys() and all(torch.equal(restored[k], encoder[k]) for k in encoder)
