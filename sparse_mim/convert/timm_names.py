"""Encoder weights -> a state_dict that loads into `timm.create_model(arch)`.

Our encoder keys already are timm's; this checks them against the real timm model (built on the
`meta` device, so no memory or init time is spent) and fails loudly on any difference.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import torch

from .archs import CLASSIFIER_PREFIXES, get_arch
from .errors import ConversionError
from .sources import load_encoder_state_dict
from .verify import key_problems, shapes_of

_NBT = "num_batches_tracked"


@functools.lru_cache(maxsize=None)
def _timm_model(arch: str) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[str, ...]]:
    """(keys and shapes, head prefixes) of timm's `arch`, built on the meta device."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    if get_arch(arch).family != "timm":
        return shapes, CLASSIFIER_PREFIXES
    # a sparsified timm model (backbones.sparsified) ends at its last feature map: the top-level
    # modules after the one holding it (pooling, classifier, EfficientNet's conv_head) are the head
    top = model.feature_info[-1]["module"].split(".")[0]
    names = list(model._modules)
    return shapes, tuple(f"{n}." for n in names[names.index(top) + 1:])


def _is_head(arch: str, key: str) -> bool:
    return key.startswith(_timm_model(arch)[1])


def timm_encoder_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """timm's state_dict keys and shapes for `arch`, minus the classifier/head, in model order."""
    get_arch(arch)
    return {k: s for k, s in _timm_model(arch)[0] if not _is_head(arch, k)}


def timm_classifier_keys(arch: str) -> list[str]:
    """The keys of timm's `arch` that an encoder export leaves for the target model to initialise."""
    get_arch(arch)
    return [k for k, _ in _timm_model(arch)[0] if _is_head(arch, k)]


def to_timm(src: str | os.PathLike | Mapping, arch: str) -> dict[str, torch.Tensor]:
    """Return the encoder weights of `src` keyed and ordered like `timm.create_model(arch)`.

    `load_state_dict(sd, strict=False)` then reports only the classifier/head as missing and
    nothing as unexpected. BatchNorm `num_batches_tracked` counters absent from `src` are set to 0
    (they only matter when BN momentum is None). Raises ConversionError listing missing, unexpected
    and wrongly shaped keys."""
    get_arch(arch)
    state_dict, _ = load_encoder_state_dict(src, arch)
    expected = timm_encoder_shapes(arch)
    state_dict = dict(state_dict)
    for key in expected:
        bn = key.removesuffix(_NBT)
        if key.endswith(_NBT) and key not in state_dict and bn + "running_mean" in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    problems = key_problems(shapes_of(state_dict), expected)
    if problems:
        raise ConversionError(
            f"encoder weights do not match timm {arch!r} (classifier excluded): {problems}\n"
            f"Check that the backbone given (--arch NAME) is the one that was pretrained, and that the checkpoint is "
            f"a sparse-mim pretraining checkpoint or encoder export."
        )
    return {k: state_dict[k] for k in expected}
