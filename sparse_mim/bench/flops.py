"""Executed FLOPs: counted from the ops that actually run, with ``torch.utils.flop_counter``.

The counter sees every aten convolution / matmul. Custom Triton kernels (``sparse_mim.kernels``, the
implicit-GEMM path on CUDA) are invisible to it, so they tally their own executed FLOPs (2 x valid
kernel-map entries x C_in x C_out per pass) inside ``count_triton_flops`` and the two are added.

torch's formula for ``aten.convolution_backward`` ignores ``groups`` in the weight-gradient term
(it counts a depthwise 7x7 conv's weight gradient C times over, making ConvNeXt's backward ~4x too
large), so the counter here uses a corrected formula: the weight gradient does exactly the forward's
multiply-adds, as the input gradient does.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .workload import Workload

__all__ = ["count_flops"]


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: input gradient + weight gradient, each as the forward."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


CORRECTED_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flops}


def count_flops(workload: Workload, variant: str, what: str, active: torch.Tensor) -> Dict[str, int]:
    """``{"fwd": ..., "bwd": ..., "fwd_bwd": ...}`` FLOPs of one iteration (one untimed run)."""
    from sparse_mim.kernels import count_triton_flops

    workload.prepare(variant)
    with workload.eager(), FlopCounterMode(display=False, custom_mapping=CORRECTED_FORMULAS) as counter, \
            count_triton_flops() as triton_flops:
        loss = workload.forward(variant, what, active)
        forward = counter.get_total_flops() + triton_flops()
        loss.backward()
        total = counter.get_total_flops() + triton_flops()
    workload.prepare(variant)
    return {"fwd": int(forward), "bwd": int(total - forward), "fwd_bwd": int(total)}
