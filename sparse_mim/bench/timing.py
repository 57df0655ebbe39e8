"""Wall time of the two variants, interleaved in one process.

Iteration ``i`` runs every variant once, in a fixed order (sparse, dense, sparse, dense, ...), all on
mask ``i``, so slow drifts of a shared machine (other jobs, clocks, thermals) hit both alike. Only the
call itself is timed: gradients are cleared and the device synchronised before the clock starts; the
one synchronize inside the timed region is the final one on CUDA (kernels are asynchronous).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from .workload import Workload

__all__ = ["synchronizer", "interleaved_times", "time_variants", "median_ms"]


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_times(runs: Dict[str, Callable[[int], None]], prepare: Callable[[str], None],
                      warmup: int, repeats: int, sync: Callable[[], None]) -> Dict[str, List[float]]:
    """Seconds per timed iteration of each run (``runs[name](i)`` for i in range(warmup + repeats))."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, run in runs.items():
            prepare(name)
            gc.collect()
            sync()
            start = time.perf_counter()
            run(i)
            sync()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def time_variants(workload: Workload, what: str, masks: Sequence[torch.Tensor], warmup: int,
                  repeats: int) -> Dict[str, List[float]]:
    """Seconds of ``repeats`` iterations of ``what`` per variant, after ``warmup`` untimed ones."""
    if len(masks) < warmup + repeats:
        raise ValueError(f"need {warmup + repeats} masks (warmup + repeats), got {len(masks)}")
    runs = {v: (lambda i, v=v: workload.iteration(v, what, masks[i])) for v in workload.models}
    return interleaved_times(runs, workload.prepare, warmup, repeats, synchronizer(workload.device))


def median_ms(seconds: Sequence[float]) -> float:
    return 1000.0 * statistics.median(seconds)
