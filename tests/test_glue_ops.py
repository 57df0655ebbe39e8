"""The glue ops and layers with a sparse meaning that timm's and torchvision's CNNs call between their
layers: each one sparse vs the masked-dense reference (the same modules fed a MaskedDenseTensor) on
random patch masks, and sparse on a fully visible image vs the plain dense module, forward and
gradients (input and weights), float64."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_mim import SparseTensor
from sparse_mim.engine import UnsupportedOperationError, patch_input, sparsify_layers
from sparse_mim.engine.errors import UnsupportedLayerError
from sparse_mim.engine.tensor import MaskedDenseTensor

from conftest import assert_close, patch_mask

DT = torch.float64


def _stem(c_out=8, stride=1):
    return nn.Sequential(nn.Conv2d(3, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())


def _outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _run(model, x, build):
    """(outputs as dense maps, gradients of input and parameters) of ``model`` on ``build(x)``."""
    xi = x.clone().requires_grad_()
    inp = build(xi)
    outs = [o.dense() if not isinstance(o, torch.Tensor) else o for o in _outputs(model(inp))]
    loss = sum(((o - 0.3) ** 2).mean() + o.sin().sum() for o in outs)
    grads = torch.autograd.grad(loss, [xi] + list(model.parameters()), allow_unused=True)
    return outs, grads


def _assert_same(a, b, what, tol):
    (oa, ga), (ob, gb) = a, b
    assert len(oa) == len(ob)
    for i, (p, q) in enumerate(zip(oa, ob)):
        assert p.shape == q.shape, f"{what} output {i}: {tuple(p.shape)} vs {tuple(q.shape)}"
        assert_close(p, q, tol, f"{what} output {i}")
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert (p is None) == (q is None), f"{what} grad {i}"
        if p is not None:
            assert_close(p, q, tol, f"{what} grad {i}")


P = 8  # patch size: small maps keep float64 convolutions fast; every module here has total stride <= 4


def check(model, size=(16, 24), batch=2, masks=("random", "corners")):
    """Sparse == masked-dense on each mask kind, and sparse all-visible == the dense module."""
    model = model.to(DT).train()
    dense = copy.deepcopy(model)
    sparse = sparsify_layers(model)
    x = torch.randn(batch, 3, *size, dtype=DT)
    grid = (size[0] // P, size[1] // P)
    for kind in masks:
        mask = patch_mask(kind, batch, grid)
        ours = _run(sparse, x, lambda t: patch_input(t, mask, P))
        ref = _run(sparse, x, lambda t: patch_input(t, mask, P, dense_reference=True))
        _assert_same(ours, ref, f"{kind} mask: sparse vs masked-dense", 1e-10)
    full = torch.ones(batch, *grid, dtype=torch.bool)
    ours = _run(sparse, x, lambda t: patch_input(t, full, P))
    theirs = _run(dense, x, lambda t: t)
    _assert_same(ours, theirs, "all visible: sparse vs dense", 1e-10)
    return sparse


class Glue(nn.Module):
    """A stem conv, then ``fn(self, x)``, then a 1x1 conv (so weights on both sides get gradients)."""

    def __init__(self, fn, c_mid=8, c_out=None, stride=1, **children):
        super().__init__()
        self.stem = _stem(c_mid, stride)
        for k, v in children.items():
            setattr(self, k, v)
        self.fn = fn
        self.c_out = c_out

    def forward(self, x):
        y = self.fn(self, self.stem(x))
        return y


# -- channel slices ----------------------------------------------------------------------------------------
def test_channel_slice_by_indexing():
    def fn(m, x):  # GhostNet's out[:, :k, :, :], ReXNet's x[:, 0:c] + shortcut
        return torch.cat([x[:, 0:3] * 2.0 + x[:, 5:8], x[:, :6, :, :], x[:, 6:]], dim=1)
    check(Glue(fn))


def test_channel_slice_by_ellipsis_and_negative_bounds():
    check(Glue(lambda m, x: x[..., :, :][:, -4:] + x[:, 1:5]))


@pytest.mark.parametrize("how", ["Tensor.split", "torch.split sections", "chunk", "tensor_split", "narrow"])
def test_split_along_channels(how):
    def fn(m, x):
        if how == "Tensor.split":  # CSPNet
            a, b = x.split(4, dim=1)
            parts = [a, m.conv(b)]
        elif how == "torch.split sections":  # Res2Net
            parts = list(torch.split(x, [3, 5], 1))
        elif how == "chunk":  # ShuffleNetV2
            a, b = x.chunk(2, dim=1)
            parts = [m.conv(a), b]
        elif how == "tensor_split":
            parts = list(torch.tensor_split(x, [2, 7], dim=1))
        else:
            parts = [x.narrow(1, 2, 3), torch.narrow(x, 1, 0, 2)]
        return torch.cat([p.relu() for p in parts], 1)
    check(Glue(fn, conv=nn.Conv2d(4, 4, 3, padding=1)))


def test_channel_slices_keep_the_sites_and_views():
    x = patch_input(torch.randn(1, 6, 16, 16), patch_mask("random", 1, (2, 2)), P)
    a, b = x.split(4, 1)
    assert (a.num_channels, b.num_channels) == (4, 2) and a.stride == x.stride and a.manager is x.manager
    assert a.features.data_ptr() == x.features.data_ptr()  # a view of the rows, no copy
    assert x[:, :] is x


# -- channel regrouping ------------------------------------------------------------------------------------
def test_channel_shuffle():
    def fn(m, x):  # torchvision's ShuffleNetV2 channel_shuffle, groups 2
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return m.conv(x.view(b, -1, h, w))
    check(Glue(fn, conv=nn.Conv2d(8, 6, 3, padding=1)))


class SplitAttention(nn.Module):
    """timm's ResNeSt ``SplitAttn`` forward (radix 2, cardinality 1) on a stem."""

    def __init__(self, c=8, radix=2):
        super().__init__()
        self.radix = radix
        self.stem = _stem(c * radix)
        self.fc1 = nn.Conv2d(c, 4, 1, bias=False)  # a bias before BatchNorm has no gradient
        self.bn1 = nn.BatchNorm2d(4)
        self.fc2 = nn.Conv2d(4, c * radix, 1)

    def forward(self, x):
        x = self.stem(x)
        b, rc, h, w = x.shape
        x = x.reshape((b, self.radix, rc // self.radix, h, w))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        attn = attn.view(b, 1, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(b, -1)
        out = (x * attn.reshape((b, self.radix, rc // self.radix, 1, 1))).sum(dim=1)
        return out.contiguous()


def test_split_attention_over_radix_groups():
    check(SplitAttention())


class SelectiveKernel(nn.Module):
    """timm's SKNet ``SelectiveKernel``: branches stacked on a new axis, a pooled gate softmaxed over it."""

    def __init__(self, c=8, paths=2):
        super().__init__()
        self.stem = _stem(c)
        self.paths = nn.ModuleList(nn.Conv2d(c // paths, c, 3, padding=d, dilation=d) for d in range(1, paths + 1))
        self.reduce = nn.Conv2d(c, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.select = nn.Conv2d(4, c * paths, 1, bias=False)
        self.n = paths

    def forward(self, x):
        x = self.stem(x)
        split = torch.split(x, x.shape[1] // self.n, 1)
        x = torch.stack([op(s) for op, s in zip(self.paths, split)], dim=1)
        a = self.select(F.relu(self.bn(self.reduce(x.sum(1).mean((2, 3), keepdim=True)))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, self.n, c // self.n, h, w), dim=1)
        return torch.sum(x * a, dim=1)


def test_selective_kernel_stack_and_branch_softmax():
    check(SelectiveKernel())


def test_softmax_over_channels_and_over_groups_of_a_sparse_map():
    def fn(m, x):
        b, c, h, w = x.shape
        grouped = x.view(b, 2, c // 2, h, w).softmax(1).flatten(1, 2)
        return m.conv(x.softmax(dim=1) + grouped * x.sigmoid())
    check(Glue(fn, conv=nn.Conv2d(8, 4, 3, padding=1)))


def test_channel_mean_and_max_with_keepdim():
    def fn(m, x):  # CBAM's spatial gate
        gate = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * m.conv(gate).sigmoid()
    check(Glue(fn, conv=nn.Conv2d(2, 1, 7, padding=3)))


# -- moves between strides ---------------------------------------------------------------------------------
class Fuse(nn.Module):
    """HRNet's fuse: a coarse branch (stride 4 here) upsampled onto the fine one and added."""

    def __init__(self, functional=False):
        super().__init__()
        self.fine = _stem(8)
        self.coarse = nn.Sequential(nn.Conv2d(8, 6, 3, 4, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1),
                                    nn.Upsample(scale_factor=4, mode="nearest"))
        self.functional = functional

    def forward(self, x):
        x = self.fine(x)
        if self.functional:
            y = F.interpolate(self.coarse[:3](x), size=x.shape[-2:], mode="nearest")
        else:
            y = self.coarse(x)
        return F.relu(x + y)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Upsample", "F.interpolate size"])
def test_nearest_upsampling_onto_the_finer_active_set(functional):
    check(Fuse(functional))


def test_nearest_upsampling_of_arbitrary_sites_takes_the_parents_value():
    model = sparsify_layers(Fuse().to(DT))
    active = torch.rand(2, 16, 16) < 0.3
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    ours = _run(model, x, lambda t: SparseTensor.from_dense(t, active))
    ref = _run(model, x, lambda t: MaskedDenseTensor.from_dense(t, active))
    _assert_same(ours, ref, "arbitrary sites", 1e-10)


def test_space_to_depth_stem():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.SpaceToDepth(), nn.Conv2d(48, 8, 3, padding=1))
    assert sparsify_layers(copy.deepcopy(model))[0].__class__.__name__ == "SparseSpaceToDepth"
    check(model)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_blur_pool_reads_mirrored_sites_at_the_border(pad_mode):
    timm_layers = pytest.importorskip("timm.layers")
    blur = timm_layers.BlurPool2d(8, filt_size=3, stride=2, pad_mode=pad_mode)  # ResNet-blur, TResNet
    model = Glue(lambda m, x: m.conv(m.blur(x)), blur=blur, conv=nn.Conv2d(8, 4, 3, padding=1))
    assert type(sparsify_layers(copy.deepcopy(model)).blur).__name__ == "SparseBlurPool2d"
    check(model)


# -- pooling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_counting_padding_divides_by_the_window_area(stride):
    pool = nn.AvgPool2d(3, stride, padding=1)  # count_include_pad=True: Res2Net, ResNeSt
    check(Glue(lambda m, x: m.pool(x), pool=pool))


def test_max_pool_in_ceil_mode_pads_the_high_side():
    pool = nn.MaxPool2d(3, 2, ceil_mode=True)  # VoVNet: ceil mode keeps the grid at input / stride
    model = check(Glue(lambda m, x: m.pool(x), pool=pool))
    assert model.pool.geometry.pad_lo == (0, 0) and model.pool.geometry.pad_hi == (1, 1)


def test_avg_pool_in_ceil_mode_without_counting_padding():
    check(Glue(lambda m, x: m.pool(x), pool=nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False)))


def test_pools_whose_ceil_mode_changes_the_grid_are_refused_up_front():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(torch.nn.modules.pooling.MaxPool2d\): ceil_mode=True"):
        sparsify_layers(model)


def test_pools_called_functionally():
    def fn(m, x):  # GhostNet V2's gate: pooled, convolved, upsampled back; a stride-2 max pool beside it
        gate = m.conv(F.avg_pool2d(x, kernel_size=2, stride=2)).sigmoid()
        y = x * F.interpolate(gate, size=(x.shape[-2], x.shape[-1]), mode="nearest")
        return y, F.max_pool2d(y, 3, 2, 1)
    check(Glue(fn, conv=nn.Conv2d(8, 8, (1, 5), padding=(0, 2), groups=8)))


def test_gamma_activation():
    nfnet = pytest.importorskip("timm.models.nfnet")
    check(Glue(lambda m, x: m.act(x), act=nfnet.GammaAct("gelu", gamma=1.7)))


# -- zero padding folded into the next window op; scalar affine ---------------------------------------------
def _lab(scale=1.3, bias=-0.4):
    hgnet = pytest.importorskip("timm.models.hgnet")
    lab = hgnet.LearnableAffineBlock(scale, bias)
    return lab


def test_learnable_affine_block():
    check(Glue(lambda m, x: m.lab(x), lab=_lab()))  # HGNet-V2: scale * x + bias, two scalar weights


def test_zero_padding_folds_into_the_next_convolution_and_max_pool():
    def fn(m, x):  # HGNet-V2's stem: F.pad(x, (0, 1, 0, 1)) read by a 2x2 conv and a 2x2 stride-1 ceil-mode pool
        x = F.pad(m.lab(x), (0, 1, 0, 1))  # negative values, so the pool's zero border matters
        x2 = m.conv_b(F.pad(m.conv_a(x), (0, 1, 0, 1)))
        return torch.cat([m.pool(x), x2], 1)
    model = check(Glue(fn, lab=_lab(), conv_a=nn.Conv2d(8, 4, 2), conv_b=nn.Conv2d(4, 8, 2),
                       pool=nn.MaxPool2d(2, 1, ceil_mode=True)))
    assert model.conv_a.geometry.pad_hi == (0, 0)  # the padding lives in the call, not in the layer


@pytest.mark.parametrize("pads, stride", [((1, 1, 1, 1), 2), ((2, 0, 2, 0), 1)])
def test_zero_padding_before_an_unpadded_convolution(pads, stride):
    check(Glue(lambda m, x: m.conv(F.pad(x, pads)), conv=nn.Conv2d(8, 6, 3, stride)))


@pytest.mark.parametrize("op, message", [
    (lambda x: F.pad(x, (0, 1, 0, 1)).relu(), r"relu of a zero-padded sparse map"),
    (lambda x: F.pad(x, (0, 1, 0, 1)) + 1.0, r"__add__ of a zero-padded sparse map"),
    (lambda x: F.pad(x, (0, 1, 0, 1), value=1.0), r"only non-negative zero padding"),
    (lambda x: F.pad(x, (0, 1, 0, 1), mode="reflect"), r"only non-negative zero padding"),
    (lambda x: F.pad(x, (0, 0, 0, 0, 1, 1)), r"only non-negative zero padding"),
    (lambda x: F.pad(x, (2, 0, 0, 2)), r"the same on both axes"),
    (lambda x: nn.BatchNorm2d(8)(F.pad(x, (1, 1, 1, 1))), r"batch_norm of a zero-padded sparse map"),
])
def test_padding_not_read_by_a_window_op_is_refused(op, message):
    with pytest.raises(UnsupportedOperationError, match=message):
        op(_sparse_input())


def test_padding_before_a_max_pool_with_minus_infinity_padding_is_refused():
    pool = sparsify_layers(nn.Sequential(nn.MaxPool2d(3, 1, padding=1)))[0]
    with pytest.raises(UnsupportedOperationError, match="two borders"):
        pool(F.pad(_sparse_input(), (1, 1, 1, 1)))


# -- what stays refused, with the reason ------------------------------------------------------------------
def _sparse_input(channels=8):
    return patch_input(torch.randn(2, channels, 16, 16), patch_mask("random", 2, (2, 2)), P)


@pytest.mark.parametrize("op, message", [
    (lambda x: x[:, :, 1:], r"indexing a sparse tensor .*slice\(1, None, None\)"),
    (lambda x: x[:, ::2], r"only channel slices with step 1"),
    (lambda x: x.split(4, dim=2), r"split along dim 2 .* only along the channels"),
    (lambda x: x.view(2, 8, 16 * 16), r"spatial dims are never merged or split"),
    (lambda x: x.view(2, 8, 2, 8, 16), r"spatial dims are never merged or split"),
    (lambda x: x.flatten(2), r"would merge spatial dims"),
    (lambda x: x.transpose(1, 3), r"only transpose\(1, 2\) of a channel-grouped"),
    (lambda x: x.softmax(2), r"softmax over dim 2"),
    (lambda x: x.amax((2, 3)), r"amax over dims"),
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), r"only nearest upsampling"),
    (lambda x: F.interpolate(x, scale_factor=2), r"would leave the input grid"),
    (lambda x: x.view(2, 2, 4, 16, 16).mean((3, 4)), r"mean over dims"),
])
def test_glue_without_a_sparse_meaning_is_refused_with_the_reason(op, message):
    with pytest.raises((UnsupportedOperationError, ValueError), match=message):
        op(_sparse_input())


def test_writing_into_a_slice_is_refused_by_name():
    x = _sparse_input()
    with pytest.raises(UnsupportedOperationError, match=r"__setitem__ is not supported on sparse tensors"):
        x[:, :4] = x[:, 4:]


def test_a_channel_grouped_tensor_cannot_enter_a_layer():
    conv = sparsify_layers(nn.Sequential(nn.Conv2d(4, 4, 1)))[0]
    with pytest.raises(UnsupportedOperationError, match="channel-grouped"):
        conv(_sparse_input().view(2, 2, 4, 16, 16))


def test_non_nearest_upsampling_layers_are_refused_up_front():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2, mode="bilinear"),
                          nn.Upsample(scale_factor=1.5))
    with pytest.raises(UnsupportedLayerError) as e:
        sparsify_layers(model)
    assert [p for p, _ in e.value.layers] == ["1", "2"]
    assert "mode='bilinear'" in str(e.value) and "only one integer scale factor" in str(e.value)
