"""SparK pretraining checkpoints, ours and the official SparK's: where the encoder is, the official one's
``config`` entry, and the parts around the encoder (densify norms, mask tokens, densify projections,
decoder) under sparse-mim's names.

The official SparK (keyu-tian/SparK, ``pretrain/spark.py``) names them like we do except for the
decoder (``dense_decoder.dec.i.up_sample`` -> ``decoder.blocks.i.upsample``), keeps three unused
buffers (``imn_m``, ``imn_s``, ``norm_black``), and its ``state_dict(with_config=True)`` holds a
plain-dict ``config`` entry among the tensors, and its encoder under ``sparse_encoder.sp_cnn.``
(its ConvNeXts in the official ConvNeXt names, ``layouts/convnext.py``). Names only: no model code
is imported.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import ConversionError

#: Our SparK's top-level module names around the encoder, in model order.
HEAD_GROUPS = ("densify_norms", "mask_tokens", "densify_projs", "decoder")
OFFICIAL_UNUSED_BUFFERS = frozenset({"imn_m", "imn_s", "norm_black"})
#: Where the official SparK keeps its encoder (``SparK.sparse_encoder.sp_cnn``).
OFFICIAL_ENCODER_PREFIX = "sparse_encoder.sp_cnn."
#: The official SparK's ``state_dict(with_config=True)`` entry (mask_ratio, densify_norm_str, sbn,
#: hierarchy, sparse_encoder.input_size, dense_decoder.width), read as metadata.
CONFIG_KEY = "config"
SPARK_HIERARCHY = 4  # feature maps of every encoder converted here (4 stages)
_OFFICIAL_DECODER = re.compile(r"^dense_decoder\.(?:dec\.(\d+)\.up_sample\.|dec\.(\d+)\.|proj\.)")


def split_spark_config(weights: Mapping) -> tuple[dict, dict | None]:
    """``weights`` (a state dict, unwrapped) without the official SparK's ``config`` entry, and that
    config (None if absent), checked against what can be converted: 4 feature maps."""
    config = weights.get(CONFIG_KEY)
    if not isinstance(config, Mapping):
        return dict(weights), None
    hierarchy = config.get("hierarchy")
    if hierarchy is not None and hierarchy != SPARK_HIERARCHY:
        raise ConversionError(f"the checkpoint's SparK config has hierarchy={hierarchy!r} (feature maps), but "
                              f"every encoder converted here has {SPARK_HIERARCHY} stages; this is not one of "
                              f"the supported archs")
    return {k: v for k, v in weights.items() if k != CONFIG_KEY}, dict(config)


def config_arch(config: Mapping | None) -> str | None:
    """The arch an official SparK config names (``arch`` or ``model``), None if it names none."""
    config = config or {}
    return next((config[k] for k in ("arch", "model") if isinstance(config.get(k), str)), None)


def _our_name(key: str) -> str:
    match = _OFFICIAL_DECODER.match(key)
    if match is None:
        return key
    rest = key[match.end():]
    if match.group(1) is not None:
        return f"decoder.blocks.{match.group(1)}.upsample.{rest}"
    if match.group(2) is not None:
        return f"decoder.blocks.{match.group(2)}.{rest}"
    return f"decoder.proj.{rest}"


def spark_head_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The densify / mask-token / decoder tensors of ``weights`` (a whole SparK state dict, ours or
    the official one's) under our names; empty when ``weights`` holds an encoder only."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = _our_name(key)
        if name.split(".", 1)[0] in HEAD_GROUPS:
            out[name] = value
    return out
