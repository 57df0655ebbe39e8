"""Which CNNs ``sparsify`` runs exactly: one check per architecture, shared by the coverage sweep
(``benchmarks/any_cnn.py``) and the test that keeps its table honest.

A check builds the dense model (random weights, float64, drop paths and dropout off so that every
forward is deterministic), sparsifies a deep copy of it and compares, in training mode (what
pretraining runs):

* all patches visible: the sparse encoder's four feature maps against the dense model's outputs of
  the same modules, forward and the gradients of input and weights;
* a random patch mask: the sparse encoder against the masked-dense reference (the same modules fed a
  ``MaskedDenseTensor``), forward and the gradients of input and weights.

The verdict is ``exact`` (every relative error at most ``TOLERANCE``), ``wrong`` (it ran, but an
error is larger), ``refused`` (``sparsify`` raised ``UnsupportedLayerError`` before any computation)
or ``crash`` (anything else, including an unsupported operation met only during a forward: the
module that was running and the error's first line are recorded); with a memory budget, a model whose
float64 check would not fit in it is ``not run`` (never counted as exact). ``speed`` times the encoder's
forward+backward against the masked-dense reference on the same weights and masks.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["Arch", "Check", "TIMM", "TORCHVISION", "ARCHS", "TESTED", "TOLERANCE", "find_arch", "build_dense",
           "parameter_count", "randomize", "check", "speed", "relative_error"]

#: ``exact`` means every relative error (max |sparse - reference| / max |reference|) is at most this.
TOLERANCE = 1e-9
#: Bytes per parameter a float64 check holds: the dense model, its sparse copy and the gradients of both.
CHECK_BYTES_PER_PARAMETER = 4 * 8


@dataclass(frozen=True)
class Arch:
    """One architecture of the sweep: where it comes from, its family, and whether it is an attention hybrid."""

    source: str   # "timm" or "torchvision"
    name: str     # the constructor's name in that library
    family: str
    hybrid: bool = False   # attention / transformer blocks: allowed to stay refused

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


def _timm(family: str, *names: str, hybrid: bool = False) -> List[Arch]:
    return [Arch("timm", n, family, hybrid) for n in names]


#: The smallest variant of each timm CNN family (several where variants differ in their glue).
TIMM: List[Arch] = [
    *_timm("ResNet", "resnet18", "resnet10t"), *_timm("ResNet-D", "resnet18d"),
    *_timm("ResNeXt", "resnext26ts"), *_timm("SE-ResNet", "seresnet18"), *_timm("ECA-ResNet", "ecaresnet26t"),
    *_timm("Wide ResNet", "wide_resnet50_2"), *_timm("ResNetV2", "resnetv2_50"),
    *_timm("ResNet-Blur", "resnetblur18"), *_timm("GC-ResNet", "gcresnet33ts"),
    *_timm("RegNetX", "regnetx_002"), *_timm("RegNetY", "regnety_002"), *_timm("RegNetZ", "regnetz_b16"),
    *_timm("EfficientNet", "efficientnet_b0", "efficientnet_lite0"),
    *_timm("EfficientNetV2", "tf_efficientnetv2_b0"),
    *_timm("MobileNetV1", "mobilenetv1_100"), *_timm("MobileNetV2", "mobilenetv2_050"),
    *_timm("MobileNetV3", "mobilenetv3_small_050"), *_timm("MobileNetV4", "mobilenetv4_conv_small"),
    *_timm("MnasNet", "mnasnet_050"), *_timm("SPNASNet", "spnasnet_100"),
    *_timm("MixNet", "mixnet_s"), *_timm("GhostNet", "ghostnet_050"),
    *_timm("GhostNetV2", "ghostnetv2_100"), *_timm("RepGhostNet", "repghostnet_050"),
    *_timm("ReXNet", "rexnet_100"), *_timm("DLA", "dla34", "dla46_c"),
    *_timm("CSPNet", "cspresnet50", "cs3darknet_s"), *_timm("DarkNet", "darknet17"),
    *_timm("DenseNet", "densenet121"), *_timm("DPN", "dpn48b"), *_timm("HRNet", "hrnet_w18_small"),
    *_timm("RepVGG", "repvgg_a0"), *_timm("MobileOne", "mobileone_s0"),
    *_timm("VoVNet", "vovnet39a", "ese_vovnet19b_dw"), *_timm("NF-ResNet", "nf_resnet26"),
    *_timm("NFNet", "nfnet_f0"), *_timm("Xception", "legacy_xception"),
    *_timm("Inception", "inception_v3", "inception_v4"),
    *_timm("ConvNeXt", "convnext_atto"), *_timm("ConvNeXt V2", "convnextv2_atto"),
    *_timm("ResNeSt", "resnest14d"), *_timm("Res2Net", "res2net50_14w_8s"),
    *_timm("SKNet", "skresnet18"), *_timm("TResNet", "tresnet_m"), *_timm("SelecSLS", "selecsls42"),
    *_timm("HardCoRe-NAS", "hardcorenas_a"), *_timm("FBNet", "fbnetc_100", "fbnetv3_b"),
    *_timm("LCNet", "lcnet_050"), *_timm("TinyNet", "tinynet_e"), *_timm("GENet", "gernet_s"),
    *_timm("HGNet", "hgnetv2_b0"),
    *_timm("EfficientViT", "efficientvit_b0", hybrid=True), *_timm("MobileViT", "mobilevit_xxs", hybrid=True),
]


#: torchvision's families, by the prefix of their builders' names (longest first where prefixes overlap).
_TV_FAMILIES = (("wide_resnet", "Wide ResNet"), ("resnext", "ResNeXt"), ("resnet", "ResNet"),
                ("mobilenet_v2", "MobileNetV2"), ("mobilenet_v3", "MobileNetV3"), ("efficientnet_v2", "EfficientNetV2"),
                ("efficientnet", "EfficientNet"), ("regnet_x", "RegNetX"), ("regnet_y", "RegNetY"),
                ("shufflenet", "ShuffleNetV2"), ("mnasnet", "MNASNet"), ("densenet", "DenseNet"),
                ("squeezenet", "SqueezeNet"), ("googlenet", "GoogLeNet"), ("inception", "Inception"),
                ("convnext", "ConvNeXt"), ("alexnet", "AlexNet"), ("vgg", "VGG"))
#: torchvision's classification transformers: not CNNs, not in the list.
_TV_TRANSFORMERS = ("vit_", "swin_", "maxvit_")


def _torchvision_cnns() -> List[Arch]:
    """Every classification builder of the installed torchvision (``list_models(module=torchvision.models)``)
    except the transformers: all variants, so the figure is about all of torchvision's CNNs."""
    try:
        import torchvision
    except ImportError:
        return []
    archs = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if name.startswith(_TV_TRANSFORMERS):
            continue
        family = next((f for prefix, f in _TV_FAMILIES if name.startswith(prefix)), name)
        archs.append(Arch("torchvision", name, family))
    return archs


#: torchvision's classification CNNs: every builder of every family.
TORCHVISION: List[Arch] = _torchvision_cnns()

ARCHS: List[Arch] = TIMM + TORCHVISION

#: The quick subset the test suite checks on every run (one per family, small and fast).
TESTED: Tuple[str, ...] = ("timm:resnest14d", "timm:mobilenetv3_small_050", "timm:regnetx_002", "timm:lcnet_050",
                           "timm:dla46_c", "timm:ghostnet_050", "torchvision:shufflenet_v2_x0_5",
                           "torchvision:mnasnet0_5", "timm:hgnetv2_b0", "timm:selecsls42")


def find_arch(key: str) -> Arch:
    """``"timm:resnet18"``, ``"torchvision:resnet18"`` or a bare name (timm first); unknown names are an error."""
    for a in ARCHS:
        if key in (a.key, a.name):
            return a
    source, _, name = key.partition(":")
    if source in ("timm", "torchvision") and name:
        return Arch(source, name, "-")
    raise KeyError(f"unknown architecture {key!r}: use timm:<name> or torchvision:<name>")


# -- the dense model ---------------------------------------------------------------------------------------
#: Constructor arguments that switch randomness and auxiliary heads off, tried where a constructor takes them.
_QUIET_KWARGS = {"stochastic_depth_prob": 0.0, "dropout": 0.0, "aux_logits": False, "init_weights": False}


def _construct(ctor: Callable[..., nn.Module], wanted: Dict[str, Any]) -> nn.Module:
    """``ctor(**wanted)``, leaving out each keyword the constructor rejects (torchvision's builders take
    ``**kwargs``, so only calling tells which of them the model class knows)."""
    kwargs = dict(wanted)
    while True:
        try:
            return ctor(**kwargs)
        except TypeError as e:
            rejected = [k for k in kwargs if f"'{k}'" in str(e)]
            if not rejected:
                raise
            for k in rejected:
                kwargs.pop(k)


def _quiet(model: nn.Module) -> None:
    """Dropout, drop path and stochastic depth off: each variant would draw different random numbers."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("drop_prob", "p"):  # timm DropPath, torchvision StochasticDepth
            if type(m).__name__ in ("DropPath", "StochasticDepth") and hasattr(m, attr):
                setattr(m, attr, 0.0)


def _build(arch: Arch) -> nn.Module:
    if arch.source == "timm":
        import timm
        return _construct(lambda **kw: timm.create_model(arch.name, pretrained=False, **kw),
                          {"drop_rate": 0.0, "drop_path_rate": 0.0})
    import torchvision
    ctor = getattr(torchvision.models, arch.name)
    return _construct(lambda **kw: ctor(weights=None, **kw), _QUIET_KWARGS)


def parameter_count(arch: Arch) -> int:
    """How many parameters the model has: built on the meta device (no memory, no initialisation cost), or in
    float32 on the CPU where the constructor computes with tensors (torchvision's RegNet widths)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in _build(arch).parameters())
    except NotImplementedError:
        return sum(p.numel() for p in _build(arch).parameters())


def build_dense(arch: Arch, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The dense model with random weights and non-trivial norms, no drop path, no dropout."""
    torch.manual_seed(seed)
    model = _build(arch)
    _quiet(model)
    model = model.to(dtype)
    randomize(model, seed)
    return model


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random norm weights / biases / layer scales and running statistics: the defaults (1, 0) would hide
    a swapped or skipped norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))


# -- the comparison ----------------------------------------------------------------------------------------
def relative_error(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], floor: float = 0.0) -> float:
    """max |actual - expected| / max |expected|, the scale at least ``floor`` (and 1e-30); inf when one side
    is missing or the shapes differ."""
    if actual is None and expected is None:
        return 0.0
    if actual is None or expected is None or actual.shape != expected.shape:
        return float("inf")
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor, 1e-30)
    return (actual - expected).abs().max().item() / scale if actual.numel() else 0.0


#: A tensor's error is relative to its own largest value, but to no less than this fraction of the largest
#: value in its group (all gradients of one backward): a gradient that is zero in exact arithmetic (a
#: BatchNorm bias followed by another BatchNorm in training mode) holds rounding noise of the group's scale.
GROUP_FLOOR = 1e-3


@dataclass
class Check:
    """One architecture's verdict and the evidence behind it."""

    source: str
    family: str
    model: str
    hybrid: bool
    status: str = "crash"        # exact / wrong / refused / crash / not run (too big for the memory budget)
    reason: str = ""             # the error's first line (refused / crash)
    detail: str = ""             # the whole message on one line (a refusal lists every layer / op)
    stage: str = ""              # where it failed: build, sparsify, visible, masked
    module: str = ""             # the module that was running when it failed (forward errors)
    visible_error: float = float("nan")       # all visible vs the dense model, forward and gradients
    masked_error: float = float("nan")        # forward vs the masked-dense reference
    masked_grad_error: float = float("nan")   # input and weight gradients vs the masked-dense reference
    glue: List[str] = field(default_factory=list)     # torch functions run on sparse tensors
    layers: List[str] = field(default_factory=list)   # the engine's sparse layers in the encoder
    features: List[str] = field(default_factory=list)  # the modules whose outputs are the 4 maps
    seconds: float = 0.0
    speedup: float = float("nan")          # masked-dense time / sparse time, encoder fwd+bwd (median)
    sparse_ms: float = float("nan")
    dense_ms: float = float("nan")

    @property
    def errors(self) -> List[float]:
        return [self.visible_error, self.masked_error, self.masked_grad_error]

    def row(self) -> Dict[str, Any]:
        out = asdict(self)
        for k in ("glue", "layers", "features"):
            out[k] = " ".join(out[k])
        return out


@contextlib.contextmanager
def _running_module(model: nn.Module) -> Iterator[List[str]]:
    """Yields a list that, after an exception inside ``model``'s forward, ends with the innermost running
    module's path (forward hooks of a failing module never run, so its path stays on the stack)."""
    paths = {m: n for n, m in model.named_modules()}
    stack: List[str] = []

    def pre(module, args):
        if module is model:  # a new forward: what an earlier one left (it stops early by raising) is stale
            stack.clear()
        if module in paths:
            stack.append(paths[module] or "(model)")

    def post(module, args, out):
        if module in paths and stack:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post, always_call=False)]
    try:
        yield stack
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _recording_glue() -> Iterator[set]:
    """The names of the torch functions that reach the engine's ``__torch_function__`` inside the block."""
    from sparse_mim.engine import dispatch as dispatch_table
    seen: set = set()
    original = dispatch_table.dispatch

    def recording(func, args, kwargs):
        seen.add(getattr(func, "__name__", None) or repr(func))
        return original(func, args, kwargs)

    dispatch_table.dispatch = recording
    try:
        yield seen
    finally:
        dispatch_table.dispatch = original


def _first_line(e: BaseException) -> str:
    """The message's first line; for a list ("N layer(s) ...:" then one per line) also the first item."""
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    head = text[0] if text else ""
    if head.endswith(":") and len(text) > 1:
        head += " " + text[1] + (f" (+{len(text) - 2} more)" if len(text) > 2 else "")
    return f"{type(e).__name__}: {head}"


def _one_line(e: BaseException, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def _feature_paths(backbone) -> List[str]:
    """The module paths whose outputs are the encoder's four maps."""
    paths = getattr(backbone, "feature_modules", None)
    return list(paths if isinstance(paths, (list, tuple)) else getattr(backbone, "_paths", []) or [])


def _dense_features(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> List[torch.Tensor]:
    from backbones.dry_run import feature_map
    outs: Dict[str, torch.Tensor] = {}
    # a clone: the model may change the map in place afterwards (torchvision DenseNet's F.relu(inplace=True))
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: outs.__setitem__(p, feature_map(o).clone())) for p in paths]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [outs[p] for p in paths]


def _max_error(pairs) -> float:
    """The largest relative error of a group of tensors (see ``GROUP_FLOOR``)."""
    pairs = list(pairs)
    top = max((b.abs().max().item() for _, b in pairs if b is not None and b.numel()), default=0.0)
    return max((relative_error(a, b, GROUP_FLOOR * top) for a, b in pairs), default=0.0)


def _visible_error(dense: nn.Module, sparse, x: torch.Tensor) -> float:
    """All patches visible: sparse maps and gradients against the dense model's, same probes."""
    paths = _feature_paths(sparse)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = [o.dense() for o in sparse(xs)]
    theirs = _dense_features(dense, paths, xd)
    probes = [torch.randn_like(t) for t in theirs]
    params = dict(dense.named_parameters())
    names = [n for n, p in sparse.named_parameters() if p.requires_grad]
    mine = dict(sparse.named_parameters())
    ga = torch.autograd.grad(sum((o * p).sum() for o, p in zip(ours, probes)), [xs] + [mine[n] for n in names],
                             allow_unused=True)
    gb = torch.autograd.grad(sum((o * p).sum() for o, p in zip(theirs, probes)), [xd] + [params[n] for n in names],
                             allow_unused=True)
    return max(max(_max_error([pair]) for pair in zip(ours, theirs)), _max_error(zip(ga, gb)))


def _masked_errors(sparse, x: torch.Tensor, mask: torch.Tensor) -> Tuple[float, float]:
    """A masked input: sparse against the masked-dense reference, forward and gradients."""
    params = [p for p in sparse.parameters() if p.requires_grad]
    outs, grads = [], []
    for reference in (False, True):
        xi = x.clone().requires_grad_()
        feats = [f.dense() for f in sparse(xi, mask, dense_reference=reference)]
        probe_gen = torch.Generator().manual_seed(1)
        probes = [torch.randn(f.shape, generator=probe_gen, dtype=f.dtype) for f in feats]
        grads.append(torch.autograd.grad(sum((f * p).sum() for f, p in zip(feats, probes)), [xi] + params,
                                         allow_unused=True))
        outs.append([f.detach() for f in feats])
    return max(_max_error([pair]) for pair in zip(*outs)), _max_error(zip(*grads))


def check(arch: Arch, img_size: Tuple[int, int] = (96, 96), batch: int = 2, mask_ratio: float = 0.6,
          seed: int = 0, memory_gb: Optional[float] = None) -> Check:
    """Build, sparsify and compare one architecture in float64 (see the module docstring) on images of
    ``img_size`` (height, width). 96 px by default: at 64 px a masked image keeps two sites at stride 32, and
    BatchNorm statistics over four values amplify rounding to ~1e-9; 3x3 patches keep errors near 1e-12."""
    from backbones import sparsify
    from sparse_mim.engine import UnsupportedLayerError
    from sparse_mim.spark import random_patch_mask

    result = Check(arch.source, arch.family, arch.name, arch.hybrid)
    start = time.perf_counter()
    if memory_gb is not None:
        n = parameter_count(arch)
        need = n * CHECK_BYTES_PER_PARAMETER / 2 ** 30
        if need > memory_gb:
            result.status = "not run"
            result.reason = (f"memory: {n / 1e6:.0f}M parameters need about {need:.0f} GB in float64 (dense model, "
                             f"sparse copy and their gradients), over the {memory_gb:g} GB budget")
            result.detail = result.reason
            return result
    try:
        result.stage = "build"
        dense = build_dense(arch, torch.float64, seed)
        result.stage = "sparsify"
        try:
            sparse = sparsify(copy.deepcopy(dense))
        except UnsupportedLayerError as e:
            result.status, result.reason, result.detail = "refused", _first_line(e), _one_line(e)
            return result
        result.features = _feature_paths(sparse)
        result.layers = sorted({type(m).__name__ for m in sparse.modules()
                                if type(m).__module__.startswith("sparse_mim.engine")})
        dense.train(), sparse.train()
        g = torch.Generator().manual_seed(seed)
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        x = torch.randn(batch, 3, h, w, generator=g, dtype=torch.float64)
        grid = (h // 32, w // 32)
        mask = random_patch_mask(batch, grid, mask_ratio, generator=g)
        with _recording_glue() as glue, _running_module(sparse) as running:
            try:
                result.stage = "visible"
                result.visible_error = _visible_error(dense, sparse, x)
                result.stage = "masked"
                result.masked_error, result.masked_grad_error = _masked_errors(sparse, x, mask)
            except Exception:
                result.module = running[-1] if running else ""
                raise
            finally:
                result.glue = sorted(glue)
        result.stage = ""
        ok = all(e <= TOLERANCE for e in result.errors)
        result.status = "exact" if ok else "wrong"
    except Exception as e:  # noqa: BLE001 - a sweep records every failure and goes on
        result.status, result.reason, result.detail = "crash", _first_line(e), _one_line(e)
        if not result.module:
            result.module = _last_frame(e)
    finally:
        result.seconds = time.perf_counter() - start
    return result


def _last_frame(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"


# -- speed ---------------------------------------------------------------------------------------------------
def speed(arch: Arch, img_size: int = 128, batch: int = 4, mask_ratio: float = 0.6, warmup: int = 1,
          repeats: int = 3, seed: int = 0) -> Dict[str, float]:
    """Encoder forward+backward, float32: the sparse encoder against the masked-dense reference on the same
    weights and the same mask per iteration, interleaved (``sparse_mim.bench.timing``)."""
    from backbones import sparsify
    from sparse_mim.spark import random_patch_mask

    from .timing import interleaved_times, median_ms, synchronizer
    from .workload import feature_tensor

    encoder = sparsify(build_dense(arch, torch.float32, seed)).train()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    masks = [random_patch_mask(batch, (img_size // 32, img_size // 32), mask_ratio, generator=g)
             for _ in range(warmup + repeats)]

    def run(reference: bool) -> Callable[[int], None]:
        def one(i: int) -> None:
            sum(feature_tensor(f).sum() for f in encoder(images, masks[i], dense_reference=reference)).backward()
        return one

    seconds = interleaved_times({"sparse": run(False), "dense": run(True)},
                                lambda _: encoder.zero_grad(set_to_none=True), warmup, repeats,
                                synchronizer(torch.device("cpu")))
    sparse_ms, dense_ms = median_ms(seconds["sparse"]), median_ms(seconds["dense"])
    ratios = [d / s for s, d in zip(seconds["sparse"], seconds["dense"])]
    return {"sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": statistics.median(ratios)}
