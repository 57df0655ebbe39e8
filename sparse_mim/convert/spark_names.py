"""The parts of a SparK pretraining checkpoint around the encoder (densify norms, mask tokens,
densify projections, decoder) under sparse-mim's names, from our checkpoints or the reference SparK's.

The reference SparK (keyu-tian/SparK, ``pretrain/spark.py``) names them like we do except for the
decoder (``dense_decoder.dec.i.up_sample`` -> ``decoder.blocks.i.upsample``), keeps three unused
buffers (``imn_m``, ``imn_s``, ``norm_black``), and its ``state_dict(with_config=True)`` holds a
plain-dict ``config`` entry among the tensors. Names only: no model code is imported.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

#: Our SparK's top-level module names around the encoder, in model order.
HEAD_GROUPS = ("densify_norms", "mask_tokens", "densify_projs", "decoder")
REFERENCE_UNUSED_BUFFERS = frozenset({"imn_m", "imn_s", "norm_black"})
CONFIG_KEY = "config"
_REFERENCE_DECODER = re.compile(r"^dense_decoder\.(?:dec\.(\d+)\.up_sample\.|dec\.(\d+)\.|proj\.)")


def split_spark_config(raw: Mapping) -> tuple[Mapping, dict | None]:
    """``raw`` without the reference SparK's ``config`` entry inside its state dict (bare, or under
    ``module`` / ``model`` / ``state_dict``), and that config (None if absent)."""
    if isinstance(raw.get(CONFIG_KEY), Mapping) and any(isinstance(v, torch.Tensor) for v in raw.values()):
        return {k: v for k, v in raw.items() if k != CONFIG_KEY}, dict(raw[CONFIG_KEY])
    for wrapper in ("module", "model", "state_dict"):
        inner = raw.get(wrapper)
        if isinstance(inner, Mapping) and isinstance(inner.get(CONFIG_KEY), Mapping):
            cleaned = {k: v for k, v in inner.items() if k != CONFIG_KEY}
            return {**raw, wrapper: cleaned}, dict(inner[CONFIG_KEY])
    return raw, None


def _our_name(key: str) -> str:
    match = _REFERENCE_DECODER.match(key)
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
    the reference's) under our names; empty when ``weights`` holds an encoder only."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = _our_name(key)
        if name.split(".", 1)[0] in HEAD_GROUPS:
            out[name] = value
    return out
