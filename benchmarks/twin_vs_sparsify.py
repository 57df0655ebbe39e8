"""Hand-tuned twins against ``sparsify`` of the same timm model: encoder time and peak memory.

A hand-tuned backbone (``resnet50``) and the general path (``sparsify:resnet50``: timm's own forward
on the engine's tensors) run the same layers; the twin earns its place only where it is measurably
faster or lighter. For each model both are SparK encoders as ``sparse-mim bench`` builds them
(``sparse_mim.bench.workload``), on the same weights, images and masks. Each repeat times both,
alternately first (twin, sparsify; then sparsify, twin; ...), and keeps the repeat's ratio
sparsify / twin (the two runs are neighbours in time): the median and range of those ratios are
the result (above 1: the twin is faster). ``uptime``'s load is recorded at the start and the end.
Peak memory is the bench's figure (CPU: one fresh process per variant; CUDA: in process), measured
before any timing.

    python benchmarks/twin_vs_sparsify.py --models resnet50 convnext_tiny \\
        --csv benchmarks/results/twin_vs_sparsify.csv                         # CPU, batch 8, 224 px
    python benchmarks/twin_vs_sparsify.py --device cuda --batch-size 128 --bf16 --threads 0 \\
        --models resnet50 convnext_tiny convnext_base --csv OUT/twins.csv     # the GPU sweep
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backbones.registry import SPARSIFY_PREFIX  # noqa: E402
from sparse_mim.bench.machine import cpu_model, load_average  # noqa: E402
from sparse_mim.bench.memory import peak_memory_mb  # noqa: E402
from sparse_mim.bench.workload import Workload, WorkloadSpec  # noqa: E402

COLUMNS = ["model", "what", "mask_ratio", "batch_size", "img_size", "precision", "twin_ms", "sparsify_ms",
           "sparsify_over_twin", "ratio_min", "ratio_max", "repeats", "threads", "twin_ms_all",
           "sparsify_ms_all", "peak_mb_twin", "peak_mb_sparsify", "commit", "date", "load_start", "load_end",
           "machine", "command"]


def spec(args, model: str) -> WorkloadSpec:
    return WorkloadSpec(model=model, mask_ratio=args.mask_ratio, batch_size=args.batch_size, img_size=args.img_size,
                        device=args.device, autocast=args.bf16, channels_last=True, execution="auto",
                        decoder_width=768, seed=0)


def timed(workload: Workload, what: str, active: torch.Tensor) -> float:
    workload.prepare("sparse")
    if workload.device.type == "cuda":
        torch.cuda.synchronize(workload.device)
    start = time.perf_counter()
    workload.iteration("sparse", what, active)
    if workload.device.type == "cuda":
        torch.cuda.synchronize(workload.device)
    return (time.perf_counter() - start) * 1e3


def pair(args, name: str) -> dict:
    """Memory, then interleaved times, of ``name``'s twin and ``sparsify:name``."""
    threads = torch.get_num_threads()
    twin, general = (Workload(spec(args, m), variants=("sparse",)) for m in (name, SPARSIFY_PREFIX + name))
    general.models["sparse"].load_state_dict(twin.models["sparse"].state_dict())  # timm's keys on both
    masks = twin.masks(args.warmup + args.repeats)
    peaks = [peak_memory_mb(w, "sparse", args.what, masks[0], threads) if args.memory else float("nan")
             for w in (twin, general)]
    times = {"twin": [], "sparsify": []}
    order = [("twin", twin), ("sparsify", general)]
    for r, active in enumerate(masks):
        ms = {k: timed(w, args.what, active) for k, w in (order if r % 2 == 0 else order[::-1])}
        if r >= args.warmup:
            for k in times:
                times[k].append(ms[k])
    ratios = [s / t for s, t in zip(times["sparsify"], times["twin"])]
    return dict(model=name, twin_ms=round(statistics.median(times["twin"]), 1),
                sparsify_ms=round(statistics.median(times["sparsify"]), 1),
                sparsify_over_twin=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                ratio_max=round(max(ratios), 3), twin_ms_all=" ".join(f"{t:.0f}" for t in times["twin"]),
                sparsify_ms_all=" ".join(f"{t:.0f}" for t in times["sparsify"]),
                peak_mb_twin=round(peaks[0], 1), peak_mb_sparsify=round(peaks[1], 1))


def machine(args) -> str:
    torch_version = torch.__version__.split("+")[0]
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}; torch {torch_version}"
    return f"{cpu_model()} ({os.cpu_count()} cores); torch {torch_version}; {torch.get_num_threads()} thread(s)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"],
                   help="hand-tuned backbone names; each is compared with sparsify:NAME")
    p.add_argument("--what", default="encoder", choices=("encoder", "step"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--csv", type=Path, help="write one row per model here (replacing the file)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()
    print(f"uptime load at start: {load_start}", flush=True)
    rows = []
    for name in args.models:
        row = pair(args, name)
        rows.append(row)
        print(f"{name}: twin {row['twin_ms']} ms, sparsify {row['sparsify_ms']} ms, sparsify/twin "
              f"{row['sparsify_over_twin']} ({row['ratio_min']}-{row['ratio_max']}); peak MB twin "
              f"{row['peak_mb_twin']} sparsify {row['peak_mb_sparsify']}", flush=True)
    load_end = load_average()
    print(f"uptime load at end: {load_end}")
    if args.csv:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        shared = dict(what=args.what, mask_ratio=args.mask_ratio, batch_size=args.batch_size, img_size=args.img_size,
                      precision="bfloat16" if args.bf16 else "float32", repeats=args.repeats,
                      threads=torch.get_num_threads(), commit=commit,
                      date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                      load_start=load_start[0] if load_start else "", load_end=load_end[0] if load_end else "",
                      machine=machine(args), command=" ".join(["python"] + sys.argv))
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({**shared, **row})


if __name__ == "__main__":
    main()
