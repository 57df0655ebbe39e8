"""A fixed depthwise filter over a reflect- or zero-padded window: timm's ``BlurPool2d`` (anti-aliased
downsampling of ResNet-blur and TResNet).

Reflect padding has a sparse meaning: a window position outside the image reads the site mirrored
back into the image (``-1 -> 1``, ``H -> H - 2``), which is zero when that site is masked, exactly as
in the masked-dense map that the dense layer pads. Each output site gathers its ``k x k`` (mirrored)
neighbours, so only active sites are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..coords import SparseInputError
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from ..gather import gather_rows

__all__ = ["padded_depthwise_filter"]


def _check(x: SiteTensor, k: int, stride: int, pad: int, mode: str) -> None:
    h, w = x.spatial_shape
    for n in (h, w):
        if n % stride or (n + 2 * pad - k) // stride + 1 != n // stride:
            raise SparseInputError(f"a {k}x{k} filter with stride {stride} and padding {pad} maps a {h}x{w} grid "
                                   f"to another size than {h // stride}x{w // stride}; sparse ops need input / stride")
        if mode == "reflect" and pad >= n:
            raise SparseInputError(f"reflect padding {pad} needs a grid larger than {h}x{w}")


def _window_rows(x: SparseTensor, k: int, stride: int, pad: int, mode: str) -> torch.Tensor:
    """(N_out * k * k,) input row of every output row and offset (mirrored at the image border for
    ``reflect``); the fill row ``N`` where inactive or, for ``constant``, outside the image."""
    m = x.manager
    out_stride = x.stride * stride
    n_rows = x.features.shape[0]

    def build():
        h, w = m.spatial_shape(x.stride)
        c = m.coordinates(out_stride)
        r = torch.arange(k, device=m.device)
        ys = c[:, 1:2] * stride - pad + r.repeat_interleave(k)[None]
        xs = c[:, 2:3] * stride - pad + r.repeat(k)[None]
        if mode == "reflect":
            ys = torch.where(ys < 0, -ys, torch.where(ys >= h, 2 * (h - 1) - ys, ys))
            xs = torch.where(xs < 0, -xs, torch.where(xs >= w, 2 * (w - 1) - xs, xs))
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        rows = m.row_index_grid(x.stride)[c[:, 0:1].expand_as(ys), ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
        return torch.where(inside & (rows >= 0), rows, torch.full_like(rows, n_rows)).reshape(-1)
    return m.cached(("padded_window", x.stride, k, stride, pad, mode, n_rows), build)


def padded_depthwise_filter(x: SiteTensor, weight: torch.Tensor, stride: int, pad: int,
                            mode: str = "reflect") -> SiteTensor:
    """``F.conv2d(F.pad(x, [pad] * 4, mode=mode), weight, stride=stride, groups=C)`` on active sites;
    ``weight`` is (C, 1, k, k) or (1, 1, k, k) (one filter for every channel)."""
    if mode not in ("reflect", "constant"):
        raise SparseInputError(f"padding mode {mode!r}: only 'reflect' and 'constant' (zeros) have a sparse meaning")
    k = weight.shape[-1]
    _check(x, k, stride, pad, mode)
    c = x.num_channels
    w = weight.expand(c, 1, k, k)
    out_stride = x.stride * stride
    if isinstance(x, MaskedDenseTensor):
        out = F.conv2d(F.pad(x.dense_features, [pad] * 4, mode=mode), w, stride=stride, groups=c)
        return MaskedDenseTensor(out * x.manager.mask(out_stride, out.dtype), x.manager, out_stride)
    neighbours = gather_rows(x.features, _window_rows(x, k, stride, pad, mode), 0.0).view(-1, k * k, c)
    rows = torch.einsum("nkc,ck->nc", neighbours, w.reshape(c, k * k))
    return SparseTensor(rows, manager=x.manager, stride=out_stride)
