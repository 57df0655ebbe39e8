"""Gather convolutions over neighbour maps: Triton implicit-GEMM kernels with a plain-PyTorch version.

``gather_conv`` and ``gather_depthwise_conv`` pick the Triton kernels for CUDA tensors in
float32/float16/bfloat16 and the plain-PyTorch version (``torch_gather.py``) otherwise.
"""
from .torch_gather import gather_conv_torch, gather_depthwise_torch
from .triton_conv import (count_triton_flops, gather_conv, gather_depthwise_conv, invert_neighbor_map,
                          triton_available)

__all__ = [
    "gather_conv",
    "gather_depthwise_conv",
    "gather_conv_torch",
    "gather_depthwise_torch",
    "invert_neighbor_map",
    "triton_available",
    "count_triton_flops",
]
