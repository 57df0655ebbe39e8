"""The architectures the converters know, described by name only (no model code is imported).

Every supported arch is a timm model name. Our sparse backbones share timm's state_dict keys minus
the classifier, so the classifier prefixes below are the only keys an encoder export never has.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError

# Keys under these prefixes are the classifier/head in every supported timm model: `fc.*` for the
# ResNets, `head.*` (the pooled-feature `head.norm` and `head.fc`) for the ConvNeXts. Our backbones
# end at the last stage, so none of them is part of an encoder.
CLASSIFIER_PREFIXES = ("fc.", "head.")


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # "resnet" or "convnext"
    in_torchvision: bool
    # ResNets only: blocks per stage and whether the blocks are bottlenecks (R50 and deeper).
    blocks_per_stage: tuple[int, ...] = ()
    bottleneck: bool = False

    @property
    def depth(self) -> int:
        return int(self.name.removeprefix("resnet"))


def _resnet(depth: int, blocks: tuple[int, ...], in_torchvision: bool = True) -> Arch:
    return Arch(f"resnet{depth}", "resnet", in_torchvision, blocks, bottleneck=depth >= 50)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        _resnet(18, (2, 2, 2, 2)),
        _resnet(34, (3, 4, 6, 3)),
        _resnet(50, (3, 4, 6, 3)),
        _resnet(101, (3, 4, 23, 3)),
        _resnet(152, (3, 8, 36, 3)),
        _resnet(200, (3, 24, 36, 3), in_torchvision=False),
        Arch("convnext_tiny", "convnext", True),
        Arch("convnext_small", "convnext", True),
        Arch("convnext_base", "convnext", True),
        Arch("convnext_large", "convnext", True),
        # ConvNeXt V2 (timm; atto..nano hold their MLPs as 1x1 convs, conv_mlp=True)
        *(Arch(f"convnextv2_{size}", "convnext", False)
          for size in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")),
    )
}


#: ``sparsify:<timm name>`` (a model pretrained through the general ``sparsify`` path) has the very keys
#: of ``<timm name>``: for conversion it IS that arch.
SPARSIFY_PREFIX = "sparsify:"


def base_arch(name: str | None) -> str | None:
    """The timm name an arch's weights are named after: ``sparsify:resnet50`` -> ``resnet50``."""
    return name.removeprefix(SPARSIFY_PREFIX) if isinstance(name, str) else name


def get_arch(name: str, *, target: str = "timm", supported: tuple[str, ...] | None = None) -> Arch:
    """Look up `name`; `supported` narrows the choice for targets that cover fewer archs.

    For the timm target any timm model name is an arch (family "timm"): a sparsified encoder keeps
    timm's own keys, and the export is verified against `timm.create_model(name)` itself."""
    choices = supported if supported is not None else tuple(ARCHS)
    name = base_arch(name)
    if name in choices:
        return ARCHS[name]
    if supported is None and target == "timm" and _is_timm_model(name):
        return Arch(name, "timm", in_torchvision=False)
    anything = " or any timm model name" if supported is None and target == "timm" else ""
    raise ConversionError(
        f"arch {name!r} cannot be converted to {target}; supported archs: {', '.join(choices)}{anything}"
    )


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def check_arch(pretrained_as: str | None, asked: str) -> None:
    """Refuse a conversion whose --arch differs from the arch recorded in the checkpoint."""
    if pretrained_as is not None and base_arch(pretrained_as) != base_arch(asked):
        raise ConversionError(
            f"checkpoint was pretrained as {pretrained_as}, you asked for {asked}; "
            f"pass --arch {base_arch(pretrained_as)}"
        )
