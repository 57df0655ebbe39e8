"""Encoder weights (timm names) -> MinkowskiEngine's weight layout (`sparse-mim convert --to minkowski`).

* ConvNeXt V2 archs use the official FCMAE layout (`layouts/fcmae.py`): what ConvNeXt V2's own sparse
  encoder and fine-tuning code read.
* Every other backbone keeps its timm key names, with each convolution's `.weight` stored as an ME
  `.kernel` and its bias as `(1, C_out)` (`layouts/minkowski.py` reads such files back).
A written file is `{"model": {"encoder.<key>": tensor}, "arch": NAME}`, like an FCMAE checkpoint. An
FCMAE pretraining run of ours is written whole (`official_fcmae_decoder`): encoder, mask_token, proj,
decoder and pred, the state_dict the official `FCMAE` module loads with strict=True.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from sparse_mim.engine.minkowski_layout import dense_bias_to_me, dense_kernel_to_me

from ..layouts.fcmae import FCMAE_DECODER_GROUPS, ours_to_official_fcmae, timm_to_fcmae
from ..layouts.minkowski import KERNEL_SUFFIX, is_depthwise
from ..verify import require_state_dict
from .timm import to_timm

__all__ = ["to_minkowski", "official_fcmae_decoder"]

_STRIDED_1X1 = re.compile(r"layer[2-9]\d*\.0\.downsample\.0\.weight")  # ResNet shortcuts of stages 2..4


def to_minkowski(encoder: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """`encoder` (timm-named weights, checked with `to_timm`) -> the `model` dict of an ME checkpoint."""
    require_state_dict(encoder, "to_minkowski")
    weights = to_timm(encoder, arch)
    if arch.startswith("convnextv2_"):
        return {f"encoder.{k}": v for k, v in timm_to_fcmae(weights).items()}
    out = {}
    for key, value in weights.items():
        stem = key.removesuffix(".weight")
        if key.endswith(".weight") and value.dim() == 4:
            stride = 2 if _STRIDED_1X1.fullmatch(key) else 1
            out[f"encoder.{stem}{KERNEL_SUFFIX}"] = dense_kernel_to_me(value, depthwise=is_depthwise(value.shape),
                                                                       stride=stride)
        elif key.endswith(".bias") and weights.get(key.removesuffix(".bias") + ".weight", value).dim() == 4:
            out[f"encoder.{key}"] = dense_bias_to_me(value)
        else:
            out[f"encoder.{key}"] = value
    return out


def official_fcmae_decoder(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder side of our whole FCMAE model's weights (`read(path).weights`), in the official
    names and layouts, to add to `to_minkowski`'s encoder."""
    return ours_to_official_fcmae({k: v for k, v in weights.items() if k.split(".", 1)[0] in FCMAE_DECODER_GROUPS})
