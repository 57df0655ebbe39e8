"""``sparse-mim bench``: FLOPs, wall time and peak memory of the sparse encoder against SparK's
masked-dense simulation, on the same weights, the same masks and the same precision.

    config.py    configs/bench.yaml + overrides -> checked settings (device, precision)
    workload.py  the two variants of one configuration and one iteration of each
    flops.py     executed FLOPs (torch.utils.flop_counter)
    timing.py    interleaved wall time
    maps.py      mask + coordinate-map construction time
    memory.py    peak memory (CUDA allocator; CPU: fresh subprocesses)
    machine.py   hardware, software, load, command line, date
    runner.py    every configuration in order
    report.py    Markdown table, results.json / .csv, speedup.png
    loader.py    what=loader: input-pipeline images/s against a plain torchvision loader
"""
from __future__ import annotations

import sys
from typing import List

from sparse_mim.runtime.run_folder import check_output_dir

__all__ = ["main"]


def main(overrides: List[str]) -> int:
    """Run the benchmark with Hydra ``key=value`` overrides of configs/bench.yaml; return the exit code."""
    from .config import CONFIG_NAME, BenchConfigError, compose_bench_config, resolve

    help_asked = any(a in ("-h", "--help") for a in overrides)
    overrides = [a for a in overrides if a not in ("-h", "--help")]
    try:
        cfg = compose_bench_config(overrides)
        if help_asked:
            from sparse_mim.configs import help_text

            print(help_text(CONFIG_NAME, cfg, "usage: sparse-mim bench [key=value ...]   (Hydra overrides)"), end="")
            return 0
        settings = resolve(cfg)
        check_output_dir(settings.output_dir, BenchConfigError)
    except BenchConfigError as e:
        print(f"sparse-mim bench: error: {e}", file=sys.stderr)
        return 2

    import torch
    from omegaconf import OmegaConf

    from .machine import load_average, machine_info
    from .report import write_all
    from .runner import run_all

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    for note in settings.notes:
        print(f"sparse-mim bench: note: {note}", file=sys.stderr)

    if settings.what == ("loader",):
        return _loader(settings, overrides)
    info = {"machine": machine_info(settings.device, ["sparse-mim", "bench", *overrides]),
            "settings": {**OmegaConf.to_container(cfg, resolve=True), "device": str(settings.device),
                         "effective_dtype": settings.effective_dtype, "what": list(settings.what),
                         "threads": torch.get_num_threads(), "backends": list(settings.backends)},
            "notes": list(settings.notes)}
    rows = run_all(settings)
    info["machine"]["load_average_end"] = load_average()
    print(write_all(settings.output_dir, info, rows), end="")
    print(f"sparse-mim bench: wrote results.md, results.json, results.csv, speedup.png to {settings.output_dir}",
          file=sys.stderr)
    return 0


def _loader(settings, overrides: List[str]) -> int:
    import json

    from .loader import format_loader_table, loader_rows
    from .machine import load_average, machine_info

    info = machine_info(settings.device, ["sparse-mim", "bench", *overrides])
    try:
        rows = loader_rows(settings.data_path, settings.img_size, settings.batch_size, settings.loader_workers,
                           settings.loader_batches, settings.repeats,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"sparse-mim bench: error: {e}", file=sys.stderr)
        return 2
    info["load_average_end"] = load_average()
    table = format_loader_table(rows, settings.data_path, settings.img_size, settings.batch_size)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "loader.md").write_text(table)
    (settings.output_dir / "loader.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(table, end="")
    return 0
