"""Layout adapters: pure dict -> dict functions from the key names and tensor layouts a file was
written in to timm's (the names every target takes). `reader.read` finds the encoder in a
checkpoint and hands it to `to_timm_names`, which picks the adapter by the keys:

* ``"timm"``: our checkpoints and encoder exports, timm state dicts, torchvision ResNets (same names);
* ``"convnext-official"``: the official ConvNeXt names of the official SparK's ConvNeXts (`convnext`);
* ``"fcmae"``: ConvNeXt V2 FCMAE checkpoints, MinkowskiEngine kernels in the official names (`fcmae`);
* ``"minkowski"``: timm names with MinkowskiEngine kernels, as ``--to minkowski`` writes (`minkowski`).

`spark` holds the SparK checkpoint's names around the encoder (ours and the official one's).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .convnext import is_official_convnext_layout, official_convnext_to_timm
from .fcmae import fcmae_to_timm, is_fcmae_layout
from .minkowski import is_minkowski_layout, minkowski_to_timm

__all__ = ["TIMM", "to_timm_names"]

TIMM = "timm"
# In the order they are tried: FCMAE kernels end in ".kernel" too.
_ADAPTERS = (
    ("fcmae", is_fcmae_layout, fcmae_to_timm),
    ("minkowski", is_minkowski_layout, minkowski_to_timm),
    ("convnext-official", is_official_convnext_layout, official_convnext_to_timm),
)


def to_timm_names(encoder: Mapping[str, torch.Tensor], arch: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    """(the layout `encoder` is in, its weights in timm's names and shapes). `arch` (None: unknown) is
    needed where the layout does not tell the shapes (official ConvNeXt names, MinkowskiEngine kernels)."""
    for name, matches, adapt in _ADAPTERS:
        if matches(encoder):
            return name, adapt(encoder, arch)
    return TIMM, dict(encoder)
