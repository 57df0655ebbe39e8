"""Every switch of the engine in one object, set for a block with one context manager.

``EngineSettings`` holds who computes the sparse ops (``backend``), how windowed ops run
(``execution`` and its overrides, see ``engine.execution``) and the switches of a few fast paths
that tests and benchmarks turn off to measure or to reach the other path. ``use_settings(**changes)``
changes some of them inside a ``with`` block; ``current_settings()`` is what the ops read. The
settings are per thread (a ``contextvars`` variable): a block on one thread never changes another's.
torch runs a CUDA backward on threads of its own, so an autograd function whose backward reads a
setting keeps the forward's settings on its ``ctx`` and enters them there (``ops.conv``).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .backend import backend_ops, check_backend_usable
from .execution import check_path

__all__ = ["EngineSettings", "use_settings", "current_settings"]


@dataclass(frozen=True)
class EngineSettings:
    """What the engine does, where a choice exists. Defaults are the measured fast paths."""

    #: who computes the sparse ops: ``native`` (our engine) or a registered backend (``minkowski``)
    backend: str = "native"
    #: windowed ops' execution path (``engine.execution.PATHS``; ``auto``: the measured choice)
    execution: str = "auto"
    #: overrides ``execution`` for depthwise convolutions only (e.g. ``canvas`` for ConvNeXt's 7x7)
    execution_depthwise: Optional[str] = None
    #: overrides both for windowed ops on patch tiles smaller than 4x4 sites (stages 3-4 at 224 px),
    #: where a halo costs 4-49x the rows
    execution_small_tiles: Optional[str] = None
    #: rebuild BatchNorm -> ReLU outputs in backward instead of saving them (``engine.recompute``);
    #: off for a double backward (``create_graph=True``) or to measure the difference
    recompute: bool = True
    #: masked-dense BatchNorm gathers the active rows, runs torch's kernel and scatters back (what
    #: it does on CUDA) on the CPU too, instead of the row kernel
    gather_masked_rows: bool = False
    #: CUDA gathers with a fill row run one Triton kernel instead of ``cat`` + ``index_select``
    fused_fill_gather: bool = True
    #: a channels_last depthwise convolution takes the plain (NCHW) weight gradient when oneDNN's
    #: padded one would exceed this many times the input map (``ops.conv``); 0 disables it
    plain_depthwise_weight_grad_ratio: float = 16

    def __post_init__(self):
        check_backend_usable(self.backend)
        check_path(self.execution, "execution")
        for name in ("execution_depthwise", "execution_small_tiles"):
            if getattr(self, name) is not None:
                check_path(getattr(self, name), name)

    def backend_op(self, op: str) -> Optional[Callable]:
        """The backend's implementation of engine op ``op``, or None where our engine computes it."""
        return backend_ops(self.backend).get(op)


_DEFAULT = EngineSettings()
_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSettings))
_current: contextvars.ContextVar[EngineSettings] = contextvars.ContextVar("sparse_mim_engine_settings",
                                                                          default=_DEFAULT)


def current_settings() -> EngineSettings:
    return _current.get()


@contextlib.contextmanager
def use_settings(settings: Optional[EngineSettings] = None, /, **changes) -> Iterator[EngineSettings]:
    """Run the block with ``settings`` (default: the current ones) changed by ``changes`` (checked
    first); the previous settings come back when it ends, also on an exception. Blocks nest."""
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown engine setting(s) {', '.join(unknown)}; the settings are {', '.join(_FIELDS)}")
    if settings is None:
        settings = _current.get()
    if any(getattr(settings, name) != value for name, value in changes.items()):
        settings = dataclasses.replace(settings, **changes)
    token = _current.set(settings)
    try:
        yield settings
    finally:
        _current.reset(token)
