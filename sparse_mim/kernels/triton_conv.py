"""Triton gather convolutions: implicit GEMM over a neighbour map, with their backward passes.

Layout. Features are rows: ``x`` (N_in, C_in), one contiguous row per active site. A convolution
is a neighbour map ``nbr`` (N_out, K) int32, ``nbr[o, k]`` being the input row that output row
``o`` reads through kernel offset ``k`` (row-major (ky, kx) order) or -1 for none. Its inverse
``nbr_inv`` (N_in, K) gives, for input row ``i`` and offset ``k``, the output row that reads it, or
-1. Weights are (K, C_in, C_out) for a full convolution and (K, C) for a depthwise one, so
``weight[k]`` is the matrix applied to the neighbour at offset ``k``.

Why implicit GEMM. The obvious sparse convolution gathers an im2col matrix (N_out, K * C_in) and
multiplies it by the (K * C_in, C_out) weight; that buffer is K times the size of the input and is
written once and read once, so the layer is memory bound. Here each program owns a tile of
BLOCK_N output rows by BLOCK_CO output channels, and for every offset k it reads the BLOCK_N
neighbour indices, loads the gathered (BLOCK_N, BLOCK_CI) slab of ``x`` straight from the feature
rows (masked where the index is -1 or the channel is past the edge) and feeds it to ``tl.dot``
with the (BLOCK_CI, BLOCK_CO) slice of ``weight[k]``, accumulating in fp32 registers. Nothing the
size of im2col ever exists; offsets where the whole tile has no neighbour are skipped.

Backward.
- dx is the same kernel run on ``dout`` through ``nbr_inv`` with ``weight[k]`` transposed:
  dx[i] = sum_k dout[nbr_inv[i, k]] @ weight[k]^T.
- dW[k] = x[nbr[:, k]]^T @ dout is a reduction over output rows. Each program owns one
  (BLOCK_CI, BLOCK_CO) tile of one dW[k] and one contiguous range of output rows; it accumulates
  in fp32 with ``tl.dot`` and adds its partial sum into an fp32 buffer with ``tl.atomic_add``. The
  number of row ranges is chosen so that the grid fills the GPU. The summation order therefore
  varies from run to run (results agree to rounding, not bit for bit).
- dbias = dout.sum(0), in fp32.
The depthwise kernels follow the same plan with elementwise products instead of ``tl.dot``.

Dispatch: ``gather_conv`` / ``gather_depthwise_conv`` use these kernels when ``x`` is on CUDA (or
when ``SPARSE_MIM_FORCE_TRITON=1``, which together with ``TRITON_INTERPRET=1`` runs them on the
CPU for tests) and the dtype is float32, float16 or bfloat16; otherwise they call the PyTorch
plain-PyTorch version in ``torch_gather.py``, which defines the semantics.
"""
from __future__ import annotations

import functools
import contextlib
import os

import torch
from torch.autograd.function import once_differentiable

from .torch_gather import check_gather_args, gather_conv_torch, gather_depthwise_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the plain-PyTorch path still works without Triton
    triton = None
    tl = None

__all__ = ["gather_conv", "gather_depthwise_conv", "invert_neighbor_map", "triton_available"]

FORCE_TRITON_ENV = "SPARSE_MIM_FORCE_TRITON"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gather_gemm_kernel(x_ptr, w_ptr, nbr_ptr, bias_ptr, out_ptr,
                            n_out, c_in, c_out, K,
                            HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            DOT_IN_FP32: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
        """out[o, :] = sum_k x[nbr[o, k], :] @ w[k] (+ bias) for one (BLOCK_N, BLOCK_CO) tile."""
        pid_n = tl.program_id(0)
        pid_co = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cos = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        row_ok = rows < n_out
        co_ok = cos < c_out
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=tl.float32)
        for k in range(0, K):
            src = tl.load(nbr_ptr + rows64 * K + k, mask=row_ok, other=-1)
            src_ok = src >= 0
            if tl.max(src_ok.to(tl.int32), axis=0) > 0:
                x_rows = x_ptr + src.to(tl.int64) * c_in
                w_k = w_ptr + k * c_in * c_out
                for ci0 in range(0, c_in, BLOCK_CI):
                    cis = ci0 + tl.arange(0, BLOCK_CI)
                    ci_ok = cis < c_in
                    a = tl.load(x_rows[:, None] + cis[None, :],
                                mask=src_ok[:, None] & ci_ok[None, :], other=0.0)
                    b = tl.load(w_k + cis[:, None] * c_out + cos[None, :],
                                mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                    if DOT_IN_FP32:
                        a, b = a.to(tl.float32), b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cos, mask=co_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows64[:, None] * c_out + cos[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])

    @triton.jit
    def _gather_wgrad_kernel(x_ptr, dout_ptr, nbr_ptr, dw_ptr,
                             n_out, c_in, c_out, K, rows_per_split,
                             DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
        """dw[k] += x[nbr[rows, k]]^T @ dout[rows] over one range of output rows (fp32 dw)."""
        pid_tile = tl.program_id(0)
        k = tl.program_id(1)
        pid_split = tl.program_id(2)
        n_co_tiles = tl.cdiv(c_out, BLOCK_CO)
        cis = (pid_tile // n_co_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        cos = (pid_tile % n_co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        ci_ok = cis < c_in
        co_ok = cos < c_out
        acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        row_start = pid_split * rows_per_split
        for n0 in range(row_start, row_start + rows_per_split, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rows64 = rows.to(tl.int64)
            src = tl.load(nbr_ptr + rows64 * K + k, mask=rows < n_out, other=-1)
            src_ok = src >= 0
            if tl.max(src_ok.to(tl.int32), axis=0) > 0:
                # The gathered slab is loaded already transposed: (BLOCK_CI, BLOCK_N).
                xt = tl.load(x_ptr + src.to(tl.int64)[None, :] * c_in + cis[:, None],
                             mask=ci_ok[:, None] & src_ok[None, :], other=0.0)
                d = tl.load(dout_ptr + rows64[:, None] * c_out + cos[None, :],
                            mask=src_ok[:, None] & co_ok[None, :], other=0.0)
                if DOT_IN_FP32:
                    xt, d = xt.to(tl.float32), d.to(tl.float32)
                acc = tl.dot(xt, d, acc, input_precision=DOT_PRECISION)
        dw_ptrs = dw_ptr + k * c_in * c_out + cis[:, None] * c_out + cos[None, :]
        tl.atomic_add(dw_ptrs, acc, mask=ci_ok[:, None] & co_ok[None, :], sem="relaxed")

    @triton.jit
    def _gather_depthwise_kernel(x_ptr, w_ptr, nbr_ptr, bias_ptr, out_ptr,
                                 n_out, C, K,
                                 HAS_BIAS: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[o, c] = sum_k x[nbr[o, k], c] * w[k, c] (+ bias[c]) for one (BLOCK_N, BLOCK_C) tile."""
        pid_n = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < n_out
        c_ok = cs < C
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for k in range(0, K):
            src = tl.load(nbr_ptr + rows64 * K + k, mask=row_ok, other=-1)
            src_ok = src >= 0
            a = tl.load(x_ptr + src.to(tl.int64)[:, None] * C + cs[None, :],
                        mask=src_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + k * C + cs, mask=c_ok, other=0.0)
            acc += a.to(tl.float32) * w.to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=c_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows64[:, None] * C + cs[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _gather_depthwise_wgrad_kernel(x_ptr, dout_ptr, nbr_ptr, dw_ptr,
                                       n_out, C, K, rows_per_split,
                                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """dw[k, c] += sum_rows x[nbr[rows, k], c] * dout[rows, c] over one range of rows (fp32 dw)."""
        pid_c = tl.program_id(0)
        k = tl.program_id(1)
        pid_split = tl.program_id(2)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        row_start = pid_split * rows_per_split
        for n0 in range(row_start, row_start + rows_per_split, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rows64 = rows.to(tl.int64)
            src = tl.load(nbr_ptr + rows64 * K + k, mask=rows < n_out, other=-1)
            src_ok = src >= 0
            m = src_ok[:, None] & c_ok[None, :]
            a = tl.load(x_ptr + src.to(tl.int64)[:, None] * C + cs[None, :], mask=m, other=0.0)
            d = tl.load(dout_ptr + rows64[:, None] * C + cs[None, :], mask=m, other=0.0)
            acc += a.to(tl.float32) * d.to(tl.float32)
        tl.atomic_add(dw_ptr + k * C + cs, tl.sum(acc, axis=0), mask=c_ok, sem="relaxed")


# --------------------------------------------------------------------------------------------
# Launch heuristics
# --------------------------------------------------------------------------------------------
def _block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi] (tl.dot needs every side >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should have to keep the device busy."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 16  # interpreter: a few row ranges, so the atomic reduction and its loop both run


def _conv_blocks(c_in: int, c_out: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":  # interpreter: the smallest legal tiles, so loops and edges run
        return dict(BLOCK_N=16, BLOCK_CI=16, BLOCK_CO=16, num_warps=4)
    wide = _is_16bit(dtype)
    return dict(BLOCK_N=64,
                BLOCK_CI=_block(c_in, 16, 64 if wide else 32),
                BLOCK_CO=_block(c_out, 16, 128 if wide else 64),
                num_warps=4)


def _wgrad_blocks(c_in: int, c_out: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_CI=16, BLOCK_CO=16, num_warps=4)
    return dict(BLOCK_N=64 if _is_16bit(dtype) else 32,
                BLOCK_CI=_block(c_in, 16, 64),
                BLOCK_CO=_block(c_out, 16, 64),
                num_warps=4)


def _depthwise_blocks(c: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_C=16, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_C=_block(c, 16, 128), num_warps=4)


def _row_split(n_rows: int, block_n: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """Split the rows into ranges (multiples of block_n) so tiles * splits fills the device."""
    n_blocks = triton.cdiv(max(n_rows, 1), block_n)
    splits = max(1, min(n_blocks, triton.cdiv(_target_programs(device), max(tiles, 1))))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split * block_n


def _dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    # fp32 stays exact fp32 (no tf32) so that it matches the plain-PyTorch version to ~1e-5; the precision
    # setting is ignored for fp16/bf16 operands. The Triton interpreter multiplies bfloat16 blocks
    # as raw integers, so there (and only there) bf16 operands are widened to fp32 before tl.dot.
    return dict(DOT_PRECISION="ieee", DOT_IN_FP32=device.type != "cuda" and dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Launchers (contiguous inputs, int32 maps)
# --------------------------------------------------------------------------------------------
def _launch_gather_gemm(x, weight, nbr, bias):
    n_out, K = nbr.shape
    c_in, c_out = weight.shape[1], weight.shape[2]
    out = torch.empty(n_out, c_out, dtype=x.dtype, device=x.device)
    if n_out == 0 or c_out == 0:
        return out
    if c_in == 0 or K == 0:
        return out.copy_(bias.expand_as(out) if bias is not None else torch.zeros_like(out))
    cfg = _conv_blocks(c_in, c_out, x.dtype, x.device)
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(c_out, cfg["BLOCK_CO"]))
    _gather_gemm_kernel[grid](
        x, weight, nbr, bias if bias is not None else out, out,
        n_out, c_in, c_out, K,
        HAS_BIAS=bias is not None, **_dot_args(x.dtype, x.device), **cfg)
    return out


def _launch_gather_wgrad(x, dout, nbr, c_in, c_out):
    n_out, K = nbr.shape
    dw = torch.zeros(K, c_in, c_out, dtype=torch.float32, device=x.device)
    if n_out == 0 or c_in == 0 or c_out == 0 or K == 0:
        return dw
    cfg = _wgrad_blocks(c_in, c_out, x.dtype, x.device)
    tiles = triton.cdiv(c_in, cfg["BLOCK_CI"]) * triton.cdiv(c_out, cfg["BLOCK_CO"])
    splits, rows_per_split = _row_split(n_out, cfg["BLOCK_N"], tiles * K, x.device)
    _gather_wgrad_kernel[(tiles, K, splits)](
        x, dout, nbr, dw, n_out, c_in, c_out, K, rows_per_split,
        **_dot_args(x.dtype, x.device), **cfg)
    return dw


def _launch_depthwise(x, weight, nbr, bias):
    n_out, K = nbr.shape
    C = x.shape[1]
    out = torch.empty(n_out, C, dtype=x.dtype, device=x.device)
    if n_out == 0 or C == 0:
        return out
    cfg = _depthwise_blocks(C, x.device)
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _gather_depthwise_kernel[grid](
        x, weight, nbr, bias if bias is not None else out, out, n_out, C, K,
        HAS_BIAS=bias is not None, **cfg)
    return out


def _launch_depthwise_wgrad(x, dout, nbr):
    n_out, K = nbr.shape
    C = x.shape[1]
    dw = torch.zeros(K, C, dtype=torch.float32, device=x.device)
    if n_out == 0 or C == 0 or K == 0:
        return dw
    cfg = _depthwise_blocks(C, x.device)
    tiles = triton.cdiv(C, cfg["BLOCK_C"])
    splits, rows_per_split = _row_split(n_out, cfg["BLOCK_N"], tiles * K, x.device)
    _gather_depthwise_wgrad_kernel[(tiles, K, splits)](
        x, dout, nbr, dw, n_out, C, K, rows_per_split, **cfg)
    return dw


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
class _FlopTally:
    """Multiply-add FLOPs executed by the Triton kernels, counted only inside ``count_triton_flops``
    (torch's FlopCounterMode cannot see custom kernels; counting costs a host sync per call)."""

    enabled = False
    total = 0

    @classmethod
    def add(cls, nbr: torch.Tensor, per_pair: int) -> None:
        if cls.enabled:
            cls.total += 2 * int((nbr >= 0).sum()) * per_pair


@contextlib.contextmanager
def count_triton_flops():
    """Yield a callable returning the FLOPs the Triton kernels executed inside the block."""
    _FlopTally.enabled, _FlopTally.total = True, 0
    try:
        yield lambda: _FlopTally.total
    finally:
        _FlopTally.enabled = False


class _GatherConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, nbr, nbr_inv):
        x, weight = x.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(x, weight, nbr, nbr_inv)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        _FlopTally.add(nbr, weight.shape[1] * weight.shape[2])
        return _launch_gather_gemm(x, weight, nbr, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, nbr, nbr_inv = ctx.saved_tensors
        dout = dout.contiguous()
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            if nbr_inv is None:
                nbr_inv = invert_neighbor_map(nbr, x.shape[0])
            w_t = weight.transpose(1, 2).contiguous()  # (K, C_out, C_in)
            dx = _launch_gather_gemm(dout, w_t, nbr_inv, None)
            _FlopTally.add(nbr, weight.shape[1] * weight.shape[2])
        if ctx.needs_input_grad[1]:
            dw = _launch_gather_wgrad(x, dout, nbr, weight.shape[1], weight.shape[2]).to(weight.dtype)
            _FlopTally.add(nbr, weight.shape[1] * weight.shape[2])
        if ctx.needs_input_grad[2]:
            dbias = dout.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, dbias, None, None


class _GatherDepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, nbr, nbr_inv):
        x, weight = x.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(x, weight, nbr, nbr_inv)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        _FlopTally.add(nbr, weight.shape[1])
        return _launch_depthwise(x, weight, nbr, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, nbr, nbr_inv = ctx.saved_tensors
        dout = dout.contiguous()
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            if nbr_inv is None:
                nbr_inv = invert_neighbor_map(nbr, x.shape[0])
            dx = _launch_depthwise(dout, weight, nbr_inv, None)  # depthwise weight is its own transpose
            _FlopTally.add(nbr, weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = _launch_depthwise_wgrad(x, dout, nbr).to(weight.dtype)
            _FlopTally.add(nbr, weight.shape[1])
        if ctx.needs_input_grad[2]:
            dbias = dout.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, dbias, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def triton_available() -> bool:
    """True when the Triton kernels can run here: Triton imports and there is a CUDA device or
    the Triton interpreter is switched on (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def invert_neighbor_map(nbr: torch.Tensor, n_in: int) -> torch.Tensor:
    """The (n_in, K) int32 map ``inv`` with ``inv[nbr[o, k], k] == o`` for every ``nbr[o, k] >= 0``
    and -1 elsewhere. Each (input row, offset) pair must be read by at most one output row, which
    holds for any stride and padding; for a map that breaks this, which reader wins is undefined."""
    if nbr.dim() != 2:
        raise ValueError(f"invert_neighbor_map: nbr must be (N_out, K), got shape {tuple(nbr.shape)}")
    n_out, K = nbr.shape
    flat = torch.full((n_in * K + 1,), -1, dtype=torch.int32, device=nbr.device)
    valid = nbr >= 0
    k = torch.arange(K, device=nbr.device).expand(n_out, K)
    o = torch.arange(n_out, device=nbr.device, dtype=torch.int32)[:, None].expand(n_out, K)
    # Missing neighbours all write to one spare slot past the end, dropped below.
    target = torch.where(valid, nbr.long() * K + k, torch.full_like(k, n_in * K))
    flat.index_put_((target.reshape(-1),), o.reshape(-1))
    return flat[:-1].view(n_in, K)


def _as_map(m: torch.Tensor, rows: int, K: int, name: str, op: str) -> torch.Tensor:
    if m.dim() != 2 or m.shape != (rows, K) or m.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: {name} must be a ({rows}, {K}) int32/int64 map, got shape "
                         f"{tuple(m.shape)} dtype {m.dtype}; build it with invert_neighbor_map(nbr, n_in)")
    return m.to(torch.int32).contiguous()


def _check_bias(bias, c_out, x, op):
    if bias is not None and (bias.shape != (c_out,) or bias.device != x.device):
        raise ValueError(f"{op}: bias must be ({c_out},) on {x.device}, got shape "
                         f"{tuple(bias.shape)} on {bias.device}")


def _use_triton(x: torch.Tensor, op: str) -> bool:
    if x.dtype not in TRITON_DTYPES:
        return False
    forced = os.environ.get(FORCE_TRITON_ENV) == "1"
    if not (x.is_cuda or forced):
        return False
    if triton is None:
        if forced:
            raise RuntimeError(f"{op}: {FORCE_TRITON_ENV}=1 but Triton is not installed; "
                               "install triton or unset the variable")
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op}: {FORCE_TRITON_ENV}=1 with x on {x.device} needs the Triton "
                           "interpreter; set TRITON_INTERPRET=1 before triton is imported, or move x to CUDA")
    return True


def gather_conv(x: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor,
                nbr_inv: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse convolution through a neighbour map: out[o] = sum_k x[nbr[o, k]] @ weight[k] + bias.

    x (N_in, C_in); weight (K, C_in, C_out); nbr (N_out, K) with -1 for missing neighbours;
    nbr_inv (N_in, K), the inverse map, used by the backward pass for dx (computed from ``nbr``
    when omitted); bias (C_out,) or None. Returns (N_out, C_out) in x's dtype.
    """
    op = "gather_conv"
    check_gather_args(x, weight, nbr, depthwise=False)
    _check_bias(bias, weight.shape[2], x, op)
    if not _use_triton(x, op):
        return gather_conv_torch(x, weight, nbr, bias)
    nbr = _as_map(nbr, nbr.shape[0], nbr.shape[1], "nbr", op)
    if nbr_inv is not None:
        nbr_inv = _as_map(nbr_inv, x.shape[0], nbr.shape[1], "nbr_inv", op)
    return _GatherConv.apply(x, weight, bias, nbr, nbr_inv)


def gather_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor,
                          nbr_inv: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse depthwise convolution: out[o, c] = sum_k x[nbr[o, k], c] * weight[k, c] + bias[c].

    x (N_in, C); weight (K, C); nbr, nbr_inv and bias as for ``gather_conv``. Returns (N_out, C).
    """
    op = "gather_depthwise_conv"
    check_gather_args(x, weight, nbr, depthwise=True)
    _check_bias(bias, weight.shape[1], x, op)
    if not _use_triton(x, op):
        return gather_depthwise_torch(x, weight, nbr, bias)
    nbr = _as_map(nbr, nbr.shape[0], nbr.shape[1], "nbr", op)
    if nbr_inv is not None:
        nbr_inv = _as_map(nbr_inv, x.shape[0], nbr.shape[1], "nbr_inv", op)
    return _GatherDepthwiseConv.apply(x, weight, bias, nbr, nbr_inv)
