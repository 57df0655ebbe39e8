"""``init_from=PATH``: start a pretraining run from existing weights (not a resume).

The file is read by the converter's one reader (``sparse_mim.convert.read``): any file ``sparse-mim convert``
reads (timm state dicts, torchvision ResNets, which share timm's names, our exports and checkpoints,
the official SparK's files with official ConvNeXt names), checked key by key and shape by shape
against timm's model. Densify norms, mask tokens, densify projections and the
decoder are loaded too when the file has them (our checkpoints, the official SparK's
``*_withdecoder_1kpretrained_spark_style.pth``), all or nothing; for an FCMAE run, its mask token,
projection, decoder and prediction head (our FCMAE checkpoints, or the official ConvNeXt V2
``checkpoint-*.pth`` in MinkowskiEngine layout). Optimizer, step and schedule always
start fresh. What was loaded and what starts fresh is returned, printed and written to
``output_dir/init_from.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from sparse_mim.convert import ConversionError, read, to_timm
from sparse_mim.convert.errors import advice_for
from sparse_mim.convert.layouts.fcmae import FCMAE_DECODER_GROUPS, fcmae_head_state_dict
from sparse_mim.convert.layouts.spark import HEAD_GROUPS, spark_head_state_dict
from sparse_mim.convert.verify import key_problems, shapes_of
from sparse_mim.runtime.atomic import atomic_write

from .config import ConfigError

__all__ = ["INIT_LOG_NAME", "InitReport", "init_from"]

INIT_LOG_NAME = "init_from.json"


@dataclass
class InitReport:
    source: str
    arch: str
    loaded: Dict[str, int] = field(default_factory=dict)  # group -> tensors loaded from the file
    fresh: List[str] = field(default_factory=list)        # groups initialised fresh
    spark_config: Optional[dict] = None                   # the official SparK's config entry, if any

    def lines(self) -> List[str]:
        loaded = ", ".join(f"{group} ({n} tensors)" for group, n in self.loaded.items())
        out = [f"init_from {self.source}: loaded {loaded}"]
        if self.fresh:
            out.append(f"init_from: initialised fresh (not in the file): {', '.join(self.fresh)}")
        out.append("init_from: optimizer, step and schedule start fresh")
        return out

    def write(self, output_dir: str | os.PathLike) -> Path:
        text = json.dumps(asdict(self), indent=2, default=str) + "\n"
        return atomic_write(Path(output_dir) / INIT_LOG_NAME, lambda tmp: Path(tmp).write_text(text))


def _group_of(key: str) -> str:
    return key.split(".", 1)[0]


def _head_groups(model: nn.Module) -> tuple:
    """The model's groups around the encoder: SparK's densify + decoder, or FCMAE's decoder side."""
    return FCMAE_DECODER_GROUPS if _is_fcmae(model) else HEAD_GROUPS


def _is_fcmae(model: nn.Module) -> bool:
    return hasattr(model, "load_official_state_dict")


def _check_head(head: Dict[str, torch.Tensor], model: nn.Module, path: str, spark_config: Optional[dict]) -> None:
    groups = _head_groups(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if _group_of(k) in groups}
    problems = key_problems(shapes_of(head), expected)
    if problems is None:
        return
    if _is_fcmae(model):
        raise ConfigError(f"init_from={path}: its FCMAE decoder weights do not fit this model: {problems}\n"
                          "Check fcmae.decoder_depth and fcmae.decoder_embed_dim (the file's decoder must have the "
                          f"same shape). To load the encoder only, convert it first: sparse-mim convert {path} "
                          "--to timm --arch ARCH --out encoder.safetensors")
    width = (spark_config or {}).get("dense_decoder.width")
    hint = f" The file's decoder width is {width}: pass decoder_width={width}." if width else \
        " Check decoder_width (the file's decoder must have the same width)."
    raise ConfigError(f"init_from={path}: its densify/decoder weights do not fit this model: {problems}\n"
                      f"{hint.strip()} To load the encoder only, convert it first: sparse-mim convert "
                      f"{path} --to timm --arch ARCH --out encoder.safetensors")


def init_from(model: nn.Module, path: str | os.PathLike, arch: str) -> InitReport:
    """Load ``path`` into the SparK ``model`` (bare, before DDP) whose encoder is ``arch``.

    Raises ``ConfigError`` naming the problem (unreadable file, another architecture, missing or
    misshaped keys) before any weight of ``model`` changes.
    """
    path = str(Path(path).expanduser())
    try:
        ckpt = read(path, arch)
        encoder = to_timm(ckpt.encoder, arch)
        head = fcmae_head_state_dict(ckpt.weights) if _is_fcmae(model) else spark_head_state_dict(ckpt.weights)
    except ConversionError as e:
        raise ConfigError(f"init_from={path}: {advice_for(e)}") from None
    spark_config = ckpt.spark_config
    if head:
        _check_head(head, model, path, spark_config)

    # timm's keys are our encoder's (checked above against timm's model); load strictly anyway, the
    # encoder alone or, with the file's head, the whole model in one go
    if head:
        model.load_state_dict({**{f"encoder.{k}": v for k, v in encoder.items()}, **head}, strict=True)
    else:
        model.encoder.load_state_dict(encoder, strict=True)
    report = InitReport(path, arch, {"encoder": len(encoder)}, spark_config=spark_config)
    for group in _head_groups(model):
        n = sum(1 for k in head if _group_of(k) == group)
        if n:
            report.loaded[group] = n
        elif any(_group_of(k) == group for k in model.state_dict()):
            report.fresh.append(group)
    return report
