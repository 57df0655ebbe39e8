"""ConvNeXt V2 FCMAE checkpoints (MinkowskiEngine layout) <-> timm `convnextv2` state_dicts.

An FCMAE pretraining checkpoint (facebookresearch/ConvNeXt-V2 `main_pretrain.py`) is
`{"model": {...}, "optimizer": ..., "epoch": ..., "scaler": ..., "args": Namespace}` with the encoder
under `encoder.*` in the official sparse encoder's names: `downsample_layers.{0..3}`, `stages.s.b.*`,
MinkowskiEngine kernels `(K, C_in, C_out)` / depthwise `(K, C)` with `(1, C)` biases, `ln` / `linear`
wrapper modules and GRN parameters `(1, 4C)`. The decoder side (`mask_token`, `proj`, `decoder`,
`pred`) is not part of the encoder and is dropped, as the official fine-tuning code does.

The rules below are one table used both ways: FCMAE -> timm (`fcmae_to_timm`) and timm -> FCMAE
(`timm_to_fcmae`, what `sparse-mim convert --to minkowski` writes for a ConvNeXt V2). They work for
any depths and dims; with an `arch`, the result is also checked against that timm model.

The whole pretraining model (`sparse_mim.fcmae.FCMAE`: the encoder under `encoder.` with timm's
names, the decoder's blocks as timm `ConvNeXtBlock`s) maps onto the official `FCMAE` module's
state_dict through `official_fcmae_to_ours` / `ours_to_official_fcmae` (decoder rules below).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sparse_mim.engine.minkowski_layout import (KernelLayoutError, dense_bias_to_me, dense_kernel_to_me, me_bias_to_dense,
                                                me_kernel_to_dense)

from ..errors import ConversionError
from ..timm_keys import timm_encoder_shapes
from ..verify import key_problems, shapes_of

__all__ = ["fcmae_to_timm", "timm_to_fcmae", "is_fcmae_layout", "FCMAE_DECODER_GROUPS",
           "official_fcmae_to_ours", "ours_to_official_fcmae", "official_fcmae_name", "fcmae_head_state_dict"]

#: Top-level groups of an FCMAE model that belong to the decoder (dropped by the official fine-tuning).
FCMAE_DECODER_GROUPS = ("mask_token", "proj", "decoder", "pred")


def _me_kernel_to_dense(kernel: torch.Tensor, depthwise: bool) -> torch.Tensor:
    side = math.isqrt(kernel.shape[0])
    if side * side != kernel.shape[0]:
        raise ConversionError(f"an ME kernel of shape {tuple(kernel.shape)} is not square (K = {kernel.shape[0]})")
    return me_kernel_to_dense(kernel, side, depthwise=depthwise)


def _grn_to_timm(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(p.shape[-1])  # sparse (1, C) and official dense (1, 1, 1, C) alike


@dataclass(frozen=True)
class _Rule:
    timm: str                                       # template, e.g. "stages.{s}.blocks.{b}.conv_dw.weight"
    fcmae: str                                      # template, e.g. "stages.{s}.{b}.dwconv.kernel"
    to_timm: Callable[[torch.Tensor], torch.Tensor]
    to_fcmae: Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


_RULES = (
    _Rule("stem.0.{p}", "downsample_layers.0.0.{p}", _same, _same),                     # dense 4x4 conv
    _Rule("stem.1.{p}", "downsample_layers.0.1.{p}", _same, _same),                     # LayerNorm (no .ln.)
    _Rule("stages.{s}.downsample.0.{p}", "downsample_layers.{s}.0.ln.{p}", _same, _same),
    _Rule("stages.{s}.downsample.1.weight", "downsample_layers.{s}.1.kernel",
          lambda k: _me_kernel_to_dense(k, depthwise=False), lambda w: dense_kernel_to_me(w, stride=2)),
    _Rule("stages.{s}.downsample.1.bias", "downsample_layers.{s}.1.bias", me_bias_to_dense, dense_bias_to_me),
    _Rule("stages.{s}.blocks.{b}.conv_dw.weight", "stages.{s}.{b}.dwconv.kernel",
          lambda k: _me_kernel_to_dense(k, depthwise=True), lambda w: dense_kernel_to_me(w, depthwise=True)),
    _Rule("stages.{s}.blocks.{b}.conv_dw.bias", "stages.{s}.{b}.dwconv.bias", me_bias_to_dense, dense_bias_to_me),
    _Rule("stages.{s}.blocks.{b}.norm.{p}", "stages.{s}.{b}.norm.ln.{p}", _same, _same),
    # timm's atto..nano hold the MLP as 1x1 convs (conv_mlp=True); FCMAE always as nn.Linear
    _Rule("stages.{s}.blocks.{b}.mlp.fc{n}.{p}", "stages.{s}.{b}.pwconv{n}.linear.{p}", _same,
          lambda w: w.flatten(1) if w.dim() == 4 else w),
    _Rule("stages.{s}.blocks.{b}.mlp.grn.weight", "stages.{s}.{b}.grn.gamma", _grn_to_timm, lambda p: p[None]),
    _Rule("stages.{s}.blocks.{b}.mlp.grn.bias", "stages.{s}.{b}.grn.beta", _grn_to_timm, lambda p: p[None]),
)

#: The decoder side of the whole model: ours (timm ConvNeXtBlock names) <- official (`models/fcmae.py`).
_DECODER_RULES = (
    _Rule("mask_token", "mask_token", _same, _same),
    _Rule("proj.{p}", "proj.{p}", _same, _same),
    _Rule("pred.{p}", "pred.{p}", _same, _same),
    _Rule("decoder.{b}.conv_dw.{p}", "decoder.{b}.dwconv.{p}", _same, _same),
    _Rule("decoder.{b}.norm.{p}", "decoder.{b}.norm.{p}", _same, _same),
    _Rule("decoder.{b}.mlp.fc{n}.{p}", "decoder.{b}.pwconv{n}.{p}", _same, _same),
    _Rule("decoder.{b}.mlp.grn.weight", "decoder.{b}.grn.gamma", _grn_to_timm, lambda p: p.reshape(1, 1, 1, -1)),
    _Rule("decoder.{b}.mlp.grn.bias", "decoder.{b}.grn.beta", _grn_to_timm, lambda p: p.reshape(1, 1, 1, -1)),
)
_ENCODER = "encoder."
_MODEL_RULES = tuple(_Rule(_ENCODER + r.timm, _ENCODER + r.fcmae, r.to_timm, r.to_fcmae) for r in _RULES) \
    + _DECODER_RULES

_FIELDS = {"s": r"(?P<s>\d+)", "b": r"(?P<b>\d+)", "p": r"(?P<p>weight|bias)", "n": r"(?P<n>[12])"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile(regex)


_TO_TIMM = [(_pattern(r.fcmae), r) for r in _RULES]
_TO_FCMAE = [(_pattern(r.timm), r) for r in _RULES]
_MODEL_TO_OURS = [(_pattern(r.fcmae), r) for r in _MODEL_RULES]
_MODEL_TO_OFFICIAL = [(_pattern(r.timm), r) for r in _MODEL_RULES]


def is_fcmae_layout(keys) -> bool:
    """True for encoder keys in the official sparse ConvNeXt V2 names (`downsample_layers.i.1.kernel`)."""
    return any(k.startswith("downsample_layers.") and k.endswith(".kernel") for k in keys)


def _rename(state_dict: Mapping[str, torch.Tensor], to_timm: bool, table=None) -> tuple[dict, list[str]]:
    table = table or (_TO_TIMM if to_timm else _TO_FCMAE)
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, rule in table:
            if m := pattern.fullmatch(key):
                target = (rule.timm if to_timm else rule.fcmae).format(**m.groupdict())
                try:
                    out[target] = (rule.to_timm if to_timm else rule.to_fcmae)(value)
                except KernelLayoutError as e:
                    raise ConversionError(f"{key}: {e}") from None
                break
        else:
            unknown.append(key)
    return out, unknown


def timm_to_fcmae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ConvNeXt V2 encoder weights -> the official sparse encoder's names and ME layout
    (encoder-relative: prefix `encoder.` to get the keys of an FCMAE `model` dict)."""
    out, unknown = _rename(state_dict, to_timm=False)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise ConversionError(f"{len(unknown)} keys have no FCMAE counterpart (is this a ConvNeXt V2 encoder?): "
                              f"{shown}")
    return {k: v.contiguous() for k, v in out.items()}


def official_fcmae_to_ours(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The official `FCMAE` module's state_dict (encoder, mask_token, proj, decoder, pred) -> our
    `sparse_mim.fcmae.FCMAE` names, dense kernel layouts and GRN shapes; plus the keys with no
    counterpart. MLP weights stay (out, in): reshape to 1x1 convs where the encoder holds them so."""
    return _rename(state_dict, to_timm=True, table=_MODEL_TO_OURS)


def ours_to_official_fcmae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our whole FCMAE model's state_dict -> the official `FCMAE` module's names and MinkowskiEngine
    layouts (what `FCMAE.load_state_dict(..., strict=True)` takes)."""
    out, unknown = _rename(state_dict, to_timm=False, table=_MODEL_TO_OFFICIAL)
    if unknown:
        raise ConversionError(f"{len(unknown)} keys have no counterpart in the official FCMAE model: "
                              + ", ".join(unknown[:20]))
    return {k: v.contiguous() for k, v in out.items()}


def fcmae_head_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder side (mask_token, proj, decoder, pred) of a whole FCMAE state dict under our names:
    renamed from the official layout when the file is an official checkpoint, as-is from ours."""
    head = {k: v for k, v in weights.items() if k.split(".", 1)[0] in FCMAE_DECODER_GROUPS}
    official = any(k.startswith("encoder.downsample_layers.") for k in weights) or \
        any(k.startswith("decoder.") and ".dwconv." in k for k in head)
    if not official:
        return head
    renamed, unknown = official_fcmae_to_ours(head)
    if unknown:
        raise ConversionError(f"{len(unknown)} decoder keys of the FCMAE checkpoint have no counterpart: "
                              + ", ".join(unknown[:20]))
    return renamed


def official_fcmae_name(name: str) -> str | None:
    """The official `FCMAE` state_dict name of our FCMAE parameter ``name`` (None if it has none)."""
    for pattern, rule in _MODEL_TO_OFFICIAL:
        if m := pattern.fullmatch(name):
            return rule.fcmae.format(**m.groupdict())
    return None


def _infer_config(keys: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) of an FCMAE encoder from its keys and shapes."""
    dims, depths = [], []
    for s in range(4):
        blocks = {int(m.group(1)) for k in keys if (m := re.fullmatch(rf"stages\.{s}\.(\d+)\..+", k))}
        stem_or_down = "downsample_layers.0.0.weight" if s == 0 else f"downsample_layers.{s}.1.kernel"
        if stem_or_down in keys:
            dims.append(int(keys[stem_or_down].shape[0 if s == 0 else -1]))
        elif f"stages.{s}.0.dwconv.kernel" in keys:
            dims.append(int(keys[f"stages.{s}.0.dwconv.kernel"].shape[-1]))
        else:
            raise ConversionError(f"FCMAE encoder: cannot tell the width of stage {s}: neither {stem_or_down!r} nor "
                                  f"'stages.{s}.0.dwconv.kernel' is in the checkpoint (truncated?)")
        if not blocks:
            raise ConversionError(f"FCMAE encoder: stage {s} has no blocks ('stages.{s}.*' is missing; truncated?)")
        depths.append(max(blocks) + 1)
    return tuple(depths), tuple(dims)


def _timm_convnextv2_shapes(depths, dims) -> dict[str, tuple[int, ...]]:
    from timm.models.convnext import ConvNeXt

    with torch.device("meta"):
        model = ConvNeXt(depths=depths, dims=dims, use_grn=True, ls_init_value=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}


def _expected_fcmae_shapes(timm_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    meta = {k: torch.empty(s, device="meta") for k, s in timm_shapes.items()}
    return shapes_of(timm_to_fcmae(meta))


def fcmae_to_timm(encoder: Mapping[str, torch.Tensor], arch: str | None = None) -> dict[str, torch.Tensor]:
    """Encoder-relative FCMAE weights -> timm names and shapes.

    Without `arch` the depths and dims come from the weights and the result loads into
    `timm.models.convnext.ConvNeXt(depths, dims, use_grn=True, ls_init_value=None)`; with `arch`
    (e.g. `convnextv2_atto`) the checkpoint must match that model, whose MLP layout (linear or 1x1
    conv) the result takes. Missing, unexpected or wrongly shaped keys raise a ConversionError
    listing them, in the checkpoint's own names."""
    if arch is None:
        depths, dims = _infer_config(encoder)
        timm_shapes, what = _timm_convnextv2_shapes(depths, dims), f"depths={list(depths)}, dims={list(dims)}"
    else:
        timm_shapes, what = timm_encoder_shapes(arch), f"timm {arch!r}"
    problems = key_problems(shapes_of(encoder), _expected_fcmae_shapes(timm_shapes))
    if problems:
        raise ConversionError(f"FCMAE encoder weights do not match a ConvNeXt V2 with {what} "
                              f"(keys without the 'encoder.' prefix): {problems}")
    renamed, _ = _rename(encoder, to_timm=True)
    return {k: renamed[k].reshape(s).contiguous() for k, s in timm_shapes.items()}

