"""Gather convolutions: the plain-PyTorch version against dense convolution, the Triton kernels against
it, and the inverse neighbour map.

The Triton tests (named ``test_triton_*``) run on CUDA when there is a GPU. On a CPU-only machine
they run in the Triton interpreter, which must be switched on before Triton is imported, so
``test_interpreted_triton_suite_passes`` runs them in a fresh Python process with
``TRITON_INTERPRET=1 SPARSE_MIM_FORCE_TRITON=1``; in this process they are skipped. To run them
in the interpreter by hand: ``TRITON_INTERPRET=1 SPARSE_MIM_FORCE_TRITON=1 python -m pytest
tests/test_kernels.py -k test_triton_``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_mim.kernels import (
    gather_conv,
    gather_conv_torch,
    gather_depthwise_conv,
    gather_depthwise_torch,
    invert_neighbor_map,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = (os.environ.get("TRITON_INTERPRET") == "1"
                  and os.environ.get("SPARSE_MIM_FORCE_TRITON") == "1")
if IN_INTERPRETER:
    TRITON_DEVICE = "cpu"
elif HAS_TRITON and torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = None
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="no GPU here: run in the interpreter by test_interpreted_triton_suite_passes")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def random_map(n_out: int, n_in: int, K: int, p_missing: float, seed: int) -> torch.Tensor:
    """A random (n_out, K) int32 map in which each (input row, offset) has at most one reader,
    as every real convolution map does, with about ``p_missing`` of the entries set to -1."""
    gen = torch.Generator().manual_seed(seed)
    nbr = torch.full((n_out, K), -1, dtype=torch.int32)
    m = min(n_out, n_in)
    for k in range(K):
        readers = torch.randperm(n_out, generator=gen)[:m]
        nbr[readers, k] = torch.randperm(n_in, generator=gen)[:m].to(torch.int32)
    nbr[torch.rand(n_out, K, generator=gen) < p_missing] = -1
    return nbr


def conv_map(in_mask: torch.Tensor, out_mask: torch.Tensor, kh: int, kw: int, stride: int,
             pad: int) -> torch.Tensor:
    """The neighbour map of a kh x kw convolution from the active sites of ``in_mask`` (B, H, W)
    to those of ``out_mask`` (B, Ho, Wo); rows are numbered in row-major site order."""
    B, H, W = in_mask.shape
    row_of = torch.full((B, H + 2 * pad + kh, W + 2 * pad + kw), -1, dtype=torch.long)
    row_of[:, pad:pad + H, pad:pad + W][in_mask] = torch.arange(int(in_mask.sum()))
    b, oy, ox = out_mask.nonzero(as_tuple=True)
    cols = [row_of[b, oy * stride + ky, ox * stride + kx] for ky in range(kh) for kx in range(kw)]
    return torch.stack(cols, dim=1).to(torch.int32)


def dense_to_gather_weight(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kh, kw) dense weight -> (K, C_in, C_out), offsets in row-major (ky, kx)."""
    c_out, c_in, kh, kw = w.shape
    return w.permute(2, 3, 1, 0).reshape(kh * kw, c_in, c_out)


def masked_image(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter site features (N, C) into a zero image (B, C, H, W) at the active sites of ``mask``."""
    img = feats.new_zeros(*mask.shape, feats.shape[1])
    img[mask] = feats
    return img.permute(0, 3, 1, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def torch_grads(fn, inputs, nbr, dout):
    """Output and gradients of a float64 plain-PyTorch ``fn(x, weight, nbr, *rest)`` on the CPU, at
    the given ``inputs`` = [x, weight, *rest]."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    out = fn(leaves[0], leaves[1], nbr.cpu(), *leaves[2:])
    return out.detach(), torch.autograd.grad(out, leaves, dout.cpu().double())


# Masked-dense convolutions: (kernel, stride, padding, output sites from the input mask).
DENSE_CASES = {
    "submanifold_3x3": (3, 1, 1, lambda m: m),
    "strided_3x3_s2": (3, 2, 1, lambda m: F.max_pool2d(m[:, None].double(), 2)[:, 0] > 0),
    "patchify_2x2_s2": (2, 2, 0, lambda m: F.max_pool2d(m[:, None].double(), 2)[:, 0] > 0),
}


def dense_setup(case: str, seed: int):
    k, stride, pad, out_sites = DENSE_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    in_mask = torch.rand(2, 8, 8, generator=gen) < 0.45
    out_mask = out_sites(in_mask)
    return k, stride, pad, in_mask, out_mask, conv_map(in_mask, out_mask, k, k, stride, pad), gen


# --------------------------------------------------------------------------------------------
# The plain-PyTorch gather convolution is masked-dense convolution evaluated at the active sites
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_torch_gather_conv_equals_dense_conv_of_masked_image_at_active_sites(case):
    k, stride, pad, in_mask, out_mask, nbr, gen = dense_setup(case, seed=1)
    c_in, c_out = 3, 5
    feats = torch.randn(int(in_mask.sum()), c_in, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64, requires_grad=True)

    dense = F.conv2d(masked_image(feats, in_mask), w, b, stride=stride, padding=pad)
    dense = dense.permute(0, 2, 3, 1)[out_mask]
    sparse = gather_conv_torch(feats, dense_to_gather_weight(w), nbr, b)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)

    dout = torch.randn(dense.shape, generator=gen, dtype=torch.float64)
    g_dense = torch.autograd.grad(dense, (feats, w, b), dout)
    g_sparse = torch.autograd.grad(sparse, (feats, w, b), dout)
    for name, gs, gd in zip(("x", "weight", "bias"), g_sparse, g_dense):
        torch.testing.assert_close(gs, gd, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_torch_gather_depthwise_equals_dense_grouped_conv_of_masked_image(case):
    k, stride, pad, in_mask, out_mask, nbr, gen = dense_setup(case, seed=2)
    c = 6
    feats = torch.randn(int(in_mask.sum()), c, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True)

    dense = F.conv2d(masked_image(feats, in_mask), w, b, stride=stride, padding=pad, groups=c)
    dense = dense.permute(0, 2, 3, 1)[out_mask]
    w_gather = w[:, 0].permute(1, 2, 0).reshape(k * k, c)
    sparse = gather_depthwise_torch(feats, w_gather, nbr, b)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)

    dout = torch.randn(dense.shape, generator=gen, dtype=torch.float64)
    g_dense = torch.autograd.grad(dense, (feats, w, b), dout)
    g_sparse = torch.autograd.grad(sparse, (feats, w, b), dout)
    for name, gs, gd in zip(("x", "weight", "bias"), g_sparse, g_dense):
        torch.testing.assert_close(gs, gd, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


def test_torch_gather_input_gradient_is_a_gather_through_the_inverse_map():
    # The identity the Triton backward relies on: dx = sum_k dout[nbr_inv[:, k]] @ weight[k]^T.
    gen = torch.Generator().manual_seed(3)
    nbr = random_map(n_out=30, n_in=45, K=9, p_missing=0.4, seed=3)
    x = torch.randn(45, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, 7, generator=gen, dtype=torch.float64)
    dout = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad(gather_conv_torch(x, w, nbr), x, dout)
    via_inverse = gather_conv_torch(dout, w.transpose(1, 2), invert_neighbor_map(nbr, 45))
    torch.testing.assert_close(dx, via_inverse, rtol=1e-12, atol=1e-12)


def test_torch_gather_depthwise_input_gradient_is_a_gather_through_the_inverse_map():
    gen = torch.Generator().manual_seed(4)
    nbr = random_map(n_out=30, n_in=45, K=9, p_missing=0.4, seed=4)
    x = torch.randn(45, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    dout = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad(gather_depthwise_torch(x, w, nbr), x, dout)
    via_inverse = gather_depthwise_torch(dout, w, invert_neighbor_map(nbr, 45))
    torch.testing.assert_close(dx, via_inverse, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Inverse map
# --------------------------------------------------------------------------------------------
def test_invert_neighbor_map_points_each_read_back_to_its_reader():
    nbr = random_map(n_out=25, n_in=40, K=9, p_missing=0.5, seed=5)
    inv = invert_neighbor_map(nbr, 40)
    assert inv.shape == (40, 9) and inv.dtype == torch.int32
    o, k = (nbr >= 0).nonzero(as_tuple=True)
    assert torch.equal(inv[nbr[o, k].long(), k], o.to(torch.int32))
    # Every other entry is -1: as many valid entries as the map has reads.
    assert int((inv >= 0).sum()) == len(o)
    assert bool(((inv >= 0) | (inv == -1)).all())


def test_inverting_a_map_twice_gives_it_back():
    nbr = random_map(n_out=33, n_in=20, K=4, p_missing=0.3, seed=6)
    assert torch.equal(invert_neighbor_map(invert_neighbor_map(nbr, 20), 33), nbr)


def test_inverse_of_a_map_with_no_reads_is_all_missing():
    inv = invert_neighbor_map(torch.full((5, 4), -1, dtype=torch.int32), 7)
    assert torch.equal(inv, torch.full((7, 4), -1, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# Dispatch and argument checks
# --------------------------------------------------------------------------------------------
def test_float64_is_computed_by_plain_pytorch():
    nbr = random_map(n_out=12, n_in=10, K=4, p_missing=0.3, seed=7)
    x = torch.randn(10, 3, dtype=torch.float64)
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    wd = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(gather_conv(x, w, nbr), gather_conv_torch(x, w, nbr))
    assert torch.equal(gather_depthwise_conv(x, wd, nbr), gather_depthwise_torch(x, wd, nbr))


def test_gather_conv_rejects_a_weight_with_the_wrong_input_channels():
    nbr = random_map(n_out=4, n_in=4, K=9, p_missing=0.0, seed=8)
    with pytest.raises(ValueError, match="channels"):
        gather_conv(torch.randn(4, 3), torch.randn(9, 5, 2), nbr)


def test_gather_conv_rejects_a_dense_layout_weight_and_says_how_to_convert_it():
    nbr = random_map(n_out=4, n_in=4, K=9, p_missing=0.0, seed=9)
    with pytest.raises(ValueError, match="permute"):
        gather_conv(torch.randn(4, 3), torch.randn(2, 3, 3, 3), nbr)


def test_gather_conv_rejects_a_map_whose_width_is_not_the_kernel_size():
    nbr = random_map(n_out=4, n_in=4, K=4, p_missing=0.0, seed=10)
    with pytest.raises(ValueError, match="kernel offsets"):
        gather_conv(torch.randn(4, 3), torch.randn(9, 3, 2), nbr)


# --------------------------------------------------------------------------------------------
# Triton kernels against the plain-PyTorch versions (CUDA, or the interpreter in a subprocess)
# --------------------------------------------------------------------------------------------
# (n_in, n_out, c_in, c_out, K, with_bias, pass_inverse)
CONV_CASES = {
    "submanifold_k9_tiny_channels": (40, 40, 3, 5, 9, True, True),
    "strided_k4_ragged_cin": (70, 23, 17, 16, 4, False, False),
    "more_outputs_than_inputs_k1": (20, 33, 16, 17, 1, True, False),
    "k9_ragged_cout": (55, 48, 5, 17, 9, False, True),
}
# (n_in, n_out, c, K, with_bias, pass_inverse)
DEPTHWISE_CASES = {
    "submanifold_k9": (40, 40, 5, 9, True, False),
    "strided_k4_two_channel_blocks": (70, 23, 17, 4, False, True),
    "k1_wide": (30, 30, 16, 1, True, True),
}


def conv_inputs(n_in, n_out, c_in, c_out, K, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_in, c_in, generator=gen)
    w = torch.randn(K, c_in, c_out, generator=gen) / (K * c_in) ** 0.5
    b = torch.randn(c_out, generator=gen)
    dout = torch.randn(n_out, c_out, generator=gen)
    nbr = random_map(n_out, n_in, K, p_missing=0.4, seed=seed)
    dev = TRITON_DEVICE
    return [t.to(dev, dtype) for t in (x, w, b, dout)] + [nbr.to(dev)]


@needs_triton
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_triton_conv_forward_matches_plain_pytorch(case):
    n_in, n_out, c_in, c_out, K, with_bias, _ = CONV_CASES[case]
    x, w, b, dout, nbr = conv_inputs(n_in, n_out, c_in, c_out, K, seed=11)
    out = gather_conv(x, w, nbr, bias=b if with_bias else None)
    ref = gather_conv_torch(x.cpu().double(), w.cpu().double(), nbr.cpu(),
                                b.cpu().double() if with_bias else None)
    assert out.dtype == torch.float32 and out.shape == (n_out, c_out)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_triton_conv_gradients_match_plain_pytorch(case):
    n_in, n_out, c_in, c_out, K, with_bias, pass_inverse = CONV_CASES[case]
    x, w, b, dout, nbr = conv_inputs(n_in, n_out, c_in, c_out, K, seed=12)
    inputs = [x, w, b] if with_bias else [x, w]
    leaves = [t.clone().requires_grad_() for t in inputs]
    nbr_inv = invert_neighbor_map(nbr, n_in) if pass_inverse else None
    grads = torch.autograd.grad(gather_conv(leaves[0], leaves[1], nbr, nbr_inv, *leaves[2:]), leaves, dout)
    _, ref = torch_grads(gather_conv_torch, inputs, nbr, dout)
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


@needs_triton
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_triton_depthwise_forward_and_gradients_match_plain_pytorch(case):
    n_in, n_out, c, K, with_bias, pass_inverse = DEPTHWISE_CASES[case]
    gen = torch.Generator().manual_seed(13)
    x, w, b = (torch.randn(s, generator=gen) for s in ((n_in, c), (K, c), (c,)))
    dout = torch.randn(n_out, c, generator=gen)
    nbr = random_map(n_out, n_in, K, p_missing=0.4, seed=13)
    x, w, b, dout, nbr = (t.to(TRITON_DEVICE) for t in (x, w, b, dout, nbr))

    inputs = [x, w, b] if with_bias else [x, w]
    leaves = [t.clone().requires_grad_() for t in inputs]
    nbr_inv = invert_neighbor_map(nbr, n_in) if pass_inverse else None
    out = gather_depthwise_conv(leaves[0], leaves[1], nbr, nbr_inv, *leaves[2:])
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref = torch_grads(gather_depthwise_torch, inputs, nbr, dout)
    torch.testing.assert_close(out.detach().cpu().double(), ref_out, rtol=1e-4, atol=1e-4)
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)],
                         ids=["float16", "bfloat16"])
def test_triton_conv_in_half_precision_is_close_to_float64_on_the_same_inputs(dtype, tol):
    x, w, b, dout, nbr = conv_inputs(50, 37, 17, 16, 9, seed=14, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = gather_conv(leaves[0], leaves[1], nbr, bias=leaves[2])
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref = torch_grads(gather_conv_torch, [x, w, b], nbr, dout)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out.detach().cpu(), ref_out) < tol
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        assert rel_err(g.cpu(), r) < tol, f"grad {name}"


@needs_triton
def test_triton_depthwise_in_bfloat16_is_close_to_float64_on_the_same_inputs():
    gen = torch.Generator().manual_seed(15)
    x, w, b = (torch.randn(s, generator=gen).to(TRITON_DEVICE, torch.bfloat16)
               for s in ((40, 17), (9, 17), (17,)))
    nbr = random_map(33, 40, 9, p_missing=0.4, seed=15).to(TRITON_DEVICE)
    out = gather_depthwise_conv(x, w, nbr, bias=b)
    ref = gather_depthwise_torch(x.cpu().double(), w.cpu().double(), nbr.cpu(), b.cpu().double())
    assert out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref) < 2e-2


@needs_triton
def test_triton_conv_with_no_output_rows_gives_empty_output_and_zero_gradients():
    x = torch.randn(10, 3, device=TRITON_DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 5, device=TRITON_DEVICE, requires_grad=True)
    nbr = torch.empty(0, 4, dtype=torch.int32, device=TRITON_DEVICE)
    out = gather_conv(x, w, nbr)
    assert out.shape == (0, 5)
    dx, dw = torch.autograd.grad(out, (x, w), torch.empty(0, 5, device=TRITON_DEVICE))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dw, torch.zeros_like(w))


@needs_triton
def test_triton_path_leaves_float64_to_plain_pytorch():
    nbr = random_map(n_out=12, n_in=10, K=4, p_missing=0.3, seed=16).to(TRITON_DEVICE)
    x = torch.randn(10, 3, dtype=torch.float64, device=TRITON_DEVICE)
    w = torch.randn(4, 3, 2, dtype=torch.float64, device=TRITON_DEVICE)
    assert torch.equal(gather_conv(x, w, nbr), gather_conv_torch(x, w, nbr))


@needs_triton
@pytest.mark.parametrize("c,dtype,fill", [(3, torch.float32, 0.0), (300, torch.bfloat16, float("-inf")),
                                          (64, torch.float32, 1.5)])
def test_triton_gather_rows_filled_matches_plain_pytorch(c, dtype, fill):
    from sparse_mim.kernels.triton_gather import gather_rows_filled, gather_rows_filled_torch
    gen = torch.Generator().manual_seed(c)
    src = torch.randn(37, c, generator=gen).to(dtype).to(TRITON_DEVICE)
    index = torch.randint(0, 38, (1000,), generator=gen).to(TRITON_DEVICE)  # 37 = the fill row
    index[:5] = 37
    out = gather_rows_filled(src, index, fill)
    assert torch.equal(out, gather_rows_filled_torch(src, index, fill))
    assert (out[:5] == fill).all()
    assert gather_rows_filled(src, index[:0], fill).shape == (0, c)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(TRITON_DEVICE is not None, reason="the Triton tests run directly in this process")
def test_interpreted_triton_suite_passes():
    env = dict(os.environ, TRITON_INTERPRET="1", SPARSE_MIM_FORCE_TRITON="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q",
           "-k", "test_triton_", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15, report
    assert "skipped" not in summary, report
