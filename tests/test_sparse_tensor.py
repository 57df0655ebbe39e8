"""SparseTensor / coordinate manager: construction, dense(), layout, caching and input errors."""
import pytest
import torch

from sparse_mim import MaskedDenseTensor, SparseInputError, SparseTensor
from sparse_mim.engine import PatchCoordinateManager, SparseConv2d, patch_input, use_settings

from conftest import patch_mask


def test_from_dense_and_dense_round_trip_zeroes_inactive_sites():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    active = torch.rand(2, 5, 7) < 0.5
    active[0, 0, 0] = True
    sp = SparseTensor.from_dense(x, active)
    assert sp.features.shape == (int(active.sum()), 3)
    assert torch.equal(sp.dense(), x * active[:, None])
    assert sp.spatial_shape == (5, 7) and sp.batch_size == 2


def test_dense_uses_full_shape_not_coordinate_extent():
    # the only active site is at the top-left: MinkowskiEngine's .dense() would shrink the output
    coords = torch.tensor([[0, 0, 0]])
    sp = SparseTensor(torch.ones(1, 2), coords, spatial_shape=(6, 4), batch_size=3)
    assert sp.dense().shape == (3, 2, 6, 4)


def test_patch_layout_is_tile_major_and_zero_copy_tiles():
    mask = patch_mask("random", 2, (2, 3))
    images = torch.randn(2, 3, 64, 96)
    sp = patch_input(images, mask)
    tiles = sp.tiles()
    assert tiles.data_ptr() == sp.features.data_ptr()
    first = sp.manager.tiles[0]
    b, py, px = first.tolist()
    expected = images[b, :, py * 32:(py + 1) * 32, px * 32:(px + 1) * 32].permute(1, 2, 0)
    assert torch.equal(tiles[0], expected)
    assert torch.equal(sp.dense(), images * sp.manager.mask(1, images.dtype))


def test_coordinates_are_on_own_stride_grid():
    mask = torch.tensor([[[False, True]]])
    m = PatchCoordinateManager(mask, 32)
    c = m.coordinates(16)  # tile side 2 at stride 16, patch (0, 1)
    assert c.tolist() == [[0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3]]


def test_kernel_maps_are_built_once_per_batch():
    mask = patch_mask("random", 2, (2, 3))
    sp = patch_input(torch.randn(2, 3, 64, 96), mask)
    conv_a, conv_b = SparseConv2d(3, 3, 3, 1, 1), SparseConv2d(3, 3, 3, 1, 1)
    conv_b(conv_a(sp))
    gather_keys = [k for k in sp.manager._cache if isinstance(k, tuple) and k[0] == "tile_gather"]
    assert len(gather_keys) == 1


@pytest.mark.parametrize("size", [(60, 64), (64, 100)])
def test_image_size_not_multiple_of_patch_is_an_error(size):
    with pytest.raises(SparseInputError, match="not a multiple of the patch size 32"):
        patch_input(torch.randn(1, 3, *size), torch.ones(1, 2, 2, dtype=torch.bool))


def test_all_patches_masked_is_an_error():
    sp_mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    with pytest.raises(SparseInputError, match=r"every patch of image\(s\) \[0\] is masked"):
        patch_input(torch.randn(1, 3, 64, 64), sp_mask)
    with pytest.raises(SparseInputError, match="every patch is masked"):
        PatchCoordinateManager(sp_mask, 32).tiles


def test_a_patch_mask_that_is_not_bool_is_an_error():
    with pytest.raises(SparseInputError, match="patch mask must be bool"):
        patch_input(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2))


def test_the_masked_dense_reference_input_is_the_sparse_input_made_dense():
    mask = patch_mask("random", 2, (2, 3))
    images = torch.randn(2, 3, 64, 96)
    reference = patch_input(images, mask, dense_reference=True)
    assert isinstance(reference, MaskedDenseTensor)
    assert torch.equal(reference.dense(), patch_input(images, mask).dense())


def test_patch_mask_shape_mismatch_is_an_error():
    with pytest.raises(SparseInputError, match="patch mask shape"):
        patch_input(torch.randn(1, 3, 64, 64), torch.ones(1, 3, 2, dtype=torch.bool))


def test_coordinates_out_of_range_are_an_error():
    with pytest.raises(SparseInputError, match="out of range for spatial shape"):
        SparseTensor(torch.ones(2, 1), torch.tensor([[0, 0, 0], [0, 4, 0]]), spatial_shape=(4, 4), batch_size=1)


def test_duplicate_coordinates_are_an_error():
    with pytest.raises(SparseInputError, match="duplicate coordinates"):
        SparseTensor(torch.ones(2, 1), torch.tensor([[0, 1, 1], [0, 1, 1]]), spatial_shape=(4, 4), batch_size=1)


def test_batch_index_out_of_range_is_an_error():
    with pytest.raises(SparseInputError, match="batch index out of range"):
        SparseTensor(torch.ones(1, 1), torch.tensor([[2, 0, 0]]), spatial_shape=(4, 4), batch_size=2)


def test_empty_tensor_is_an_error():
    with pytest.raises(SparseInputError, match="empty sparse tensor"):
        SparseTensor(torch.ones(0, 1), torch.zeros(0, 3, dtype=torch.long), spatial_shape=(4, 4), batch_size=1)


def test_feature_row_count_must_match_coordinates():
    with pytest.raises(SparseInputError, match="3 feature rows for 2 active sites"):
        SparseTensor(torch.ones(3, 1), torch.tensor([[0, 0, 0], [0, 1, 0]]), spatial_shape=(4, 4), batch_size=1)


def test_float_coordinates_are_an_error():
    with pytest.raises(SparseInputError, match="must be integers"):
        SparseTensor(torch.ones(1, 1), torch.tensor([[0.0, 0.0, 0.0]]), spatial_shape=(4, 4), batch_size=1)


def test_conv_geometry_that_breaks_site_mapping_is_an_error():
    sp = patch_input(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool))
    with pytest.raises(SparseInputError, match="sparse ops need"):
        SparseConv2d(3, 3, 3, 1, 0)(sp)  # no padding: 32x32 -> 30x30


def test_bfloat16_autocast_runs():
    mask = patch_mask("random", 2, (2, 3))
    sp = patch_input(torch.randn(2, 3, 64, 96), mask)
    conv = SparseConv2d(3, 8, 3, 2, 1)
    for path in ("tiles", "gather", "canvas"):
        with use_settings(execution=path), torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(sp)
        assert out.features.dtype == torch.bfloat16
        out.features.float().square().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
        conv.weight.grad = None
        ref = conv(sp)
        assert (out.features.float() - ref.features).abs().max() < 0.1 * ref.features.abs().max()
