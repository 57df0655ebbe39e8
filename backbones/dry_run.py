"""``sparsify()``'s dry run: one tiny forward of the dense model, then one of its sparse encoder.

The dense forward (batch 2, 64x64 or the smallest multiple of 32 the model accepts, no grad, eval
mode) is traced with hooks on every module. It tells, from EXECUTION order:

* where the feature maps are (for a model without timm's ``feature_info``): the last module output
  at each of strides 4, 8, 16, 32;
* which modules are the head: those that first run after the last feature map is produced (a module
  registered last but used mid-network is not);
* what the encoder must reproduce: the dense feature maps.

The sparse forward then runs on the same images, every patch visible, in ``engine.collect`` mode:
every glue op without a sparse meaning is listed at once (module path and op), and otherwise the
sparse features must equal the dense ones, or ``sparsify()`` refuses the model naming the first map
(and module) that differs. Both runs use the model's own dtype: a float64 model is checked to a
relative error of 1e-6, a float32 one to 1e-3 (exact encoders measure 1e-7..2e-5 in float32, the
wrong networks this guards against 1e-2 and more); casting the weights to float64 would cost more than
the dry run itself. Parameters, buffers, train/eval modes, torch's thread count and random state are
as before afterwards.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from sparse_mim.engine import SiteTensor, UnsupportedLayerError, UnsupportedOperationError
from sparse_mim.engine.collect import collecting
from sparse_mim.engine.errors import SparsifyMismatchError

__all__ = ["Call", "DenseTrace", "prepared", "trace_dense", "discover_features", "head_modules",
           "check_sparse", "STRIDES", "SIZES"]

STRIDES = (4, 8, 16, 32)
#: tried in turn until the dense model accepts one (some stems need more than 64 px)
SIZES = (64, 96, 128, 160, 192, 224, 256, 320)
BATCH = 2
#: largest relative error (max abs error / max abs value of the map) of an exact encoder
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


@dataclass
class Call:
    """One run of one module's forward in the dense trace (``start``/``end``: event counter)."""

    path: str
    start: int
    end: int = -1
    input: object = None
    output: object = None
    saved: object = None  # a copy of the output (later in-place ops cannot change it)
    in_stride: Optional[int] = None
    out_stride: Optional[int] = None


@dataclass
class DenseTrace:
    size: int
    images: torch.Tensor
    calls: List[Call] = field(default_factory=list)  # in completion order
    _counts: Optional[collections.Counter] = None

    def last_call(self, path: str) -> Optional[Call]:
        found = [c for c in self.calls if c.path == path]
        return found[-1] if found else None

    def count(self, path: str) -> int:
        if self._counts is None:
            self._counts = collections.Counter(c.path for c in self.calls)
        return self._counts[path]


def _stride(t, size: int) -> Optional[int]:
    """The stride of a (B, C, H, W) map of a ``size`` x ``size`` input, or None."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != BATCH:
        return None
    h, w = t.shape[2:]
    if h == 0 or size % h or size % w or size // h != size // w:
        return None
    return size // h


def _copy(o):
    if isinstance(o, torch.Tensor):
        return o.detach().clone()
    if isinstance(o, (list, tuple)):
        return [_copy(a) for a in o]
    return None


# -- state: float64, eval, random state; all restored --------------------------------------------------
def _run_dtype(model: nn.Module) -> torch.dtype:
    """The model's own float32 / float64 (no cast of its weights: that cost more than the dry run);
    half-precision models run in float32."""
    p = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    return p.dtype if p is not None and p.dtype in (torch.float32, torch.float64) else torch.float32


@contextlib.contextmanager
def prepared(model: nn.Module) -> Iterator[torch.dtype]:
    """Put ``model`` in eval mode (half precision cast to float32); afterwards (also after an error) every
    parameter, buffer (dtype and value), module mode and the random state is as it was. Layers swapped
    for sparse counterparts meanwhile hold the same tensors, so they are restored too."""
    dtype = _run_dtype(model)
    modes = {path: m.training for path, m in model.named_modules()}
    modules = list(model.modules())
    params = {id(p): (p, p.dtype) for p in model.parameters()}
    buffers = {}  # id of the float64 buffer -> (original dtype, original value)
    for m in modules:
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.detach().clone().to(dtype)
                buffers[id(m._buffers[name])] = (b.dtype, b.detach().clone())
    for p, _ in params.values():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny workload: one thread is fastest, and immune to a loaded machine
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield dtype
    finally:
        torch.set_num_threads(threads)
        for p, was in params.values():
            if p.dtype != was:
                p.data = p.data.to(was)
        for m in itertools.chain(modules, model.modules()):
            for name, b in m._buffers.items():
                if b is not None and id(b) in buffers:
                    was, value = buffers[id(b)]
                    m._buffers[name] = value.to(was)
        for path, m in model.named_modules():
            if path in modes:
                m.training = modes[path]


# -- the dense trace ---------------------------------------------------------------------------------------
def _trace_once(model: nn.Module, images: torch.Tensor) -> List[Call]:
    calls: List[Call] = []
    running: List[Call] = []
    events = itertools.count()
    size = images.shape[-1]

    def pre(path):
        def hook(module, args):
            first = args[0] if args else None
            running.append(Call(path, next(events), input=first, in_stride=_stride(first, size)))
        return hook

    def post(path):
        def hook(module, args, output):
            call = running.pop()
            call.end, call.output, call.saved = next(events), output, _copy(output)
            call.out_stride = _stride(output, size)
            calls.append(call)
        return hook

    handles = []
    for path, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre(path)), m.register_forward_hook(post(path))]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return calls


def trace_dense(model: nn.Module, dtype: torch.dtype) -> DenseTrace:
    """Run the dense model once at the smallest size of ``SIZES`` it accepts, recording every call."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = p.device if p is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    failures = []
    for size in SIZES:
        images = torch.randn(BATCH, 3, size, size, generator=generator, dtype=dtype).to(device)
        try:
            return DenseTrace(size, images, _trace_once(model, images))
        except Exception as e:  # noqa: BLE001 (too small for its stem; any other failure shows below)
            failures.append(f"{size}px: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise UnsupportedLayerError(f"the dense {type(model).__name__} fails on every dry-run input size "
                                f"({failures[0]}; ...; {failures[-1]}); sparsify needs a model that runs on "
                                "(B, 3, H, W) images with H, W multiples of 32")


# -- features and head from execution order --------------------------------------------------------------
def _within(inner: Call, outer: Call) -> bool:
    return outer.start < inner.start and inner.end < outer.end


def discover_features(trace: DenseTrace) -> List[str]:
    """Module paths of the last map at each of strides 4, 8, 16, 32 (the model's own feature maps).

    The last module output at stride s, unless it lies inside a unit that starts at stride s and ends
    coarser (a stride-2 block's expansion conv): then the map that unit was given. Each map is named
    by the outermost module that returns it, and only modules that run once are used."""
    calls = [c for c in trace.calls if c.path]
    once = {c.path for c in calls if trace.count(c.path) == 1}
    paths = []
    for s in STRIDES:
        at_s = [c for c in calls if c.out_stride == s]
        if not at_s:
            seen = sorted({c.out_stride for c in calls if c.out_stride})
            raise UnsupportedLayerError(
                f"no module of the model outputs a map at stride {s} of a {trace.size}x{trace.size} image (exact "
                f"strides seen: {seen}); SparK needs maps at strides 4, 8, 16, 32 on grids that divide the image "
                "exactly (padded convolutions and pools): pass feature_modules=[...] if the model has them")
        pick = at_s[-1]
        units = [a for a in calls if _within(pick, a) and a.in_stride == s and a.out_stride not in (None, s)]
        if units:
            unit = max(units, key=lambda a: a.start)
            given = [c for c in calls if c.output is unit.input and c.end < unit.start]
            if given:
                pick = given[-1]
        same = [a for a in calls if a.output is pick.output and (a is pick or _within(pick, a)) and a.path in once]
        if not same:
            raise UnsupportedLayerError(f"the map at stride {s} ({pick.path!r}) comes from a module that runs more than "
                                        "once per forward; pass feature_modules=[...] naming modules that run once")
        paths.append(max(same, key=lambda a: a.end).path)
    return paths


def feature_map(output):
    """The map a feature module returns: its output, or the first item of a list or tuple (SelecSLS's
    blocks return ``[output, skip]``, and timm's ``feature_info`` names those blocks)."""
    if isinstance(output, (list, tuple)) and output:
        return output[0]
    return output


def named_features(trace: DenseTrace, model: nn.Module, names: Sequence[str]) -> Tuple[List[int], List[int]]:
    """(reductions, channels) of the named modules' outputs in the trace."""
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise UnsupportedLayerError(f"feature module {n!r} does not exist in {type(model).__name__}") from None
    never = [n for n in names if trace.count(n) == 0]
    if never:
        raise UnsupportedLayerError(f"feature module(s) {never} of {type(model).__name__} never ran in its forward; "
                                    "name modules that produce the feature maps")
    twice = [n for n in names if trace.count(n) > 1]
    if twice:
        raise UnsupportedLayerError(f"feature module(s) {twice} run more than once per forward; name modules that "
                                    "run once (e.g. the stage, not a shared activation)")
    outs = [trace.last_call(n) for n in names]
    bad = [n for n, c in zip(names, outs) if c.out_stride is None]
    if bad:
        raise UnsupportedLayerError(f"feature module(s) {bad} produce no (B, C, H, W) map in {type(model).__name__}")
    return [c.out_stride for c in outs], [int(c.output.shape[1]) for c in outs]


def head_modules(trace: DenseTrace, last_feature: str) -> List[str]:
    """Outermost modules whose first run starts after ``last_feature`` has produced its map."""
    done = trace.last_call(last_feature).end
    first: Dict[str, int] = {}
    for c in trace.calls:
        first[c.path] = min(first.get(c.path, c.start), c.start)
    late = sorted((p for p, start in first.items() if p and start > done), key=lambda p: first[p])
    head = []
    for p in late:
        if not any(p.startswith(h + ".") for h in head):
            head.append(p)
    return head


def drop(model: nn.Module, paths: Sequence[str]) -> Dict[str, nn.Module]:
    """Replace the modules at ``paths`` by Identity; returns what was there (to put back)."""
    dropped = {}
    for p in paths:
        parent, _, name = p.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        dropped[p] = owner._modules[name]
        owner._modules[name] = nn.Identity()
    return dropped


def put_back(model: nn.Module, dropped: Dict[str, nn.Module]) -> None:
    for p, m in dropped.items():
        parent, _, name = p.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[name] = m


# -- the sparse run ---------------------------------------------------------------------------------------
def _logical(t) -> Optional[torch.Tensor]:
    if isinstance(t, SiteTensor):
        d = t.dense()
        return d.permute(0, 2, 3, 1) if t.layout == "nhwc" else d
    return t if isinstance(t, torch.Tensor) else None


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


def check_sparse(backbone: nn.Module, trace: DenseTrace, dense_maps: List[torch.Tensor], names: List[str],
                 dtype: torch.dtype) -> None:
    """Run ``backbone`` on the trace's images, all patches visible: refuse every unsupported glue op
    (all of them, with module paths), then any feature map that differs from the dense model's."""
    model = backbone._model
    failure = None
    with collecting(model) as found:
        try:
            features = backbone(trace.images)
        except Exception as e:  # noqa: BLE001 (reported below with the module it happened in)
            failure = (found.where, e)
    if found.offences or failure:
        raise _refusal(model, found, failure)
    tol = TOLERANCE.get(dtype, 1e-3)
    for name, ours, dense in zip(names, features, dense_maps):
        err = _error(_logical(ours), dense)
        if err > tol:
            first = _first_difference(backbone, trace, tol)
            where = f"; the first module whose output differs is {first}" if first else ""
            raise SparsifyMismatchError(
                f"the sparse {type(model).__name__} with every patch visible does not reproduce the dense model: "
                f"feature map {name!r} differs (relative error {err:.2e} > {tol:.0e}){where}. A layer or glue op of "
                "this model has a sparse counterpart that computes something else; replace it, or report the model")


def _refusal(model: nn.Module, found, failure) -> UnsupportedOperationError:
    lines = [f"  {p or '(the model itself)'} ({found.module_type(p)}): {op}: {why}" for p, op, why in found.offences]
    if failure is not None:
        path, e = failure
        lines.append(f"  {path or '(the model itself)'} ({found.module_type(path)}): then failed with "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    n = len(found.offences)
    head = (f"{n} glue operation(s) in the forward of {type(model).__name__} cannot run sparsely" if n else
            f"the sparse {type(model).__name__} fails in its dry run")
    err = UnsupportedOperationError(
        f"{head}:\n" + "\n".join(lines) + "\nRewrite these lines with the ops listed in sparse_mim.engine.dispatch, "
        "use layers with sparse counterparts instead, or keep these modules out of the encoder (feature_modules=[...])",
        [(p, op) for p, op, _ in found.offences] + ([(failure[0], type(failure[1]).__name__)] if failure else []))
    if failure is not None:
        err.__cause__ = failure[1]
    return err


def _first_difference(backbone: nn.Module, trace: DenseTrace, tol: float) -> Optional[str]:
    """``'path (Type)'`` of the first module (completion order) whose sparse output differs, or None."""
    outputs: Dict[Tuple[str, int], torch.Tensor] = {}
    counts: Dict[str, int] = {}
    model = backbone._model

    def post(path):
        def hook(module, args, output):
            k = counts.get(path, 0)
            counts[path] = k + 1
            t = _logical(output)
            if t is not None:
                outputs[(path, k)] = t.detach().clone()
        return hook

    handles = [m.register_forward_hook(post(p)) for p, m in model.named_modules()]
    try:
        backbone(trace.images)
    except Exception:  # noqa: BLE001 (a diagnosis only; the mismatch itself is the error)
        pass
    finally:
        for h in handles:
            h.remove()
    seen: Dict[str, int] = {}
    for c in trace.calls:
        k = seen.get(c.path, 0)
        seen[c.path] = k + 1
        ours = outputs.get((c.path, k))
        if ours is not None and isinstance(c.saved, torch.Tensor) and _error(ours, c.saved) > tol:
            return f"{c.path or '(the model itself)'} ({type(model.get_submodule(c.path)).__qualname__})"
    return None
