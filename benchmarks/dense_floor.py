"""The floor for any masked-dense run: plain dense timm forward+backward (no masking), median ms.

    python benchmarks/dense_floor.py --model resnet50 --batch 128 --dtype bfloat16
"""
import argparse
import statistics
import time

import timm
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.model, num_classes=0).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    use_bf16 = args.dtype == "bfloat16" and device == "cuda"
    times = []
    for i in range(args.repeats + 3):
        torch.cuda.synchronize() if device == "cuda" else None
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            model(x).float().square().mean().backward()
        torch.cuda.synchronize() if device == "cuda" else None
        if i >= 3:
            times.append(time.perf_counter() - t)
    print(f"dense timm {args.model} fwd+bwd, batch {args.batch}, {args.dtype}, channels_last, {device}: "
          f"{statistics.median(times) * 1000:.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
