"""SparK (sparse masked modelling for CNNs): masking, densify, LightDecoder, loss, and the model."""
from .decoder import DecoderBlock, LightDecoder
from .loss import masked_patch_loss, normalize_patches, patchify, unpatchify
from .masking import check_mask_ratio, len_keep, random_patch_mask
from .model import DEFAULT_DROP_PATH, SparK, SparKOutput, build_spark
from .params import no_weight_decay_names, param_groups

__all__ = ["SparK", "SparKOutput", "build_spark", "DEFAULT_DROP_PATH", "random_patch_mask", "len_keep",
           "check_mask_ratio", "LightDecoder", "DecoderBlock", "patchify", "unpatchify", "normalize_patches",
           "masked_patch_loss", "no_weight_decay_names", "param_groups"]
