"""Encoder weights (timm names) -> torchvision names, checked against torchvision's own model.

ResNets share timm's names. ConvNeXt renames (timm -> torchvision):
  stem.{0,1}                              -> features.0.{0,1}          (4x4 conv, LayerNorm2d)
  stages.s.downsample.{0,1}   (s = 1..3)  -> features.{2s}.{0,1}       (LayerNorm2d, 2x2 conv)
  stages.s.blocks.j.conv_dw / norm / mlp.fc1 / mlp.fc2
                                          -> features.{2s+1}.j.block.{0,2,3,5}
  stages.s.blocks.j.gamma (C,)            -> features.{2s+1}.j.layer_scale (C, 1, 1)
torchvision's `classifier.*` (LayerNorm2d, Flatten, Linear; timm's `head.norm` + `head.fc`) and the
ResNets' `fc.*` are the classifier: never in an encoder, left for the target model to initialise.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch

from ..archs import ARCHS, get_arch
from ..errors import ConversionError
from ..verify import key_problems, require_state_dict, shapes_of
from .timm import to_timm

TORCHVISION_ARCHS = tuple(name for name, a in ARCHS.items() if a.in_torchvision)
_CLASSIFIER_PREFIX = {"resnet": "fc.", "convnext": "classifier."}

_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_GAMMA = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.gamma")
_DOWNSAMPLE = re.compile(r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)")
_STEM = re.compile(r"stem\.([01])\.(weight|bias)")
_BLOCK_INDEX = {"conv_dw": 0, "norm": 2, "mlp.fc1": 3, "mlp.fc2": 5}


def _convnext_item(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    if m := _BLOCK.fullmatch(key):
        stage, block, layer, param = m.groups()
        return f"features.{2 * int(stage) + 1}.{block}.block.{_BLOCK_INDEX[layer]}.{param}", value
    if m := _GAMMA.fullmatch(key):
        stage, block = m.groups()
        return f"features.{2 * int(stage) + 1}.{block}.layer_scale", value.reshape(-1, 1, 1)
    if m := _DOWNSAMPLE.fullmatch(key):
        stage, index, param = m.groups()
        return f"features.{2 * int(stage)}.{index}.{param}", value
    if m := _STEM.fullmatch(key):
        index, param = m.groups()
        return f"features.0.{index}.{param}", value
    return None


@functools.lru_cache(maxsize=None)
def _torchvision_shapes(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def torchvision_encoder_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """torchvision's state_dict keys and shapes for `arch`, minus the classifier, in model order."""
    a = get_arch(arch, target="torchvision", supported=TORCHVISION_ARCHS)
    prefix = _CLASSIFIER_PREFIX[a.family]
    return {k: s for k, s in _torchvision_shapes(arch) if not k.startswith(prefix)}


def to_torchvision(encoder: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Return `encoder` (timm-named weights, e.g. `read(path).encoder`) keyed like
    `torchvision.models.<arch>()`.

    `load_state_dict(sd, strict=False)` then reports only `fc.*` (ResNet) or `classifier.*`
    (ConvNeXt) as missing. Raises ConversionError for archs torchvision lacks and for any key
    that does not line up."""
    require_state_dict(encoder, "to_torchvision")
    a = get_arch(arch, target="torchvision", supported=TORCHVISION_ARCHS)
    timm_sd = to_timm(encoder, arch)
    if a.family == "resnet":
        converted = dict(timm_sd)
    else:
        converted, unmapped = {}, []
        for key, value in timm_sd.items():
            item = _convnext_item(key, value)
            if item is None:
                unmapped.append(key)
            else:
                converted[item[0]] = item[1]
        if unmapped:
            raise ConversionError(
                f"no torchvision name for {len(unmapped)} timm keys of {arch!r}: "
                f"{', '.join(unmapped[:20])}"
            )
    expected = torchvision_encoder_shapes(arch)
    problems = key_problems(shapes_of(converted), expected)
    if problems:
        raise ConversionError(f"converted weights do not match torchvision {arch!r}: {problems}")
    return {k: converted[k] for k in expected}


def torchvision_classifier_keys(arch: str) -> list[str]:
    """The keys of torchvision's `arch` that an encoder export leaves for the model to initialise."""
    a = get_arch(arch, target="torchvision", supported=TORCHVISION_ARCHS)
    prefix = _CLASSIFIER_PREFIX[a.family]
    return [k for k, _ in _torchvision_shapes(arch) if k.startswith(prefix)]
