"""Whole encoders in MinkowskiEngine's weight layout, both ways (`sparse-mim convert --to minkowski`).

* ConvNeXt V2 archs use the official FCMAE layout (`fcmae.py`): what ConvNeXt V2's own sparse
  encoder and fine-tuning code read.
* Every other backbone keeps its timm key names, with each convolution's `.weight` stored as an ME
  `.kernel` (`(K, C_in, C_out)`, `(C_in, C_out)` for a stride-1 1x1 conv, depthwise `(K, C)`) and its
  bias as `(1, C_out)`; norms are unchanged. Reading such a file back needs the arch, whose timm
  shapes tell each kernel's size.
A written file is `{"model": {"encoder.<key>": tensor}, "arch": NAME}`, like an FCMAE checkpoint. An
FCMAE pretraining run of ours is written whole (`fcmae_decoder_of`): encoder, mask_token, proj, decoder
and pred, the state_dict the official `FCMAE` module loads with strict=True.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .errors import ConversionError
from .fcmae import FCMAE_DECODER_GROUPS, ours_to_official_fcmae, timm_to_fcmae
from sparse_mim.engine.minkowski_layout import (KernelLayoutError, dense_bias_to_me, dense_kernel_to_me, me_bias_to_dense,
                                                me_kernel_to_dense)

__all__ = ["to_minkowski", "from_minkowski_layout", "is_minkowski_layout", "fcmae_decoder_of"]

_KERNEL = ".kernel"
_STRIDED_1X1 = re.compile(r"layer[2-9]\d*\.0\.downsample\.0\.weight")  # ResNet shortcuts of stages 2..4


def is_minkowski_layout(keys) -> bool:
    return any(k.endswith(_KERNEL) for k in keys)


def _is_depthwise(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[1] == 1 and shape[0] > 1


def to_minkowski(encoder: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A timm-named encoder state_dict (checked with `to_timm`) -> the `model` dict of an ME checkpoint."""
    from .timm_names import to_timm

    weights = to_timm(encoder, arch)
    if arch.startswith("convnextv2_"):
        return {f"encoder.{k}": v for k, v in timm_to_fcmae(weights).items()}
    out = {}
    for key, value in weights.items():
        stem = key.removesuffix(".weight")
        if key.endswith(".weight") and value.dim() == 4:
            stride = 2 if _STRIDED_1X1.fullmatch(key) else 1
            out[f"encoder.{stem}{_KERNEL}"] = dense_kernel_to_me(value, depthwise=_is_depthwise(value.shape),
                                                                 stride=stride)
        elif key.endswith(".bias") and weights.get(key.removesuffix(".bias") + ".weight", value).dim() == 4:
            out[f"encoder.{key}"] = dense_bias_to_me(value)
        else:
            out[f"encoder.{key}"] = value
    return out


def fcmae_decoder_of(raw: Mapping) -> dict[str, torch.Tensor]:
    """The decoder side of one of our FCMAE pretraining checkpoints, in the official names and layouts
    (to add to `to_minkowski`'s encoder); empty for any other checkpoint."""
    from .sources import PRETRAIN_FORMAT, all_weights

    config = raw.get("config") if isinstance(raw, Mapping) else None
    if raw.get("format") != PRETRAIN_FORMAT or not isinstance(config, Mapping) or config.get("method") != "fcmae":
        return {}
    weights = all_weights(raw)
    return ours_to_official_fcmae({k: v for k, v in weights.items() if k.split(".", 1)[0] in FCMAE_DECODER_GROUPS})


def from_minkowski_layout(encoder: Mapping[str, torch.Tensor], arch: str | None) -> dict[str, torch.Tensor]:
    """Encoder-relative weights in the generic ME layout -> timm names and shapes of `arch`."""
    if arch is None:
        raise ConversionError("these weights are in MinkowskiEngine's layout ('*.kernel'); name the model so "
                              "that each kernel's size is known, e.g. --arch resnet50")
    from .timm_names import timm_encoder_shapes

    expected = timm_encoder_shapes(arch)
    out = {}
    for key, value in encoder.items():
        if key.endswith(_KERNEL):
            name = key.removesuffix(_KERNEL) + ".weight"
            shape = expected.get(name)
            if shape is None or len(shape) != 4:
                raise ConversionError(f"ME kernel {key!r} has no convolution {name!r} in timm {arch!r}; check --arch")
            try:
                out[name] = me_kernel_to_dense(value, shape[2:], depthwise=_is_depthwise(shape))
            except KernelLayoutError as e:
                raise ConversionError(f"{key}: {e}") from None
        elif key.endswith(".bias") and value.dim() == 2 and value.shape[0] == 1:
            out[key] = me_bias_to_dense(value)
        else:
            out[key] = value
    return out
