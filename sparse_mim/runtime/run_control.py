"""What every run (pretrain, finetune) does the same way around its loop: seeding, determinism, and
stopping cleanly on SIGINT/SIGTERM after the current step."""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["StopRequest", "seed_everything", "set_determinism"]


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second SIGINT interrupts at once.
    With ``announce``, the first signal says so on stderr at once (the step may take a while)."""

    def __init__(self, announce: bool = True):
        self.signum: Optional[int] = None
        self.announce = announce
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.announce and self.signum is None:
            what = "Ctrl-C again to abort" if signum == signal.SIGINT else f"got {signal.Signals(signum).name}"
            # os.write: unbuffered, so safe even if the signal interrupted a write to stderr
            os.write(2, f"\nstopping after this step and saving a checkpoint ({what})\n".encode())
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels (warn only where torch has none) or cuDNN autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
