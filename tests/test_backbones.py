"""Sparse backbones: timm state_dicts, equal to timm's features on full images, to masked-dense on masks."""
import pytest
import timm
import torch

from backbones import UnknownBackboneError, create_backbone, list_backbones
from sparse_mim.bench.coverage import randomize  # random norms and running stats: defaults would hide swaps

from conftest import assert_close, patch_mask

DT = torch.float64
ALL = list_backbones()
SMALL = ["resnet18", "resnet50", "convnext_tiny", "convnextv2_tiny"]


def _is_head(key: str) -> bool:
    return key.startswith("fc.") or key.startswith("head.")


def timm_features(name: str, state_dict: dict) -> torch.nn.Module:
    """timm's ``features_only`` model carrying ``state_dict`` (checked: only the classifier is missing)."""
    full = timm.create_model(name, pretrained=False).to(DT)
    result = full.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys
    assert all(_is_head(k) for k in result.missing_keys), result.missing_keys
    indices = (1, 2, 3, 4) if name.startswith("resnet") else (0, 1, 2, 3)
    feats = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices).to(DT)
    source = full.state_dict()
    mapped = {k: source[k if k in source else k.replace("_", ".", 1)] for k in feats.state_dict()}
    feats.load_state_dict(mapped)
    return feats


@pytest.mark.parametrize("name", ALL)
def test_state_dict_keys_and_shapes_equal_timm_minus_classifier(name):
    with torch.device("meta"):
        ours = create_backbone(name).state_dict()
        ref = {k: v for k, v in timm.create_model(name).state_dict().items() if not _is_head(k)}
    assert list(ours) == list(ref) or set(ours) == set(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("name", ALL)
def test_full_image_equals_timm_features(name):
    model = create_backbone(name).to(DT)
    randomize(model)
    ref = timm_features(name, model.state_dict()).to(DT)
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    for train in (True, False):
        model.train(train), ref.train(train)
        ours, theirs = model(x), ref(x)
        assert [o.stride for o in ours] == [4, 8, 16, 32]
        assert [o.num_channels for o in ours] == model.feature_channels
        for level, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a.dense(), b, 1e-8, f"{name} train={train} level {level}")


@pytest.mark.parametrize("name", SMALL)
def test_full_image_gradients_equal_timm(name):
    model = create_backbone(name).to(DT)
    randomize(model)
    ref = timm_features(name, model.state_dict()).to(DT)
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    probes = [torch.randn(2, c, 64 // s, 96 // s, dtype=DT) for c, s in zip(model.feature_channels, (4, 8, 16, 32))]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = sum((o.dense() * p).sum() for o, p in zip(model(xa), probes))
    lb = sum((o * p).sum() for o, p in zip(ref(xb), probes))
    ga = torch.autograd.grad(la, [xa] + list(model.parameters()))
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    gb = torch.autograd.grad(lb, [xb] + [ref_params[n if n in ref_params else n.replace(".", "_", 1)] for n in names])
    for n, a, b in zip(["input"] + names, ga, gb):
        assert_close(a, b, 1e-8, f"grad {n}")


@pytest.mark.parametrize("name", ALL)
def test_masked_input_equals_masked_dense_reference(name):
    model = create_backbone(name).to(DT)
    randomize(model, seed=1)
    mask = patch_mask("random", 2, (2, 3))
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    for train in (True, False):
        model.train(train)
        for a, b in zip(model(x, mask), model(x, mask, dense_reference=True)):
            assert torch.equal(a.active_mask(), b.active_mask())
            assert_close(a.dense(), b.dense(), 1e-9, f"{name} train={train}")


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_channels_last_masked_dense_reference_is_the_same(name):
    # the benchmark baseline runs channels_last, where its BatchNorm takes the row kernel
    model = create_backbone(name).to(DT).train()
    randomize(model, seed=3)
    mask = patch_mask("random", 2, (2, 3))
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    for a, b in zip(model(x, mask), model(x.to(memory_format=torch.channels_last), mask, dense_reference=True)):
        assert_close(a.dense(), b.dense(), 1e-9, name)


@pytest.mark.parametrize("name", SMALL)
def test_masked_gradients_equal_masked_dense_reference(name):
    model = create_backbone(name).to(DT).train()
    randomize(model, seed=2)
    mask = patch_mask("random", 2, (2, 3))
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    grads = []
    for ref in (False, True):
        xi = x.clone().requires_grad_()
        loss = sum((o.dense() ** 2).mean() for o in model(xi, mask, dense_reference=ref))
        grads.append(torch.autograd.grad(loss, [xi] + list(model.parameters())))
    for n, a, b in zip(["input"] + [n for n, _ in model.named_parameters()], *grads):
        assert_close(a, b, 1e-9, f"grad {n}")


def test_feature_info_and_ratio():
    model = create_backbone("resnet50")
    assert model.feature_channels == [256, 512, 1024, 2048]
    assert model.downsample_ratio == 32
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert create_backbone("convnext_base").feature_channels == [128, 256, 512, 1024]


def test_unknown_model_names_the_choices():
    with pytest.raises(UnknownBackboneError, match="unknown model 'resnet51'.*Did you mean"):
        create_backbone("resnet51")


def test_drop_path_rates_follow_timm():
    model = create_backbone("convnext_tiny", drop_path_rate=0.2)
    ref = timm.create_model("convnext_tiny", drop_path_rate=0.2)
    ours = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for s in ref.stages for b in s.blocks]
    assert ours == pytest.approx(theirs)


@pytest.mark.parametrize("dense_reference", (False, True))
def test_an_image_with_every_patch_masked_is_an_error(dense_reference):
    from sparse_mim import SparseInputError
    model = create_backbone("resnet18")
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    active[1] = False
    with pytest.raises(SparseInputError, match=r"image\(s\) \[1\] is masked"):
        model(torch.randn(2, 3, 64, 64), active, dense_reference=dense_reference)


def test_image_size_not_multiple_of_32_is_an_error():
    from sparse_mim import SparseInputError
    with pytest.raises(SparseInputError, match="not a multiple of the patch size 32"):
        create_backbone("resnet18")(torch.randn(1, 3, 64, 80))
