"""The official ConvNeXt key names (facebookresearch/ConvNeXt: ``downsample_layers.*``,
``stages.i.j.dwconv``, ...), which the official SparK's ConvNeXts use -> timm's, through timm's own
``checkpoint_filter_fn``. The official final norm becomes timm's ``head.norm``: part of the classifier,
never of an encoder."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConversionError

__all__ = ["is_official_convnext_layout", "official_convnext_to_timm"]

_MARK = "downsample_layers.0.0.weight"  # the stem conv, under the official names


def is_official_convnext_layout(keys) -> bool:
    return _MARK in keys


def official_convnext_to_timm(weights: Mapping[str, torch.Tensor], arch: str | None) -> dict[str, torch.Tensor]:
    """Official ConvNeXt key names -> timm's for `arch` (the filter needs the model for a few shapes)."""
    if arch is None:
        raise ConversionError("these weights use the official ConvNeXt key names (downsample_layers.*, "
                              "stages.i.j.dwconv, ...); name the model to rename them, e.g. --arch convnext_small")
    if not arch.startswith("convnext"):
        raise ConversionError(f"these weights use official ConvNeXt key names, but the arch asked for is {arch!r}")
    import timm
    from timm.models.convnext import checkpoint_filter_fn
    with torch.device("meta"):  # shapes only: the filter reshapes a few tensors to the model's
        model = timm.create_model(arch, pretrained=False)
    try:
        return checkpoint_filter_fn(dict(weights), model)
    except KeyError as e:
        raise ConversionError(f"official ConvNeXt key {e.args[0]!r} has no counterpart in timm {arch!r}; "
                              "check --arch") from None
