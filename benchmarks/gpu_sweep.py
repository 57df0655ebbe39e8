"""GPU: which sparse execution rule is fastest, measured side by side in one process.

For each model the masked-dense baseline and every candidate rule of the sparse encoder run
interleaved (same weights, same masks), encoder forward+backward, batch 128, 224 px, bf16 autocast.
Candidates are execution overrides of ``sparse_mim.engine.EngineSettings`` plus its fused fill-gather switch. Also:
the map-building cost as it occurs in a step (forward on a fresh manager minus forward on a warm
one, no extra synchronisation) and a profiler table of the sparse ResNet-50 encoder step.

    python benchmarks/gpu_sweep.py --out bench_out/sweep.json

Writes the fastest rule per model family to ``--out`` for ``benchmarks/gpu_session.sh``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from sparse_mim.bench.timing import interleaved_times, synchronizer
from sparse_mim.bench.workload import Workload, WorkloadSpec
from sparse_mim.engine import PatchCoordinateManager, patch_input, use_settings
from sparse_mim.spark import random_patch_mask

CANDIDATES = {
    "resnet50": {
        "auto": {},
        "small=tiles": {"execution_small_tiles": "tiles"},
        "auto, CUDA graph": {"cuda_graph": True},
    },
    "convnext_base": {
        "auto": {},
        "auto, CUDA graph": {"cuda_graph": True},
    },
}


PROFILE = False  # --profile: a torch.profiler table of the sparse ResNet-50 encoder


def spec_for(model: str, batch: int, device: str) -> WorkloadSpec:
    return WorkloadSpec(model=model, mask_ratio=0.6, batch_size=batch, img_size=224, device=device,
                        autocast=device == "cuda", channels_last=True, execution="auto", decoder_width=768, seed=0)


def sweep(model: str, batch: int, warmup: int, repeats: int, device: str) -> dict:
    base = spec_for(model, batch, device)
    workload = Workload(base)
    masks = workload.masks(warmup + repeats)

    failed = {}

    def run_with(name: str, options: dict):
        spec = dataclasses.replace(base, **{k: v for k, v in options.items() if k != "fused_gather"})

        def run(i: int) -> None:
            if name in failed:
                return
            workload.spec, workload.use_graphs = spec, spec.cuda_graph
            try:
                with use_settings(fused_fill_gather=options.get("fused_gather", True)):
                    workload.iteration("sparse", "encoder", masks[i])
            except Exception as e:  # report and go on: one failing candidate must not cost the sweep
                failed[name] = f"{type(e).__name__}: {e}"[:400]
                print(f"candidate {name!r} failed: {failed[name]}")
            finally:
                workload.spec, workload.use_graphs = base, False
        return run

    runs = {"masked-dense": lambda i: workload.iteration("dense", "encoder", masks[i])}
    runs.update({f"sparse {name}": run_with(f"sparse {name}", opts) for name, opts in CANDIDATES[model].items()})
    prepare = lambda name: workload.prepare("dense" if name == "masked-dense" else "sparse")
    times = interleaved_times(runs, prepare, warmup, repeats, synchronizer(workload.device))
    medians = {name: float("nan") if name in failed else 1000 * statistics.median(t) for name, t in times.items()}
    dense = medians["masked-dense"]
    print(f"\n## {model}: encoder fwd+bwd, batch {batch}, 224 px, mask 0.6, bf16 autocast "
          f"(median of {repeats}, interleaved)\n\n| run | ms | speedup vs masked-dense |\n|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {dense / ms:.2f}x |")
    best = min((n for n in medians if n.startswith("sparse ") and n not in failed), key=medians.get)
    result = {"medians_ms": medians, "failed": failed, "best": best[len("sparse "):],
              "best_options": CANDIDATES[model][best[len("sparse "):]]}
    result["maps_in_step_ms"] = maps_in_step_ms(workload, repeats)
    print(f"\nmaps as they occur in a step (fresh-manager forward - warm-manager forward, no extra syncs): "
          f"{result['maps_in_step_ms']:.2f} ms")
    if model == "resnet50" and PROFILE:
        profile(workload, masks[0])
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def maps_in_step_ms(workload: Workload, repeats: int) -> float:
    encoder, images, spec = workload.models["sparse"].encoder, workload.images["sparse"], workload.spec
    sync = synchronizer(workload.device)
    gen = torch.Generator(device=workload.device).manual_seed(5)
    diffs = []
    with torch.no_grad(), workload.context():
        for _ in range(repeats):
            active = random_patch_mask(spec.batch_size, spec.grid, spec.mask_ratio, generator=gen,
                                       device=workload.device)
            timings = []
            manager = None
            for fresh in (True, False):
                sync()
                start = time.perf_counter()
                if fresh:
                    manager = PatchCoordinateManager(active, encoder.downsample_ratio)
                x = patch_input(images, manager=manager)
                encoder.forward_features(x)
                sync()
                timings.append(time.perf_counter() - start)
            diffs.append(timings[0] - timings[1])
    return 1000 * statistics.median(diffs)


def profile(workload: Workload, active: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    workload.prepare("sparse")
    cuda = workload.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        workload.iteration("sparse", "encoder", active)
        synchronizer(workload.device)()
    print("\n## profile: sparse resnet50 encoder fwd+bwd (auto), top CUDA kernels\n")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=22, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--models", nargs="+", default=list(CANDIDATES))
    p.add_argument("--profile", action="store_true", help="print a profiler table (sparse ResNet-50)")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    p.add_argument("--out", default="bench_out/sweep.json")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    global PROFILE
    PROFILE = args.profile
    results = {m: sweep(m, args.batch, args.warmup, args.repeats, args.device) for m in args.models}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
