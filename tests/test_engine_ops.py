"""Every sparse op equals SparK's masked-dense reference, forward and gradients, in float64."""
import pytest
import torch

from sparse_mim.engine import (MaskedDenseTensor, PatchCoordinateManager, SiteCoordinateManager, WindowGeometry,
                               SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseDropPath, SparseGELU,
                               SparseGlobalAvgPool, SparseGRN, SparseLayerNorm, SparseLinear,
                               SparseMaxPool2d, SparseReLU, SparseSyncBatchNorm, SparseTensor, current_settings,
                               use_settings)
from sparse_mim.engine.tensor import SparseTensor as _ST

from conftest import MASKS, assert_close, patch_mask

DT = torch.float64
PATHS = ("tiles", "gather", "canvas")


def pair(x: torch.Tensor, manager, stride: int):
    """The same dense leaf seen as sparse rows and as a masked-dense map."""
    sparse = SparseTensor(_ST._gather_sites(x, manager, stride), manager=manager, stride=stride)
    ref = MaskedDenseTensor(x * manager.mask(stride, x.dtype), manager, stride)
    return sparse, ref


def compare(module: torch.nn.Module, channels: int, stride: int, mask: torch.Tensor, path: str = "tiles",
            site_manager: bool = False, tol: float = 1e-10, channels_last: bool = False):
    """Run ``module`` sparse and masked-dense on the same input; compare outputs and all gradients."""
    manager = PatchCoordinateManager(mask, 32)
    if site_manager:  # arbitrary-coordinate (MinkowskiEngine-style) input on the same active set
        manager = SiteCoordinateManager.from_mask(manager.active_mask(stride), stride)
    h, w = manager.spatial_shape(stride)
    x = torch.randn(mask.shape[0], channels, h, w, dtype=DT)
    if channels_last:  # the masked-dense baseline's memory format (its BatchNorm then runs on rows)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    sparse, ref = pair(x, manager, stride)
    # backward of each run before the next forward: BatchNorm updates its running stats in place
    with use_settings(execution=path):
        out_s = module(sparse)
    dense_s = out_s.dense()
    probe = torch.randn_like(dense_s)
    gs = torch.autograd.grad((dense_s * probe).sum(), [x] + params)
    out_r = module(ref)
    dense_r = out_r.dense()
    gr = torch.autograd.grad((dense_r * probe).sum(), [x] + params)
    assert dense_s.shape == dense_r.shape
    assert_close(dense_s, dense_r, tol, "forward")
    assert out_s.stride == out_r.stride
    for name, a, b in zip(["input"] + [n for n, p in module.named_parameters() if p.requires_grad], gs, gr):
        assert_close(a, b, tol, f"grad {name}")
    return out_s


CONVS = [  # (kernel, stride, padding, dilation, groups)
    (1, 1, 0, 1, 1), (1, 2, 0, 1, 1), (2, 2, 0, 1, 1), (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 1),
    (4, 4, 0, 1, 1), (7, 1, 3, 1, "dw"), (7, 2, 3, 1, 1), (2, 1, "same", 1, 1), (4, 1, "same", 1, 1),
    (3, 1, 1, 1, "dw"), (5, 2, 2, 1, 1),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", CONVS)
@pytest.mark.parametrize("path", PATHS)
def test_conv_matches_masked_dense(kernel, stride, padding, dilation, groups, path):
    cin = 5
    g = cin if groups == "dw" else groups
    cout = cin if groups == "dw" else 7
    conv = SparseConv2d(cin, cout, kernel, stride, padding, dilation, groups=g, bias=True).to(DT)
    mask = patch_mask("random", 2, (2, 3))
    for in_stride in (1, 8):
        if in_stride * stride > 32:
            continue
        compare(conv, cin, in_stride, mask, path)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (2, 1, "same")])
def test_gather_conv_with_fewer_rows_than_output_channels(kernel, stride, padding):
    # deep stages of a masked image: a few dozen rows against many output channels (the GEMM then
    # reorders the neighbourhoods instead of the weight)
    conv = SparseConv2d(6, 96, kernel, stride, padding, bias=True).to(DT)
    out = compare(conv, 6, 16, patch_mask("random", 2, (2, 3)), "gather")
    assert out.features.shape[0] < 96


@pytest.mark.parametrize("mask_kind", MASKS)
def test_conv_masks_borders_single_patch_batch_one(mask_kind):
    conv = SparseConv2d(3, 4, 3, 1, 1).to(DT)
    for batch in (1, 3):
        compare(conv, 3, 4, patch_mask(mask_kind, batch, (2, 3)))


def test_strided_conv_output_active_set_is_coarser_patch_mask():
    mask = patch_mask("random", 2, (2, 3))
    conv = SparseConv2d(3, 4, 3, 2, 1).to(DT)
    out = compare(conv, 3, 4, mask)
    expected = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(out.active_mask(), expected)
    assert out.features.shape[0] == int(expected.sum())


@pytest.mark.parametrize("path", ("gather", "canvas"))
def test_conv_on_arbitrary_coordinates(path):
    # A MinkowskiEngine-style input: arbitrary active sites (not patch-aligned).
    active = torch.rand(2, 12, 10) < 0.4
    manager = SiteCoordinateManager.from_mask(active)
    x = torch.randn(2, 3, 12, 10, dtype=DT, requires_grad=True)
    conv = SparseConv2d(3, 4, 3, 2, 1).to(DT)
    sparse, ref = pair(x, manager, 1)
    with use_settings(execution=path):
        out_s = conv(sparse)
    out_r = conv(ref)
    assert_close(out_s.dense(), out_r.dense(), what="forward")
    # ME quantisation: a coarse site is active iff any of its fine sites is
    expected = torch.nn.functional.max_pool2d(active[:, None].float(), 2)[:, 0] > 0
    assert torch.equal(out_s.active_mask(), expected)
    probe = torch.randn_like(out_r.dense())
    ga = torch.autograd.grad((out_s.dense() * probe).sum(), [x, conv.weight])
    gb = torch.autograd.grad((out_r.dense() * probe).sum(), [x, conv.weight])
    for a, b in zip(ga, gb):
        assert_close(a, b, what="grad")


@pytest.mark.parametrize("path", PATHS)
def test_site_manager_on_patch_masks_matches_tiles(path):
    conv = SparseConv2d(4, 6, 3, 1, 1).to(DT)
    compare(conv, 4, 4, patch_mask("random", 2, (2, 3)), path, site_manager=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_is_max_over_active_neighbours(path, kernel, stride, padding):
    pool = SparseMaxPool2d(kernel, stride, padding)
    compare(pool, 5, 2, patch_mask("random", 2, (2, 3)), path)


def test_max_pool_ignores_masked_zeros_unlike_dense_maxpool():
    # all-negative features next to masked patches: a dense max-pool of the zero-filled map gives 0
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    manager = PatchCoordinateManager(mask, 32)
    sp = SparseTensor(torch.rand(16 * 16, 2, dtype=DT) - 2.0, manager=manager, stride=2)
    out = SparseMaxPool2d(3, 2, 1)(sp)
    assert (out.features < -1.0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_avg_pool_divides_by_active_neighbours(path, kernel, stride, padding):
    compare(SparseAvgPool2d(kernel, stride, padding), 3, 4, patch_mask("random", 2, (2, 3)), path)


def test_avg_pool_denominator_counts_active_sites_only():
    mask = torch.tensor([[[True, False]]])
    manager = PatchCoordinateManager(mask, 32)
    sp = SparseTensor(torch.ones(16 * 16, 1, dtype=DT), manager=manager, stride=2)  # constant 1
    out = SparseAvgPool2d(3, 1, 1)(sp)
    assert torch.allclose(out.features, torch.ones_like(out.features))  # not diluted by masked zeros


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("train", (True, False))
def test_batch_norm_statistics_over_active_sites_only(mask_kind, train):
    bn_s, bn_r = SparseBatchNorm2d(5).to(DT), SparseBatchNorm2d(5).to(DT)
    with torch.no_grad():
        for bn in (bn_s, bn_r):
            bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
            bn.bias.copy_(torch.linspace(-1, 1, 5))
            bn.running_mean.copy_(torch.linspace(-0.2, 0.2, 5))
            bn.running_var.copy_(torch.linspace(0.5, 2.0, 5))
    bn_s.train(train), bn_r.train(train)
    mask = patch_mask(mask_kind, 2, (2, 3))
    manager = PatchCoordinateManager(mask, 32)
    x = torch.randn(2, 5, 16, 24, dtype=DT) * 3 + 1
    sparse, ref = pair(x, manager, 4)
    assert ref.dense_features.is_contiguous()
    out_s, out_r = bn_s(sparse), bn_r(ref)
    assert_close(out_s.dense(), out_r.dense(), what="forward")
    assert_close(bn_s.running_mean, bn_r.running_mean, what="running_mean")
    assert_close(bn_s.running_var, bn_r.running_var, what="running_var")
    if train:  # the running stats are BatchNorm1d's over the active rows
        rows = sparse.features
        expected_var = 0.9 * torch.linspace(0.5, 2.0, 5, dtype=DT) + 0.1 * rows.var(0, unbiased=True)
        assert_close(bn_s.running_var, expected_var, what="unbiased running var")
    compare(bn_s, 5, 4, mask)
    compare(bn_s, 5, 4, mask, channels_last=True)


def test_gathered_rows_batch_norm_of_masked_dense_baseline():
    # the CUDA baseline's BatchNorm (gather active rows, native kernel, scatter back), run on CPU
    bn = SparseBatchNorm2d(5).to(DT)
    with use_settings(gather_masked_rows=True):
        compare(bn, 5, 4, patch_mask("random", 2, (2, 3)), channels_last=True)
        bn.eval()
        compare(bn, 5, 4, patch_mask("random", 2, (2, 3)), channels_last=True)


def test_sync_batch_norm_without_process_group_equals_local():
    mask = patch_mask("random", 2, (2, 3))
    compare(SparseSyncBatchNorm(5).to(DT), 5, 8, mask)


@pytest.mark.parametrize("channels_first", (True, False))
def test_layer_norm(channels_first):
    ln = SparseLayerNorm(7, eps=1e-6, channels_first=channels_first).to(DT)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    compare(ln, 7, 4, patch_mask("random", 2, (2, 3)))


def test_linear_and_activations():
    lin = SparseLinear(5, 9).to(DT)
    compare(torch.nn.Sequential(lin, SparseGELU(), SparseReLU()), 5, 8, patch_mask("corners", 2, (2, 3)))


def test_grn_is_per_sample_over_active_sites():
    grn = SparseGRN(6).to(DT)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    mask = patch_mask("random", 3, (2, 3))
    out = compare(grn, 6, 16, mask)
    # per sample: changing sample 1's features must not change sample 0's output
    manager = out.manager
    x = torch.randn(3, 6, 4, 6, dtype=DT)
    a = grn(pair(x, manager, 16)[0]).dense()
    x2 = x.clone()
    x2[1] *= 10
    b = grn(pair(x2, manager, 16)[0]).dense()
    assert_close(a[0], b[0], what="sample 0 unchanged")
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_grn_batch_mode_takes_one_norm_over_the_whole_batch():
    grn = SparseGRN(6, mode="batch").to(DT)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    mask = patch_mask("random", 3, (2, 3))
    out = compare(grn, 6, 16, mask)
    # the official MinkowskiGRN: ||x||_2 per channel over every active row of the batch
    manager = out.manager
    x = torch.randn(3, 6, 4, 6, dtype=DT)
    sparse = pair(x, manager, 16)[0]
    f = sparse.features
    g = f.norm(dim=0, keepdim=True)
    expected = grn.weight * (f * (g / (g.mean(-1, keepdim=True) + 1e-6))) + grn.bias + f
    assert_close(grn(sparse).features, expected, what="whole-batch GRN")
    # ... so another sample's features change sample 0's output
    x2 = x.clone()
    x2[1] *= 10
    a, b = grn(sparse).dense(), grn(pair(x2, manager, 16)[0]).dense()
    assert (a[0] - b[0]).abs().max() > 1e-3


def _grn_against_masked_dense(grn: SparseGRN, manager, stride: int, zero_channel: bool = False):
    """The fused row GRN (sparse) against the masked-dense GRN, forward and all gradients."""
    h, w = manager.spatial_shape(stride)
    c = grn.weight.shape[0]
    x = torch.randn(manager.batch_size, c, h, w, dtype=DT)
    if zero_channel:  # a channel that is zero over a whole sample: norm 0, gradient 0 (no NaN)
        x[0, 1] = 0
    x.requires_grad_()
    sparse, ref = pair(x, manager, stride)
    out_s, out_r = grn(sparse).dense(), grn(ref).dense()
    probe = torch.randn_like(out_s)
    wrt = [x, grn.weight, grn.bias]
    gs = torch.autograd.grad((out_s * probe).sum(), wrt)
    gr = torch.autograd.grad((out_r * probe).sum(), wrt)
    assert_close(out_s, out_r, what="forward")
    for name, a, b in zip(("input", "weight", "bias"), gs, gr):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, what=f"grad {name}")
    return sparse


def _random_grn(mode: str) -> SparseGRN:
    grn = SparseGRN(6, mode=mode).to(DT)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    return grn


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_grn_on_equal_contiguous_samples_runs_as_one_broadcast_and_matches_masked_dense(mode):
    from sparse_mim.engine.ops.grn_rows import row_groups
    from sparse_mim.spark import random_patch_mask
    mask = random_patch_mask(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    for manager in (PatchCoordinateManager(mask, 32), PatchCoordinateManager(mask, 32, visible_per_image=3)):
        for stride in (8, 32):
            sparse = _grn_against_masked_dense(_random_grn(mode), manager, stride, zero_channel=True)
            groups = row_groups(sparse, mode)
            assert groups.index is None and groups.count == (3 if mode == "sample" else 1)


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_grn_on_unequal_or_unordered_samples_matches_masked_dense(mode):
    from sparse_mim.engine.ops.grn_rows import row_groups
    mask = patch_mask("random", 3, (2, 3), generator=torch.Generator().manual_seed(3))
    mask[1] = False  # sample 1 has no active site at all
    mask[1, 1, 2] = True
    active = PatchCoordinateManager(mask, 32).active_mask(16)
    coords = active.nonzero()
    shuffled = SiteCoordinateManager(coords[torch.randperm(coords.shape[0])], active.shape[1:], 3, 16)
    for manager in (SiteCoordinateManager.from_mask(active, 16), shuffled):
        sparse = _grn_against_masked_dense(_random_grn(mode), manager, 16, zero_channel=True)
        if mode == "sample":
            assert row_groups(sparse, mode).index is not None


def test_grn_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="GRN mode must be one of sample, batch"):
        SparseGRN(4, mode="image")


def test_global_avg_pool_per_sample():
    mask = patch_mask("random", 2, (2, 3))
    manager = PatchCoordinateManager(mask, 32)
    x = torch.randn(2, 4, 8, 12, dtype=DT, requires_grad=True)
    sparse, ref = pair(x, manager, 8)
    pool = SparseGlobalAvgPool()
    a, b = pool(sparse), pool(ref)
    assert_close(a, b, what="forward")
    m = manager.active_mask(8)
    expected = torch.stack([x[i][:, m[i]].mean(1) for i in range(2)])
    assert_close(a, expected, what="direct formula")
    g1 = torch.autograd.grad(a.sum(), x)[0]
    g2 = torch.autograd.grad(b.sum(), x)[0]
    assert_close(g1, g2, what="grad")


def test_drop_path_drops_whole_samples_identically():
    dp = SparseDropPath(0.5).train()
    mask = patch_mask("all", 8, (1, 1))
    manager = PatchCoordinateManager(mask, 32)
    x = torch.ones(8, 2, 4, 4, dtype=DT)
    sparse, ref = pair(x, manager, 8)
    torch.manual_seed(3)
    a = dp(sparse).dense()
    torch.manual_seed(3)
    b = dp(ref).dense()
    assert_close(a, b, what="same RNG, same result")
    per_sample = a.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert dp.eval()(sparse) is sparse


def test_residual_add_requires_same_active_set():
    mask = patch_mask("random", 2, (2, 3))
    m1, m2 = PatchCoordinateManager(mask, 32), PatchCoordinateManager(mask, 32)
    x = torch.randn(2, 3, 16, 24, dtype=DT)
    a, _ = pair(x, m1, 4)
    b, _ = pair(x, m2, 4)
    assert_close((a + a).features, 2 * a.features, what="add")
    with pytest.raises(ValueError, match="different active sets"):
        a + b


@pytest.mark.parametrize("kernel,stride,padding,groups", [(3, 1, 1, 1), (3, 2, 1, 1), (7, 1, 3, "dw"), (2, 2, 0, 1)])
def test_implicit_gemm_path_matches_masked_dense(kernel, stride, padding, groups):
    # on CPU the implicit-GEMM path runs the kernels' PyTorch reference through the same cached maps
    g = 5 if groups == "dw" else 1
    conv = SparseConv2d(5, 5 if g == 5 else 6, kernel, stride, padding, groups=g).to(DT)
    compare(conv, 5, 4, patch_mask("random", 2, (2, 3)), "implicit_gemm")


def test_convert_sync_batchnorm_keeps_dtype_values_and_sparse_semantics():
    from sparse_mim.engine import convert_sync_batchnorm
    model = torch.nn.Sequential(SparseBatchNorm2d(5), torch.nn.BatchNorm2d(5)).to(DT)
    with torch.no_grad():
        model[0].running_mean.fill_(0.3)
    synced = convert_sync_batchnorm(model)
    assert all(isinstance(m, SparseSyncBatchNorm) for m in synced)
    assert synced[0].weight.dtype == DT and synced[1].running_var.dtype == DT
    assert torch.equal(synced[0].running_mean, model[0].running_mean)


def test_auto_execution_follows_the_measured_rules():
    from sparse_mim.engine.execution import auto_path
    g3 = WindowGeometry.make(3, 1, 1)
    g2s2 = WindowGeometry.make(2, 2, 0)
    g7 = WindowGeometry.make(7, 1, 3)
    assert auto_path(g3, False, 8, cuda=False) == "tiles"
    assert auto_path(g3, False, 2, cuda=False) == "gather"
    assert auto_path(g7, True, 1, cuda=False) == "canvas"
    assert auto_path(g3, False, 0, cuda=False) == "gather"  # arbitrary coordinates
    assert auto_path(g3, False, 8, cuda=True) == "tiles"
    assert auto_path(g3, False, 2, cuda=True) == "implicit_gemm"
    assert auto_path(g7, True, 8, cuda=True) == "implicit_gemm"
    assert auto_path(g2s2, False, 8, cuda=True) == "implicit_gemm"


def test_small_tile_and_depthwise_overrides_pick_their_layers_only():
    from sparse_mim.engine.execution import choose_path
    manager = PatchCoordinateManager(patch_mask("random", 2, (2, 2)), 32)
    g3 = WindowGeometry.make(3, 1, 1)
    at = {s: SparseTensor(torch.zeros(manager.num_rows(s), 2), manager=manager, stride=s) for s in (4, 16)}
    with use_settings(execution="auto", execution_depthwise="gather", execution_small_tiles="canvas") as s:
        assert choose_path(s, at[16], g3) == "canvas"             # 2x2 tiles
        assert choose_path(s, at[4], g3) == "tiles"               # 8x8 tiles keep the CPU rule
        assert choose_path(s, at[16], g3, depthwise=True) == "canvas"  # small tiles win over depthwise
        assert choose_path(s, at[4], g3, depthwise=True) == "gather"
    with pytest.raises(ValueError, match="execution_small_tiles: unknown execution path 'fast'"):
        with use_settings(execution_small_tiles="fast"):
            pass


def test_settings_apply_inside_their_block_only_and_reject_unknown_names():
    assert current_settings().execution == "auto" and current_settings().recompute
    with use_settings(execution="gather", recompute=False):
        with use_settings(execution="canvas"):
            assert (current_settings().execution, current_settings().recompute) == ("canvas", False)
        assert current_settings().execution == "gather"
    assert current_settings().execution == "auto" and current_settings().recompute
    with pytest.raises(TypeError, match="unknown engine setting.* recompte"):
        with use_settings(recompte=False):
            pass


@pytest.mark.parametrize("kernel,padding,dilation,groups", [(3, 1, 1, 1), (3, 2, 2, 1), (7, 3, 1, "dw")])
def test_stride_one_tile_conv_input_gradient_needs_no_scatter(monkeypatch, kernel, padding, dilation, groups):
    """Centred stride-1 tile convs take their input gradient as a transposed tile conv (no atomics)."""
    from sparse_mim.engine.ops import conv as conv_ops

    def no_scatter(*_args, **_kwargs):
        raise AssertionError("the stride-1 tile backward must not scatter-add")
    monkeypatch.setattr(conv_ops, "scatter_add_rows", no_scatter)
    cin = 4
    g = cin if groups == "dw" else groups
    conv = SparseConv2d(cin, cin if groups == "dw" else 6, kernel, 1, padding, dilation, groups=g).to(DT)
    for in_stride in (4, 16):
        compare(conv, cin, in_stride, patch_mask("random", 2, (2, 3)), "tiles")


@pytest.mark.parametrize("groups", (1, 3))
def test_group_norm_is_per_sample_over_active_sites(groups):
    from sparse_mim.engine import SparseGroupNorm
    gn = SparseGroupNorm(groups, 6).to(DT)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    out = compare(gn, 6, 8, patch_mask("random", 3, (2, 3)))
    # all visible: equal to the dense GroupNorm
    x = torch.randn(2, 6, 16, 24, dtype=DT)
    manager = PatchCoordinateManager(torch.ones(2, 2, 3, dtype=torch.bool), 32)
    assert_close(gn(pair(x, manager, 4)[0]).dense(), torch.nn.functional.group_norm(x, groups, gn.weight, gn.bias, gn.eps),
                 1e-10, "all visible")
    assert out.num_channels == 6


@pytest.mark.parametrize("path", ("tiles", "gather"))
def test_recomputed_batch_norm_relu_equals_saved_and_masked_dense(path):
    # conv -> BN -> ReLU -> conv with the BN -> ReLU output rebuilt in backward (engine.recompute):
    # bitwise the gradients of the run that saves it, and equal to the masked-dense reference
    from sparse_mim.engine import recompute
    torch.manual_seed(0)
    net = torch.nn.Sequential(SparseConv2d(4, 6, 3, padding=1, bias=False), SparseBatchNorm2d(6),
                              SparseReLU(inplace=True), SparseConv2d(6, 5, 3, padding=1, bias=False)).to(DT)
    mask = patch_mask("random", 2, (2, 3))
    manager = PatchCoordinateManager(mask, 32)
    x = torch.randn(2, 4, *manager.spatial_shape(8), dtype=DT, requires_grad=True)
    params = [x] + list(net.parameters())
    grads = []
    for enabled in (True, False):
        sparse, _ = pair(x, manager, 8)
        with use_settings(execution=path), recompute.saving() if enabled else torch.enable_grad():
            out = net(sparse)
        assert recompute.recording() is False
        grads.append(torch.autograd.grad((out.features * out.features).sum(), params))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    compare(net, 4, 8, mask, path)


def test_recompute_hooks_still_catch_in_place_modification():
    from sparse_mim.engine import recompute
    w = torch.randn(3, dtype=DT, requires_grad=True)
    with recompute.saving():
        y = w * 2
        z = y.sin()
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_recompute_hooks_refuse_a_double_backward_instead_of_a_wrong_one():
    from sparse_mim.engine import recompute
    w = torch.randn(3, dtype=DT, requires_grad=True)
    with recompute.saving():
        z = (w * w).sin().sum()
    with pytest.raises(RuntimeError, match=r"use_settings\(recompute=False\)"):
        torch.autograd.grad(z, w, create_graph=True)
    with recompute.saving():
        z = (w * w).sin().sum()
    (g,) = torch.autograd.grad(z, w)          # a plain backward is unaffected
    assert torch.allclose(g, 2 * w * torch.cos(w * w))


def test_masked_dense_batch_norm_saves_only_the_active_rows():
    # SparK's reference: BatchNorm1d on x[active]; the dense map is not kept for backward
    mask = patch_mask("random", 2, (2, 3))
    manager = PatchCoordinateManager(mask, 32)
    x = torch.randn(2, 8, *manager.spatial_shape(4), dtype=DT).to(memory_format=torch.channels_last)
    saved = []
    def pack(t):
        saved.append(t.numel())
        return t
    ref = MaskedDenseTensor(x.requires_grad_() * manager.mask(4, DT), manager, 4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SparseBatchNorm2d(8).to(DT)(ref)
    active = manager.num_rows(4) * 8
    assert max(saved) == active


def test_masked_dense_depthwise_conv_plain_weight_grad_path_equals_conv2d():
    """ConvNeXt's last-stage depthwise conv (channels_last, float32, map small against the kernel)
    takes the path that computes its weight / bias gradients in NCHW; values and gradients as the
    plain masked-dense convolution's."""
    import torch.nn.functional as F

    from sparse_mim.engine.ops import conv as conv_ops
    torch.manual_seed(0)
    c = 64
    active = torch.rand(2, 7, 7) > 0.4
    x = torch.randn(2, c, 7, 7).contiguous(memory_format=torch.channels_last)
    mdt = MaskedDenseTensor.from_dense(x, active)
    w = torch.randn(c, 1, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(c, requires_grad=True)
    inp = mdt.dense_features.detach().requires_grad_()
    geom = WindowGeometry.make(7, 1, 3)
    assert conv_ops._plain_weight_grad(inp, w, geom, c)
    out = conv_ops._masked_dense(mdt.replace(inp), w, b, geom, c, 1).dense_features
    ref = F.conv2d(inp, w, b, 1, 3, 1, c) * mdt.mask()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (inp, w, b), g)
    want = torch.autograd.grad(ref, (inp, w, b), g)
    assert_close(out, ref, tol=1e-5)
    for a, e in zip(got, want):
        assert_close(a, e, tol=1e-5)
