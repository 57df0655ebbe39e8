"""The type and range of every setting of ``configs/<command>.yaml``, as Hydra structured configs.

The YAML files hold the values and the comments users read (``--help``, docs/settings.md); the
dataclasses here say what each value may be. Each is registered in Hydra's ConfigStore as
``<command>_schema`` and named first in its YAML's ``defaults`` list, so composing refuses a wrong type
(``train.epochs=abc``) and a key the schema lacks. ``setting_errors`` then checks the ranges and
choices declared with ``setting(...)``; rules that tie several settings together live in
``sparse_mim.config_rules``.

A choice list that belongs to a module importing torch is named by ``"module:NAME"`` and read only
when checking, so ``--help`` stays free of torch.
"""
from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = ["PretrainConfig", "FinetuneConfig", "BenchConfig", "SCHEMAS", "register", "setting",
           "setting_errors", "describe", "message", "field_of", "is_int", "is_number"]


def setting(*, ge=None, gt=None, le=None, lt=None, multiple_of=None, choices=(), length=None, kind=None,
            says=None, null_means=None, example=None, number=False, one_or_list=None):
    """A field whose value comes from the YAML (``MISSING`` here), with what it may hold.

    ge/gt/le/lt: bounds (of each item for lists); choices: allowed values (``"module:NAME"`` entries are
    expanded); length: items of a list; kind: the noun of the message (``"a share"``); says: the whole
    requirement as written in the message; null_means: what ``null`` selects; example: a good value for
    the message; number: an int or a float kept as written (``Any`` typed: OmegaConf has no int-or-float);
    one_or_list: the item type of a setting given as one value or a list of them (``what=loader``).
    """
    meta = dict(ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of, choices=tuple(choices), length=length,
                kind=kind, says=says, null_means=null_means, example=example, number=number, one_or_list=one_or_list)
    return field(default=MISSING, metadata=meta)


def group(cls):
    return field(default_factory=cls)


# -- pretrain: configs/pretrain.yaml -------------------------------------------------------------
@dataclass
class FcmaeSettings:
    decoder_depth: int = setting(ge=0)
    decoder_embed_dim: int = setting(ge=1)
    grn: str = setting(choices=["sparse_mim.engine.ops:GRN_MODES"])
    norm_pix_loss: bool = setting()


@dataclass
class PretrainData:
    path: Optional[str] = setting()
    img_size: int = setting()  # with the mask ratio: config_rules.image_and_mask_errors
    crop_scale: List[float] = setting(gt=0, le=1, length=2, example="[0.2,1.0]")  # low <= high: config_rules
    num_workers: int = setting(ge=0)
    decode: str = setting(choices=["sparse_mim.data.tensor_decode:DECODERS"])
    wait_warning: Optional[float] = setting(gt=0, lt=1, kind="a share", example=0.2)


@dataclass
class PretrainTrain:
    batch_size: int = setting(ge=1, says="a positive integer")
    epochs: int = setting(ge=1)
    max_steps: Optional[int] = setting(ge=1)
    base_lr: Optional[float] = setting(gt=0, null_means="the method's")
    warmup_epochs: Any = setting(ge=0, number=True)  # <= train.epochs: config_rules.warmup_errors
    weight_decay: float = setting(ge=0)
    weight_decay_end: float = setting(ge=0)
    clip_grad: Optional[float] = setting(gt=0)
    optimizer: Optional[str] = setting(choices=["sparse_mim.train.methods:OPTIMIZERS"], null_means="the method's own")
    betas: Optional[List[float]] = setting(ge=0, lt=1, length=2)
    seed: int = setting()
    deterministic: bool = setting()
    autocast: bool = setting()
    sync_bn: bool = setting()
    cuda_graph: bool = setting()
    grad_sync: str = setting(choices=["auto", "sparse_mim.runtime.distributed:GRAD_SYNCS"], says="{or}")
    log_every: int = setting(ge=1)
    save_every_steps: Optional[int] = setting(ge=1)
    save_every_minutes: Optional[float] = setting(gt=0)
    keep_checkpoints: int = setting(ge=1)
    vis_images: int = setting(ge=1)


@dataclass
class PretrainConfig:
    method: str = setting(choices=["sparse_mim.train.methods:METHODS"])
    model: str = setting()
    mask_ratio: float = setting()  # with the image size: config_rules.image_and_mask_errors
    backend: str = setting(choices=["sparse_mim.engine.backend:backend_names"])
    drop_path_rate: Optional[float] = setting(ge=0, lt=1)
    decoder_width: int = setting(ge=1)
    output_dir: str = setting()
    init_from: Optional[str] = setting()
    fcmae: FcmaeSettings = group(FcmaeSettings)
    data: PretrainData = group(PretrainData)
    train: PretrainTrain = group(PretrainTrain)


# -- finetune: configs/finetune.yaml -------------------------------------------------------------
@dataclass
class FinetuneData:
    path: str = setting()
    img_size: int = setting(ge=32)
    crop_pct: float = setting(gt=0, le=1)
    label_fraction: float = setting(gt=0, le=1, example=0.1)
    label_seed: Optional[int] = setting()
    num_workers: int = setting(ge=0)
    eval_batch_size: int = setting(ge=1)


@dataclass
class FinetuneAugment:
    crop_scale: List[float] = setting(gt=0, le=1, length=2, example="[0.2,1.0]")  # low <= high: config_rules
    hflip: float = setting(ge=0, le=1)
    color_jitter: Optional[float] = setting(ge=0)
    auto_augment: Optional[str] = setting()
    reprob: float = setting(ge=0, le=1)
    mixup: float = setting(ge=0)
    cutmix: float = setting(ge=0)
    label_smoothing: float = setting(ge=0, lt=1)


@dataclass
class FinetuneTrain:
    batch_size: int = setting(ge=1, says="a positive integer")
    epochs: int = setting(ge=1)
    opt: str = setting()
    base_lr: float = setting(gt=0)
    min_lr: float = setting(ge=0)
    warmup_epochs: Any = setting(ge=0, number=True)  # a warmup not shorter than the run is cut to half of it
    warmup_lr: float = setting(ge=0)
    weight_decay: float = setting(ge=0)
    layer_decay: Optional[float] = setting(gt=0, le=1)
    drop_path_rate: float = setting(ge=0, lt=1)
    clip_grad: Optional[float] = setting(gt=0)
    seed: int = setting()
    autocast: bool = setting()
    sync_bn: bool = setting()
    eval_every: int = setting(ge=1)
    log_every: int = setting(ge=1)


@dataclass
class KnnSettings:
    k: int = setting(ge=1)
    temperature: float = setting(gt=0)


@dataclass
class FinetuneConfig:
    model: str = setting()
    mode: str = setting(choices=["sparse_mim.finetune.config:MODES"])
    weights: Optional[str] = setting()
    output_dir: str = setting()
    data: FinetuneData = group(FinetuneData)
    augment: FinetuneAugment = group(FinetuneAugment)
    train: FinetuneTrain = group(FinetuneTrain)
    knn: KnnSettings = group(KnnSettings)


# -- bench: configs/bench.yaml -------------------------------------------------------------------
_PATHS = "sparse_mim.engine.execution:PATHS"


@dataclass
class BenchConfig:
    models: Any = setting(one_or_list=str, example="[resnet50]")
    method: str = setting(choices=["sparse_mim.train.methods:METHODS"])
    mask_ratios: Any = setting(one_or_list=float, example="[0.6]")  # with the image size: config_rules.image_and_mask_errors
    batch_size: int = setting(ge=1)
    img_size: int = setting()
    device: str = setting()
    dtype: str = setting(choices=["sparse_mim.bench.config:DTYPES"])
    warmup: int = setting(ge=0)
    repeats: int = setting(ge=1)
    threads: Optional[int] = setting(ge=1)
    channels_last: bool = setting()
    cudnn_benchmark: bool = setting()
    execution: str = setting(choices=[_PATHS])
    execution_depthwise: Optional[str] = setting(choices=[_PATHS])
    execution_small_tiles: Optional[str] = setting(choices=[_PATHS])
    backend: Any = setting(one_or_list=str, choices=["sparse_mim.engine.backend:backend_names"])
    cuda_graph: bool = setting()
    what: Any = setting(one_or_list=str, choices=["sparse_mim.bench.config:WHAT"], example="[encoder,step]")
    memory: bool = setting()
    decoder_width: int = setting(ge=1, multiple_of=32)
    seed: int = setting()
    output_dir: str = setting()
    data_path: Optional[str] = setting()
    loader_workers: Any = setting(one_or_list=int, ge=0)
    loader_batches: int = setting(ge=1)


SCHEMAS: Dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "bench": BenchConfig}


def register() -> None:
    """Store every schema in Hydra's ConfigStore as ``<command>_schema`` (what the YAML defaults name)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)


# -- checking --------------------------------------------------------------------------------------
def _choices(meta) -> List[object]:
    out: List[object] = []
    for choice in meta["choices"]:
        if isinstance(choice, str) and ":" in choice:
            module, name = choice.split(":")
            found = getattr(importlib.import_module(module), name)
            out += list(found() if callable(found) else found)
        else:
            out.append(choice)
    return out


def is_int(value) -> bool:
    """An integer value (bools excluded: YAML's ``true`` is not a batch size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def _base(hint):
    """``Optional[List[float]]`` -> ``List[float]``."""
    if _is_optional(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _item_type(hint, meta):
    base = _base(hint)
    if meta["one_or_list"] is not None:
        return meta["one_or_list"]
    if typing.get_origin(base) in (list, List):
        return typing.get_args(base)[0]
    if meta["number"]:
        return float
    return base


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true or false"),
          str: ("a string", "strings")}
_COUNTS = {2: "two", 3: "three", 4: "four"}


def _bounds(meta) -> str:
    low = (f"[{meta['ge']:g}" if meta["ge"] is not None else f"({meta['gt']:g}" if meta["gt"] is not None else None)
    high = (f"{meta['le']:g}]" if meta["le"] is not None else f"{meta['lt']:g})" if meta["lt"] is not None else None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {meta['ge']:g}" if meta["ge"] is not None else f"> {meta['gt']:g}"
    if high:
        return f"<= {meta['le']:g}" if meta["le"] is not None else f"< {meta['lt']:g}"
    return ""


def describe(hint, meta) -> str:
    """What a setting must be, as the message says it: ``"null or an integer >= 1"``."""
    choices = _choices(meta)
    if meta["says"]:  # "{or}" lists the choices as "a, b or c"
        names = [str(c) for c in choices]
        text = meta["says"].format(**{"or": " or ".join(filter(None, [", ".join(names[:-1]), *names[-1:]]))})
    elif choices:
        text = f"one of {', '.join(map(str, choices))}"
    else:
        item = _item_type(hint, meta)
        single, plural = _NOUNS.get(item, ("a value", "values"))
        bounds = _bounds(meta)
        listed = typing.get_origin(_base(hint)) in (list, List)
        if listed:
            count = _COUNTS.get(meta["length"], f"{meta['length']}") if meta["length"] else "a list of"
            text = f"{count} {plural}" + (f" {bounds}" if bounds else "")
        elif bounds.startswith("in ") and not (meta["kind"] or _is_optional(hint) or meta["one_or_list"]):
            return f"lie {bounds}"  # "must lie in (0, 1]"
        else:
            text = f"{meta['kind'] or single}" + (f" {bounds}" if bounds else "")
        if meta["multiple_of"]:
            text += f" and a multiple of {meta['multiple_of']}"
    if meta["one_or_list"] is not None:
        text += " or a list of them"
    if _is_optional(hint):
        text = f"null ({meta['null_means']}) or {text}" if meta["null_means"] else f"null or {text}"
    return text


def message(key: str, hint, meta, value) -> str:
    """The one-line error for ``key=value``: what the key must be, what it got, and an example."""
    requirement = describe(hint, meta)
    verb = "" if requirement.startswith("lie ") else "be "
    text = f"{key} must {verb}{requirement}, got {value!r}"
    if meta["example"] is not None:
        text += f"; e.g. {key}={meta['example']}"
    return text


def _item_ok(value, item_type, meta, choices) -> bool:
    if item_type is int and not is_int(value):
        return False
    if item_type is float and not is_number(value):
        return False
    if item_type is str and not isinstance(value, str):
        return False
    if choices and value not in choices:
        return False
    if is_number(value):
        if meta["ge"] is not None and not value >= meta["ge"]:
            return False
        if meta["gt"] is not None and not value > meta["gt"]:
            return False
        if meta["le"] is not None and not value <= meta["le"]:
            return False
        if meta["lt"] is not None and not value < meta["lt"]:
            return False
        if meta["multiple_of"] and value % meta["multiple_of"]:
            return False
    return True


def _value_ok(value, hint, meta) -> bool:
    if value is None:
        return _is_optional(hint)
    if value == MISSING:
        return True  # reported as a required setting, by the command
    item_type, choices = _item_type(hint, meta), _choices(meta)
    if meta["one_or_list"] is not None:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return bool(items) and all(_item_ok(v, item_type, meta, choices) for v in items)
    if typing.get_origin(_base(hint)) in (list, List):
        if meta["length"] is not None and len(value) != meta["length"]:
            return False
        return all(_item_ok(v, item_type, meta, choices) for v in value)
    return _item_ok(value, item_type, meta, choices)


def _leaves(schema, prefix: str = ""):
    """``(key path, type hint, metadata)`` of every setting of a schema, groups walked into."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        hint = hints[f.name]
        if is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint, f.metadata


def field_of(command: str, key: str):
    """``(type hint, metadata)`` of ``key`` in the command's schema, or None."""
    return next(((h, m) for k, h, m in _leaves(SCHEMAS[command]) if k == key), None)


def setting_errors(command: str, cfg: DictConfig) -> List[str]:
    """A message for every setting of ``cfg`` outside its declared range or choices."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    errors = []
    for key, hint, meta in _leaves(SCHEMAS[command]):
        value = values
        for part in key.split("."):
            value = value[part]
        if not _value_ok(value, hint, meta):
            errors.append(message(key, hint, meta, value))
    return errors
