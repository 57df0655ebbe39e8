"""The benchmark config: ``configs/bench.yaml`` composed by Hydra, checked, and resolved to a device.

``configs/`` is found by ``sparse_mim.configs`` (as for pretraining), so ``sparse-mim bench key=value``
works from any folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from .. import config_rules as rules
from ..config_schema import setting_errors
from ..configs import compose, config_dir

__all__ = ["CONFIG_DIR", "BenchConfigError", "BenchSettings", "compose_bench_config", "resolve"]

CONFIG_DIR = config_dir()
CONFIG_NAME = "bench"
WHAT = ("encoder", "step", "loader")
DTYPES = ("float32", "bfloat16")


class BenchConfigError(ValueError):
    """The benchmark config cannot run; raised before any model is built."""


@dataclass(frozen=True)
class BenchSettings:
    """The checked config with the device and precision actually used."""

    models: Tuple[str, ...]
    method: str             # spark or fcmae: the pretraining model wrapped around the encoder
    mask_ratios: Tuple[float, ...]
    batch_size: int
    img_size: int
    device: torch.device
    dtype: str              # requested: float32 / bfloat16
    autocast: bool          # bfloat16 autocast in effect (CUDA only)
    warmup: int
    repeats: int
    threads: Optional[int]
    channels_last: bool
    cudnn_benchmark: bool
    execution: str
    execution_depthwise: Optional[str]    # path of depthwise convs (null = ``execution``'s choice)
    execution_small_tiles: Optional[str]  # path of other windowed ops on tiles < 4x4 (null = auto)
    cuda_graph: bool                      # sparse encoder as one CUDA graph (CUDA only)
    backends: Tuple[str, ...]             # sparse backends measured: "native" always, "minkowski" optional
    what: Tuple[str, ...]
    memory: bool
    decoder_width: int
    seed: int
    output_dir: Path
    notes: Tuple[str, ...]  # what was adjusted (e.g. bfloat16 requested on a CPU)
    data_path: Optional[str] = None        # what=loader: folder of JPEGs
    loader_workers: Tuple[int, ...] = ()   # what=loader: worker counts
    loader_batches: int = 0                # what=loader: timed batches per measurement

    @property
    def effective_dtype(self) -> str:
        return "bfloat16 (autocast)" if self.autocast else "float32"

    @property
    def num_patches(self) -> int:
        return (self.img_size // 32) ** 2


def compose_bench_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/bench.yaml`` with Hydra ``key=value`` overrides applied."""
    return compose(CONFIG_NAME, overrides, BenchConfigError, ", lists as models=[resnet50,convnext_tiny]")



def device_name_is_cpu(c) -> bool:
    import torch

    return str(c["device"]) == "cpu" or (str(c["device"]) == "auto" and not torch.cuda.is_available())


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise BenchConfigError(f"device must be cpu or cuda, got {name!r}")
    return device


def resolve(cfg: DictConfig) -> BenchSettings:
    """Check every setting (all problems at once) and pick the device; raise ``BenchConfigError``."""
    from backbones import is_backbone, list_backbones

    from ..engine.backend import backend_names

    c = OmegaConf.to_container(cfg, resolve=True)
    errors = setting_errors(CONFIG_NAME, cfg)  # types were checked while composing (BenchConfig)
    models = [str(m) for m in _as_list(c["models"])]
    unknown = [m for m in models if not is_backbone(m)]
    if unknown:
        errors.append(f"models: unknown {', '.join(unknown)}; choose a timm model name (hand-tuned: "
                      f"{', '.join(list_backbones())}; 'sparsify:<name>' forces the general path)")
    method = str(c["method"])
    if method == "fcmae":
        from sparse_mim.fcmae import FCMAEModelError, check_fcmae_model
        for m in models:
            try:
                check_fcmae_model(m)
            except FCMAEModelError as e:
                errors.append(str(e))
        if c["cuda_graph"]:
            errors.append("cuda_graph=true captures SparK's encoder only; use method=spark or cuda_graph=false")
    size = c["img_size"]
    ratios = _as_list(c["mask_ratios"])
    what = [str(w) for w in _as_list(c["what"])]
    loader_only = "loader" in what  # no model, no mask: only the image size matters
    errors += rules.image_and_mask_errors(size, [] if loader_only else ratios, "img_size", "mask_ratios")
    on_cuda = not device_name_is_cpu(c)
    if c["cuda_graph"]:
        errors += rules.needs_cuda("cuda_graph=true", on_cuda, "CUDA graphs", "set device=cuda")
    backends = [str(b) for b in _as_list(c["backend"])]
    errors += rules.backend_errors(backends, on_cuda, cuda_graph=bool(c["cuda_graph"]))
    if "loader" in what:
        if len(what) > 1:
            errors.append(f"what=loader runs alone (it measures the input pipeline, not the encoder), got {what}")
        if c["data_path"] is None or not Path(str(c["data_path"])).expanduser().is_dir():
            errors.append(f"what=loader needs data_path=<folder of images with class subfolders>, "
                          f"got {c['data_path']!r}")
    device = None
    try:
        device = _device(str(c["device"]))
    except BenchConfigError as e:
        errors.append(str(e))
    rules.raise_if(errors, BenchConfigError, "invalid benchmark config")

    notes = []
    autocast = c["dtype"] == "bfloat16" and device.type == "cuda"
    if c["dtype"] == "bfloat16" and not autocast:
        notes.append("dtype=bfloat16 runs as float32 on a CPU (bfloat16 autocast is CUDA-only here)")
    return BenchSettings(
        models=tuple(models), method=method, mask_ratios=tuple(float(r) for r in ratios), batch_size=int(c["batch_size"]),
        img_size=int(size), device=device, dtype=str(c["dtype"]), autocast=autocast, warmup=int(c["warmup"]),
        repeats=int(c["repeats"]), threads=c["threads"], channels_last=bool(c["channels_last"]),
        cudnn_benchmark=bool(c["cudnn_benchmark"]), execution=str(c["execution"]),
        execution_depthwise=c.get("execution_depthwise"), execution_small_tiles=c.get("execution_small_tiles"),
        cuda_graph=bool(c.get("cuda_graph", False)), backends=tuple(b for b in backend_names() if b in backends or b == "native"),
        what=tuple(w for w in WHAT if w in what), memory=bool(c["memory"]), decoder_width=int(c["decoder_width"]),
        seed=int(c["seed"]), output_dir=Path(str(c["output_dir"])), notes=tuple(notes),
        data_path=None if c.get("data_path") is None else str(c["data_path"]),
        loader_workers=tuple(int(w) for w in _as_list(c.get("loader_workers"))),
        loader_batches=int(c.get("loader_batches") or 0))
