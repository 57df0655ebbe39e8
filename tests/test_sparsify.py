"""sparsify(): any timm / torchvision CNN as a sparse encoder, equal to the dense model on full images
and to the masked-dense reference on masked ones, forward and gradients, in float64."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from backbones import SparsifiedBackbone, create_backbone, sparsify
from sparse_mim import UnsupportedLayerError
from sparse_mim.engine import UnsupportedOperationError

from conftest import assert_close, patch_mask
from test_backbones import randomize

DT = torch.float64
TIMM = ["resnet50", "resnext50_32x4d", "seresnet50", "ecaresnet50d", "regnety_016", "efficientnet_b0",
        "mobilenetv3_large_100", "resnetv2_50x1_bit", "convnext_tiny", "convnextv2_atto", "densenet121"]
TORCHVISION = {"tv_resnet50": (lambda: torchvision.models.resnet50(), ["layer1", "layer2", "layer3", "layer4"]),
               "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.0),
                                    ["features.1", "features.3", "features.5", "features.7"])}
MODELS = TIMM + list(TORCHVISION)
_BUILT = {}


def _dense(name):
    if name in TORCHVISION:
        model, modules = TORCHVISION[name][0](), TORCHVISION[name][1]
    else:
        model = timm.create_model(name, pretrained=False)
        feats = model.feature_info
        modules = [[f["module"] for f in feats if f["reduction"] == s][-1] for s in (4, 8, 16, 32)]
    model = model.to(DT)
    randomize(model)
    return model, modules


def built(name):
    """(dense model, its feature module paths, sparse backbone on a copy of the same weights), cached."""
    if name not in _BUILT:
        dense, modules = _dense(name)
        sparse = sparsify(copy.deepcopy(dense), modules if name in TORCHVISION else None)
        _BUILT[name] = dense, modules, sparse
    return _BUILT[name]


def dense_features(model, modules, x):
    """The dense model's maps at the feature modules (what timm's features_only returns)."""
    outs = {}
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: outs.__setitem__(m, o))
             for m in modules]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [outs[m] for m in modules]


def _grads(loss, x, model):
    return torch.autograd.grad(loss, [x] + [p for p in model.parameters()], allow_unused=True)


@pytest.mark.parametrize("name", MODELS)
def test_full_image_equals_the_dense_model_forward_and_gradients(name):
    dense, modules, sparse = built(name)
    head = [k for k in dense.state_dict() if k not in sparse.state_dict()]
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in sparse.state_dict().items())
    assert len(head) < len(dense.state_dict()) // 4, head
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    dense.train(), sparse.train()
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = sparse(xs), dense_features(dense, modules, xd)
    assert [o.stride for o in ours] == [4, 8, 16, 32]
    assert [o.num_channels for o in ours] == sparse.feature_channels
    probes = [torch.randn_like(t) for t in theirs]
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.dense(), b, 1e-8, f"{name} train level {level}")
    params = dict(dense.named_parameters())
    names = [n for n, _ in sparse.named_parameters()]
    ga = torch.autograd.grad(sum((o.dense() * p).sum() for o, p in zip(ours, probes)),
                             [xs] + list(sparse.parameters()), allow_unused=True)
    gb = torch.autograd.grad(sum((o * p).sum() for o, p in zip(theirs, probes)),
                             [xd] + [params[n] for n in names], allow_unused=True)
    for n, a, b in zip(["input"] + names, ga, gb):
        assert (a is None) == (b is None), n
        if a is not None:
            assert_close(a, b, 1e-8, f"{name} grad {n}")
    dense.eval(), sparse.eval()
    with torch.no_grad():
        for level, (a, b) in enumerate(zip(sparse(x), dense_features(dense, modules, x))):
            assert_close(a.dense(), b, 1e-8, f"{name} eval level {level}")


@pytest.mark.parametrize("name", MODELS)
def test_masked_input_equals_masked_dense_reference_forward_and_gradients(name):
    _, _, sparse = built(name)
    sparse.train()
    mask = patch_mask("random", 2, (2, 3))
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    outs, grads = [], []
    for ref in (False, True):
        xi = x.clone().requires_grad_()
        feats = sparse(xi, mask, dense_reference=ref)
        outs.append([f.dense() for f in feats])
        grads.append(_grads(sum((o ** 2).mean() for o in outs[-1]), xi, sparse))
        assert all(torch.equal(f.active_mask(), m) for f, m in
                   zip(feats, [mask.repeat_interleave(32 // s, 1).repeat_interleave(32 // s, 2) for s in (4, 8, 16, 32)]))
    for level, (a, b) in enumerate(zip(*outs)):
        assert_close(a, b, 1e-9, f"{name} level {level}")
    for n, a, b in zip(["input"] + [n for n, _ in sparse.named_parameters()], *grads):
        if a is not None or b is not None:
            assert_close(a, b, 1e-9, f"{name} grad {n}")


def test_sparsify_of_timm_resnet50_equals_the_hand_tuned_twin():
    _, _, general = built("resnet50")
    hand = create_backbone("resnet50").to(DT)
    hand.load_state_dict(general.state_dict())
    mask = patch_mask("random", 2, (2, 2))
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    for model in (general, hand):
        model.eval()
    for a, b in zip(general(x, mask), hand(x, mask)):
        assert torch.equal(a.active_mask(), b.active_mask())
        assert_close(a.dense(), b.dense(), 1e-12, "sparsify vs hand-tuned")


def test_create_backbone_falls_back_to_sparsify_with_timm_keys():
    model = create_backbone("efficientnet_b0", drop_path_rate=0.1)
    assert isinstance(model, SparsifiedBackbone) and model.norm_kind == "batch"
    assert model.feature_channels == [24, 40, 112, 320]
    with torch.device("meta"):
        ref = timm.create_model("efficientnet_b0").state_dict()
    missing = sorted({k.split(".")[0] for k in ref if k not in model.state_dict()})
    assert missing == ["bn2", "classifier", "conv_head"]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: ref[k].shape for k in model.state_dict()}
    assert create_backbone("sparsify:convnext_tiny").norm_kind == "layer"


class Shift(nn.Module):
    """A layer that indexes space itself: no sparse meaning."""

    def forward(self, x):
        return x[:, :, 1:]


class Counting(nn.Conv2d):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def test_unsupported_layers_are_named_before_any_computation():
    model = timm.create_model("resnet18")
    model.layer2[0].shift = Shift()
    model.layer3[1].conv1 = Counting(256, 256, 3, padding=1, bias=False)
    model.layer1[0].bn1 = nn.InstanceNorm2d(64)
    with pytest.raises(UnsupportedLayerError) as e:
        sparsify(model)
    message = str(e.value)
    assert "layer2.0.shift (test_sparsify.Shift)" in message
    assert "layer3.1.conv1 (test_sparsify.Counting)" in message
    assert "layer1.0.bn1 (torch.nn.modules.instancenorm.InstanceNorm2d)" in message
    assert [p for p, _ in e.value.layers] == ["layer1.0.bn1", "layer2.0.shift", "layer3.1.conv1"]
    assert Counting.calls == 1  # the dense dry run (which finds the head) only: nothing ran sparsely
    assert isinstance(model.conv1, nn.Conv2d) and type(model.conv1) is nn.Conv2d  # nothing was swapped
    assert model.conv1.weight.dtype == torch.float32 and model.training


class IndexingBlock(nn.Module):
    """A container whose own forward indexes space: caught op by op at run time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[..., ::2]


def test_unsupported_glue_fails_with_a_clear_error():
    model = nn.Sequential(IndexingBlock())
    model.feature_info = [dict(module="0", reduction=32, num_chs=8)]
    with pytest.raises(UnsupportedLayerError, match="stride 4"):
        sparsify(model)
    from sparse_mim.engine import patch_input, sparsify_layers
    block = sparsify_layers(IndexingBlock())
    x = patch_input(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(UnsupportedOperationError, match="indexing a sparse tensor"):
        block(x)
    with pytest.raises(UnsupportedOperationError, match=r"Tensor(Base)?\.flatten is not supported on sparse tensors"):
        x.flatten(1)


def test_total_stride_other_than_32_is_an_error():
    with pytest.raises(UnsupportedLayerError, match="total stride is 16, SparK needs 32"):
        sparsify(timm.create_model("resnet18", output_stride=16))


def test_a_model_without_a_map_at_some_stride_is_asked_for_feature_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.Conv2d(8, 8, 4, 4))
    with pytest.raises(UnsupportedLayerError, match=r"no module of the model outputs a map at stride 4 .*"
                                                    r"pass feature_modules"):
        sparsify(model)


def test_timm_export_of_a_sparsified_model_loads_with_only_the_head_missing():
    from sparse_mim.convert import to_timm
    from sparse_mim.convert.timm_keys import timm_classifier_keys
    enc = create_backbone("efficientnet_b0")
    exported = to_timm(enc.state_dict(), "efficientnet_b0")
    result = timm.create_model("efficientnet_b0").load_state_dict(exported, strict=False)
    assert not result.unexpected_keys
    # torch's BatchNorm fills a missing num_batches_tracked itself instead of reporting it
    head = [k for k in timm_classifier_keys("efficientnet_b0") if not k.endswith("num_batches_tracked")]
    assert sorted(result.missing_keys) == sorted(head)
    assert {k.split(".")[0] for k in result.missing_keys} == {"conv_head", "bn2", "classifier"}
