"""The SparK model: densify, LightDecoder, the sparse encoder against SparK's masked-dense
simulation, visualisation, builders and optimizer groups."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from backbones import create_backbone
from sparse_mim.engine import SparseBatchNorm2d, SparseConv2d, SparseLayerNorm, SparseReLU, patch_input
from sparse_mim.spark import (LightDecoder, SparK, SparKOutput, build_spark, no_weight_decay_names, param_groups,
                              patchify, random_patch_mask)
from sparse_mim.spark.loss import normalize_patches


class TinyEncoder(nn.Module):
    """A four-level sparse encoder following the ``backbones`` contract, small enough for unit tests."""

    downsample_ratio = 32

    def __init__(self, norm_kind: str = "batch", width: int = 8):
        super().__init__()
        self.norm_kind = norm_kind
        self.feature_channels = [width, 2 * width, 4 * width, 8 * width]

        def norm(c):
            return SparseBatchNorm2d(c) if norm_kind == "batch" else SparseLayerNorm(c, channels_first=True)

        self.stem = SparseConv2d(3, width, 4, 4)
        self.stages = nn.ModuleList()
        cin = width
        for i, c in enumerate(self.feature_channels):
            down = [SparseConv2d(cin, c, 2, 2)] if i > 0 else []
            self.stages.append(nn.Sequential(*down, SparseConv2d(c, c, 3, padding=1), norm(c), SparseReLU()))
            cin = c

    def forward(self, images, active, dense_reference=False):
        x = self.stem(patch_input(images, active, 32, dense_reference=dense_reference))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Distinct norm affine parameters, so a misplaced norm shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def _batch(b=2, h=64, w=96, seed=0, ratio=0.6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)
    return images, random_patch_mask(b, (h // 32, w // 32), ratio, g)


# ---------------------------------------------------------------------------------------------
# densify


@pytest.mark.parametrize("norm_kind", ["batch", "layer"])
def test_densify_fills_masked_sites_with_the_mask_token_and_keeps_normalised_visible_features(norm_kind):
    torch.manual_seed(0)
    model = SparK(TinyEncoder(norm_kind), decoder_width=96).double().train()
    _randomise_norms(model)
    images, active = _batch()
    features = model.encode(images, active)
    seen = {}
    for level, proj in enumerate(model.densify_projs):
        proj.register_forward_pre_hook(lambda m, args, level=level: seen.__setitem__(level, args[0]))
    model.densify(features, active)

    for level, feature in enumerate(reversed(features)):
        dense = seen[level]
        norm, token = model.densify_norms[level], model.mask_tokens[level]
        visible = feature.active_mask()
        assert dense.shape == (2, feature.num_channels) + visible.shape[1:]
        # masked sites: exactly the token
        masked_values = dense.permute(0, 2, 3, 1)[~visible]
        assert torch.equal(masked_values, token.view(1, -1).expand_as(masked_values))
        # visible sites: the features normalised over active sites only, computed independently
        rows = feature.features
        if norm_kind == "batch":
            expected = (rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + norm.eps)
        else:
            expected = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(
                rows.var(1, unbiased=False, keepdim=True) + norm.eps)
        expected = expected * norm.weight + norm.bias
        got = dense.permute(0, 2, 3, 1)[feature.coordinates[:, 0], feature.coordinates[:, 1],
                                        feature.coordinates[:, 2]]
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_densify_projections_are_1x1_then_3x3_to_halving_decoder_widths():
    model = SparK(TinyEncoder(width=8), decoder_width=96)
    projs = list(model.densify_projs)
    assert [(p.in_channels, p.out_channels, p.kernel_size, p.padding) for p in projs] == [
        (64, 96, (1, 1), (0, 0)), (32, 48, (3, 3), (1, 1)), (16, 24, (3, 3), (1, 1)), (8, 12, (3, 3), (1, 1))]
    assert all(p.bias is not None for p in projs)


def test_densify_projection_is_identity_when_coarsest_width_equals_decoder_width():
    model = SparK(TinyEncoder(width=12), decoder_width=96)  # coarsest level has 8 * 12 = 96 channels
    assert isinstance(model.densify_projs[0], nn.Identity)
    assert isinstance(model.densify_projs[1], nn.Conv2d)


def test_densify_norm_follows_the_encoder_norm_kind():
    assert all(type(n) is SparseBatchNorm2d for n in SparK(TinyEncoder("batch"), decoder_width=96).densify_norms)
    norms = SparK(TinyEncoder("layer"), decoder_width=96).densify_norms
    assert all(type(n) is SparseLayerNorm and n.channels_first and n.eps == 1e-6 for n in norms)


def test_mask_tokens_are_truncated_normal_within_0_02():
    model = SparK(TinyEncoder(width=64), decoder_width=96)
    assert [tuple(t.shape) for t in model.mask_tokens] == [(1, 512, 1, 1), (1, 256, 1, 1), (1, 128, 1, 1),
                                                           (1, 64, 1, 1)]
    values = torch.cat([t.detach().flatten() for t in model.mask_tokens])
    assert values.abs().max() <= 0.02 and values.std() > 0.005 and values.unique().numel() == values.numel()


# ---------------------------------------------------------------------------------------------
# decoder


def test_decoder_upsamples_coarsest_map_32x_to_rgb():
    dec = LightDecoder(96).double()
    maps = [torch.randn(2, c, 2 * 2 ** i, 3 * 2 ** i, dtype=torch.float64) for i, c in enumerate([96, 48, 24, 12])]
    assert dec.channels == [96, 48, 24, 12, 6, 3]
    assert dec(maps).shape == (2, 3, 64, 96)


@torch.no_grad()
def test_decoder_adds_each_skip_before_its_block():
    torch.manual_seed(0)
    dec = LightDecoder(96).double().eval()
    _randomise_norms(dec)
    maps = [torch.randn(1, c, 2 ** i, 2 ** i, dtype=torch.float64) for i, c in enumerate([96, 48, 24, 12])]
    base = dec(maps)
    for i in range(4):
        changed = list(maps)
        changed[i] = maps[i] + 1.0
        assert (dec(changed) - base).abs().max() > 1e-9
    x = 0
    for i, block in enumerate(dec.blocks):
        x = block(x + maps[i] if i < 4 else x)
    torch.testing.assert_close(dec.proj(x), base)


def test_decoder_blocks_are_upsample_conv_bn_relu6_conv_bn():
    block = LightDecoder(768).blocks[0]
    up = block.upsample
    assert isinstance(up, nn.ConvTranspose2d) and (up.in_channels, up.out_channels) == (768, 768)
    assert (up.kernel_size, up.stride, up.padding) == ((4, 4), (2, 2), (1, 1)) and up.bias is not None
    kinds = [type(m) for m in block.conv]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Conv2d, nn.BatchNorm2d]
    assert block.conv[0].bias is None and block.conv[3].bias is None
    assert (block.conv[3].in_channels, block.conv[3].out_channels) == (768, 384)


def test_decoder_init_statistics():
    torch.manual_seed(0)
    dec = LightDecoder(768)
    convs = [m for m in dec.modules() if type(m) is nn.Conv2d]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.02) < 2e-4 and abs(weights.mean().item()) < 2e-4
    for m in dec.modules():
        if isinstance(m, nn.ConvTranspose2d):  # kaiming normal, fan_out, relu: std sqrt(2 / (C_in * 16))
            expected = math.sqrt(2.0 / (m.weight.shape[0] * 16))
            assert abs(m.weight.std().item() / expected - 1) < 0.02
            assert torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.count_nonzero(dec.proj.bias) == 0


# ---------------------------------------------------------------------------------------------
# sparse encoder == masked-dense reference


ENCODERS = ["tiny_batch", "tiny_layer", "resnet18", "convnext_tiny"]


def _encoder(name):
    if name.startswith("tiny_"):
        return TinyEncoder(name.split("_")[1]), 96, (64, 96)
    return create_backbone(name, drop_path_rate=0.0), 96, (64, 64)


@pytest.mark.parametrize("name", ENCODERS)
def test_sparse_and_masked_dense_reference_give_equal_loss_pred_and_gradients(name):
    torch.manual_seed(0)
    encoder, width, (h, w) = _encoder(name)
    sparse = SparK(encoder, decoder_width=width).double().train()
    _randomise_norms(sparse)
    reference = copy.deepcopy(sparse)
    reference.dense_reference = True
    images, active = _batch(2, h, w, seed=1)

    out_s, out_r = sparse(images, active), reference(images, active)
    out_s.loss.backward()
    out_r.loss.backward()

    torch.testing.assert_close(out_s.loss, out_r.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_s.pred, out_r.pred, rtol=1e-9, atol=1e-9)
    params_r = dict(reference.named_parameters())
    for n, p in sparse.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, params_r[n].grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")
    buffers_r = dict(reference.named_buffers())
    for n, b in sparse.named_buffers():  # BN running statistics
        torch.testing.assert_close(b, buffers_r[n], rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# forward, visualisation, builders


def test_forward_draws_a_mask_with_len_keep_visible_patches_and_returns_the_output():
    torch.manual_seed(0)
    model = SparK(TinyEncoder(), mask_ratio=0.6, decoder_width=96).double()
    images, _ = _batch(3, 64, 96)
    out = model(images)
    assert isinstance(out, SparKOutput)
    assert out.active.shape == (3, 2, 3) and out.active.flatten(1).sum(1).tolist() == [2, 2, 2]
    assert out.pred.shape == images.shape and out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_mask_keeps_20_of_49_patches_per_image_at_224_px():
    active = SparK(TinyEncoder(), decoder_width=96).mask(torch.zeros(4, 3, 224, 224),
                                                         torch.Generator().manual_seed(0))
    assert active.shape == (4, 7, 7) and active.flatten(1).sum(1).tolist() == [20] * 4


def test_mask_rejects_images_that_are_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        SparK(TinyEncoder(), decoder_width=96).mask(torch.zeros(1, 3, 64, 72))


def test_reconstruct_pastes_visible_patches_and_unnormalises_the_prediction():
    torch.manual_seed(0)
    model = SparK(TinyEncoder(), decoder_width=96).double()
    images, active = _batch(2, 64, 96, seed=3)
    out = model(images, active)
    vis = model.reconstruct(images, out)
    assert set(vis) == {"input", "masked", "reconstruction"}
    assert torch.equal(vis["input"], images)
    _, mean, std = normalize_patches(patchify(images))
    pred = patchify(out.pred)
    rec, masked = patchify(vis["reconstruction"]), patchify(vis["masked"])
    for n, l in ((~active).flatten(1)).nonzero().tolist():
        torch.testing.assert_close(rec[n, l], pred[n, l] * std[n, l] + mean[n, l], rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(masked[n, l]) == 0
    for n, l in active.flatten(1).nonzero().tolist():
        assert torch.equal(rec[n, l], patchify(images)[n, l]) and torch.equal(masked[n, l], patchify(images)[n, l])


def test_build_spark_uses_the_recipe_drop_path_unless_given_and_prefixes_encoder_keys():
    model = build_spark("resnet50", decoder_width=96)
    rates = [m.drop_prob for m in model.encoder.modules() if hasattr(m, "drop_prob")]
    assert max(rates) == pytest.approx(0.05)
    assert build_spark("resnet50", drop_path_rate=0.0, decoder_width=96).encoder.layer4[-1].drop_path.__class__ \
        is nn.Identity
    encoder_keys = {k for k in model.state_dict() if k.startswith("encoder.")}
    assert encoder_keys == {"encoder." + k for k in create_backbone("resnet50").state_dict()}
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "densify_norms", "mask_tokens",
                                                            "densify_projs", "decoder"}


def test_no_weight_decay_on_1d_params_biases_mask_tokens_and_layer_scale():
    model = build_spark("convnext_tiny", decoder_width=96)
    skip = no_weight_decay_names(model)
    assert {f"mask_tokens.{i}" for i in range(4)} <= skip
    assert "encoder.stages.0.blocks.0.gamma" in skip and "encoder.stem.0.bias" in skip
    assert "densify_projs.1.bias" in skip and "decoder.blocks.0.conv.1.weight" in skip
    assert not {"encoder.stem.0.weight", "encoder.stages.0.blocks.0.mlp.fc1.weight", "densify_projs.1.weight",
                "decoder.blocks.0.upsample.weight"} & skip
    decay, no_decay = param_groups(model, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fixed_visible_count_builds_the_same_tiles_without_nonzero_and_rejects_other_counts():
    from sparse_mim.engine import PatchCoordinateManager, SparseInputError
    mask = random_patch_mask(4, (3, 5), 0.6, generator=torch.Generator().manual_seed(3))
    k = int(mask[0].sum())
    fixed = PatchCoordinateManager(mask, 32, visible_per_image=k)
    assert torch.equal(fixed.tiles, PatchCoordinateManager(mask, 32).tiles)
    uneven = mask.clone()
    uneven[0] = True
    with pytest.raises(SparseInputError, match=r"visible_per_image=%d.*\[%d, 15\]" % (k, k)):
        PatchCoordinateManager(uneven, 32, visible_per_image=k).tiles
    with pytest.raises(SparseInputError, match="visible_per_image must be in 1..15"):
        PatchCoordinateManager(mask, 32, visible_per_image=0)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_static_shape_encoder_equals_the_eager_encoder_and_densify(name):
    """What a CUDA graph captures (sparse_mim.spark.graphed) computes exactly SparK's encode / densify."""
    from sparse_mim.spark.graphed import StaticShapeEncoder
    torch.manual_seed(0)
    spark = build_spark(name, drop_path_rate=0.0, decoder_width=64).double().train()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    active = random_patch_mask(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(1))
    k = int(active[0].sum())
    rows = StaticShapeEncoder(spark, k)(images, active)
    eager = spark.encode(images, active)
    assert len(rows) == 4 and all(torch.equal(r, f.features) for r, f in zip(rows, eager))
    maps = StaticShapeEncoder(spark, k, densify=True)(images, active)
    assert all(torch.equal(a, b) for a, b in zip(maps, spark.densify(spark.encode(images, active), active)))


def test_graph_encoder_needs_cuda_and_the_sparse_model():
    from sparse_mim.spark.graphed import graph_encoder
    spark = build_spark("resnet18", decoder_width=64)
    active = random_patch_mask(2, (2, 2), 0.5)
    with pytest.raises(ValueError, match="needs CUDA"):
        graph_encoder(spark, torch.randn(2, 3, 64, 64), active)
