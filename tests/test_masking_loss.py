"""SparK's random patch masking and the masked, per-patch-normalised reconstruction loss."""
from __future__ import annotations

import pytest
import torch

from sparse_mim.engine import SparseInputError
from sparse_mim.spark import len_keep, masked_patch_loss, patchify, random_patch_mask, unpatchify
from sparse_mim.spark.loss import normalize_patches
from sparse_mim.spark.masking import patch_grid


# ---------------------------------------------------------------------------------------------
# masking


def test_len_keep_at_224_px_and_ratio_0_6_is_20_of_49():
    assert len_keep(49, 0.6) == 20


@pytest.mark.parametrize("grid, ratio, expected", [((7, 7), 0.6, 20), ((2, 3), 0.6, 2), ((12, 12), 0.75, 36),
                                                   ((4, 4), 0.5, 8)])
def test_every_image_has_exactly_len_keep_visible_patches(grid, ratio, expected):
    mask = random_patch_mask(16, grid, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (16,) + grid and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [expected] * 16


def test_mask_follows_the_spec_sampling_rand_argsort_exactly():
    b, h, w, ratio = 5, 3, 4, 0.6
    mask = random_patch_mask(b, (h, w), ratio, torch.Generator().manual_seed(7))
    keep = torch.rand(b, h * w, generator=torch.Generator().manual_seed(7)).argsort(1)[:, :len_keep(h * w, ratio)]
    expected = torch.zeros(b, h * w, dtype=torch.bool)
    expected[torch.arange(b)[:, None], keep] = True
    assert torch.equal(mask, expected.view(b, h, w))


def test_images_get_independent_uniform_masks():
    mask = random_patch_mask(4000, (7, 7), 0.6, torch.Generator().manual_seed(1)).flatten(1)
    assert len({tuple(row.tolist()) for row in mask[:200]}) == 200  # no two images share a mask
    frequency = mask.double().mean(0)  # each patch visible with probability 20/49
    assert torch.allclose(frequency, torch.full_like(frequency, 20 / 49), atol=0.04)


def test_same_generator_seed_gives_the_same_mask_and_another_seed_does_not():
    a = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(3))
    b = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(3))
    c = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_mask_ratio_outside_open_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        random_patch_mask(2, (7, 7), ratio)


def test_ratio_leaving_no_visible_patch_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"no visible patch out of 4.*at most 0\.75"):
        random_patch_mask(2, (2, 2), 0.9)
    assert random_patch_mask(2, (2, 2), 0.75).flatten(1).sum(1).tolist() == [1, 1]


def test_ratio_leaving_no_masked_patch_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"no masked patch out of 4.*at least 0\.25"):
        random_patch_mask(2, (2, 2), 0.1)
    assert random_patch_mask(2, (2, 2), 0.25).flatten(1).sum(1).tolist() == [3, 3]


def test_image_size_not_a_multiple_of_32_is_rejected():
    with pytest.raises(SparseInputError, match="not a multiple of the patch size 32"):
        patch_grid(torch.zeros(1, 3, 64, 80))
    assert patch_grid(torch.zeros(1, 3, 64, 96)) == (2, 3)


# ---------------------------------------------------------------------------------------------
# patchify


def test_patchify_element_order_is_row_column_channel_within_raster_ordered_patches():
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    patches = patchify(images)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    for b, py, px, i, j, c in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 5, 31, 2), (0, 1, 0, 17, 3, 1), (1, 0, 1, 31, 0, 0)]:
        assert patches[b, py * 3 + px, (i * 32 + j) * 3 + c] == images[b, c, py * 32 + i, px * 32 + j]


def test_unpatchify_inverts_patchify():
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    assert torch.equal(unpatchify(patchify(images), (2, 3)), images)


# ---------------------------------------------------------------------------------------------
# loss


def _direct_loss(pred, images, active):
    """SparK's loss written out patch by patch."""
    total, count = 0.0, 0
    b, _, h, w = images.shape
    for n in range(b):
        for py in range(h // 32):
            for px in range(w // 32):
                if active[n, py, px]:
                    continue
                window = (n, slice(None), slice(py * 32, py * 32 + 32), slice(px * 32, px * 32 + 32))
                t = images[window].permute(1, 2, 0).reshape(-1)
                target = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                p = pred[window].permute(1, 2, 0).reshape(-1)
                total = total + ((p - target) ** 2).mean()
                count += 1
    return total / count


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 64, 96, generator=g, dtype=torch.float64) * 5 + 2
    pred = torch.randn(3, 3, 64, 96, generator=g, dtype=torch.float64)
    active = random_patch_mask(3, (2, 3), 0.6, g)
    return pred, images, active


def test_loss_equals_the_patch_by_patch_formula():
    pred, images, active = _inputs()
    torch.testing.assert_close(masked_patch_loss(pred, images, active), _direct_loss(pred, images, active),
                               rtol=1e-12, atol=1e-12)


def test_target_normalisation_uses_unbiased_variance_plus_1e_minus_6():
    patches = torch.randn(1, 2, 12, dtype=torch.float64)
    normed, mean, std = normalize_patches(patches)
    torch.testing.assert_close(std[0, 0, 0], torch.sqrt(patches[0, 0].var(unbiased=True) + 1e-6))
    torch.testing.assert_close(normed[0, 1], (patches[0, 1] - patches[0, 1].mean()) / std[0, 1])


def test_changing_pred_on_visible_patches_does_not_change_the_loss():
    pred, images, active = _inputs(1)
    visible = active.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
    changed = torch.where(visible, torch.randn_like(pred) * 100, pred)
    assert not torch.equal(changed, pred)
    assert masked_patch_loss(changed, images, active) == masked_patch_loss(pred, images, active)


def test_changing_pred_on_a_masked_patch_changes_the_loss():
    pred, images, active = _inputs(2)
    n, py, px = (~active).nonzero()[0].tolist()
    changed = pred.clone()
    changed[n, :, py * 32:(py + 1) * 32, px * 32:(px + 1) * 32] += 1.0
    assert masked_patch_loss(changed, images, active) != masked_patch_loss(pred, images, active)


def test_loss_divides_by_the_masked_count_of_the_whole_batch_not_per_image():
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = unpatchify(normalize_patches(patchify(images))[0], (2, 2))
    active = torch.tensor([[[True, True], [True, False]],     # image 0: one masked patch
                           [[False, False], [False, True]]])  # image 1: three masked patches
    pred = target.clone()
    pred[0, :, 32:, 32:] += 2.0  # image 0's masked patch has error 4; image 1's patches have error 0
    loss = masked_patch_loss(pred, images, active)
    torch.testing.assert_close(loss, torch.tensor(4.0 / 4, dtype=torch.float64))  # not (4 + 0) / 2


def test_loss_rejects_a_mask_of_the_wrong_shape():
    pred, images, _ = _inputs()
    with pytest.raises(SparseInputError, match=r"bool patch mask of shape \(3, 2, 3\)"):
        masked_patch_loss(pred, images, torch.ones(3, 3, 2, dtype=torch.bool))
