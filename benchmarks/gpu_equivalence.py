"""GPU check: the sparse encoder (the default CUDA rule and the alternatives the benchmarks sweep)
against the masked-dense reference on the same weights, float32 without TF32, forward and gradients.
Prints relative errors.

    python benchmarks/gpu_equivalence.py [--batch 4] [--models resnet50 convnext_tiny]
"""
import argparse

import torch

from backbones import create_backbone
from sparse_mim.engine import use_settings
from sparse_mim.spark import random_patch_mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


RULES = {  # label -> sparse_mim.engine.use_settings arguments
    "auto": {},
    "tiles": {"execution": "tiles"},
    "small tiles=canvas": {"execution_small_tiles": "canvas"},
    "small tiles=implicit_gemm": {"execution_small_tiles": "implicit_gemm"},
    "depthwise=tiles": {"execution_depthwise": "tiles"},
    "depthwise=canvas": {"execution_depthwise": "canvas"},
}


def check(name: str, batch: int, rule: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name).cuda().train()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    active = random_patch_mask(batch, (7, 7), 0.6, device="cuda")
    results = []
    for ref in (False, True):
        with use_settings(**RULES[rule]):
            outs = model(x, active, dense_reference=ref)
        dense = [o.dense() for o in outs]
        loss = sum((d.float() ** 2).mean() for d in dense)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((dense, grads))
    (ds, gs), (dr, gr) = results
    fwd = max(rel(a, b) for a, b in zip(ds, dr))
    grad = max(rel(a, b) for a, b in zip(gs, gr))
    print(f"{name:16s} {rule:26s} max rel error: forward {fwd:.2e}, weight grads {grad:.2e}")


def check_graph(name: str, batch: int) -> None:
    """A CUDA-graph replay on a NEW mask equals the eager sparse encoder on that mask (maps rebuilt in the graph)."""
    from sparse_mim.spark import build_spark
    from sparse_mim.spark.graphed import graph_encoder
    torch.manual_seed(0)
    spark = build_spark(name, drop_path_rate=0.0, decoder_width=64).cuda().train()
    params = list(spark.encoder.parameters())
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    first, second = (random_patch_mask(batch, (7, 7), 0.6, device="cuda") for _ in range(2))
    graphed = graph_encoder(spark, x, first)

    def run(fn, active):
        rows = fn(active)
        loss = sum((r.float() ** 2).mean() for r in rows)
        return rows, torch.autograd.grad(loss, params, allow_unused=True)
    (eg, gg) = run(lambda a: [f.features for f in spark.encode(x, a)], second)
    (rg, grg) = run(lambda a: graphed(x, a), second)
    fwd = max(rel(a, b) for a, b in zip(rg, eg))
    grad = max(rel(a, b) for a, b in zip(grg, gg) if a is not None and b is not None)
    moved = max(rel(a, b) for a, b in zip(graphed(x, first), eg))
    assert moved > 0, "a replay on the capture mask gave the rows of the new mask"
    print(f"{name:16s} CUDA graph, replay on a new mask vs eager: forward {fwd:.2e}, weight grads {grad:.2e} "
          f"(the capture mask's rows differ from these by {moved:.2e}: the maps follow the mask)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--graph-only", action="store_true", help="only the CUDA-graph checks")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name in args.models:
        try:
            check_graph(name, args.batch)
        except Exception as e:  # report, then the eager checks still run
            print(f"{name:16s} CUDA graph check FAILED: {type(e).__name__}: {str(e)[:600]}")
        if args.graph_only:
            continue
        for rule in RULES:
            if ("depthwise" in rule) == name.startswith("convnext") or rule in ("auto", "tiles"):
                check(name, args.batch, rule)


if __name__ == "__main__":
    main()
