"""Convolution on active sites (submanifold at stride 1; strided outputs on the coarser mask).

Semantics (the masked-dense reference): ``conv2d(zero-filled input) * mask(out stride)``. Inactive
neighbours contribute zero and biases land on active outputs only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..execution import choose_path
from ..gather import gather_rows, scatter_add_rows
from ..settings import current_settings, use_settings
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from .window import (WindowGeometry, canvas_rows, gather_neighbors, neighbor_index, padded_tiles, tile_index,
                     tile_rows)

__all__ = ["conv2d", "dense_conv2d"]


def conv2d(x: SiteTensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: WindowGeometry,
           groups: int = 1) -> SiteTensor:
    """Convolve ``x`` with ``weight`` (C_out, C_in/groups, kh, kw) over active sites."""
    geom.check_grid(x.spatial_shape)
    out_stride = x.stride * geom.stride
    if x.num_channels != weight.shape[1] * groups:
        raise ValueError(f"conv expects {weight.shape[1] * groups} input channels, got {x.num_channels}")
    if isinstance(x, MaskedDenseTensor):
        return _masked_dense(x, weight, bias, geom, groups, out_stride)
    settings = current_settings()
    delegate = settings.backend_op("conv2d")
    if delegate is not None and (out := delegate(x, weight, bias, geom, groups)) is not NotImplemented:
        return out
    if geom.pointwise and groups == 1:
        return _pointwise(x, weight, bias, geom, out_stride)
    path = choose_path(settings, x, geom, depthwise=groups > 1 and groups == x.num_channels)
    if path == "tiles":
        rows = _TileConv.apply(x.features, weight, bias, tile_index(x, geom), geom, groups,
                               x.manager.tile_side(out_stride))
    elif path == "canvas":
        dense = dense_conv2d(x.dense(), weight, bias, geom, groups)
        rows = canvas_rows(dense, x, out_stride)
    elif path == "implicit_gemm" and (groups == 1 or groups == x.num_channels == weight.shape[0]):
        rows = _implicit_gemm(x, weight, bias, geom, groups)
    elif groups == 1 and not torch.is_autocast_enabled(x.features.device.type):
        rows = _GatherConv.apply(x.features, weight, bias, neighbor_index(x, geom))
    else:
        rows = _gather_conv(gather_neighbors(x, geom), weight, bias, groups)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


class _GatherConv(torch.autograd.Function):
    """Gather-GEMM convolution that saves the input rows and the kernel map, not the (N_out, K * C_in)
    neighbourhood matrix (K = 9 times the rows for a 3x3 kernel) nor a reordered copy of the weight:
    the backward gathers the neighbourhoods again (one copy), as ``_TileConv`` does with its tiles.

    The GEMM needs the neighbourhoods and the weight in the same (offset, channel) order. Gathered
    neighbourhoods come as (ky, kx, c), the weight as (c, ky, kx): whichever is smaller is reordered.
    With fewer output rows than output channels (the stride-16 and -32 stages of a masked image:
    a 512x512x3x3 weight against a few dozen rows) that is the neighbourhoods, and the weight and its
    gradient stay in their own layout (three weight-sized copies per step saved)."""

    @staticmethod
    def forward(ctx, features, weight, bias, nbr):
        n, k = nbr.shape
        c_out, c_in = weight.shape[:2]
        neigh = gather_rows(features, nbr.reshape(-1), 0.0).view(n, -1)
        if n < c_out:
            out = _channel_major(neigh, k, c_in) @ weight.reshape(c_out, -1).t()
        else:
            out = neigh @ weight.permute(2, 3, 1, 0).reshape(-1, c_out)
        if bias is not None:
            out += bias
        ctx.save_for_backward(features, weight, nbr)
        ctx.has_bias = bias is not None
        ctx.settings = current_settings()  # its backward gathers again (see engine.settings)
        return out

    @staticmethod
    def backward(ctx, grad):
        features, weight, nbr = ctx.saved_tensors
        n, k = nbr.shape
        c_out, c_in, kh, kw = weight.shape
        small = n < c_out
        g_features = g_w = g_b = None
        if ctx.needs_input_grad[1]:
            with use_settings(ctx.settings):
                neigh = gather_rows(features, nbr.reshape(-1), 0.0).view(n, -1)
            if small:
                g_w = (grad.t() @ _channel_major(neigh, k, c_in)).view(c_out, c_in, kh, kw)
            else:
                g_w = (neigh.t() @ grad).view(kh, kw, c_in, c_out).permute(3, 2, 0, 1)
            del neigh
        if ctx.needs_input_grad[0]:
            if small:  # (N_out, C_in * K) in (c, ky, kx) order -> (N_out * K, C_in)
                g_neigh = (grad @ weight.reshape(c_out, -1)).view(n, c_in, k).transpose(1, 2).reshape(n * k, c_in)
            else:
                g_neigh = (grad @ weight.permute(0, 2, 3, 1).reshape(c_out, -1)).view(n * k, c_in)  # (ky, kx, c)
            g_features = scatter_add_rows(g_neigh, nbr.reshape(-1), features.shape[0] + 1)
            g_features = g_features[:-1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = grad.sum(0)
        return g_features, g_w, g_b, None


def _channel_major(neigh: torch.Tensor, k: int, c_in: int) -> torch.Tensor:
    """(N, K * C) neighbourhoods in (ky, kx, c) order -> (N, C * K) in the weight's (c, ky, kx) order."""
    n = neigh.shape[0]
    return neigh.view(n, k, c_in).transpose(1, 2).reshape(n, c_in * k)


class _TileConv(torch.autograd.Function):
    """Convolution of halo-padded tiles (VALID), saving the rows instead of the padded tiles.

    The padded tiles are 1.6x (stride 4) to 9x (stride 32) the size of the rows they come from; the
    backward pass gathers them again, which costs one copy and keeps the memory of a sparse encoder
    proportional to its active sites.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, index, geom: WindowGeometry, groups: int, t_out: int):
        device = features.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype
        with torch.autocast(device, enabled=False):  # cast once, as autocast's conv2d would
            tiles = padded_tiles(features.to(dtype), index)
            weight_c = weight.to(dtype)
            out = F.conv2d(tiles, weight_c, None if bias is None else bias.to(dtype), geom.stride, 0,
                           geom.dilation, groups)
        ctx.save_for_backward(features, weight_c, index)
        ctx.conf = (geom, groups, (out.shape[0], out.shape[1], t_out, t_out), bias is not None, weight.dtype,
                    None if bias is None else bias.dtype, dtype)
        ctx.settings = current_settings()  # its backward gathers the tiles again (see engine.settings)
        return tile_rows(out, t_out)

    @staticmethod
    def backward(ctx, grad_rows):
        features, weight, index = ctx.saved_tensors
        geom, groups, out_shape, has_bias, w_dtype, b_dtype, dtype = ctx.conf
        with use_settings(ctx.settings):
            tiles = padded_tiles(features.to(dtype), index)
        n, c_out, t_out, _ = out_shape
        full = (tiles.shape[-1] - geom.dilation[0] * (geom.kernel[0] - 1) - 1) // geom.stride + 1
        grad = grad_rows.reshape(n, t_out, t_out, c_out).permute(0, 3, 1, 2)
        if full != t_out:  # outputs cropped in forward get zero gradient
            grad = F.pad(grad, (0, full - t_out, 0, full - t_out))
        grad = grad.to(tiles.dtype)
        want_input = ctx.needs_input_grad[0]
        transposed = want_input and _self_adjoint(geom, t_out, index.shape[1])
        g_tiles, g_w, g_b = torch.ops.aten.convolution_backward(
            grad, tiles, weight, [c_out] if has_bias else None, [geom.stride] * 2, [0, 0],
            list(geom.dilation), False, [0, 0], groups,
            [want_input and not transposed, ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]])
        g_features = None
        if transposed:
            with use_settings(ctx.settings):
                g_features = _transposed_tile_conv(grad_rows.to(dtype), weight, index, geom, groups)
            g_features = g_features.to(features.dtype)
        elif g_tiles is not None:
            rows = tile_rows(g_tiles, g_tiles.shape[-1])
            g_features = scatter_add_rows(rows, index.reshape(-1), features.shape[0] + 1)[:-1].to(features.dtype)
        return (g_features, None if g_w is None else g_w.to(w_dtype),
                None if g_b is None else g_b.to(b_dtype), None, None, None, None)


def _self_adjoint(geom: WindowGeometry, t_out: int, t_padded: int) -> bool:
    """True when the input gradient is itself a tile convolution over the same halo tiles.

    At stride 1 with a centred window the input and output sites coincide, so the gradient of a
    submanifold convolution is the submanifold convolution of the output gradient with the flipped,
    transposed kernel: gather, dense conv, done. The general path scatters every halo row back with
    atomic adds instead.
    """
    lo, hi = geom.halo()
    return geom.stride == 1 and lo == hi and t_padded == t_out + lo + hi


def _transposed_tile_conv(grad_rows, weight, index, geom: WindowGeometry, groups: int) -> torch.Tensor:
    """Input-gradient rows of a stride-1 centred tile convolution (see ``_self_adjoint``)."""
    c_out, c_in_g, kh, kw = weight.shape
    w = weight.view(groups, c_out // groups, c_in_g, kh, kw).transpose(1, 2)
    w = w.reshape(groups * c_in_g, c_out // groups, kh, kw).flip(-1, -2)
    out = F.conv2d(padded_tiles(grad_rows, index), w, None, 1, 0, geom.dilation, groups)
    return tile_rows(out, out.shape[-1])


def dense_conv2d(dense, weight, bias, geom: WindowGeometry, groups):
    """The dense convolution ``geom`` describes (asymmetric padding included)."""
    if geom.pad_lo != geom.pad_hi:
        dense = F.pad(dense, (geom.pad_lo[1], geom.pad_hi[1], geom.pad_lo[0], geom.pad_hi[0]))
        return F.conv2d(dense, weight, bias, geom.stride, 0, geom.dilation, groups)
    return F.conv2d(dense, weight, bias, geom.stride, geom.pad_lo, geom.dilation, groups)


class _DepthwiseConvPlainWeightGrad(torch.autograd.Function):
    """A dense depthwise convolution of a channels_last map whose weight and bias gradients are
    computed from contiguous (NCHW) copies of the input, the output gradient and the weight; forward
    and input gradient as ``F.conv2d``'s. For channels_last input, oneDNN (v3.12 in torch 2.14, CPU)
    computes a depthwise weight gradient with its general grouped kernel in the padded
    ``aBCde16c16b`` weight format: every group's 1x1 channel pair padded to 16x16, a transient 256
    times the weight gradient, then reordered to
    plain; the bias gradient alone runs that primitive too. From NCHW it runs a GEMM without it. The
    input gradient (oneDNN's depthwise kernel, no such transient) stays channels_last. Saves what
    ``F.conv2d`` saves (the input and the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        conv_bwd = torch.ops.aten.convolution_backward
        g_x = g_w = g_b = None
        if need_x:
            g_x = conv_bwd(grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                           [True, False, False])[0]
        need_b = need_b and has_bias
        if need_w or need_b:
            # the weight's strides too: a channels_last (C, 1, k, k) weight is also "contiguous" (its
            # size-1 dim's stride is ignored) but would select the channels_last kernel
            plain = weight.clone(memory_format=torch.contiguous_format)
            _, g_w, g_b = conv_bwd(grad.contiguous(), x.contiguous(), plain,
                                   [weight.shape[0]] if need_b else None, stride, padding, dilation, False,
                                   [0, 0], groups, [False, need_w, need_b])
        return g_x, g_w, g_b, None, None, None, None


def _plain_weight_grad(dense: torch.Tensor, weight: torch.Tensor, geom: WindowGeometry, groups: int) -> bool:
    """A channels_last depthwise convolution takes ``_DepthwiseConvPlainWeightGrad`` when oneDNN's padded
    weight gradient (``groups * 256 * kh * kw`` elements) exceeds ``plain_depthwise_weight_grad_ratio``
    (``EngineSettings``) times the input map: there the two copies are far smaller than that transient,
    and the NCHW GEMM is also faster; below it, the padded kernel is the faster one (docs/notes.md,
    "Where masked-dense memory went")."""
    ratio = current_settings().plain_depthwise_weight_grad_ratio
    if not ratio or dense.device.type != "cpu" or dense.dtype != torch.float32 or not torch.is_grad_enabled() \
            or torch.is_autocast_enabled("cpu") or not weight.requires_grad \
            or groups == 1 or groups != dense.shape[1] or weight.shape[0] != groups or geom.pad_lo != geom.pad_hi \
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) \
            or dense.is_contiguous() or not dense.is_contiguous(memory_format=torch.channels_last):
        return False
    padded = groups * 256 * weight.shape[2] * weight.shape[3]
    return padded > ratio * dense.numel()


def _masked_dense(x: MaskedDenseTensor, weight, bias, geom, groups, out_stride) -> MaskedDenseTensor:
    if _plain_weight_grad(x.dense_features, weight, geom, groups):
        out = _DepthwiseConvPlainWeightGrad.apply(x.dense_features, weight, bias, [geom.stride] * 2,
                                                  list(geom.pad_lo), list(geom.dilation), groups)
    else:
        out = dense_conv2d(x.dense_features, weight, bias, geom, groups)
    # in place, as the official SparK does: the convolution's backward does not read its output
    return MaskedDenseTensor(out.mul_(x.manager.mask(out_stride, out.dtype)), x.manager, out_stride)


def _pointwise(x: SparseTensor, weight, bias, geom, out_stride) -> SparseTensor:
    features = x.features
    if geom.stride > 1:
        if x.manager.tiled:
            s = geom.stride
            tiles = x.tiles()[:, ::s, ::s]
            features = tiles.reshape(-1, tiles.shape[-1])
        else:
            features = gather_neighbors(x, geom)[:, 0]
    rows = F.linear(features, weight.view(weight.shape[0], weight.shape[1]), bias)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


def _gather_conv(neigh: torch.Tensor, weight, bias, groups) -> torch.Tensor:
    """(N, K, C_in) neighbourhoods x weight -> (N, C_out); any group count."""
    n, k, c_in = neigh.shape
    c_out = weight.shape[0]
    if groups == 1:
        w = weight.permute(2, 3, 1, 0).reshape(k * c_in, c_out)
        out = neigh.reshape(n, k * c_in) @ w
    else:
        g = groups
        w = weight.view(g, c_out // g, c_in // g, k)
        out = torch.einsum("nkgc,gock->ngo", neigh.view(n, k, g, c_in // g), w).reshape(n, c_out)
    return out if bias is None else out + bias.to(out.dtype)


def _implicit_gemm(x: SparseTensor, weight, bias, geom, groups) -> torch.Tensor:
    """Fused gather-GEMM through the kernel map (Triton on CUDA; the PyTorch reference elsewhere).

    Maps and their inverses (for the input gradient) are cached on the manager: once per batch.
    """
    from ...kernels import gather_conv, gather_depthwise_conv, invert_neighbor_map
    m = x.manager
    key = (x.stride, geom)
    nbr = m.cached(("nbr32",) + key, lambda: m.neighbor_map(
        x.stride, geom.kernel, geom.dilation, geom.stride, geom.pad_lo).to(torch.int32).contiguous())
    nbr_inv = m.cached(("nbr32_inv",) + key, lambda: invert_neighbor_map(nbr, x.features.shape[0]))
    features = x.features
    if torch.is_autocast_enabled(features.device.type):  # the kernels take one dtype, like autocast's conv
        dtype = torch.get_autocast_dtype(features.device.type)
        features, weight = features.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    else:
        weight = weight.to(features.dtype)
    k = nbr.shape[1]
    if groups == 1:
        w = weight.permute(2, 3, 1, 0).reshape(k, weight.shape[1], weight.shape[0])
        return gather_conv(features, w, nbr, nbr_inv, bias=bias)
    w = weight.reshape(weight.shape[0], k).t()
    return gather_depthwise_conv(features, w, nbr, nbr_inv, bias=bias)
