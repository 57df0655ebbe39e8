"""timm's own state_dict keys and shapes for an arch: the name table every layout and target checks
against. The model is built on the ``meta`` device, so no memory or init time is spent."""
from __future__ import annotations

import functools

import torch

from .archs import CLASSIFIER_PREFIXES, get_arch


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
