"""Peak memory of one iteration per variant.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in process; reported as
  the peak above what was allocated before the iteration (weights, inputs), i.e. activations,
  gradients and workspaces.
* CPU: a process keeps freed memory, so one process cannot measure two variants. Each variant runs
  in a fresh subprocess (``python -m sparse_mim.bench.memory SPEC``) that builds only that variant with
  glibc returning large blocks to the system on free (``MALLOC_MMAP_THRESHOLD_``), runs one untimed
  iteration (one-time library initialisation), then resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``) and reports the peak resident size (``VmHWM``) of a second iteration
  above the resident size just before it. Where the mark cannot be reset (not Linux) it reports
  ``ru_maxrss`` above the resident size before the first iteration, one-time costs included.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .workload import Workload, WorkloadSpec

__all__ = ["peak_memory_mb", "cuda_peak_mb", "cpu_peak_mb_subprocess"]

MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def cuda_peak_mb(workload: Workload, variant: str, what: str, active: torch.Tensor) -> float:
    """Peak allocation of one iteration above what was allocated before it. A CUDA graph's memory
    is allocated once, at capture, so the sparse variant is measured eagerly (the graph's private
    pool holds the same tensors)."""
    device = workload.device
    workload.prepare(variant)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with workload.eager():
        workload.iteration(variant, what, active)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    workload.prepare(variant)
    return (peak - before) / MB


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") > 0
    except OSError:
        return False


def _max_rss_bytes() -> int:
    kb_or_b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb_or_b if sys.platform == "darwin" else kb_or_b * 1024


def cpu_peak_mb_subprocess(spec: WorkloadSpec, variant: str, what: str, threads: int,
                           timeout: Optional[float] = None) -> float:
    """Peak resident-memory increase (MB) of one iteration, measured in a fresh process."""
    payload = json.dumps({"spec": dataclasses.asdict(spec), "variant": variant, "what": what, "threads": threads})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "sparse_mim.bench.memory", payload], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {spec.model} {variant} {what} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def peak_memory_mb(workload: Workload, variant: str, what: str, active: torch.Tensor, threads: int) -> float:
    if workload.device.type == "cuda":
        return cuda_peak_mb(workload, variant, what, active)
    return cpu_peak_mb_subprocess(workload.spec, variant, what, threads)


def _subprocess_main(payload: str) -> None:
    args = json.loads(payload)
    variant, what = args["variant"], args["what"]
    torch.set_num_threads(int(args["threads"]))
    workload = Workload(WorkloadSpec(**args["spec"]), variants=(variant,))
    first, second = workload.masks(2)
    workload.prepare(variant)
    before_first = _status_bytes("VmRSS")
    workload.iteration(variant, what, first)
    workload.prepare(variant)
    gc.collect()
    before = _status_bytes("VmRSS")
    if _reset_peak_rss():
        workload.iteration(variant, what, second)
        peak = _status_bytes("VmHWM")
    else:
        peak, before = _max_rss_bytes(), before_first
    print(json.dumps({"peak_mb": max(0, peak - before) / MB}))


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
