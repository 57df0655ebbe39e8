"""The figures of the README and the docs, drawn from the CSV files in benchmarks/results/.

    python benchmarks/plots.py                                   # speed_vs_mask.png, downstream.png
    python benchmarks/plots.py --reconstruction outputs/pretrain/resnet18   # + reconstruction.png
    python benchmarks/plots.py --sweep-from bench_out/sweep    # a `sparse-mim bench` run -> cpu_mask_sweep.csv

``--reconstruction`` takes a pretraining output folder (its newest ``reconstructions/epoch_*.png``)
or one picture, and writes a small copy. Figures go to docs/assets/ (``--out`` to change).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ASSETS = HERE.parent / "docs" / "assets"


def sweep_csv(bench_dir: Path, commit: str) -> Path:
    """``results/cpu_mask_sweep.csv`` from a ``sparse-mim bench what=[encoder] mask_ratios=[...]`` output
    folder: per mask ratio the median times, the median of the per-repeat ratios (each repeat's sparse
    and masked-dense runs are neighbours in time, so their ratio is what a loaded machine disturbs
    least) and every repeat."""
    import json
    import statistics

    run = json.loads((bench_dir / "results.json").read_text())
    machine = run["machine"]
    rows = []
    for r in run["results"]:
        sparse, dense = r["times_ms"]["encoder"]["sparse"], r["times_ms"]["encoder"]["dense"]
        rows.append({
            "model": r["model"], "mask_ratio": r["mask_ratio"], "batch_size": r["batch_size"],
            "img_size": r["img_size"], "visible": f"{r['len_keep']}/{r['num_patches']}",
            "sparse_ms": round(statistics.median(sparse), 1), "masked_dense_ms": round(statistics.median(dense), 1),
            "speedup": round(statistics.median(d / s for s, d in zip(sparse, dense)), 2),
            "speedup_min": round(min(d / s for s, d in zip(sparse, dense)), 2),
            "speedup_max": round(max(d / s for s, d in zip(sparse, dense)), 2),
            "flop_ratio": round(r["flop_ratio"]["encoder"], 3), "repeats": len(sparse), "threads": machine["threads"],
            "sparse_ms_all": " ".join(f"{t:.0f}" for t in sparse),
            "masked_dense_ms_all": " ".join(f"{t:.0f}" for t in dense),
            "commit": commit, "date": machine["date"][:10],
            "load_start": machine["load_average_start"][0], "load_end": machine["load_average_end"][0],
            "machine": f"{machine['cpu']} ({machine['cpu_count']} cores); torch {machine['torch']}; "
                       f"{machine['threads']} thread(s)",
            "command": machine["command"],
        })
    path = RESULTS / "cpu_mask_sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read(name: str) -> list[dict]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def speed_vs_mask(out: Path) -> Path:
    """Encoder fwd+bwd speedup over masked-dense against the mask ratio: H100 bf16 (eager, CUDA graph)
    and the CPU sweep, one line per model and setting."""
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), sharey=False)
    gpu = [r for r in read("gpu_h100.csv") if r["what"] == "encoder" and r["precision"] == "bfloat16"]
    styles = {"resnet50": "tab:blue", "convnext_base": "tab:orange", "convnext_small": "tab:green"}
    for (model, mode) in sorted({(r["model"], r["mode"]) for r in gpu}):
        rows = sorted((float(r["mask_ratio"]), float(r["speedup"])) for r in gpu
                      if r["model"] == model and r["mode"] == mode)
        if len(rows) < 2:
            continue
        axes[0].plot(*zip(*rows), marker="o", color=styles.get(model, "grey"),
                     linestyle="-" if mode == "eager" else "--", label=f"{model}, {mode.replace('_', ' ')}")
    axes[0].set_title(f"H100, bf16, batch 128 ({gpu[0]['date']})", fontsize=9)
    cpu_file = RESULTS / "cpu_mask_sweep.csv"
    if cpu_file.is_file():
        cpu = read(cpu_file.name)
        for model in sorted({r["model"] for r in cpu}):
            rows = sorted((float(r["mask_ratio"]), float(r["speedup"]), float(r["speedup_min"]),
                           float(r["speedup_max"])) for r in cpu if r["model"] == model)
            x, y, lo, hi = zip(*rows)
            axes[1].errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                             marker="o", capsize=3, color=styles.get(model, "grey"),
                             label=f"{model} (median, min-max of {cpu[0]['repeats']} repeats)")
        axes[1].set_title(f"CPU, {cpu[0]['threads']} thread(s), fp32, batch {cpu[0]['batch_size']} "
                          f"({cpu[0]['date']})", fontsize=9)
    ratios = [0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
    ideal = [49 / round(49 * (1 - r)) for r in ratios]  # 224 px: 49 patches, SparK's visible count
    for ax in axes:
        ax.plot(ratios, ideal, color="grey", linestyle=":", label="dense / sparse FLOPs (49 / visible patches)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("mask ratio")
        ax.set_ylabel("encoder fwd+bwd speedup\nover masked-dense")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / "speed_vs_mask.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def downstream(out: Path) -> Path:
    """Val top-1 of each evaluation, pretrained vs scratch: bars for the mean, dots for every seed."""
    rows = read("downstream.csv")
    evaluations = ["knn", "linear", "finetune"]
    labels = {"knn": "kNN", "linear": "linear probe", "finetune": "fine-tune"}
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    for offset, (arm, colour) in zip((-0.2, 0.2), (("pretrained", "tab:blue"), ("scratch", "tab:grey"))):
        for i, e in enumerate(evaluations):
            values = [float(r[f"{arm}_top1"]) for r in rows if r["evaluation"] == e]
            ax.bar(i + offset, sum(values) / len(values), width=0.38, color=colour, alpha=0.75,
                   label=arm if i == 0 else None)
            ax.scatter([i + offset] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(evaluations)), [labels[e] for e in evaluations])
    ax.set_ylabel("val top-1 (%)")
    r = rows[0]
    ax.set_title(f"{r['model']}, {r['img_size']} px, {float(r['label_fraction']):.0%} of the labels, "
                 f"3 seeds ({r['date']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "downstream.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def reconstruction(source: Path, out: Path, width: int = 720) -> Path:
    """A small copy of a pretraining run's newest reconstruction picture (input / masked / output)."""
    from PIL import Image

    if source.is_dir():
        pictures = sorted((source / "reconstructions").glob("epoch_*.png")) or sorted(source.glob("*.png"))
        if not pictures:
            raise SystemExit(f"no reconstructions/epoch_*.png in {source}")
        source = pictures[-1]
    image = Image.open(source).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    path = out / "reconstruction.png"
    image.save(path, optimize=True)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--reconstruction", type=Path, help="pretraining output folder or picture")
    parser.add_argument("--sweep-from", type=Path, help="a `sparse-mim bench` output folder (mask-ratio sweep)")
    parser.add_argument("--commit", default="", help="the commit the sweep measured (for the CSV)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep_from:
        print(f"wrote {sweep_csv(args.sweep_from, args.commit)}")
    written = [speed_vs_mask(args.out), downstream(args.out)]
    if args.reconstruction:
        written.append(reconstruction(args.reconstruction, args.out))
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
