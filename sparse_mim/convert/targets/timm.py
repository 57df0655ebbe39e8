"""Encoder weights (timm names) -> a state_dict that loads into `timm.create_model(arch)`.

Our encoder keys already are timm's; this checks them against the real timm model (its keys and
shapes from `timm_keys`) and fails loudly on any difference.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..archs import get_arch
from ..errors import ConversionError
from ..timm_keys import timm_encoder_shapes
from ..verify import key_problems, require_state_dict, shapes_of

_NBT = "num_batches_tracked"


def to_timm(encoder: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Return `encoder` (timm-named weights, e.g. `read(path).encoder`) keyed and ordered like
    `timm.create_model(arch)`.

    `load_state_dict(sd, strict=False)` then reports only the classifier/head as missing and
    nothing as unexpected. BatchNorm `num_batches_tracked` counters absent from `encoder` are set to 0
    (they only matter when BN momentum is None). Raises ConversionError listing missing, unexpected
    and wrongly shaped keys."""
    require_state_dict(encoder, "to_timm")
    get_arch(arch)
    expected = timm_encoder_shapes(arch)
    state_dict = dict(encoder)
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
