"""Gather convolutions over neighbour maps: Triton implicit-GEMM kernels with a PyTorch reference.

``gather_conv`` and ``gather_depthwise_conv`` pick the Triton kernels for CUDA tensors in
float32/float16/bfloat16 and the pure-PyTorch reference (``reference.py``) otherwise.
"""
from .reference import gather_conv_reference, gather_depthwise_reference
from .triton_conv import (count_triton_flops, gather_conv, gather_depthwise_conv, invert_neighbor_map,
                          triton_available)

__all__ = [
    "gather_conv",
    "gather_depthwise_conv",
    "gather_conv_reference",
    "gather_depthwise_reference",
    "invert_neighbor_map",
    "triton_available",
    "count_triton_flops",
]
