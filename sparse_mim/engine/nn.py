"""Sparse modules that mirror ``torch.nn`` one to one.

Each module subclasses its dense layer, so parameter names, shapes and initialisation are identical
and a sparse model's ``state_dict`` loads into the dense model unchanged. ``forward`` accepts a
``SparseTensor`` (real sparse execution), a ``MaskedDenseTensor`` (SparK's masked-dense reference) or
a plain dense tensor (the dense layer's behaviour).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import UnsupportedOperationError
from .ops.conv import dense_conv2d
from .ops.norm import sync_batch_norm_dense
from .ops.window import WindowGeometry
from .pad import PaddedSites, fold_into_conv, fold_into_max_pool
from .tensor import SiteTensor

__all__ = ["SparseConv2d", "SparseStdConv2d", "SparseScaledStdConv2d", "SparseLinear", "SparseBatchNorm2d",
           "SparseSyncBatchNorm", "SparseGroupNorm", "SparseLayerNorm",
           "SparseMaxPool2d", "SparseAvgPool2d", "SparseSpaceToDepth", "SparseBlurPool2d",
           "SparseGRN", "set_grn_mode", "SparseGlobalAvgPool", "SparseDropPath",
           "SparseActivation", "SparseReLU", "SparseReLU6", "SparseGELU", "convert_sync_batchnorm"]


def _check_layout(module: nn.Module, x: SiteTensor) -> None:
    """``module.layout`` (when set) is the logical layout its dense layer reads: a channels-last
    Linear fed an NCHW map would mix the width axis in dense PyTorch, so it is refused here."""
    if x.channel_groups is not None:
        raise UnsupportedOperationError(
            f"{type(module).__name__} got a channel-grouped {tuple(x.shape)} tensor (its dense layer reads 4-d "
            "maps); reshape it back to (B, C, H, W) first, as the dense model must")
    want = module.layout
    if want is not None and x.layout != want:
        raise UnsupportedOperationError(
            f"{type(module).__name__} expects a {want.upper()} input (as its dense layer reads it), got "
            f"{x.layout.upper()}; permute the tensor as the dense model does")


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` on active sites: submanifold at stride 1, coarser mask as output when strided.

    ``geometry`` may carry asymmetric padding (timm's ``Conv2dSame``: TF 'SAME' padding, static for
    inputs that are multiples of the stride); subclasses change the weight (``conv_weight``).
    """

    layout = "nchw"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError("sparse convolution supports padding_mode='zeros' only")
        self.geometry = WindowGeometry.make(self.kernel_size, self.stride, self.padding, self.dilation)

    def conv_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x):
        if isinstance(x, PaddedSites):  # F.pad's zeros become this window's zero padding
            x, geometry = fold_into_conv(x, self.geometry)
            _check_layout(self, x)
            return ops.conv2d(x, self.conv_weight(), self.bias, geometry, self.groups)
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.conv2d(x, self.conv_weight(), self.bias, self.geometry, self.groups)
        return dense_conv2d(x, self.conv_weight(), self.bias, self.geometry, self.groups)


class SparseStdConv2d(SparseConv2d):
    """Weight-standardised conv (timm ``StdConv2d``, BiT): each filter normalised to zero mean and unit
    variance (eps ``eps``) before convolving; the standardisation depends on weights only."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def conv_weight(self) -> torch.Tensor:
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                            momentum=0.0, eps=self.eps).reshape_as(self.weight)


class SparseScaledStdConv2d(SparseConv2d):
    """Scaled weight standardisation (timm ``ScaledStdConv2d``, NFNets): standardised filters times
    ``gain * gamma / sqrt(fan_in)``."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def conv_weight(self) -> torch.Tensor:
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                            eps=self.eps).reshape_as(self.weight)


class SparseLinear(nn.Linear):
    """Per-site ``nn.Linear`` (channels-last MLPs)."""

    layout = None  # sparsify sets "nhwc": the dense layer reads channels last

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.linear(x, self.weight, self.bias)
        return super().forward(x)


class _NormAct:
    """timm's ``BatchNormAct2d`` / ``GroupNormAct``: a norm followed by its ``drop`` and ``act`` children
    (absent on plain norms)."""

    def _post(self, y):
        drop, act = self._modules.get("drop"), self._modules.get("act")
        if drop is not None:
            y = drop(y)
        return y if act is None else act(y)


class SparseBatchNorm2d(_NormAct, nn.BatchNorm2d):
    """BatchNorm with statistics over active sites only (BatchNorm1d over the N_active x C rows)."""

    sync = False

    layout = None  # per channel: any logical layout

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return self._post(ops.batch_norm(x, self, sync=self.sync))
        if self.sync:
            return self._post(sync_batch_norm_dense(x, self))
        return self._post(super().forward(x))


class SparseSyncBatchNorm(SparseBatchNorm2d):
    """SparseBatchNorm2d whose statistics are summed over all ranks (CPU/gloo and CUDA/NCCL)."""

    sync = True

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


class SparseGroupNorm(_NormAct, nn.GroupNorm):
    """GroupNorm with statistics per sample and group over that sample's ACTIVE sites only."""

    layout = "nchw"

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return self._post(ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        return self._post(super().forward(x))


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at active sites. ``channels_first`` only records the dense layout."""

    layout = None  # sparsify sets the layout the dense layer reads ("nchw" for LayerNorm2d)

    def __init__(self, normalized_shape, eps: float = 1e-6, channels_first: bool = False, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.channels_first = channels_first

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.layer_norm(x, self)
        if self.channels_first:
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                self.eps).permute(0, 3, 1, 2)
        return super().forward(x)


class SparseMaxPool2d(nn.MaxPool2d):
    """Max over the *active* sites of each window (see ``ops.pool`` for the semantics).

    ``border`` (None = excluded, like -inf padding) is the value of padding outside the image: BiT's
    stem pads with zeros (``ConstantPad2d(1, 0)``) before an unpadded max pool, which ``sparsify``
    fuses into one pool with ``border=0``.
    """

    layout = "nchw"

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, border=None):
        super().__init__(kernel_size, stride, padding, dilation)
        self.geometry = WindowGeometry.make(kernel_size, self.stride, padding, dilation)
        self.border = border

    def forward(self, x):
        if isinstance(x, PaddedSites):  # F.pad's zeros are read as values, as by the dense pool
            x, geometry, border = fold_into_max_pool(x, self.geometry, self.border)
            _check_layout(self, x)
            return ops.max_pool2d(x, geometry, border)
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.max_pool2d(x, self.geometry, self.border)
        if self.border is not None:
            g = self.geometry
            x = F.pad(x, (g.pad_lo[1], g.pad_hi[1], g.pad_lo[0], g.pad_hi[0]), value=self.border)
            return F.max_pool2d(x, g.kernel, g.stride, 0, g.dilation)
        return super().forward(x)


class SparseAvgPool2d(nn.AvgPool2d):
    """Mean over the *active* sites of each window (padding and masked sites excluded); with
    ``count_include_pad=True`` the sum over active sites divided by the window area (padding and masked
    sites count as zeros, as in the dense layer and SparK's masked-dense simulation)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = False,
                 ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        self.geometry = WindowGeometry.make(kernel_size, self.stride, padding)

    layout = "nchw"

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.avg_pool2d(x, self.geometry, self.count_include_pad)
        return super().forward(x)


class SparseSpaceToDepth(nn.Module):
    """timm's ``SpaceToDepth`` (TResNet's stem): each ``block x block`` cell of sites becomes one site at
    ``block`` times the stride, its channels ordered ``(dy, dx, c)``; inactive sites of a cell read as
    zero. A cell lies inside one patch whenever ``block`` divides the patch's side at this stride."""

    layout = "nchw"

    def __init__(self, block_size: int = 4):
        super().__init__()
        self.bs = int(block_size)

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.space_to_depth(x, self.bs)
        n, c, h, w = x.shape
        x = x.view(n, c, h // self.bs, self.bs, w // self.bs, self.bs).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(n, c * self.bs * self.bs, h // self.bs, w // self.bs)

    def extra_repr(self) -> str:
        return f"block_size={self.bs}"


class SparseBlurPool2d(nn.Module):
    """timm's ``BlurPool2d``: a fixed binomial filter per channel over a reflect- (or zero-) padded window,
    strided (``ops.blur``: a window position outside the image reads the mirrored site)."""

    layout = "nchw"

    def __init__(self, channels=None, filt_size: int = 3, stride: int = 2, pad_mode: str = "reflect"):
        super().__init__()
        self.channels, self.filt_size, self.stride, self.pad_mode = channels, filt_size, stride, pad_mode
        self.padding = [((stride - 1) + (filt_size - 1)) // 2] * 4

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.padded_depthwise_filter(x, self.filt, self.stride, self.padding[0], self.pad_mode)
        x = F.pad(x, self.padding, mode=self.pad_mode)
        c = x.shape[1]
        return F.conv2d(x, self.filt.expand(c, 1, self.filt_size, self.filt_size), stride=self.stride, groups=c)


class SparseGRN(nn.Module):
    """ConvNeXt V2 Global Response Normalisation over active sites (timm names).

    ``mode="sample"``: each sample's own L2 norm (timm's dense GRN, fine-tuning); ``"batch"``: one norm
    over the whole local batch, as the official FCMAE sparse encoder (per process under DDP).
    """

    layout = None  # sparsify sets "nhwc" (timm's channels-last GRN)

    def __init__(self, dim: int, eps: float = 1e-6, mode: str = "sample"):
        super().__init__()
        if mode not in ops.GRN_MODES:
            raise ValueError(f"GRN mode must be one of {', '.join(ops.GRN_MODES)}, got {mode!r}")
        self.eps = eps
        self.mode = mode
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        if isinstance(x, SiteTensor):
            _check_layout(self, x)
            return ops.grn(x, self.weight, self.bias, self.eps, self.mode)
        # dense channels-last, as timm
        g = x.norm(p=2, dim=(1, 2) if self.mode == "sample" else (0, 1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias, self.weight, x * n)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, mode={self.mode}"


def set_grn_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` (``"sample"`` / ``"batch"``) on every ``SparseGRN`` of ``model``; returns ``model``."""
    if mode not in ops.GRN_MODES:
        raise ValueError(f"GRN mode must be one of {', '.join(ops.GRN_MODES)}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, SparseGRN):
            m.mode = mode
    return model


class SparseGlobalAvgPool(nn.Module):
    """(B, C) mean over each sample's active sites."""

    def forward(self, x):
        if isinstance(x, SiteTensor):
            return ops.global_avg_pool(x)
        return x.mean((2, 3))


class SparseDropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if isinstance(x, SiteTensor):
            return ops.drop_path(x, self.drop_prob, self.training)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SparseActivation(nn.Module):
    """A zero-preserving elementwise activation (f(0) = 0) applied to active rows."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)  # on the engine's tensors: engine.dispatch' pointwise dispatch


class SparseReLU(SparseActivation):
    def __init__(self, inplace: bool = False):
        super().__init__(F.relu_ if inplace else F.relu)
        self.inplace = inplace


class SparseReLU6(SparseActivation):
    def __init__(self, inplace: bool = False):
        super().__init__(F.relu6)


class SparseGELU(SparseActivation):
    def __init__(self):
        super().__init__(F.gelu)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Swap every BatchNorm for a synced one: sparse ones stay sparse; dense ones become
    ``nn.SyncBatchNorm`` on CUDA and ``SparseSyncBatchNorm`` (dense input, gloo) elsewhere."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SparseSyncBatchNorm) \
            and not isinstance(module, nn.SyncBatchNorm):
        on_cuda = module.weight is not None and module.weight.is_cuda
        if isinstance(module, SparseBatchNorm2d) or not on_cuda:
            out = SparseSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats, process_group=process_group)
        else:
            out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, process_group)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        like = module.weight if module.weight is not None else module.running_mean
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
