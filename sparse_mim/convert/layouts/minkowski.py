"""Whole encoders in MinkowskiEngine's weight layout -> timm names and shapes (what
`sparse-mim convert --to minkowski` writes for every backbone but ConvNeXt V2, read back).

The keys are timm's, with each convolution's `.weight` stored as an ME `.kernel` (`(K, C_in, C_out)`,
`(C_in, C_out)` for a stride-1 1x1 conv, depthwise `(K, C)`) and its bias as `(1, C_out)`; norms are
unchanged. A kernel's size is not in its shape, so the arch's timm shapes tell it. (ConvNeXt V2
encoders use the FCMAE layout instead, `layouts/fcmae.py`.)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from sparse_mim.engine.minkowski_layout import KernelLayoutError, me_bias_to_dense, me_kernel_to_dense

from ..errors import ConversionError
from ..timm_keys import timm_encoder_shapes

__all__ = ["KERNEL_SUFFIX", "is_minkowski_layout", "is_depthwise", "minkowski_to_timm"]

KERNEL_SUFFIX = ".kernel"


def is_minkowski_layout(keys) -> bool:
    return any(k.endswith(KERNEL_SUFFIX) for k in keys)


def is_depthwise(shape: tuple[int, ...]) -> bool:
    """A Conv2d weight shape `(C, 1, kh, kw)` with more than one channel: a depthwise convolution."""
    return len(shape) == 4 and shape[1] == 1 and shape[0] > 1


def minkowski_to_timm(encoder: Mapping[str, torch.Tensor], arch: str | None) -> dict[str, torch.Tensor]:
    """Encoder-relative weights in the generic ME layout -> timm names and shapes of `arch`."""
    if arch is None:
        raise ConversionError("these weights are in MinkowskiEngine's layout ('*.kernel'); name the model so "
                              "that each kernel's size is known, e.g. --arch resnet50")
    expected = timm_encoder_shapes(arch)
    out = {}
    for key, value in encoder.items():
        if key.endswith(KERNEL_SUFFIX):
            name = key.removesuffix(KERNEL_SUFFIX) + ".weight"
            shape = expected.get(name)
            if shape is None or len(shape) != 4:
                raise ConversionError(f"ME kernel {key!r} has no convolution {name!r} in timm {arch!r}; check --arch")
            try:
                out[name] = me_kernel_to_dense(value, shape[2:], depthwise=is_depthwise(shape))
            except KernelLayoutError as e:
                raise ConversionError(f"{key}: {e}") from None
        elif key.endswith(".bias") and value.dim() == 2 and value.shape[0] == 1:
            out[key] = me_bias_to_dense(value)
        else:
            out[key] = value
    return out
