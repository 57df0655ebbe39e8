"""backend='minkowski': every op and whole backbones equal the native engine (float64, forward and
input / weight gradients), on patch masks and on scattered coordinates; and our dense kernels, in
MinkowskiEngine's layout, run through real ME convolutions equal F.conv2d at the active sites."""
import copy

import pytest
import torch
import torch.nn.functional as F

from sparse_mim.engine import (PatchCoordinateManager, SiteCoordinateManager, SparseAvgPool2d, SparseBatchNorm2d,
                               SparseConv2d, SparseGlobalAvgPool, SparseGRN, SparseLayerNorm, SparseMaxPool2d,
                               SparseTensor, use_settings)
from sparse_mim.engine.minkowski import MinkowskiUnavailableError, import_minkowski

from conftest import assert_close

try:
    ME = import_minkowski()
except MinkowskiUnavailableError as e:
    pytest.skip(f"MinkowskiEngine parity tests: {e}", allow_module_level=True)

from backbones import create_backbone  # noqa: E402
from sparse_mim.engine.minkowski_layout import dense_bias_to_me, dense_kernel_to_me  # noqa: E402

DT = torch.float64
LAYOUTS = ("patches", "scattered")


def manager_for(layout: str, batch: int = 2, size: int = 32, generator=None):
    """Patch masks (8x8 patches, tile-major rows) or scattered sites (~35% of a 32x32 grid, raster rows)."""
    g = generator or torch.Generator().manual_seed(0)
    if layout == "patches":
        mask = torch.rand(batch, size // 8, size // 8, generator=g) < 0.5
        mask[:, 0, 0] = True
        return PatchCoordinateManager(mask, 8)
    sites = torch.rand(batch, size, size, generator=g) < 0.35
    return SiteCoordinateManager.from_mask(sites, 1)


def run_both(module, manager, channels: int, stride: int = 1, tol: float = 1e-10):
    """Native and minkowski on the same leaf: outputs (same rows) and gradients of input and parameters."""
    n = manager.num_rows(stride)
    x = torch.randn(n, channels, dtype=DT, requires_grad=True)
    params = [p for p in module.parameters() if p.requires_grad]
    results = []
    for backend in ("native", "minkowski"):
        with use_settings(backend=backend):
            out = module(SparseTensor(x, manager=manager, stride=stride))
        rows = out if isinstance(out, torch.Tensor) else out.features
        probe = torch.randn(rows.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((rows * probe).sum(), [x] + params)
        results.append((out, rows, grads))
    (out_n, rows_n, g_n), (out_m, rows_m, g_m) = results
    if not isinstance(out_n, torch.Tensor):
        assert out_m.stride == out_n.stride and out_m.manager is out_n.manager
    assert rows_m.shape == rows_n.shape
    assert_close(rows_m, rows_n, tol, "forward")
    names = ["input"] + [name for name, p in module.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_m, g_n):
        assert_close(a, b, tol, f"grad {name}")


CONVS = [  # (kernel, stride, padding, groups, bias)
    (1, 1, 0, 1, False), (1, 2, 0, 1, False), (1, 4, 0, 1, True), (2, 1, "same", 1, True), (2, 2, 0, 1, False),
    (2, 4, 0, 1, False), (3, 1, 1, 1, True), (3, 2, 1, 1, False), (3, 4, 1, 1, False), (4, 4, 0, 1, True),
    (7, 1, 3, 1, False), (7, 2, 3, 1, False), (7, 1, 3, "dw", True), (3, 2, 1, "dw", False),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel, stride, padding, groups, bias", CONVS)
def test_conv_native_equals_minkowski(layout, kernel, stride, padding, groups, bias):
    c_in = 6
    c_out, g = (c_in, c_in) if groups == "dw" else (5, 1)
    conv = SparseConv2d(c_in, c_out, kernel, stride, padding, groups=g, bias=bias).double()
    run_both(conv, manager_for(layout), c_in)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind, kernel, stride, padding", [("max", 3, 2, 1), ("max", 3, 1, 1), ("max", 2, 2, 0),
                                                           ("avg", 3, 1, 1), ("avg", 2, 2, 0), ("avg", 3, 2, 1)])
def test_pools_native_equal_minkowski(layout, kind, kernel, stride, padding):
    pool = (SparseMaxPool2d if kind == "max" else SparseAvgPool2d)(kernel, stride, padding)
    run_both(pool, manager_for(layout), 4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_native_equals_minkowski_with_running_stats(layout, train):
    bn = SparseBatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    twin = copy.deepcopy(bn)
    bn.train(train), twin.train(train)
    manager = manager_for(layout)
    x = torch.randn(manager.num_rows(1), 5, dtype=DT, requires_grad=True)
    outs = []
    for module, backend in ((bn, "native"), (twin, "minkowski")):
        with use_settings(backend=backend):
            out = module(SparseTensor(x, manager=manager, stride=1)).features
        outs.append((out, torch.autograd.grad(out.pow(3).sum(), [x, module.weight, module.bias])))
    assert_close(outs[1][0], outs[0][0], 1e-10, "forward")
    for a, b in zip(outs[1][1], outs[0][1]):
        assert_close(a, b, 1e-10, "grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(twin, name), getattr(bn, name), rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_grn_and_global_pool_native_equal_minkowski(layout):
    manager = manager_for(layout)
    ln = SparseLayerNorm(6).double()
    grn, batch_grn = SparseGRN(6).double(), SparseGRN(6, mode="batch").double()
    with torch.no_grad():
        for p in (*ln.parameters(), *grn.parameters(), *batch_grn.parameters()):
            p.normal_()
    run_both(ln, manager, 6)
    run_both(grn, manager, 6)
    run_both(batch_grn, manager, 6)
    run_both(SparseGlobalAvgPool(), manager, 6)


def _random_backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(name).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases off their defaults, so a misplaced one shows
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if n.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"])
def test_backbone_native_equals_minkowski_forward_and_gradients(name):
    native = _random_backbone(name)
    me = copy.deepcopy(native)
    me.backend = "minkowski"
    assert me.state_dict().keys() == native.state_dict().keys()
    images = torch.randn(2, 3, 64, 64, dtype=DT, generator=torch.Generator().manual_seed(2))
    active = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    grads = []
    for model in (native, me):
        x = images.clone().requires_grad_()
        outs = model(x, active)
        loss = sum((o.features * torch.randn(o.features.shape, dtype=DT, generator=torch.Generator().manual_seed(i))).sum()
                   for i, o in enumerate(outs))
        params = list(model.parameters())
        grads.append(([o.features for o in outs], torch.autograd.grad(loss, [x] + params)))
    for i, (a, b) in enumerate(zip(grads[1][0], grads[0][0])):
        assert_close(a, b, 1e-10, f"{name} stage {i}")
    names = ["images"] + [n for n, _ in native.named_parameters()]
    for n, a, b in zip(names, grads[1][1], grads[0][1]):
        assert_close(a, b, 1e-10, f"{name} grad {n}")
    for (k, a), b in zip(native.state_dict().items(), me.state_dict().values()):  # BN running stats alike
        if a.is_floating_point():
            assert_close(b, a, 1e-10, k)


def test_resnet50_on_scattered_coordinates_native_equals_minkowski():
    native = _random_backbone("resnet50")
    me = copy.deepcopy(native)
    me.backend = "minkowski"
    manager = manager_for("scattered", size=64)
    x = torch.randn(manager.num_rows(1), 3, dtype=DT, requires_grad=True)
    results = []
    for model in (native, me):
        with use_settings(backend=model.backend):
            outs = model.forward_features(SparseTensor(x, manager=manager, stride=1))
        loss = sum(o.features.sin().sum() for o in outs)
        results.append(([o.features for o in outs], torch.autograd.grad(loss, [x, model.conv1.weight,
                                                                             model.layer4[0].downsample[0].weight])))
    for a, b in zip(results[1][0], results[0][0]):
        assert_close(a, b, 1e-10, "stage")
    for a, b in zip(results[1][1], results[0][1]):
        assert_close(a, b, 1e-10, "grad")


# ---------------------------------------------------------------------------------------------
# our layout helpers against real MinkowskiEngine convolutions (no bridge of ours involved)


def _me_input(x: torch.Tensor, active: torch.Tensor):
    coords = active.nonzero().to(torch.int32).contiguous()  # ME needs contiguous int32 (nonzero may not be)
    feats = x.permute(0, 2, 3, 1)[active]
    return ME.SparseTensor(feats, coordinates=coords)  # unique coordinates: ME keeps every row


def _dense_conv(x, weight, stride, groups=1):
    """F.conv2d with MinkowskiEngine's window: odd kernels centred, even kernels at offsets 0..k-1."""
    kh, kw = weight.shape[-2:]
    pads = []
    for k in (kw, kh):  # F.pad order: last axis first
        pads += [k // 2, k // 2] if k % 2 else [0, k - 1]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


def _check_at_active_sites(out, dense, stride, active):
    coords = out.C.long()
    assert coords.shape[0] == int(F.max_pool2d(active[:, None].double(), stride, stride).sum())  # floor quantisation
    got = out.F
    want = dense[coords[:, 0], :, coords[:, 1] // stride, coords[:, 2] // stride]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (7, 7), (2, 3), (7, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_dense_kernel_in_me_layout_runs_through_minkowski_convolution_like_conv2d(kernel, stride):
    g = torch.Generator().manual_seed(3)
    c_in, c_out = 3, 4
    x = torch.randn(2, c_in, 12, 14, dtype=DT, generator=g)
    active = torch.rand(2, 12, 14, generator=g) < 0.4
    x = x * active[:, None]
    weight = torch.randn(c_out, c_in, *kernel, dtype=DT, generator=g)  # asymmetric random values
    bias = torch.randn(c_out, dtype=DT, generator=g)
    conv = ME.MinkowskiConvolution(c_in, c_out, kernel_size=list(kernel), stride=stride, bias=True, dimension=2).double()
    with torch.no_grad():
        conv.kernel.copy_(dense_kernel_to_me(weight, stride=stride))
        conv.bias.copy_(dense_bias_to_me(bias))
    out = conv(_me_input(x, active))
    _check_at_active_sites(out, _dense_conv(x, weight, stride) + bias.view(1, -1, 1, 1), stride, active)


@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_kernels_load_into_minkowski_at_stride_1_and_strided(stride):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 8, 8, dtype=DT, generator=g)
    active = torch.rand(1, 8, 8, generator=g) < 0.5
    weight = torch.randn(6, 5, 1, 1, dtype=DT, generator=g)
    conv = ME.MinkowskiConvolution(5, 6, kernel_size=1, stride=stride, dimension=2).double()
    kernel = dense_kernel_to_me(weight, stride=stride)
    assert kernel.shape == conv.kernel.shape == ((5, 6) if stride == 1 else (1, 5, 6))
    with torch.no_grad():
        conv.kernel.copy_(kernel)
    out = conv(_me_input(x * active[:, None], active))
    _check_at_active_sites(out, _dense_conv(x * active[:, None], weight, stride), stride, active)


@pytest.mark.parametrize("kernel, stride", [((7, 7), 1), ((3, 3), 2), ((3, 2), 1)])
def test_depthwise_kernel_in_me_layout_runs_through_channelwise_convolution(kernel, stride):
    g = torch.Generator().manual_seed(5)
    c = 4
    x = torch.randn(2, c, 10, 10, dtype=DT, generator=g)
    active = torch.rand(2, 10, 10, generator=g) < 0.4
    x = x * active[:, None]
    weight = torch.randn(c, 1, *kernel, dtype=DT, generator=g)
    conv = ME.MinkowskiChannelwiseConvolution(c, kernel_size=list(kernel), stride=stride, dimension=2).double()
    with torch.no_grad():
        conv.kernel.copy_(dense_kernel_to_me(weight, depthwise=True))
    out = conv(_me_input(x, active))
    _check_at_active_sites(out, _dense_conv(x, weight, stride, groups=c), stride, active)


def test_bench_has_a_minkowski_column_timed_beside_ours(tmp_path):
    import json

    from sparse_mim.bench import main
    from sparse_mim.bench.memory import cpu_peak_mb_subprocess
    from sparse_mim.bench.workload import WorkloadSpec

    threads = torch.get_num_threads()
    try:
        assert main(["models=[resnet18]", "mask_ratios=[0.5]", "batch_size=2", "img_size=64", "repeats=1",
                     "warmup=0", "decoder_width=32", "threads=1", "memory=false", "what=[encoder]", "device=cpu",
                     "backend=[native,minkowski]", f"output_dir={tmp_path}"]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(row["time_ms"]["encoder"]) == {"sparse", "dense", "minkowski"}
    assert row["minkowski_over_sparse"]["encoder"] > 0 and row["maps_ms_minkowski"] > 0
    assert "encoder fwd+bwd minkowski ms" in (tmp_path / "results.md").read_text()
    spec = WorkloadSpec(model="resnet18", mask_ratio=0.5, batch_size=2, img_size=64, device="cpu", autocast=False,
                        channels_last=True, execution="auto", decoder_width=32, seed=0, backends=("native", "minkowski"))
    assert 0 < cpu_peak_mb_subprocess(spec, "minkowski", "encoder", threads=1, timeout=300) < 2048
