"""One benchmark run: every configuration (model x mask ratio) measured in a fixed order.

Per configuration: FLOPs (one counted, untimed iteration per variant and workload), then wall time
(warmup + repeats, interleaved), the mask / coordinate-map time, and peak memory last (on a CPU it
runs in subprocesses, after the timing, so it cannot disturb it).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List

import torch

from .config import BenchSettings
from .flops import count_flops
from .maps import map_building_ms, minkowski_map_building_ms
from .memory import peak_memory_mb
from .timing import median_ms, time_variants
from .workload import VARIANTS, Workload, WorkloadSpec

__all__ = ["run_configuration", "run_all", "spec_for"]


def spec_for(settings: BenchSettings, model: str, mask_ratio: float) -> WorkloadSpec:
    return WorkloadSpec(model=model, method=settings.method, mask_ratio=mask_ratio, batch_size=settings.batch_size,
                        img_size=settings.img_size, device=str(settings.device), autocast=settings.autocast,
                        channels_last=settings.channels_last, execution=settings.execution,
                        execution_depthwise=settings.execution_depthwise,
                        execution_small_tiles=settings.execution_small_tiles,
                        cuda_graph=settings.cuda_graph, backends=settings.backends,
                        decoder_width=settings.decoder_width, seed=settings.seed)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_configuration(settings: BenchSettings, model: str, mask_ratio: float,
                      log: Callable[[str], None]) -> Dict[str, Any]:
    spec = spec_for(settings, model, mask_ratio)
    workload = Workload(spec)
    masks = workload.masks(settings.warmup + settings.repeats)
    label = model if settings.method == "spark" else f"{model} ({settings.method})"
    row: Dict[str, Any] = {"model": label, "method": settings.method, "mask_ratio": mask_ratio, "batch_size": spec.batch_size,
                           "img_size": spec.img_size, "num_patches": spec.num_patches, "len_keep": spec.len_keep,
                           "visible_fraction": spec.visible_fraction,
                           "flops": {}, "time_ms": {}, "times_ms": {}, "speedup": {}, "flop_ratio": {},
                           "memory_mb": {}}

    workloads = ["encoder"] + (["step"] if "step" in settings.what else [])
    for what in workloads:
        log(f"  {what}: counting FLOPs")
        counts = {v: count_flops(workload, v, what, masks[0]) for v in VARIANTS}
        row["flops"][what] = counts
        row["flop_ratio"][what] = _ratio(counts["sparse"]["fwd_bwd"], counts["dense"]["fwd_bwd"])
    row["flop_ratio"]["encoder_fwd"] = _ratio(row["flops"]["encoder"]["sparse"]["fwd"],
                                              row["flops"]["encoder"]["dense"]["fwd"])

    variants = spec.variants  # FLOPs: sparse and dense only (MinkowskiEngine's kernels are invisible to the counter)
    for what in settings.what:
        log(f"  {what}: timing {settings.warmup} warmup + {settings.repeats} repeats per variant, interleaved")
        seconds = time_variants(workload, what, masks, settings.warmup, settings.repeats)
        row["times_ms"][what] = {v: [1000.0 * s for s in seconds[v]] for v in variants}
        row["time_ms"][what] = {v: median_ms(seconds[v]) for v in variants}
        row["speedup"][what] = _ratio(row["time_ms"][what]["dense"], row["time_ms"][what]["sparse"])
        if "minkowski" in variants:
            row.setdefault("minkowski_over_sparse", {})[what] = _ratio(row["time_ms"][what]["minkowski"],
                                                                       row["time_ms"][what]["sparse"])

    log("  masks + coordinate maps: timing")
    row["maps_ms"] = map_building_ms(workload, settings.repeats)
    if "minkowski" in variants:
        row["maps_ms_minkowski"] = minkowski_map_building_ms(workload, settings.repeats)
    base = "step" if "step" in settings.what else "encoder"
    row["maps_pct_of"] = base
    row["maps_pct"] = 100.0 * _ratio(row["maps_ms"], row["time_ms"][base]["sparse"])

    if settings.memory:
        for what in settings.what:
            log(f"  {what}: peak memory")
            row["memory_mb"][what] = {v: peak_memory_mb(workload, v, what, masks[0], torch.get_num_threads())
                                      for v in variants}
    return row


def run_all(settings: BenchSettings, log: Callable[[str], None] = None) -> List[Dict[str, Any]]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    total = len(settings.models) * len(settings.mask_ratios)
    for model in settings.models:
        for ratio in settings.mask_ratios:
            log(f"[{len(rows) + 1}/{total}] {model} {settings.method} mask_ratio={ratio} batch={settings.batch_size} "
                f"{settings.img_size}px {settings.effective_dtype} on {settings.device}")
            rows.append(run_configuration(settings, model, ratio, log))
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
