"""Which library executes the sparse ops of a ``SparseTensor``: our engine (``native``, the default)
or another one registered here as a table of ops.

A backend is another execution path of the same modules: parameters, state_dicts and semantics do
not change, only who computes some ops. An engine op asks ``EngineSettings.backend_op(name)`` for the
current backend's implementation and runs its own code where there is none, or where that
implementation returns ``NotImplemented`` for these arguments. The masked-dense reference and dense
tensors never depend on it. ``engine.minkowski`` registers MinkowskiEngine as ``minkowski``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

__all__ = ["Backend", "BackendError", "register_backend", "backend_names", "backend_ops", "check_backend_usable"]


class BackendError(ValueError):
    """A backend was asked for where it cannot run (unknown name, device, CUDA graphs, not installed)."""


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the engine ops it computes, and where it can run."""

    name: str
    #: engine op name (``conv2d``, ``max_pool2d``, ``batch_norm``, ...) -> implementation taking the
    #: engine op's arguments; ops not named here run on our engine.
    ops: Mapping[str, Callable] = field(default_factory=dict)
    #: imports what the backend needs, or raises a ``BackendError`` that says how to install it
    require: Optional[Callable[[], object]] = None
    devices: Tuple[str, ...] = ("cpu", "cuda")
    #: how a device refusal names what runs the ops
    runs_on: str = "our engine"
    cuda_graph: bool = True


_BACKENDS: Dict[str, Backend] = {"native": Backend("native")}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backend_names() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def backend_ops(name: str) -> Mapping[str, Callable]:
    return _BACKENDS[name].ops


def check_backend_usable(name: str, *, device: Optional[str] = None, cuda_graph: bool = False) -> str:
    """``name`` if backend ``name`` can run the sparse ops on ``device`` (a device type, ``cpu`` or
    ``cuda``; None: not checked) with or without CUDA graph capture, else a one-line ``BackendError``
    naming the problem and the fix. Imports the backend's library (so a missing install fails here,
    with its install instructions, not at the first batch)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise BackendError(f"backend must be one of {', '.join(_BACKENDS)}, got {name!r}")
    if cuda_graph and not backend.cuda_graph:
        raise BackendError(f"cuda_graph=true captures our own engine; it cannot run with backend={name} "
                           "(use backend=native or cuda_graph=false)")
    if device is not None and str(device).split(":")[0] not in backend.devices:
        raise BackendError(f"backend={name} runs on {backend.runs_on}, but a {device} device would be used; "
                           f"use device={backend.devices[0]} or backend=native")
    if backend.require is not None:
        backend.require()
    return name
