"""Encoder weights (timm ResNet names) -> a Detectron2 backbone checkpoint (`.pkl`).

Renames (docs/converting.md): `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`, `downsample.0` -> `shortcut`,
`downsample.1` -> `shortcut.norm`, and the stem (`conv1`, `bn1`) gets a `stem.` prefix. BatchNorm
`num_batches_tracked` is dropped (Detectron2's norms have weight, bias, running_mean, running_var).

Detectron2 only warns about missing keys or wrong shapes, so the result is checked against the key
names and shapes that Detectron2's `build_resnet_backbone` creates for the depth, generated here
from the block counts alone, independently of timm and of the renaming.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from ..archs import ARCHS, Arch, get_arch
from ..errors import ConversionError
from ..verify import key_problems, require_state_dict
from ..writers import save_pickle
from .timm import to_timm

DETECTRON2_ARCHS = tuple(name for name, a in ARCHS.items() if a.family == "resnet")
AUTHOR = "sparse-mim"
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
# Depths that Detectron2's own build_resnet_backbone has block counts for.
_DETECTRON2_BUILTIN_DEPTHS = (18, 34, 50, 101, 152)

_BLOCK_KEY = re.compile(r"layer(\d)\.(\d+)\.(.+)")


def _rename_layer(path: str) -> str:
    """`bnK.x` -> `convK.norm.x`, `downsample.0.x` -> `shortcut.x`, `downsample.1.x` ->
    `shortcut.norm.x`; convolutions keep their names."""
    if m := re.fullmatch(r"bn(\d)\.(.+)", path):
        return f"conv{m[1]}.norm.{m[2]}"
    if m := re.fullmatch(r"downsample\.0\.(.+)", path):
        return f"shortcut.{m[1]}"
    if m := re.fullmatch(r"downsample\.1\.(.+)", path):
        return f"shortcut.norm.{m[1]}"
    return path


def detectron2_name(timm_key: str) -> str:
    if m := _BLOCK_KEY.fullmatch(timm_key):
        stage, block, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.{_rename_layer(rest)}"
    return f"stem.{_rename_layer(timm_key)}"


def detectron2_key_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every parameter/buffer name and shape of Detectron2's ResNet of this depth (stem + res2..res5,
    no classifier), following Detectron2's BasicStem/BasicBlock/BottleneckBlock: 64-channel stem,
    res2 out 64 (basic) or 256 (bottleneck) channels doubling per stage, bottleneck width 64
    doubling per stage, a projection shortcut exactly where a block's in/out channels differ."""
    a = get_arch(arch, target="detectron2", supported=DETECTRON2_ARCHS)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        for p in _NORM_PARAMS:
            shapes[f"{name}.norm.{p}"] = (c_out,)

    stem_out = 64
    conv_norm("stem.conv1", stem_out, 3, 7)
    c_in = stem_out
    for i, n_blocks in enumerate(a.blocks_per_stage):
        c_out = (256 if a.bottleneck else 64) * 2**i
        width = 64 * 2**i
        for j in range(n_blocks):
            block = f"res{i + 2}.{j}"
            if c_in != c_out:
                conv_norm(f"{block}.shortcut", c_out, c_in, 1)
            if a.bottleneck:
                conv_norm(f"{block}.conv1", width, c_in, 1)
                conv_norm(f"{block}.conv2", width, width, 3)
                conv_norm(f"{block}.conv3", c_out, width, 1)
            else:
                conv_norm(f"{block}.conv1", c_out, c_in, 3)
                conv_norm(f"{block}.conv2", c_out, c_out, 3)
            c_in = c_out
    return shapes


def check_detectron2_weights(weights: Mapping[str, np.ndarray], arch: str) -> None:
    problems = key_problems(
        {k: tuple(v.shape) for k, v in weights.items()}, detectron2_key_shapes(arch)
    )
    if problems:
        raise ConversionError(f"weights do not match Detectron2 R{ARCHS[arch].depth}: {problems}")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def to_detectron2(
    encoder: Mapping[str, torch.Tensor], arch: str, out_path: str | os.PathLike
) -> dict[str, object]:
    """Convert `encoder` (timm-named weights, e.g. `read(path).encoder`), verify it against
    Detectron2's key list, and write `out_path` atomically.

    Returns the pickled dict: `{"model": {name: ndarray}, "__author__": "sparse-mim",
    "matching_heuristics": True}`. See `detectron2_config_hints` for the matching config."""
    require_state_dict(encoder, "to_detectron2")
    get_arch(arch, target="detectron2", supported=DETECTRON2_ARCHS)
    weights = {
        detectron2_name(k): _to_numpy(v)
        for k, v in to_timm(encoder, arch).items()
        if not k.endswith("num_batches_tracked")
    }
    check_detectron2_weights(weights, arch)
    checkpoint = {"model": weights, "__author__": AUTHOR, "matching_heuristics": True}
    save_pickle(checkpoint, out_path)
    return checkpoint


def detectron2_config_hints(arch: str) -> dict[str, object]:
    """The Detectron2 config values these weights were trained for (RGB, ImageNet mean/std x255,
    stride in the 3x3 conv)."""
    a: Arch = get_arch(arch, target="detectron2", supported=DETECTRON2_ARCHS)
    hints: dict[str, object] = {
        "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
        "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
        "MODEL.RESNETS.DEPTH": a.depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
    }
    if not a.bottleneck:
        hints["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    return hints


def detectron2_notes(arch: str) -> list[str]:
    """Caveats a user must know beyond the config values."""
    a = get_arch(arch, target="detectron2", supported=DETECTRON2_ARCHS)
    if a.depth in _DETECTRON2_BUILTIN_DEPTHS:
        return []
    return [
        f"Detectron2's build_resnet_backbone has no block counts for depth {a.depth}; register a "
        f"backbone that builds stages of {list(a.blocks_per_stage)} BottleneckBlocks"
    ]
