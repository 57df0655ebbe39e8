"""The pretraining methods the trainer runs: which model ``method=`` builds, and what each method checks.

Both models share the trainer's contract: ``model(images, active).loss``, ``model.encoder`` (the
exported backbone), ``patch_size``, ``mask_ratio``, ``len_keep(num_patches)``, ``mask(images,
generator)`` and ``reconstruct(images, out)``. Settings of the other method (``decoder_width`` for
FCMAE, ``fcmae.*`` for SparK) are ignored, with a note when they differ from configs/pretrain.yaml.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch.nn as nn

__all__ = ["METHODS", "OPTIMIZERS", "build_pretrain_model", "base_lr_of", "method_errors", "optimizer_of", "unused_setting_notes",
           "method_title"]

METHODS = ("spark", "fcmae")
OPTIMIZERS = ("lamb", "adamw")
#: ``train.optimizer: null`` picks the method's own: SparK's LAMB, FCMAE's AdamW.
_DEFAULT_OPTIMIZER = {"spark": "lamb", "fcmae": "adamw"}
_TITLES = {"spark": "SparK", "fcmae": "FCMAE"}
#: ``train.base_lr: null``: a base lr sized for the short CPU runs of configs/pretrain.yaml (the presets
#: set the papers' own): SparK's LAMB at 0.2, FCMAE's AdamW at 100x its ImageNet 1.5e-4.
_DEFAULT_BASE_LR = {"spark": 0.2, "fcmae": 0.015}


def build_pretrain_model(config: Dict[str, Any]) -> nn.Module:
    """The bare model of ``config["method"]`` (default spark) for ``config["model"]``."""
    method, arch = config.get("method", "spark"), config["model"]
    backend = config.get("backend", "native")
    if method == "fcmae":
        from sparse_mim.fcmae import build_fcmae

        f = config["fcmae"]
        return build_fcmae(arch, decoder_depth=f["decoder_depth"], decoder_embed_dim=f["decoder_embed_dim"],
                           mask_ratio=config["mask_ratio"], norm_pix_loss=f["norm_pix_loss"], grn=f["grn"],
                           drop_path_rate=config["drop_path_rate"], backend=backend)
    from sparse_mim.spark import build_spark

    return build_spark(arch, mask_ratio=config["mask_ratio"], drop_path_rate=config["drop_path_rate"],
                       decoder_width=config["decoder_width"], backend=backend)


def optimizer_of(config: Dict[str, Any]) -> str:
    return config["train"].get("optimizer") or _DEFAULT_OPTIMIZER[config.get("method", "spark")]


def base_lr_of(config: Dict[str, Any]) -> float:
    base_lr = config["train"].get("base_lr")
    return base_lr if base_lr is not None else _DEFAULT_BASE_LR[config.get("method", "spark")]


def method_title(config: Dict[str, Any]) -> str:
    return _TITLES[config.get("method", "spark")]


def method_errors(cfg) -> List[str]:
    """What is wrong with the model and settings ``method=fcmae`` is asked to pretrain (the values'
    types, ranges and choices are the schema's: sparse_mim.config_schema)."""
    from sparse_mim.fcmae import FCMAEModelError, check_fcmae_model, fcmae_len_keep

    if cfg.get("method", "spark") != "fcmae":
        return []
    errors = []
    try:
        check_fcmae_model(str(cfg.model))
    except FCMAEModelError as e:
        errors.append(f"model: {e}")
    if cfg.train.get("cuda_graph"):
        errors.append("train.cuda_graph=true captures SparK's encoder + densify; method=fcmae runs eagerly: "
                      "set train.cuda_graph=false")
    size, ratio = cfg.data.img_size, cfg.mask_ratio
    if isinstance(size, int) and size > 0 and size % 32 == 0 and isinstance(ratio, float) and 0 < ratio < 1:
        try:
            fcmae_len_keep((size // 32) ** 2, ratio)
        except ValueError as e:
            errors.append(f"mask_ratio: {e} at data.img_size={size}")
    return errors


def unused_setting_notes(config: Dict[str, Any], defaults: Dict[str, Any]) -> List[str]:
    """Notes for settings of the other method that differ from ``defaults`` (configs/pretrain.yaml)."""
    method = config.get("method", "spark")
    unused = ["decoder_width"] if method == "fcmae" else [f"fcmae.{k}" for k in config.get("fcmae", {})]
    notes = []
    for key in unused:
        group, _, leaf = key.rpartition(".")
        value = config[group][leaf] if group else config[key]
        default = defaults[group][leaf] if group else defaults[key]
        if value != default:
            notes.append(f"{key}={value} is not used by method={method} (ignored)")
    return notes
