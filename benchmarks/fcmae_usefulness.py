"""FCMAE vs SparK pretraining of the same ConvNeXt V2 for the same CPU time, against random init.

    python benchmarks/fcmae_usefulness.py --data /path/to/imagenette-128 --out outputs/fcmae_usefulness

1. For each pretraining method (``--methods``, default fcmae and spark), measures the process CPU
   seconds of one training step with the real trainer (``sparse-mim pretrain`` for 1 and for
   ``1 + calibration`` steps, data loading in-process: the difference over the extra steps), then
   pretrains for ``--cpu-budget / (CPU s per step)`` steps, so both methods get the same CPU time;
2. evaluates each pretraining and random init (scratch) with ``sparse-mim finetune`` in kNN and
   linear-probe mode on the same label subsets and seeds (benchmarks/downstream.py's recipe);
3. writes ``table.md`` (top-1 mean +- std over seeds per method) and ``results.json``.

Every stage is its own resumable run folder; rerunning skips what finished. ``--methods`` and
``--stages`` let the arms run separately (e.g. scratch and SparK while another job runs FCMAE).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from downstream import MODE_TITLES, finetune_overrides  # noqa: E402
from sparse_mim.finetune import compose_finetune_config, finetune  # noqa: E402
from sparse_mim.train import compose_config, pretrain  # noqa: E402

METHODS = ("fcmae", "spark")
ARMS = METHODS + ("scratch",)
MODES = ("knn", "linear")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", default="outputs/fcmae_usefulness", type=Path)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="pretrainings to run (scratch needs none)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to evaluate")
    p.add_argument("--stages", nargs="+", default=["pretrain", "probe", "report"],
                   choices=["pretrain", "probe", "report"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    g = p.add_argument_group("pretraining (sparse-mim pretrain; each method keeps its own default lr)")
    g.add_argument("--cpu-budget", type=float, default=240.0, help="process CPU seconds of training steps per method")
    g.add_argument("--calibration-steps", type=int, default=3)
    g.add_argument("--pretrain-batch", type=int, default=32)
    g.add_argument("--mask-ratio", type=float, default=0.6)
    g.add_argument("--pretrain-extra", nargs="*", default=[], help="more key=value overrides for every pretraining")
    g = p.add_argument_group("linear probe and kNN (sparse-mim finetune), identical for every arm")
    g.add_argument("--label-fraction", type=float, default=0.1)
    g.add_argument("--epochs", type=int, default=10, help="linear-probe epochs")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--linear-lr", type=float, default=1e-2)
    g.add_argument("--warmup-epochs", type=int, default=1, help="linear-probe lr warmup (below --epochs)")
    g.add_argument("--workers", type=int, default=0)
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every finetune run")
    args = p.parse_args(argv)
    args.finetune_epochs, args.eval_every = 0, args.epochs  # downstream.finetune_overrides' fields
    return args


# -- pretraining for a fixed CPU time --------------------------------------------------------------
def pretrain_overrides(args, method: str, steps: int, out: Path) -> List[str]:
    overrides = [f"model={args.model}", f"data.path={args.data}", f"data.img_size={args.img_size}",
                 f"train.batch_size={args.pretrain_batch}", f"train.max_steps={steps}",
                 f"mask_ratio={args.mask_ratio}", "data.num_workers=0", "train.log_every=5",
                 f"output_dir={out}"]
    if method != "spark":  # spark is the trainer's default method
        overrides.insert(0, f"method={method}")
    return overrides + list(args.pretrain_extra)


def _cpu_seconds_of_pretraining(args, method: str, steps: int, out: Path) -> Dict:
    """Run (or resume) a pretraining; CPU and wall seconds this invocation spent, and the result."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = pretrain(compose_config(pretrain_overrides(args, method, steps, out)))
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "result": result}


def _load(path: Path) -> Dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, state: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def run_pretraining(args, method: str) -> Dict:
    """Calibrate CPU seconds per step, then pretrain for the budget (resumable; state in state.json)."""
    root = args.out / f"pretrain_{method}"
    state_path = root / "state.json"
    state = _load(state_path)
    if "cpu_s_per_step" not in state:
        short = _cpu_seconds_of_pretraining(args, method, 1, root / "calibrate_1")
        long = _cpu_seconds_of_pretraining(args, method, 1 + args.calibration_steps,
                                           root / f"calibrate_{1 + args.calibration_steps}")
        if not short["result"].losses or not long["result"].losses:
            raise SystemExit(f"{root}: calibration folders hold finished runs from before; delete them to recalibrate")
        per_step = (long["cpu_s"] - short["cpu_s"]) / args.calibration_steps
        if per_step <= 0:
            raise SystemExit(f"{method}: calibration measured {per_step:.2f} CPU s per step (the machine's load "
                             f"swamped it); delete {root} and rerun with more --calibration-steps")
        state["cpu_s_per_step"] = per_step
    if "done_steps" not in state:  # the budget may change until the run is finished
        state["steps"] = max(1, int(args.cpu_budget / state["cpu_s_per_step"]))
        state["cpu_budget_s"] = args.cpu_budget
        _save(state_path, state)
    print(f"== pretrain {method}: {state['steps']} steps at {state['cpu_s_per_step']:.2f} CPU s/step", flush=True)
    run = _cpu_seconds_of_pretraining(args, method, state["steps"], root / "run")
    result = run["result"]
    if result.losses:
        state["pretrain_cpu_s"] = state.get("pretrain_cpu_s", 0.0) + run["cpu_s"]
        state["pretrain_wall_s"] = state.get("pretrain_wall_s", 0.0) + run["wall_s"]
        state["first_losses"] = state.get("first_losses") or result.losses[:5]
        state["last_losses"] = result.losses[-5:]
    if not result.finished:
        raise SystemExit(f"pretraining {method} stopped early at step {result.step}; rerun to resume")
    state["done_steps"] = result.step
    _save(state_path, state)
    return state


# -- probes ------------------------------------------------------------------------------------------
def checkpoint_of(args, arm: str) -> Optional[Path]:
    return None if arm == "scratch" else args.out / f"pretrain_{arm}" / "run" / "checkpoint.pth"


def probe(args, mode: str, arm: str, seed: int) -> Dict:
    name = f"{mode}_{arm}_seed{seed}"
    out = args.out / name
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        weights = checkpoint_of(args, arm)
        if weights is not None and not weights.is_file():
            raise SystemExit(f"{name}: no pretraining at {weights}; run --stages pretrain --methods {arm} first")
        overrides = [o for o in finetune_overrides(args, mode, "scratch", seed)
                     if not o.startswith(("weights=", "output_dir="))]
        overrides += [f"weights={weights if weights else 'null'}", f"output_dir={out}",
                      f"train.warmup_epochs={args.warmup_epochs}"]
        print(f"== {name}", flush=True)
        outcome = finetune(compose_finetune_config(overrides))
        if not outcome.finished:
            raise SystemExit(f"{name} stopped early; rerun the command to resume")
    summary = json.loads(summary_path.read_text())
    return {"mode": mode, "arm": arm, "seed": seed, "top1": summary["top1"], "wall_time_s": summary["wall_time_s"],
            "train_images": summary["train_images"]}


# -- report --------------------------------------------------------------------------------------------
def collect(args) -> Dict:
    runs = []
    for mode in args.modes:
        for arm in ARMS:
            for seed in args.seeds:
                path = args.out / f"{mode}_{arm}_seed{seed}" / "summary.json"
                if path.is_file():
                    s = json.loads(path.read_text())
                    runs.append({"mode": mode, "arm": arm, "seed": seed, "top1": s["top1"],
                                 "wall_time_s": s["wall_time_s"], "train_images": s["train_images"]})
    pretrainings = {m: _load(args.out / f"pretrain_{m}" / "state.json") for m in METHODS}
    return {"runs": runs, "pretrain": {m: s for m, s in pretrainings.items() if s}}


def _cell(values: List[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})"


def write_report(args, data: Dict) -> str:
    lines = [f"{args.model}, {args.img_size} px, mask {args.mask_ratio}, pretraining batch {args.pretrain_batch}, "
             f"CPU budget {args.cpu_budget:.0f} process-CPU s of training steps per method; label fraction "
             f"{args.label_fraction}; seeds {', '.join(map(str, args.seeds))}", "",
             "| method | CPU s / step | steps | pretraining CPU s (wall s) | loss first -> last |", "|---|---|---|---|---|"]
    for method, s in data["pretrain"].items():
        first = statistics.mean(s["first_losses"]) if s.get("first_losses") else float("nan")
        last = statistics.mean(s["last_losses"]) if s.get("last_losses") else float("nan")
        lines.append(f"| {method} | {s['cpu_s_per_step']:.2f} | {s.get('done_steps', s['steps'])} | "
                     f"{s.get('pretrain_cpu_s', float('nan')):.0f} ({s.get('pretrain_wall_s', float('nan')):.0f}) | "
                     f"{first:.3f} -> {last:.3f} |")
    lines += ["", "| evaluation | " + " | ".join(f"{a} top-1 (%)" for a in ARMS) + " |",
              "|---|" + "---|" * len(ARMS)]
    for mode in args.modes:
        title = MODE_TITLES[mode] + (f" ({args.epochs} epochs)" if mode == "linear" else "")
        cells = [_cell([r["top1"] for r in data["runs"] if r["mode"] == mode and r["arm"] == arm]) for arm in ARMS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(data, indent=2))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if "pretrain" in args.stages:
        for method in args.methods:
            run_pretraining(args, method)
    if "probe" in args.stages:
        for seed in args.seeds:
            for mode in args.modes:
                for arm in args.arms:
                    probe(args, mode, arm, seed)
    if "report" in args.stages:
        print(write_report(args, collect(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
