"""Read the encoder's weights out of whatever the user hands the converter.

Accepted sources (a path to `.pth`/`.pt`/`.safetensors`, or an in-memory dict):
- a full pretraining checkpoint: `{"format": "sparse-mim/pretrain-v1", "model": {"encoder.<timm key>":
  ..., "densify...": ..., "decoder...": ..., "mask_tokens...": ...}, "optimizer": ..., "epoch": ...,
  "step": ..., "config": ..., "arch": ...}`: the `encoder.*` weights are kept, the rest is dropped;
- an encoder-only state_dict with timm keys, bare or wrapped as `{"model": ...}` / `{"state_dict": ...}`;
- a checkpoint of the reference SparK implementation: its whole pretraining model
  (`sparse_encoder.sp_cnn.*` is the encoder; decoder, densify and mask tokens are dropped) or an
  encoder state_dict. Its `<model>_withdecoder_1kpretrained_spark_style.pth` holds
  `SparK.state_dict(with_config=True)`: the model's tensors plus a `config` dict (mask_ratio,
  densify_norm_str, sbn, hierarchy, sparse_encoder.input_size, dense_decoder.width), read as
  metadata that must agree with the arch (4 feature maps); its ConvNeXts use the official ConvNeXt key names (`downsample_layers.*`,
  `stages.i.j.dwconv`, ...), which are renamed to timm's by timm's own `checkpoint_filter_fn`
  (this needs the arch, e.g. `--arch convnext_small`);
- a ConvNeXt V2 FCMAE pretraining checkpoint (the official MinkowskiEngine encoder under `encoder.*`,
  see `fcmae.py`): its decoder side is dropped and its encoder converted to timm names and shapes;
- our backbones' weights in MinkowskiEngine's layout (`sparse-mim convert --to minkowski`, `*.kernel`);
- any of the above with DDP (`module.`) or torch.compile (`_orig_mod.`) prefixes.
Classifier keys (`fc.*`, `head.*`) are never part of an encoder and are dropped as well.
Files are recognised by their content (torch.save zip or pickle, safetensors header), not their name.
"""
from __future__ import annotations

import argparse
import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_mim.runtime.checkpoint import PRETRAIN_FORMAT

from .archs import CLASSIFIER_PREFIXES, base_arch, check_arch
from .errors import ConversionError
from .fcmae import fcmae_to_timm, is_fcmae_layout
from .minkowski_checkpoints import from_minkowski_layout, is_minkowski_layout

ENCODER_PREFIX = "encoder."
REFERENCE_ENCODER_PREFIX = "sparse_encoder.sp_cnn."  # the reference SparK's SparK.sparse_encoder.sp_cnn
OFFICIAL_CONVNEXT_MARK = "downsample_layers.0.0.weight"  # facebookresearch/ConvNeXt naming (reference SparK)
# Top-level entries that describe a checkpoint rather than hold weights: never reported as dropped.
# (The reference SparK's checkpoints: {"args", "arch", "epoch", "performance_desc", "module", "optimizer",
#  "is_pretrain", "input_size"}.)
_METADATA_KEYS = frozenset({"format", "arch", "epoch", "step", "config", "rng",
                            "args", "performance_desc", "is_pretrain", "input_size"})
_WRAPPER_KEYS = ("model", "state_dict", "module")
SPARK_CONFIG_KEY = "config"  # the reference SparK's state_dict(with_config=True) entry
SPARK_HIERARCHY = 4  # feature maps of every encoder converted here (4 stages)
ACCEPTED = ("accepted: torch.save files (.pth/.pt: a sparse-mim or SparK checkpoint, or an encoder "
            "state_dict) and .safetensors files")
_PARALLEL_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class EncoderCheckpoint:
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, int]  # group name -> number of tensors left out
    arch: str | None  # the arch recorded in the checkpoint, if any


def load_encoder_state_dict(
    src: str | os.PathLike | Mapping, arch: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Return `(encoder state_dict with timm keys, {dropped group: tensor count})`.

    With `arch`, a checkpoint that records a different arch is refused."""
    ckpt = load_encoder(src, arch)
    return ckpt.state_dict, ckpt.dropped


def load_encoder(src: str | os.PathLike | Mapping, arch: str | None = None) -> EncoderCheckpoint:
    """The encoder's weights (timm keys), what was dropped, and the arch: `arch` when given (refused
    if the checkpoint records another), else the one the checkpoint records (None if it has none)."""
    ckpt = read_encoder_checkpoint(src)
    if arch is not None:
        check_arch(ckpt.arch, arch)
    arch = base_arch(arch or ckpt.arch)
    if is_fcmae_layout(ckpt.state_dict):
        return EncoderCheckpoint(fcmae_to_timm(ckpt.state_dict, arch), ckpt.dropped, arch)
    if is_minkowski_layout(ckpt.state_dict):
        return EncoderCheckpoint(from_minkowski_layout(ckpt.state_dict, arch), ckpt.dropped, arch)
    if OFFICIAL_CONVNEXT_MARK in ckpt.state_dict:
        return EncoderCheckpoint(*_from_official_convnext_names(ckpt.state_dict, arch, dict(ckpt.dropped)), arch)
    return EncoderCheckpoint(ckpt.state_dict, ckpt.dropped, arch)


def _from_official_convnext_names(weights: dict[str, torch.Tensor], arch: str | None,
                                  dropped: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Official ConvNeXt key names (the reference SparK's) -> timm's, via timm's own remapping."""
    if arch is None:
        raise ConversionError("these weights use the official ConvNeXt key names (downsample_layers.*, "
                              "stages.i.j.dwconv, ...); name the model to rename them, e.g. --arch convnext_small")
    if not arch.startswith("convnext"):
        raise ConversionError(f"these weights use official ConvNeXt key names, but the arch asked for is {arch!r}")
    import timm
    from timm.models.convnext import checkpoint_filter_fn
    with torch.device("meta"):  # shapes only: the filter reshapes a few tensors to the model's
        model = timm.create_model(arch, pretrained=False)
    try:
        renamed = checkpoint_filter_fn(weights, model)
    except KeyError as e:
        raise ConversionError(f"official ConvNeXt key {e.args[0]!r} has no counterpart in timm {arch!r}; "
                              "check --arch") from None
    head = [k for k in renamed if k.startswith(CLASSIFIER_PREFIXES)]  # the final norm becomes head.norm
    for k in head:
        del renamed[k]
    if head:
        dropped["classifier"] = dropped.get("classifier", 0) + len(head)
    return renamed, dropped


def read_encoder_checkpoint(src: str | os.PathLike | Mapping) -> EncoderCheckpoint:
    if isinstance(src, Mapping):
        raw, file_arch = src, None
    elif isinstance(src, (str, os.PathLike)):
        raw, file_arch = _read_file(Path(src))
    else:
        raise TypeError(f"expected a checkpoint path or a dict, got {type(src).__name__}")
    if not isinstance(raw, Mapping):
        raise ConversionError(f"expected the checkpoint to hold a dict, found {type(raw).__name__}")

    weights, dropped = _unwrap(raw)
    weights, config_arch = _without_spark_config(weights)
    weights = _strip_parallel_prefixes(weights)
    encoder = _select_encoder(weights, dropped, is_pretraining=raw.get("format") == PRETRAIN_FORMAT)

    classifier = [k for k in encoder if k.startswith(CLASSIFIER_PREFIXES)]
    if classifier:
        dropped["classifier"] += len(classifier)
        for k in classifier:
            del encoder[k]

    arch = base_arch(raw.get("arch") if isinstance(raw.get("arch"), str) else file_arch)
    if config_arch is not None:
        check_arch(arch, config_arch)
        arch = config_arch
    return EncoderCheckpoint(encoder, dict(dropped), arch)


def _without_spark_config(weights: Mapping) -> tuple[Mapping, str | None]:
    """Split off the `config` dict of a reference SparK `state_dict(with_config=True)`; check it
    against what can be converted and return the arch it names (None: it names none)."""
    config = weights.get(SPARK_CONFIG_KEY)
    if not isinstance(config, Mapping):
        return weights, None
    hierarchy = config.get("hierarchy")
    if hierarchy is not None and hierarchy != SPARK_HIERARCHY:
        raise ConversionError(f"the checkpoint's SparK config has hierarchy={hierarchy!r} (feature maps), but "
                              f"every encoder converted here has {SPARK_HIERARCHY} stages; this is not one of "
                              f"the supported archs")
    named = next((config[k] for k in ("arch", "model") if isinstance(config.get(k), str)), None)
    return {k: v for k, v in weights.items() if k != SPARK_CONFIG_KEY}, named


def _file_kind(path: Path) -> str:
    """"torch" (torch.save's zip, or a plain pickle as older torch wrote), "safetensors" (an 8-byte
    header length, then the JSON header), or a ConversionError naming what the file is not."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    what = "it is empty" if not head else f"it starts with {head[:12]!r}"
    raise ConversionError(f"{path} is not a torch or safetensors checkpoint ({what}); {ACCEPTED}")


def _read_file(path: Path) -> tuple[object, str | None]:
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    kind = _file_kind(path)
    try:
        if kind == "safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata.get("arch")
        return _torch_load(path), None
    except Exception as e:  # a corrupt or foreign file: say which, without a traceback
        raise ConversionError(f"could not read checkpoint {path}: {e}") from e


#: Python objects that checkpoints of well-known training scripts hold beside their tensors and that
#: the restricted unpickler may rebuild: the official MAE / ConvNeXt(-V2) / SparK scripts save their
#: `argparse.Namespace` under `args`.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A checkpoint whose config holds arbitrary Python objects needs the full unpickler, which
        # can run code from the file. Fall back only for a readable checkpoint that names such
        # objects (a corrupt file fails here and is reported as unreadable).
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not unsafe:
            raise
        warnings.warn(
            f"{path} holds Python objects beyond tensors and plain containers "
            f"({', '.join(unsafe[:5])}); loading it with weights_only=False "
            "(only do this for checkpoints you trust)",
            stacklevel=4,
        )
        return torch.load(path, map_location="cpu", weights_only=False)


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
) -> dict[str, torch.Tensor]:
    """Keep `encoder.*` (prefix removed) when present, reporting the other groups as dropped.

    A reference SparK model keeps its encoder under `sparse_encoder.sp_cnn.*` instead."""
    prefix = ENCODER_PREFIX
    if not any(k.startswith(prefix) for k in weights) and any(k.startswith(REFERENCE_ENCODER_PREFIX) for k in weights):
        prefix = REFERENCE_ENCODER_PREFIX
    if not any(k.startswith(prefix) for k in weights):
        if is_pretraining:
            raise ConversionError(
                f"pretraining checkpoint has no '{ENCODER_PREFIX}*' weights in 'model'; "
                f"found groups: {', '.join(sorted({k.split('.', 1)[0] for k in weights}))}"
            )
        return dict(weights)
    encoder = {}
    for key, value in weights.items():
        if key.startswith(prefix):
            encoder[key.removeprefix(prefix)] = value
        else:
            dropped[key.split(".", 1)[0]] += 1
    return encoder


def read_checkpoint_file(path: str | os.PathLike) -> tuple[object, str | None]:
    """The raw content of a checkpoint file and the arch its safetensors metadata records (if any);
    unreadable files raise ConversionError."""
    return _read_file(Path(path))


def all_weights(raw: Mapping) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's weights (encoder and the rest), unwrapped from `model` /
    `state_dict` / `module` and without DDP/compile prefixes."""
    weights, _ = _unwrap(raw)
    return _strip_parallel_prefixes(weights)
