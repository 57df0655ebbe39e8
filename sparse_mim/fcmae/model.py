"""FCMAE (ConvNeXt V2's fully convolutional masked autoencoder) as one module whose methods are its steps.

    active = model.mask(images)                       # 1. choose visible 32x32 patches
    feature = model.encode(images, active)            # 2. sparse ConvNeXt V2 encoder, stride-32 output
    dense = model.densify(feature)                    # 3. dense map, zeros at masked patches
    pred = model.decode(dense, active)                # 4. 1x1 proj, mask token, ConvNeXt V2 block(s), 1x1 pred
    loss = model.forward_loss(images, pred, active)   # 5. MSE on masked, per-patch normalised patches

Semantics are the official ``models/fcmae.py`` and ``models/convnextv2_sparse.py``: the stem (4x4/4
conv + LayerNorm) sees the whole image and is then masked; every later layer runs on the visible
sites only; GRN takes its norm over the whole local batch (``grn="batch"``, as ``MinkowskiGRN``) or
per image (``grn="sample"``); ``pred`` is (B, patch^2 * 3, H/32, W/32), patch pixels in
(row, column, channel) order. ``dense_reference=True`` runs the encoder as the masked-dense
simulation on the same weights (the benchmark baseline and the tests' reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Set

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

from backbones import create_backbone
from backbones.convnext import SparseConvNeXt
from sparse_mim.convert.layouts.fcmae import official_fcmae_name, official_fcmae_to_ours
from sparse_mim.engine import SparseGRN, SparseInputError, set_grn_mode
from sparse_mim.engine.ops import GRN_MODES
from sparse_mim.spark.densify import sites_of
from sparse_mim.spark.loss import masked_patch_loss, normalize_patches, patchify, unpatchify
from sparse_mim.spark.masking import patch_grid, random_patch_mask

__all__ = ["FCMAE", "FCMAEOutput", "FCMAEModelError", "LoadResult", "build_fcmae", "fcmae_len_keep",
           "check_fcmae_model"]

PATCH_SIZE = 32  # the encoder's total stride: one prediction per 32x32 patch


class FCMAEModelError(ValueError):
    """The encoder asked for cannot be pretrained with FCMAE."""


@dataclass
class FCMAEOutput:
    loss: torch.Tensor    # scalar: mean error over the batch's masked patches
    pred: torch.Tensor    # (B, patch^2 * 3, H/32, W/32), as the official forward returns it
    active: torch.Tensor  # (B, H/32, W/32) bool patch mask, True = visible


class LoadResult(NamedTuple):
    missing_keys: List[str]     # official names our model has but the state_dict lacks
    unexpected_keys: List[str]  # official names in the state_dict our model has no place for


def fcmae_len_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``int(L * (1 - mask_ratio))`` (the official rounds down; SparK rounds)."""
    keep = int(num_patches * (1 - mask_ratio))
    if not 1 <= keep < num_patches:
        raise SparseInputError(f"mask_ratio {mask_ratio} keeps {keep} of {num_patches} patches (FCMAE keeps "
                               f"int(L * (1 - mask_ratio))); it must keep at least one and mask at least one")
    return keep


def _decoder_block(dim: int) -> nn.Module:
    """The official dense ConvNeXt V2 block (dwconv 7x7, LN, Linear, GELU, per-image GRN, Linear; no
    layer scale), as timm's ``ConvNeXtBlock`` with GRN."""
    return ConvNeXtBlock(dim, ls_init_value=None, use_grn=True, conv_mlp=False)


class FCMAE(nn.Module):
    """Sparse ConvNeXt V2 encoder + FCMAE's light decoder. ``encoder`` follows the ``backbones``
    contract (``encoder(images, active, dense_reference=...)`` -> features at strides 4..32)."""

    def __init__(self, encoder: nn.Module, decoder_depth: int = 1, decoder_embed_dim: int = 512,
                 patch_size: int = PATCH_SIZE, mask_ratio: float = 0.6, norm_pix_loss: bool = True,
                 dense_reference: bool = False):
        super().__init__()
        if patch_size != encoder.downsample_ratio:
            raise FCMAEModelError(f"patch_size must equal the encoder's total stride "
                                  f"{encoder.downsample_ratio}, got {patch_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
        if decoder_depth < 0 or decoder_embed_dim < 1:
            raise ValueError(f"need decoder_depth >= 0 and decoder_embed_dim >= 1, got "
                             f"{decoder_depth} / {decoder_embed_dim}")
        self.encoder = encoder
        self.patch_size = int(patch_size)
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.dense_reference = bool(dense_reference)
        self.proj = nn.Conv2d(encoder.feature_channels[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[_decoder_block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size ** 2 * 3, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """The official init: convs and linears trunc_normal(.02) with zero bias, LayerNorms 1/0,
        GRN 0, the mask token normal(.02). The encoder keeps its own (the same rules)."""
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def grn(self) -> str:
        """The encoder's GRN mode: ``"batch"`` (official) or ``"sample"``."""
        return next(m.mode for m in self.encoder.modules() if isinstance(m, SparseGRN))

    # -- the paper's steps ---------------------------------------------------------------------------
    def len_keep(self, num_patches: int) -> int:
        return fcmae_len_keep(num_patches, self.mask_ratio)

    def mask(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, H/32, W/32) bool, True = visible: each image keeps ``len_keep`` uniform random patches."""
        grid = patch_grid(images, self.patch_size)
        return random_patch_mask(images.shape[0], grid, self.mask_ratio, generator, images.device,
                                 keep=self.len_keep(grid[0] * grid[1]))

    def encode(self, images: torch.Tensor, active: torch.Tensor):
        """The encoder's stride-32 output on the visible patches (sparse, or masked-dense)."""
        return self.encoder(images, active, dense_reference=self.dense_reference)[-1]

    def densify(self, feature) -> torch.Tensor:
        """(B, C, H/32, W/32): the features at visible patches, zeros at masked ones."""
        return feature.dense()

    def decode(self, dense: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(B, patch^2 * 3, H/32, W/32) prediction in normalised-patch space."""
        x = self.proj(dense)
        x = torch.where(active[:, None], x, self.mask_token.to(x.dtype))
        return self.pred(self.decoder(x))

    def pred_images(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): ``pred``'s per-patch pixels laid out as an image."""
        b, _, h, w = pred.shape
        return unpatchify(pred.flatten(2).transpose(1, 2), (h, w), self.patch_size)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(self.pred_images(pred), images, active, self.patch_size,
                                 normalize=self.norm_pix_loss)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> FCMAEOutput:
        """One pretraining step's forward pass; draws a random mask unless ``active`` is given."""
        if active is None:
            active = self.mask(images)
        pred = self.decode(self.densify(self.encode(images, active)), active)
        return FCMAEOutput(self.forward_loss(images, pred, active), pred, active)

    # -- the official checkpoint layout --------------------------------------------------------------
    def official_names(self) -> Dict[str, str]:
        """Our parameter name -> the official ``FCMAE`` state_dict name it corresponds to."""
        return {n: official_fcmae_name(n) for n, _ in self.named_parameters()}

    def no_weight_decay_names(self) -> Set[str]:
        """The official pretraining's no-decay group: parameters that are 1-D or named ``*.bias`` in the
        official model (so its GRN gamma/beta, (1, C) there, and the mask token do take decay)."""
        shapes = self._official_shapes()
        return {n for n, official in self.official_names().items()
                if len(shapes[official]) == 1 or official.endswith(".bias")}

    def _official_shapes(self) -> Dict[str, tuple]:
        from sparse_mim.convert.layouts.fcmae import ours_to_official_fcmae

        meta = {n: torch.empty(p.shape, device="meta") for n, p in self.named_parameters()}
        return {k: tuple(v.shape) for k, v in ours_to_official_fcmae(meta).items()}

    def load_official_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> LoadResult:
        """Load an official ``FCMAE.state_dict()`` (MinkowskiEngine layouts, decoder included).

        Returns the missing and unexpected keys in official names (both empty for a whole official
        model of the same size); a tensor of the wrong size raises ``ValueError`` naming it."""
        renamed, unexpected = official_fcmae_to_ours(state_dict)
        own = self.state_dict()
        tensors, wrong = {}, []
        for key, value in renamed.items():
            if key not in own:
                unexpected.append(official_fcmae_name(key))
            elif value.numel() != own[key].numel():
                wrong.append(f"{official_fcmae_name(key)}: {tuple(value.shape)} does not fit {tuple(own[key].shape)}")
            else:
                tensors[key] = value.reshape(own[key].shape)  # MLP weights: (out, in) -> 1x1 conv where held so
        if wrong:
            raise ValueError(f"official FCMAE weights do not fit this model (depths/dims or decoder size differ): "
                             + "; ".join(wrong[:10]))
        result = self.load_state_dict(tensors, strict=False)
        return LoadResult([official_fcmae_name(k) or k for k in result.missing_keys], unexpected)

    # -- visualisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: FCMAEOutput) -> Dict[str, torch.Tensor]:
        """Images for inspection, each (B, 3, H, W) in the input's value space: ``input``, ``masked``
        and ``reconstruction`` (the prediction, un-normalised with each true patch's mean and std
        under norm_pix_loss, with the visible patches pasted back from the input)."""
        pred = self.pred_images(out.pred.to(images.dtype))
        if self.norm_pix_loss:
            grid = patch_grid(images, self.patch_size)
            _, mean, std = normalize_patches(patchify(images, self.patch_size))
            pred = unpatchify(patchify(pred, self.patch_size) * std + mean, grid, self.patch_size)
        visible = sites_of(out.active, images.shape[2:])
        return {"input": images, "masked": images * visible.to(images.dtype),
                "reconstruction": torch.where(visible, images, pred)}

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, norm_pix_loss={self.norm_pix_loss}, "
                f"dense_reference={self.dense_reference}")


def check_fcmae_model(name: str) -> None:
    """Raise ``FCMAEModelError`` unless ``name`` is a ConvNeXt V2 (the encoder FCMAE is defined for)."""
    import timm

    if not name.startswith("convnextv2_"):
        sizes = ", ".join(n for n in timm.list_models("convnextv2_*") if n.count("_") == 1)
        raise FCMAEModelError(f"FCMAE pretrains ConvNeXt V2 encoders; model={name} is not one: use one of "
                              f"{sizes}, or method=spark for any other CNN")


def build_fcmae(name: Optional[str] = None, *, depths: Optional[Sequence[int]] = None,
                dims: Optional[Sequence[int]] = None, decoder_depth: int = 1, decoder_embed_dim: int = 512,
                patch_size: int = PATCH_SIZE, mask_ratio: float = 0.6, norm_pix_loss: bool = True,
                grn: str = "batch", drop_path_rate: Optional[float] = 0.0, dense_reference: bool = False,
                backend: str = "native") -> FCMAE:
    """FCMAE around a sparse ConvNeXt V2: a timm name (``"convnextv2_atto"``) or ``depths`` and ``dims``.

    ``grn``: ``"batch"`` (the official: one L2 norm over the local batch's visible sites) or
    ``"sample"`` (per image, like the dense GRN of fine-tuning).
    """
    if grn not in GRN_MODES:
        raise ValueError(f"grn must be one of {', '.join(GRN_MODES)}, got {grn!r}")
    if (name is None) == (depths is None or dims is None):
        raise ValueError("give either a model name (e.g. 'convnextv2_atto') or both depths and dims")
    drop_path_rate = drop_path_rate or 0.0
    if name is None:
        encoder = SparseConvNeXt(depths, dims, drop_path_rate=drop_path_rate, version=2)
    else:
        check_fcmae_model(name)
        encoder = create_backbone(name, drop_path_rate=drop_path_rate, backend=backend)
    set_grn_mode(encoder, grn)
    return FCMAE(encoder, decoder_depth=decoder_depth, decoder_embed_dim=decoder_embed_dim, patch_size=patch_size,
                 mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, dense_reference=dense_reference)
