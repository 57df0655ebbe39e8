"""FCMAE pretraining: our model reproduces the official ConvNeXt V2 FCMAE step (MinkowskiEngine, float64)
loss, prediction and every gradient; the sparse step equals the masked-dense one; bad input is refused."""
from __future__ import annotations

import pytest
import torch

from sparse_mim.convert.layouts.fcmae import official_fcmae_to_ours
from sparse_mim.engine import SparseInputError
from sparse_mim.fcmae import FCMAEModelError, build_fcmae

from conftest import assert_close, shared_fixture

FIXTURE, _SEARCHED = shared_fixture("fcmae_pretrain", "model.pt")
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="official FCMAE step fixture not found: no "
                                   f"shared/fixtures/fcmae_pretrain/model.pt in {', '.join(_SEARCHED)}")
DT = torch.float64
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), decoder_depth=1, decoder_embed_dim=32)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def _load(name: str):
    return torch.load(FIXTURE / name, map_location="cpu", weights_only=True)


def _official_step(grn: str, batch1: bool):
    """Our model loaded with the fixture's weights, run on its images and mask: (model, out, expected)."""
    model = build_fcmae(**TINY, grn=grn).to(DT)
    loaded = model.load_official_state_dict(_load("model.pt"))
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    images, mask, expected = _load("input.pt"), _load("mask.pt"), _load("expected.pt")
    if batch1:
        images, mask = images[:1], mask[:1]
        expected = {k: expected[f"{k}_batch1"] for k in ("loss", "pred", "grads")}
    active = (mask == 0).reshape(len(images), 4, 4)  # official: 1 = removed, flattened patch grid
    out = model(images, active)
    out.loss.backward()
    return model, out, expected


def _assert_reproduces(model, out, expected) -> None:
    assert _rel(out.loss, expected["loss"]) <= 1e-9, (out.loss.item(), expected["loss"].item())
    assert out.pred.shape == expected["pred"].shape
    assert _rel(out.pred, expected["pred"]) <= 1e-9
    grads, unknown = official_fcmae_to_ours(expected["grads"])  # official layouts -> ours
    assert unknown == []
    names = model.official_names()
    params = dict(model.named_parameters())
    assert set(names.values()) == set(expected["grads"])  # every official parameter is compared
    for name, p in params.items():
        ref = grads[name].reshape(p.shape)
        assert _rel(p.grad, ref) <= 1e-9, f"grad of {name} ({names[name]}): rel {_rel(p.grad, ref):.2e}"


@needs_fixture
def test_batch_grn_reproduces_the_official_step():
    _assert_reproduces(*_official_step("batch", batch1=False))


@needs_fixture
@pytest.mark.parametrize("grn", ["batch", "sample"])
def test_both_grn_modes_reproduce_the_official_batch_of_one(grn):
    _assert_reproduces(*_official_step(grn, batch1=True))


@needs_fixture
def test_sample_grn_differs_from_the_official_batch_step():
    _, out, expected = _official_step("sample", batch1=False)
    assert _rel(out.pred, expected["pred"]) > 1e-2  # the fixture tells the two GRN semantics apart


@needs_fixture
def test_official_names_cover_the_official_state_dict_one_to_one():
    model = build_fcmae(**TINY)
    names = model.official_names()
    official = _load("model.pt")
    assert sorted(names.values()) == sorted(official) and len(set(names.values())) == len(names)


def _random_model(grn: str, dense_reference: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = build_fcmae(**TINY, grn=grn, dense_reference=dense_reference).to(DT)
    with torch.no_grad():
        for p in model.parameters():  # nothing at its init (GRN 0 would hide it)
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("grn", ["batch", "sample"])
def test_sparse_step_equals_masked_dense_step(grn):
    sparse, dense = _random_model(grn, False), _random_model(grn, True)
    images = torch.randn(3, 3, 64, 96, dtype=DT)
    active = sparse.mask(images, torch.Generator().manual_seed(1))
    outs = []
    for model in (sparse, dense):
        out = model(images, active)
        out.loss.backward()
        outs.append(out)
    assert_close(outs[0].loss, outs[1].loss, 1e-10, "loss")
    assert_close(outs[0].pred, outs[1].pred, 1e-10, "pred")
    dense_params = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        assert_close(p.grad, dense_params[name].grad, 1e-10, f"grad {name}")


def test_mask_keeps_the_official_count():
    model = build_fcmae(**TINY, mask_ratio=0.6)
    active = model.mask(torch.zeros(4, 3, 224, 224), torch.Generator().manual_seed(0))
    assert active.shape == (4, 7, 7) and active.flatten(1).sum(1).tolist() == [19] * 4  # int(49 * 0.4)


def test_image_size_not_a_multiple_of_32_is_a_one_line_error():
    model = build_fcmae(**TINY)
    with pytest.raises(SparseInputError) as info:
        model(torch.zeros(1, 3, 100, 96), torch.ones(1, 3, 3, dtype=torch.bool))
    assert "not a multiple of the patch size 32" in str(info.value) and "\n" not in str(info.value)


def test_a_model_without_grn_is_refused_naming_the_supported_ones():
    with pytest.raises(FCMAEModelError) as info:
        build_fcmae("resnet50")
    message = str(info.value)
    assert "convnextv2_atto" in message and "method=spark" in message and "\n" not in message


def test_norm_pix_loss_off_compares_raw_pixels():
    model = _random_model("batch", False)
    model.norm_pix_loss = False
    images = torch.randn(2, 3, 64, 64, dtype=DT)
    active = torch.tensor([[[True, False], [False, False]], [[False, True], [True, False]]])
    out = model(images, active)
    target = images.reshape(2, 3, 2, 32, 2, 32).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, -1)
    per_patch = (out.pred.flatten(2).transpose(1, 2) - target).pow(2).mean(-1)
    masked = (~active).reshape(2, 4).to(DT)
    assert_close(out.loss, (per_patch * masked).sum() / masked.sum(), 1e-12, "raw-pixel loss")
