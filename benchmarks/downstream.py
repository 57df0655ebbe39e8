"""Do sparse-mim's SparK weights make a better classifier than random init? One command, end to end.

    python benchmarks/downstream.py --data /data/imagenette-128 --out outputs/downstream

1. SparK-pretrains a backbone on the ``train`` images (labels unused) for a fixed budget
   (``sparse-mim pretrain``);
2. with the same recipe, budget, label subset and seeds, runs ``sparse-mim finetune`` in every mode
   (kNN, linear probe, fine-tuning) from that pretraining and from random init (scratch);
3. writes ``table.md`` (top-1 mean +- std over seeds), ``results.json`` and ``downstream.png``
   (bars with every seed's point), plus the pretraining's loss curve and reconstructions in ``pretrain/``.

Every stage is a resumable run in its own folder: rerunning the command after an interruption skips
what finished and resumes what did not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_mim.finetune import compose_finetune_config, finetune  # noqa: E402
from sparse_mim.train import compose_config, pretrain  # noqa: E402

MODES = ("knn", "linear", "finetune")
ARMS = ("pretrained", "scratch")
MODE_TITLES = {"knn": "kNN (k=20)", "linear": "linear probe", "finetune": "fine-tune"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", default="outputs/downstream", type=Path)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    g = p.add_argument_group("pretraining (sparse-mim pretrain)")
    g.add_argument("--pretrain-epochs", type=int, default=12)
    g.add_argument("--pretrain-batch", type=int, default=64)
    g.add_argument("--pretrain-lr", type=float, default=0.04, help="train.base_lr (peak = base * batch / 256)")
    g.add_argument("--mask-ratio", type=float, default=0.6)
    g.add_argument("--decoder-width", type=int, default=256)
    g = p.add_argument_group("fine-tuning and linear probe (sparse-mim finetune), identical for both arms")
    g.add_argument("--epochs", type=int, default=30, help="linear-probe epochs")
    g.add_argument("--finetune-epochs", type=int, default=20)
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--finetune-lr", type=float, default=4e-3)
    g.add_argument("--linear-lr", type=float, default=1e-2)
    g.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every finetune run")
    return p.parse_args(argv)


def pretrain_overrides(args) -> List[str]:
    return [f"model={args.model}", f"data.path={args.data}", f"data.img_size={args.img_size}",
            f"train.batch_size={args.pretrain_batch}", f"train.epochs={args.pretrain_epochs}",
            f"train.base_lr={args.pretrain_lr}", f"mask_ratio={args.mask_ratio}",
            f"decoder_width={args.decoder_width}", f"data.num_workers={args.workers}", "train.log_every=10",
            f"output_dir={args.out / 'pretrain'}"]


def finetune_overrides(args, mode: str, arm: str, seed: int) -> List[str]:
    weights = args.out / "pretrain" / "checkpoint.pth" if arm == "pretrained" else None
    common = [f"model={args.model}", f"mode={mode}", f"weights={weights if weights else 'null'}",
              f"data.path={args.data}", f"data.img_size={args.img_size}", f"data.label_fraction={args.label_fraction}",
              f"data.num_workers={args.workers}", f"train.seed={seed}", f"train.batch_size={args.batch}",
              f"train.epochs={args.finetune_epochs if mode == 'finetune' else args.epochs}", f"train.eval_every={args.eval_every}", "augment.crop_scale=[0.35,1.0]",
              f"output_dir={args.out / f'{mode}_{arm}_seed{seed}'}"]
    if mode == "linear":
        common += [f"train.base_lr={args.linear_lr}", "train.weight_decay=0.0", "augment.label_smoothing=0.0"]
    elif mode == "finetune":
        common += [f"train.base_lr={args.finetune_lr}"]
    return common + list(args.extra)


def _load_state(path: Path) -> Dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(path: Path, state: Dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def run_all(args) -> Dict:
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "state.json"
    state = _load_state(state_path)

    tic = time.perf_counter()
    result = pretrain(compose_config(pretrain_overrides(args)))
    if result.losses:  # this invocation trained (a finished run only reloads)
        state["pretrain_seconds"] = state.get("pretrain_seconds", 0.0) + (time.perf_counter() - tic)
        _save_state(state_path, state)
    state["pretrain_steps"] = result.step

    runs = state.setdefault("runs", {})
    for mode in args.modes:
        for seed in args.seeds:
            for arm in ARMS:
                name = f"{mode}_{arm}_seed{seed}"
                summary_path = args.out / name / "summary.json"
                if not summary_path.is_file():
                    print(f"== {name}", flush=True)
                    outcome = finetune(compose_finetune_config(finetune_overrides(args, mode, arm, seed)))
                    if not outcome.finished:
                        raise SystemExit(f"{name} stopped early; rerun the command to resume")
                summary = json.loads(summary_path.read_text())
                runs[name] = {"mode": mode, "arm": arm, "seed": seed, "top1": summary["top1"],
                              "top5": summary["top5"], "wall_time_s": summary["wall_time_s"],
                              "train_images": summary["train_images"]}
                _save_state(state_path, state)
    return state


def aggregate(state: Dict, modes) -> Dict[str, Dict[str, Dict]]:
    table: Dict[str, Dict[str, Dict]] = {}
    for mode in modes:
        for arm in ARMS:
            values = [r["top1"] for r in state["runs"].values() if r["mode"] == mode and r["arm"] == arm]
            if values:
                table.setdefault(mode, {})[arm] = {
                    "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}
    return table


def write_report(args, state: Dict) -> str:
    table = aggregate(state, args.modes)
    minutes = state.get("pretrain_seconds", 0.0) / 60
    runs_minutes = sum(r["wall_time_s"] for r in state["runs"].values()) / 60
    train_images = next(iter(state["runs"].values()))["train_images"]
    lines = [f"{args.model}, {args.img_size} px; SparK pretraining {args.pretrain_epochs} epochs "
             f"({state['pretrain_steps']} steps of {args.pretrain_batch}, mask {args.mask_ratio}) "
             f"in {minutes:.1f} min; label fraction {args.label_fraction} ({train_images} labelled images); "
             f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); downstream runs {runs_minutes:.1f} min",
             "", "| evaluation | pretrained top-1 (%) | scratch top-1 (%) | difference | beats scratch by more "
                 "than the seed spread |", "|---|---|---|---|---|"]
    for mode, arms in table.items():
        if set(arms) != set(ARMS):
            continue
        p, s = arms["pretrained"], arms["scratch"]
        diff = p["mean"] - s["mean"]
        spread = max(p["std"], s["std"])
        wins = min(p["values"]) > max(s["values"])
        epochs = args.finetune_epochs if mode == "finetune" else args.epochs
        lines.append(f"| {MODE_TITLES[mode]} ({epochs} epochs)" if mode != "knn" else f"| {MODE_TITLES[mode]}")
        lines[-1] += (f" | {p['mean']:.2f} ± {p['std']:.2f} | {s['mean']:.2f} ± {s['std']:.2f} | {diff:+.2f} | "
                      f"{'yes' if diff > spread and wins else 'no'} (spread {spread:.2f}; every pretrained seed above "
                      f"every scratch seed: {'yes' if wins else 'no'}) |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"table": table, **state}, indent=2))
    plot(table, args.out / "downstream.png", f"{args.model} {args.img_size}px, {args.label_fraction:g} of labels")
    return text


def plot(table: Dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in table]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes), 3.6), dpi=110)
    width = 0.38
    for j, (arm, colour) in enumerate(zip(ARMS, ("tab:blue", "tab:grey"))):
        xs = [i + (j - 0.5) * width for i in range(len(modes))]
        means = [table[m][arm]["mean"] if arm in table[m] else 0 for m in modes]
        stds = [table[m][arm]["std"] if arm in table[m] else 0 for m in modes]
        ax.bar(xs, means, width, yerr=stds, capsize=4, color=colour, alpha=0.8, label=arm)
        for x, m in zip(xs, modes):
            values = table[m].get(arm, {}).get("values", [])
            ax.scatter([x] * len(values), values, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(modes)), [MODE_TITLES[m] for m in modes])
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.expanduser().resolve()
    state = run_all(args)
    print(write_report(args, state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
