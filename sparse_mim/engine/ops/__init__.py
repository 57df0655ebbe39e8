"""Functional ops on SparseTensor / MaskedDenseTensor: one place per op's semantics."""
from .blur import padded_depthwise_filter
from .conv import conv2d
from .linear import linear
from .norm import batch_norm, group_norm, layer_norm
from .pool import avg_pool2d, max_pool2d
from .resample import space_to_depth, upsample_nearest
from .per_sample import GRN_MODES, drop_path, global_avg_pool, grn, per_sample_sum
from .window import WindowGeometry

__all__ = ["conv2d", "linear", "batch_norm", "group_norm", "layer_norm", "avg_pool2d", "max_pool2d", "drop_path",
           "space_to_depth", "upsample_nearest", "padded_depthwise_filter", "global_avg_pool", "grn", "GRN_MODES",
           "per_sample_sum", "WindowGeometry"]
