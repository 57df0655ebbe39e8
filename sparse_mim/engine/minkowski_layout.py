"""MinkowskiEngine <-> dense (torch.nn.Conv2d) weight layouts; pure tensor reshuffles, used by the
``minkowski`` backend (our weights handed to ME modules) and by ``sparse_mim.convert`` (checkpoints).

ME stores a conv kernel as `(K, C_in, C_out)`, K = kh * kw offsets. For coordinates `[b, h, w]`
the offset index is `k = dh + kh * dw` (the first spatial axis varies fastest), and ME applies the
kernel as a cross-correlation like conv2d (no flip), so

    W_dense[o, i, a, b] = K_me[a + kh * b, i, o]

A 1x1 kernel is stored as `(C_in, C_out)` only at stride 1 (MinkowskiEngine then runs it as a plain
matrix product); a strided 1x1 convolution (a ResNet downsample) keeps `(1, C_in, C_out)`. A
depthwise (channelwise) kernel is `(K, C)` and a bias `(1, C_out)`.
"""
from __future__ import annotations

import torch

__all__ = ["KernelLayoutError", "me_kernel_to_dense", "dense_kernel_to_me", "me_bias_to_dense", "dense_bias_to_me"]


class KernelLayoutError(ValueError):
    """A weight's shape does not fit the layout it is converted from (ME kernel or Conv2d weight)."""


def _stride_of(stride: int | tuple[int, int]) -> int:
    s = _extent(stride)
    return max(s)


def _extent(kernel_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(kernel_size, int):
        return kernel_size, kernel_size
    kh, kw = kernel_size
    return int(kh), int(kw)


def me_kernel_to_dense(
    kernel: torch.Tensor, kernel_size: int | tuple[int, int], *, depthwise: bool | None = None
) -> torch.Tensor:
    """ME kernel -> Conv2d weight: `(K, C_in, C_out)` -> `(C_out, C_in, kh, kw)`;
    `(C_in, C_out)` (1x1) -> `(C_out, C_in, 1, 1)`; depthwise `(K, C)` -> `(C, 1, kh, kw)`.

    A 2-D kernel is depthwise when the kernel is larger than 1x1 unless `depthwise` says otherwise
    (a 1x1 depthwise kernel `(1, C)` needs `depthwise=True`)."""
    kh, kw = _extent(kernel_size)
    volume = kh * kw
    if kernel.dim() == 3:
        if depthwise or kernel.shape[0] != volume:
            raise KernelLayoutError(
                f"a (K, C_in, C_out) ME kernel of size {kh}x{kw} needs K = {volume}, "
                f"found shape {tuple(kernel.shape)}" + (" (and is not depthwise)" if depthwise else "")
            )
        # index a + kh*b: reshape to [b, a, i, o], then move to [o, i, a, b]
        return kernel.reshape(kw, kh, *kernel.shape[1:]).permute(3, 2, 1, 0).contiguous()
    if kernel.dim() != 2:
        raise KernelLayoutError(f"expected a 2-D or 3-D ME kernel, found shape {tuple(kernel.shape)}")
    if depthwise is None:
        depthwise = volume > 1
    if depthwise:
        if kernel.shape[0] != volume:
            raise KernelLayoutError(
                f"a depthwise (K, C) ME kernel of size {kh}x{kw} needs K = {volume}, "
                f"found shape {tuple(kernel.shape)}"
            )
        return kernel.reshape(kw, kh, -1).permute(2, 1, 0).unsqueeze(1).contiguous()
    if volume != 1:
        raise KernelLayoutError(
            f"a 2-D (C_in, C_out) ME kernel is 1x1, but kernel_size is {kh}x{kw}; pass "
            "depthwise=True for a channelwise kernel"
        )
    return kernel.t()[:, :, None, None].contiguous()


def dense_kernel_to_me(weight: torch.Tensor, *, depthwise: bool = False, stride: int = 1) -> torch.Tensor:
    """Conv2d weight -> ME kernel; the inverse of `me_kernel_to_dense`. `(C_out, C_in, kh, kw)` ->
    `(kh*kw, C_in, C_out)`, or `(C_in, C_out)` for a 1x1 kernel at `stride` 1 (the shape
    MinkowskiEngine gives a stride-1 1x1 convolution; strided ones keep `(1, C_in, C_out)`); with
    `depthwise=True`, `(C, 1, kh, kw)` -> `(kh*kw, C)`."""
    if weight.dim() != 4:
        raise KernelLayoutError(f"expected a 4-D Conv2d weight, found shape {tuple(weight.shape)}")
    c_out, c_in, kh, kw = weight.shape
    if depthwise:
        if c_in != 1:
            raise KernelLayoutError(
                f"a depthwise Conv2d weight has shape (C, 1, kh, kw), found {tuple(weight.shape)}"
            )
        return weight[:, 0].permute(2, 1, 0).reshape(kh * kw, c_out).contiguous()
    if kh == kw == 1 and _stride_of(stride) == 1:
        return weight[:, :, 0, 0].t().contiguous()
    return weight.permute(3, 2, 1, 0).reshape(kh * kw, c_in, c_out).contiguous()


def me_bias_to_dense(bias: torch.Tensor) -> torch.Tensor:
    """`(1, C_out)` -> `(C_out,)`."""
    if bias.dim() != 2 or bias.shape[0] != 1:
        raise KernelLayoutError(f"an ME bias has shape (1, C_out), found {tuple(bias.shape)}")
    return bias[0].contiguous()


def dense_bias_to_me(bias: torch.Tensor) -> torch.Tensor:
    """`(C_out,)` -> `(1, C_out)`."""
    if bias.dim() != 1:
        raise KernelLayoutError(f"a Conv2d bias has shape (C_out,), found {tuple(bias.shape)}")
    return bias[None].contiguous()
