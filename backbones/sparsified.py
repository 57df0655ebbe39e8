"""Any CNN as a sparse SparK encoder: ``sparsify(model)`` around a timm or torchvision model.

The model's own ``forward`` runs unchanged on the engine's tensors (its layers swapped for sparse
counterparts by ``sparse_mim.engine.sparsify_layers``). The four feature maps at strides 4, 8, 16, 32 are
read from the modules named in the model's ``feature_info`` (timm), in ``feature_modules``, or
found by a dry run (the last module output at each stride), through forward hooks; the forward stops
after the last one. The modules that first run after it in the dry run (pooling, classifier, timm's
EfficientNet ``conv_head``: the head, by execution order, not registration order) are replaced by
``Identity`` up front, so they are neither checked, nor run, nor part of the encoder's state_dict.
A timm ``features_only`` model, which returns its maps itself, is used as it is.

``sparsify`` then runs the sparse encoder once on the dry run's images with every patch visible:
unsupported glue ops are refused all at once, and the feature maps must equal the dense model's
(``backbones.dry_run``).

The backbone registers the model's own children under their own names, so its state_dict keys are
the model's (for a full timm model: timm's keys minus the head; export is the identity).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch.nn as nn

from sparse_mim.engine import SiteTensor, SparseLayerNorm, sparsify_layers
from sparse_mim.engine.errors import UnsupportedLayerError

from . import dry_run
from .base import SparseBackbone

__all__ = ["SparsifiedBackbone", "sparsify", "sparsify_timm"]

STRIDES = dry_run.STRIDES


class _StopForward(Exception):
    """Raised by the hook of the last feature module: nothing after it is needed."""


class SparsifiedBackbone(SparseBackbone):
    """A dense model run sparsely; ``model(images, active)`` -> 4 maps at strides 4, 8, 16, 32."""

    def __init__(self, model: nn.Module, feature_modules: Optional[Sequence[str]] = None):
        super().__init__()
        training = model.training
        with dry_run.prepared(model) as dtype:
            trace = dry_run.trace_dense(model, dtype)
            dense_maps, head = self._choose_features(model, feature_modules, trace)
            self.dropped_head = self._swap_layers(model, head)  # module paths, for messages and docs
            self._adopt(model)
            names = self._paths or [f"output {i}" for i in self._list_indices]
            dry_run.check_sparse(self, trace, dense_maps, names, dtype)
        self.training = training  # the modules' own modes are as they were (restored by prepared)

    def _choose_features(self, model: nn.Module, feature_modules, trace: dry_run.DenseTrace):
        """Set which outputs are the 4 maps; return the dense maps of the trace and the head's paths."""
        if feature_modules is None and _returns_feature_list(model):
            info = model.feature_info
            picks = _pick(list(info.reduction()), list(info.channels()), type(model).__name__, deeper_ok=False)
            self._list_indices = [i for i, _ in picks]
            self._paths: List[str] = []
            self.feature_channels = [c for _, c in picks]
            return [trace.last_call("").saved[i] for i in self._list_indices], []
        paths, reductions, channels = _feature_modules(model, feature_modules, trace)
        picks = _pick(reductions, channels, type(model).__name__, deeper_ok=True)
        self._list_indices = None
        self._paths = [paths[i] for i, _ in picks]
        self.feature_channels = [c for _, c in picks]
        return [dry_run.feature_map(trace.last_call(p).saved) for p in self._paths], dry_run.head_modules(trace, self._paths[-1])

    @staticmethod
    def _swap_layers(model: nn.Module, head: List[str]) -> List[str]:
        """Head -> Identity, then every layer -> its sparse counterpart; on a refused layer the head is put back."""
        dropped = dry_run.drop(model, head)
        try:
            sparsify_layers(model)
        except UnsupportedLayerError:
            dry_run.put_back(model, dropped)
            raise
        return list(dropped)

    def _adopt(self, model: nn.Module) -> None:
        """Register the model's children and own parameters as ours; hook the feature modules."""
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        if any(True for _ in model.named_buffers(recurse=False)):
            raise UnsupportedLayerError(f"{type(model).__name__} holds buffers of its own (outside any layer); "
                                        "sparsify supports models whose state lives in their layers")
        self.__dict__["_model"] = model  # not a submodule: its children are ours, under the same names
        for i, path in enumerate(self._paths):
            m = model.get_submodule(path)
            m._sparse_feature_index = i
            m.register_forward_hook(self._capture)
        self.norm_kind = _norm_kind(self)
        self._captured: List = []

    @property
    def feature_modules(self) -> List[str]:
        """Paths of the modules whose outputs are the 4 maps (empty for a timm ``features_only`` model)."""
        return list(self._paths)

    def _capture(self, module, inputs, output):
        i = module._sparse_feature_index
        self._captured[i] = dry_run.feature_map(output)
        if i == len(self._paths) - 1:
            raise _StopForward

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.training = mode
        return self

    def forward_features(self, x):
        if self._list_indices is not None:
            outs = self._model(x)
            outs = [outs[i] for i in self._list_indices]
        else:
            self._captured = [None] * len(self._paths)
            try:
                self._model(x)
            except _StopForward:
                pass
            outs, self._captured = self._captured, []
            missing = [p for p, o in zip(self._paths, outs) if o is None]
            if missing:
                raise UnsupportedLayerError(f"feature module(s) {missing} of {type(self._model).__name__} never ran "
                                            "in its forward; name modules that produce the feature maps")
        for path, o, s in zip(self._paths or self._list_indices, outs, STRIDES):
            if not isinstance(o, SiteTensor) or o.stride != s or o.layout != "nchw":
                got = f"stride {o.stride}, {o.layout.upper()}" if isinstance(o, SiteTensor) else type(o).__name__
                raise UnsupportedLayerError(f"feature {path!r} should be an NCHW sparse map at stride {s}, got {got}")
        return outs

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, features={self._paths or self._list_indices}"


def _returns_feature_list(model: nn.Module) -> bool:
    """timm's ``features_only`` wrappers carry a ``FeatureInfo`` (a full model carries a list of dicts)."""
    info = getattr(model, "feature_info", None)
    return info is not None and hasattr(info, "reduction") and callable(info.reduction)


def _feature_modules(model: nn.Module, names: Optional[Sequence[str]], trace: dry_run.DenseTrace):
    """(module paths, reductions, channels) of the candidate feature maps: timm's ``feature_info``,
    else the named modules, else the ones the dry run finds (last map at each stride)."""
    info = getattr(model, "feature_info", None)
    if names is None and isinstance(info, list) and info and "module" in info[0] and \
            all(trace.count(f["module"]) for f in info):  # (HRNet's name modules its classifier never runs)
        return [f["module"] for f in info], [int(f["reduction"]) for f in info], [int(f["num_chs"]) for f in info]
    names = list(names) if names is not None else dry_run.discover_features(trace)
    reductions, channels = dry_run.named_features(trace, model, names)
    return names, reductions, channels


def _pick(reductions: List[int], channels: List[int], what: str, deeper_ok: bool):
    """(index, channels) of the last map at each of the strides 4, 8, 16, 32.

    With ``deeper_ok`` (the forward stops at the stride-32 map), maps at strides above 32 (SelecSLS's
    stride-64 head convolutions) are ignored: they run after the last feature map, so they are part
    of the head that is dropped. A ``features_only`` model computes every map it lists, so there a
    deeper map is refused."""
    deepest = max(reductions)
    if deepest < 32 or (deepest > 32 and not deeper_ok):
        raise UnsupportedLayerError(f"{what}'s total stride is {max(reductions)}, SparK needs 32 (patch size 32); "
                                    f"feature reductions are {reductions}. Use a model with 5 stride-2 stages "
                                    "(and output_stride=32)")
    picks = []
    for s in STRIDES:
        found = [i for i, r in enumerate(reductions) if r == s]
        if not found:
            raise UnsupportedLayerError(f"{what} has no feature map at stride {s} (reductions {reductions})")
        picks.append((found[-1], channels[found[-1]]))
    return picks


def _norm_kind(encoder: nn.Module) -> str:
    """SparK's densify norm: LayerNorm for LayerNorm-only encoders (ConvNeXt-like), else BatchNorm."""
    kinds = {type(m) for m in encoder.modules()}
    layer = any(issubclass(k, SparseLayerNorm) for k in kinds)
    batch = any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
    return "layer" if layer and not batch else "batch"


def sparsify(model: nn.Module, feature_modules: Optional[Sequence[str]] = None) -> SparsifiedBackbone:
    """Turn a dense CNN (timm, torchvision or your own) into a sparse SparK encoder sharing its parameters.

    ``model`` is changed in place (its layers become sparse counterparts); the returned backbone registers
    the same children, so ``backbone.state_dict()`` has the model's keys minus the head (the modules
    that first run after the last feature map). Feature maps come from timm's ``feature_info``, else
    from ``feature_modules`` (module paths whose outputs are the maps at strides 4, 8, 16, 32), else
    from a dry run: the last module output at each stride.

    Everything is checked here, on one tiny forward (batch 2, 64 px or the smallest multiple of 32
    the model accepts; eval mode, no grad; parameters, buffers, modes and random state untouched):

    * ``UnsupportedLayerError``: every layer with no sparse counterpart (path and type), before anything is swapped;
    * ``UnsupportedOperationError``: every glue op of the model's own ``forward`` with no sparse
      meaning (module path and op), all listed at once;
    * ``SparsifyMismatchError``: the sparse encoder with every patch visible does not reproduce the
      dense model's feature maps (names the first map and module that differ).
    """
    return SparsifiedBackbone(model, feature_modules)


def sparsify_timm(name: str, **kwargs) -> SparsifiedBackbone:
    """``sparsify(timm.create_model(name, **kwargs))``: keys are timm's own (minus the head).

    ``drop_path_rate`` is passed only to models whose constructor takes it (DLA, GhostNet and others
    have no stochastic depth); a non-zero rate such a model ignores is said once, as a warning."""
    return sparsify(create_timm_model(name, **kwargs))


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, minus a ``drop_path_rate`` it does not take."""
    import timm
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "drop_path_rate" not in kwargs or "'drop_path_rate'" not in str(e):
            raise
    rate = kwargs.pop("drop_path_rate")
    if rate:
        warnings.warn(f"timm's {name} has no stochastic depth (its constructor takes no drop_path_rate): "
                      f"drop_path_rate={rate} is ignored", UserWarning, stacklevel=3)
    return timm.create_model(name, pretrained=False, **kwargs)
