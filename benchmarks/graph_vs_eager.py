"""Pretraining with ``train.cuda_graph=true`` vs eager, and the graph path under torchrun.

Three short ``sparse-mim pretrain`` runs with the same seed, data and masks (the masks are drawn before
the encoder, so the graph replays the eager model's work on the same inputs):

  eager      plain launch, eager encoder
  graph      plain launch, ``train.cuda_graph=true``
  torchrun   ``torchrun --nproc_per_node 1``, ``train.cuda_graph=true`` (grad_sync=auto -> allreduce):
             the launch path a multi-GPU run takes. With one process there is no all-reduce to run,
             so this shows the path starts, captures and trains under torchrun, not that NCCL inside
             the captured graph is right (that needs two GPUs).

Prints images/s (median over the steps after ``--skip``; the first steps include capture) and how far
the graph runs' loss curves are from the eager one (bf16 autocast: equal within bf16 noise, taken as
a relative difference of at most ``--rtol`` at every step). Writes ``OUT/summary.md``.

  python benchmarks/graph_vs_eager.py OUT                     # on a CUDA machine
  python benchmarks/graph_vs_eager.py OUT --plumbing          # CPU: eager three times, tiny; checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List


def _metrics(run_dir: Path) -> List[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if "loss" in row and "images_per_sec" in row]


def _launch(name: str, out: Path, overrides: List[str], torchrun: bool, limit: float) -> Dict[str, object]:
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "sparse_mim"]
              if torchrun else [sys.executable, "-m", "sparse_mim"])
    command = prefix + ["pretrain", *overrides, f"output_dir={out / name}"]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - start
    print(f"   exit {rc} after {seconds:.0f} s (log {out / name}.log)", flush=True)
    return {"rc": rc, "seconds": seconds}


def compare(curves: Dict[str, List[dict]], reference: str, skip: int, rtol: float) -> List[Dict[str, object]]:
    """Per run: median images/s after ``skip`` steps and the loss curve's largest distance from ``reference``."""
    ref = [row["loss"] for row in curves[reference]]
    rows = []
    for name, rows_ in curves.items():
        loss = [row["loss"] for row in rows_]
        speed = [row["images_per_sec"] for row in rows_[skip:]]
        n = min(len(loss), len(ref))
        rel = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(loss[:n], ref[:n])), default=float("nan"))
        rows.append({"run": name, "steps": len(loss), "images_per_sec": statistics.median(speed) if speed else float("nan"),
                     "first_loss": loss[0] if loss else float("nan"), "last_loss": loss[-1] if loss else float("nan"),
                     "max_rel_loss_diff": rel, "curve_ok": len(loss) == len(ref) and rel <= rtol})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--data", default=None, help="image folder (default: the built-in demo images)")
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the images/s median")
    parser.add_argument("--rtol", type=float, default=0.02, help="largest relative loss difference counted as bf16 noise")
    parser.add_argument("--limit", type=float, default=240, help="seconds per run before it is stopped")
    parser.add_argument("--plumbing", action="store_true", help="CPU check of this script: eager only, tiny")
    args = parser.parse_args()

    if args.plumbing:
        args.model, args.steps, args.batch, args.img_size, args.workers, args.skip = "resnet18", 3, 4, 64, 0, 1
    common = [f"model={args.model}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
              f"data.img_size={args.img_size}", f"data.num_workers={args.workers}", "train.log_every=1",
              "train.save_every_steps=null", f"data.path={args.data if args.data else 'null'}"]
    graph = [] if args.plumbing else ["train.cuda_graph=true"]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runs = {"eager": (common, False), "graph": (common + graph, False), "torchrun": (common + graph, True)}
    launched = {name: _launch(name, args.out, overrides, torchrun, args.limit) for name, (overrides, torchrun) in runs.items()}
    curves = {name: _metrics(args.out / name) for name, info in launched.items() if info["rc"] == 0}
    if "eager" not in curves:
        print("the eager run failed; nothing to compare (see eager.log)")
        return 1
    rows = compare(curves, "eager", args.skip, args.rtol)
    eager_speed = next(r["images_per_sec"] for r in rows if r["run"] == "eager")
    lines = [f"{args.model}, batch {args.batch}, {args.img_size} px, {args.steps} steps, data "
             f"{args.data or 'demo'}; images/s = median after step {args.skip}; loss curve ok = every step "
             f"within {args.rtol:.0%} of eager", "",
             "| run | exit | steps | images/s | vs eager | first loss | last loss | max rel. loss diff | curve ok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    by_name = {r["run"]: r for r in rows}
    for name, info in launched.items():
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | {info['rc']} | - | - | - | - | - | - | no |")
            continue
        lines.append(f"| {name} | {info['rc']} | {r['steps']} | {r['images_per_sec']:.1f} | "
                     f"{r['images_per_sec'] / eager_speed:.2f}x | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
                     f"{r['max_rel_loss_diff']:.2e} | {'yes' if r['curve_ok'] else 'NO'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (args.out / "summary.md").write_text(table)
    ok = all(info["rc"] == 0 for info in launched.values()) and all(r["curve_ok"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
