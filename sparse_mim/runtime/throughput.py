"""Is the input pipeline the bottleneck? Sums each step's data wait and compute time over a window
and returns a warning when waiting for data took more than a set share of the time."""
from __future__ import annotations

from typing import Dict, Optional

__all__ = ["DataWaitWatch"]


class DataWaitWatch:
    """Feed it every step's metrics (``data_s``, ``compute_s``); every ``window`` steps it compares
    the window's data-wait share with ``threshold`` (None: never warns) and warns at most once per
    ``quiet`` windows, so a lasting bottleneck is reported without flooding the log."""

    def __init__(self, threshold: Optional[float], window: int = 50, quiet: int = 10):
        self.threshold, self.window, self.quiet = threshold, window, quiet
        self.data = self.compute = 0.0
        self.steps = 0
        self.windows_since_warning: Optional[int] = None

    def add(self, metrics: Dict[str, float]) -> Optional[str]:
        self.data += metrics["data_s"]
        self.compute += metrics["compute_s"]
        self.steps += 1
        if self.steps < self.window:
            return None
        share, steps = self.data / max(self.data + self.compute, 1e-12), self.steps
        self.data = self.compute = 0.0
        self.steps = 0
        if self.windows_since_warning is not None:
            self.windows_since_warning += 1
            if self.windows_since_warning < self.quiet:
                return None
        if self.threshold is None or share <= self.threshold:
            return None
        self.windows_since_warning = 0
        return (f"input pipeline: {100 * share:.0f}% of the last {steps} steps' time was spent waiting for data "
                f"(warning above {100 * self.threshold:.0f}%, data.wait_warning); the GPU/CPU is starved: raise "
                f"data.num_workers, try data.decode=tensor (or gpu on CUDA), put the images on a faster disk, or "
                f"see `sparse-mim bench what=loader`")
