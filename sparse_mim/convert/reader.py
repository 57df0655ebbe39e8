"""The one way a checkpoint is read: ``read(path)`` returns its weights as plain dicts and what is
known about it (arch, layout, method); every target, ``sparse-mim convert``, ``pretrain init_from=``
and ``finetune weights=`` start from it.

Accepted sources (a path to `.pth`/`.pt`/`.safetensors`, or the same content as an in-memory dict):
- a full pretraining checkpoint: `{"format": "sparse-mim/pretrain-v1", "model": {"encoder.<timm key>":
  ..., "densify...": ..., "decoder...": ..., "mask_tokens...": ...}, "optimizer": ..., "epoch": ...,
  "step": ..., "config": ..., "arch": ...}`: the `encoder.*` weights are the encoder, the rest is
  reported as dropped;
- an encoder-only state_dict with timm keys, bare or wrapped as `{"model": ...}` / `{"state_dict": ...}`;
- a checkpoint of the official SparK implementation: its whole pretraining model
  (`sparse_encoder.sp_cnn.*` is the encoder) or an encoder state_dict. Its
  `<model>_withdecoder_1kpretrained_spark_style.pth` holds `SparK.state_dict(with_config=True)`: the
  model's tensors plus a `config` dict, read as metadata that must agree with the arch (4 feature
  maps); its ConvNeXts use the official ConvNeXt key names, renamed to timm's (this needs the arch,
  e.g. `--arch convnext_small`);
- a ConvNeXt V2 FCMAE pretraining checkpoint (the official MinkowskiEngine encoder under `encoder.*`):
  its decoder side is dropped and its encoder converted to timm names and shapes;
- our backbones' weights in MinkowskiEngine's layout (`sparse-mim convert --to minkowski`, `*.kernel`);
- any of the above with DDP (`module.`) or torch.compile (`_orig_mod.`) prefixes.
Classifier keys (`fc.*`, `head.*`) are never part of an encoder and are dropped as well. The layout
adapters (`layouts/`) do the renaming; this module only finds the weights and tells them apart.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from sparse_mim.runtime.checkpoint import PRETRAIN_FORMAT

from .archs import CLASSIFIER_PREFIXES, base_arch, check_arch
from .errors import ConversionError
from .files import read_file
from .layouts import to_timm_names
from .layouts.fcmae import FCMAE_DECODER_GROUPS
from .layouts.spark import HEAD_GROUPS, OFFICIAL_ENCODER_PREFIX, config_arch, split_spark_config

__all__ = ["Checkpoint", "SPARSE_MIM", "OFFICIAL_SPARK", "STATE_DICT", "read"]

ENCODER_PREFIX = "encoder."
#: What wrote the file (`Checkpoint.source`).
SPARSE_MIM = "sparse-mim"            # one of our pretraining checkpoints ("format": PRETRAIN_FORMAT)
OFFICIAL_SPARK = "official-spark"  # the official SparK's model (its encoder prefix or config entry)
STATE_DICT = "state-dict"            # anything else: a state dict, bare or wrapped
# Top-level entries that describe a checkpoint rather than hold weights: never reported as dropped.
# (The official SparK's checkpoints: {"args", "arch", "epoch", "performance_desc", "module", "optimizer",
#  "is_pretrain", "input_size"}.)
_METADATA_KEYS = frozenset({"format", "arch", "epoch", "step", "config", "rng",
                            "args", "performance_desc", "is_pretrain", "input_size"})
_WRAPPER_KEYS = ("model", "state_dict", "module")
_PARALLEL_PREFIXES = ("module.", "_orig_mod.")
# Top-level groups only one method's pretraining model has (the two share "decoder").
_SPARK_ONLY = frozenset(HEAD_GROUPS) - {"decoder"}
_FCMAE_ONLY = frozenset(FCMAE_DECODER_GROUPS) - {"decoder"}


@dataclass(frozen=True)
class Checkpoint:
    """What `read` found in a checkpoint."""

    encoder: dict[str, torch.Tensor]  # the encoder in timm's names and shapes, classifier excluded
    weights: dict[str, torch.Tensor]  # every tensor of the model as the file names it (unwrapped, no DDP prefix)
    dropped: dict[str, int]           # group -> tensors an encoder export leaves out (decoder, optimizer, ...)
    arch: Optional[str]               # the arch asked for, else the one the file records (None: unknown)
    layout: str                       # the encoder's layout in the file (`layouts.to_timm_names`)
    source: str                       # SPARSE_MIM, OFFICIAL_SPARK or STATE_DICT
    method: Optional[str]             # "spark" or "fcmae" when the file holds a pretraining model around the encoder
    spark_config: Optional[dict] = None  # the official SparK's config entry, if any


def read(src: str | os.PathLike | Mapping, arch: str | None = None) -> Checkpoint:
    """Read a checkpoint (path, or its content as a dict) and return its encoder in timm's names.

    With `arch`, a checkpoint that records a different arch is refused (ConversionError); it is
    also what layouts that do not tell their shapes are converted for."""
    if isinstance(src, Mapping):
        raw, file_arch = src, None
    elif isinstance(src, (str, os.PathLike)):
        raw, file_arch = read_file(src)
    else:
        raise TypeError(f"expected a checkpoint path or a dict, got {type(src).__name__}")
    if not isinstance(raw, Mapping):
        raise ConversionError(f"expected the checkpoint to hold a dict, found {type(raw).__name__}")

    is_ours = raw.get("format") == PRETRAIN_FORMAT
    weights, dropped = _unwrap(raw)
    weights, spark_config = split_spark_config(weights)
    weights = _strip_parallel_prefixes(weights)
    encoder, encoder_prefix = _select_encoder(weights, dropped, is_pretraining=is_ours)
    _drop_classifier(encoder, dropped)

    recorded = base_arch(raw.get("arch") if isinstance(raw.get("arch"), str) else file_arch)
    named = config_arch(spark_config)
    if named is not None:
        check_arch(recorded, named)
        recorded = named
    if arch is not None:
        check_arch(recorded, arch)
    arch = base_arch(arch or recorded)

    layout, encoder = to_timm_names(encoder, arch)
    _drop_classifier(encoder, dropped)  # the official ConvNeXt's final norm becomes timm's head.norm

    official = encoder_prefix == OFFICIAL_ENCODER_PREFIX or spark_config is not None
    source = SPARSE_MIM if is_ours else OFFICIAL_SPARK if official else STATE_DICT
    return Checkpoint(encoder, weights, dict(dropped), arch, layout, source,
                      _method(raw, weights, source), spark_config)


def _method(raw: Mapping, weights: Mapping, source: str) -> str | None:
    """The pretraining method whose model the file holds: recorded in our checkpoints (those from
    before method= existed are SparK's), told by the groups around the encoder in anyone else's."""
    if source == SPARSE_MIM:
        config = raw.get("config")
        return config.get("method", "spark") if isinstance(config, Mapping) else "spark"
    groups = {k.split(".", 1)[0] for k in weights}
    if source == OFFICIAL_SPARK or groups & _SPARK_ONLY:
        return "spark"
    if groups & _FCMAE_ONLY:
        return "fcmae"
    return None


def _count_tensors(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, Mapping):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _unwrap(raw: Mapping) -> tuple[Mapping, Counter]:
    """Find the dict of weights; everything else that is not metadata is reported as dropped."""
    fmt = raw.get("format")
    if fmt is not None and fmt != PRETRAIN_FORMAT:
        raise ConversionError(
            f"unknown checkpoint format {fmt!r}; this version reads {PRETRAIN_FORMAT!r} "
            "and plain state_dicts"
        )
    dropped: Counter = Counter()
    for key in _WRAPPER_KEYS:
        inner = raw.get(key)
        if isinstance(inner, Mapping):
            for other, value in raw.items():
                if other != key and other not in _METADATA_KEYS:
                    dropped[other] += _count_tensors(value)
            return inner, dropped
    if fmt == PRETRAIN_FORMAT:
        raise ConversionError(f"checkpoint says {PRETRAIN_FORMAT!r} but has no 'model' dict")
    return raw, dropped


def _strip_parallel_prefixes(weights: Mapping) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    not_tensors = []
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            not_tensors.append(f"{key} ({type(value).__name__})")
            continue
        name = key
        while name.startswith(_PARALLEL_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ConversionError(f"{key!r} and another key both become {name!r} without the "
                                  "DDP/compile prefix; the checkpoint mixes wrapped and bare names")
        out[name] = value
    if not_tensors:
        shown = ", ".join(not_tensors[:20])
        raise ConversionError(
            f"expected a state_dict of tensors, found {len(not_tensors)} other values: {shown}"
        )
    return out


def _select_encoder(
    weights: dict[str, torch.Tensor], dropped: Counter, *, is_pretraining: bool
) -> tuple[dict[str, torch.Tensor], str]:
    """(`encoder.*` with the prefix removed when present, that prefix), reporting the other groups
    as dropped. An official SparK model keeps its encoder under `sparse_encoder.sp_cnn.*` instead."""
    prefix = ENCODER_PREFIX
    if not any(k.startswith(prefix) for k in weights) and any(k.startswith(OFFICIAL_ENCODER_PREFIX) for k in weights):
        prefix = OFFICIAL_ENCODER_PREFIX
    if not any(k.startswith(prefix) for k in weights):
        if is_pretraining:
            raise ConversionError(
                f"pretraining checkpoint has no '{ENCODER_PREFIX}*' weights in 'model'; "
                f"found groups: {', '.join(sorted({k.split('.', 1)[0] for k in weights}))}"
            )
        return dict(weights), ""
    encoder = {}
    for key, value in weights.items():
        if key.startswith(prefix):
            encoder[key.removeprefix(prefix)] = value
        else:
            dropped[key.split(".", 1)[0]] += 1
    return encoder, prefix


def _drop_classifier(encoder: dict[str, torch.Tensor], dropped: Counter) -> None:
    classifier = [k for k in encoder if k.startswith(CLASSIFIER_PREFIXES)]
    for k in classifier:
        del encoder[k]
    if classifier:
        dropped["classifier"] += len(classifier)

