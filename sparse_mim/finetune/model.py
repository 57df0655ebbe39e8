"""The dense timm classifier a fine-tuning run trains, built from (pretrained) encoder weights.

Weights are read by the converter's one reader and checked against timm's model
(``sparse_mim.convert.read``, ``to_timm``): any file ``sparse-mim convert`` reads works, and a
checkpoint of another architecture is refused there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ["LoadReport", "LinearProbe", "build_classifier", "build_feature_extractor"]


@dataclass
class LoadReport:
    source: Optional[str]                 # the weights file, None for random init
    loaded: int = 0                       # tensors taken from the file
    fresh: List[str] = field(default_factory=list)  # parameters left at their random init (the head)

    def describe(self) -> str:
        if self.source is None:
            return "weights: random init (scratch)"
        return (f"weights: {self.loaded} tensors from {self.source}; initialised fresh: "
                f"{', '.join(self.fresh) or 'nothing'}")


def _create(arch: str, num_classes: int, drop_path_rate: float = 0.0) -> nn.Module:
    import timm

    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _load(model: nn.Module, arch: str, weights: Optional[str]) -> LoadReport:
    if weights is None:
        return LoadReport(None)
    from sparse_mim.convert import ConversionError, read, to_timm
    from sparse_mim.convert.errors import advice_for

    try:
        state = to_timm(read(str(weights), arch).encoder, arch)
    except ConversionError as e:
        raise ConversionError(f"weights={weights}: {advice_for(e)}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = {k for k in model.state_dict() if k.startswith(("fc.", "head.", "classifier."))}
    if unexpected or set(missing) - head:
        raise ConversionError(f"{weights} does not fit timm {arch!r}: missing {sorted(set(missing) - head)[:10]}, "
                              f"unexpected {sorted(unexpected)[:10]}")
    return LoadReport(str(weights), len(state), sorted(missing))


def build_classifier(arch: str, num_classes: int, weights: Optional[str] = None,
                     drop_path_rate: float = 0.0) -> tuple[nn.Module, LoadReport]:
    """``timm.create_model(arch, num_classes)`` with the encoder weights of ``weights`` (None: scratch)."""
    model = _create(arch, num_classes, drop_path_rate)
    return model, _load(model, arch, weights)


def build_feature_extractor(arch: str, weights: Optional[str] = None) -> tuple[nn.Module, LoadReport]:
    """The backbone with its classifier removed: ``model(images)`` -> pooled features ``(B, C)``."""
    model = _create(arch, 0)
    return model, _load(model, arch, weights)


class LinearProbe(nn.Module):
    """MAE's linear probe: a frozen backbone (BatchNorm in eval mode) and ``BN(affine=False) -> Linear``
    on its pooled features. Only the head trains; ``train()`` leaves the backbone in eval mode."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        features = backbone.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(features, affine=False, eps=1e-6), nn.Linear(features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(images)
        return self.head(features)
