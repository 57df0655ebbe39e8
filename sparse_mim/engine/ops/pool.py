"""Max and average pooling over active neighbours.

Sparse semantics (documented choice, the MinkowskiEngine one):
* max pooling takes the max over the *active* sites of the window (a window must contain at least
  one active site; with patch masks every window that covers its own output cell does). The official
  SparK's masked-dense simulation takes masked zeros into the max; both agree after a ReLU (true for
  the ResNet stem), not in general.
* average pooling divides by the number of *active* sites of the window (padding and masked sites
  excluded). For windows that lie inside one patch (ResNet-D's 2x2/2 ``avg_down``) this equals the
  dense average. With ``count_include_pad=True`` (``nn.AvgPool2d``'s default, Res2Net, ResNeSt) it
  divides by the window area instead: padding and masked sites count as zeros, which is what SparK's
  masked-dense simulation computes and, on a fully visible image, the dense layer.
The masked-dense reference below implements exactly these semantics with -inf fills and mask counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..coords import SparseInputError
from ..execution import choose_path
from ..settings import current_settings
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from .window import WindowGeometry, canvas_rows, gather_neighbors, gather_tiles, tile_rows

__all__ = ["max_pool2d", "avg_pool2d"]


def _padded(dense: torch.Tensor, geom: WindowGeometry, value: float) -> torch.Tensor:
    out = F.pad(dense, (geom.pad_lo[1], geom.pad_hi[1], geom.pad_lo[0], geom.pad_hi[0]), value=value)
    return out.contiguous(memory_format=torch.channels_last) \
        if dense.is_contiguous(memory_format=torch.channels_last) else out


class _MaxPool(torch.autograd.Function):
    """``F.max_pool2d`` that keeps only the argmax indices for backward, not its input (torch's own
    backward keeps both); the gradient is scattered to the argmax sites exactly as torch's is."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, return_indices=True)
        ctx.save_for_backward(index)
        ctx.shape, ctx.channels_last = x.shape, x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        b, c, h, w = ctx.shape
        if ctx.channels_last:  # scatter along the sites of each (sample, channel) in NHWC memory
            g = grad.new_zeros(b, h * w, c).scatter_add_(1, index.permute(0, 2, 3, 1).reshape(b, -1, c),
                                                         grad.permute(0, 2, 3, 1).reshape(b, -1, c))
            return g.view(b, h, w, c).permute(0, 3, 1, 2), None, None, None, None
        g = grad.new_zeros(b, c, h * w).scatter_add_(2, index.reshape(b, c, -1), grad.reshape(b, c, -1))
        return g.view(b, c, h, w), None, None, None, None


def _max_pool(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled() and x.dim() == 4:
        return _MaxPool.apply(x, kernel, stride, padding, dilation)
    return F.max_pool2d(x, kernel, stride, padding, dilation)


def _dense_max_pool(dense: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Max pool with -inf padding (max_pool2d's own padding is -inf when it is symmetric)."""
    if geom.pad_lo == geom.pad_hi and all(2 * p <= k for p, k in zip(geom.pad_lo, geom.kernel)):
        return _max_pool(dense, geom.kernel, geom.stride, geom.pad_lo, geom.dilation)
    return _max_pool(_padded(dense, geom, float("-inf")), geom.kernel, geom.stride, 0, geom.dilation)


def max_pool2d(x: SiteTensor, geom: WindowGeometry, border: float | None = None) -> SiteTensor:
    """Max over active neighbours; ``border`` (if not None) is the value of padding outside the image."""
    geom.check_grid(x.spatial_shape)
    out_stride = x.stride * geom.stride
    if isinstance(x, MaskedDenseTensor):
        active = x.active_mask()[:, None]
        filled = x.dense_features.masked_fill(~active, float("-inf"))
        out = _dense_max_pool(filled, geom) if border is None else _bordered_max_pool(filled, geom, border)
        out_active = x.manager.active_mask(out_stride)[:, None]
        return MaskedDenseTensor(out.masked_fill_(~out_active, 0.0), x.manager, out_stride)
    settings = current_settings()
    delegate = settings.backend_op("max_pool2d")
    if delegate is not None and (out := delegate(x, geom, border)) is not NotImplemented:
        return out
    path = "canvas" if border is not None else choose_path(settings, x, geom)
    if path == "canvas" and border is not None:
        dense = x.dense().masked_fill(~x.active_mask()[:, None], float("-inf"))
        rows = canvas_rows(_bordered_max_pool(dense, geom, border), x, out_stride)
    elif path == "tiles":
        tiles = gather_tiles(x, geom, fill=float("-inf"))
        out = _max_pool(tiles, geom.kernel, geom.stride, 0, geom.dilation)
        rows = tile_rows(out, x.manager.tile_side(out_stride))
    elif path == "canvas":
        dense = x.dense().masked_fill(~x.active_mask()[:, None], float("-inf"))
        out = _dense_max_pool(dense, geom)
        rows = canvas_rows(out, x, out_stride)
    else:
        rows = gather_neighbors(x, geom, fill=float("-inf")).amax(1)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


def _bordered_max_pool(dense: torch.Tensor, geom: WindowGeometry, border: float) -> torch.Tensor:
    return _max_pool(_padded(dense, geom, border), geom.kernel, geom.stride, 0, geom.dilation)


def avg_pool2d(x: SiteTensor, geom: WindowGeometry, count_include_pad: bool = False) -> SiteTensor:
    """Mean over the active sites of each window, or with ``count_include_pad`` their sum / window area."""
    geom.check_grid(x.spatial_shape)
    out_stride = x.stride * geom.stride
    if isinstance(x, MaskedDenseTensor):
        mask = x.mask()
        pool = lambda t: F.avg_pool2d(_padded(t, geom, 0.0), geom.kernel, geom.stride, 0)
        if geom.dilation != (1, 1):
            raise SparseInputError("avg_pool2d has no dilation")
        out = pool(x.dense_features)
        if not count_include_pad:
            out = out / pool(mask).clamp(min=1e-12)
        return MaskedDenseTensor(out * x.manager.mask(out_stride, out.dtype), x.manager, out_stride)
    settings = current_settings()
    delegate = settings.backend_op("avg_pool2d")
    if delegate is not None and (out := delegate(x, geom, count_include_pad)) is not NotImplemented:
        return out
    path = choose_path(settings, x, geom)
    ones = x.replace(torch.ones_like(x.features[:, :1]))
    if path in ("tiles", "canvas"):
        if path == "tiles":
            tiles = gather_tiles(x, geom)
            counts = None if count_include_pad else gather_tiles(ones, geom)
        else:
            tiles = _padded(x.dense(), geom, 0.0)
            counts = None if count_include_pad else _padded(ones.dense(), geom, 0.0)
        out = F.avg_pool2d(tiles, geom.kernel, geom.stride, 0)
        if counts is not None:
            out = out / F.avg_pool2d(counts, geom.kernel, geom.stride, 0)
        rows = tile_rows(out, x.manager.tile_side(out_stride)) if path == "tiles" else canvas_rows(out, x, out_stride)
    else:
        neigh = gather_neighbors(x, geom).sum(1)
        if count_include_pad:
            rows = neigh / (geom.kernel[0] * geom.kernel[1])
        else:
            rows = neigh / gather_neighbors(ones, geom).sum(1)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)
