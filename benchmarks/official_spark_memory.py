"""Peak memory of SparK's official masked-dense encoder (a small replica) beside ours, CPU, one row per model.

    python benchmarks/official_spark_memory.py                       # ResNet-50 and ConvNeXt-T, batch 8, 224 px, mask 0.6
    python benchmarks/official_spark_memory.py --models resnet50 --repeats 3
    python benchmarks/official_spark_memory.py --check               # replica == our masked-dense (float64, small)

Variants, each in a fresh subprocess with the method of ``sparse_mim.bench.memory`` (one untimed
iteration, then the peak resident size of a second one above the resident size before it):

* ``official``: a replica, written for this benchmark, of how the official SparK (keyu-tian/SparK,
  ``pretrain/encoder.py``) simulates sparsity on a dense network: every Conv2d / MaxPool2d output is
  multiplied in place by the mask at its resolution; BatchNorm is ``BatchNorm1d`` on the active rows
  gathered with ``x.permute(0, 2, 3, 1)[active.nonzero()]`` and written back into ``zeros_like``;
  ConvNeXt's LayerNorm likewise; the ConvNeXt block masks its branch in place before the residual
  add. The ResNet is timm's ``resnet50`` (as the official code uses) with those modules swapped in; the
  ConvNeXt is a replica of the official one (dwconv -> permute -> LayerNorm -> Linear -> GELU ->
  Linear -> gamma -> permute -> mask -> residual). NCHW memory, as the official code runs. It is not
  the official code: it has no hierarchy of decoders, loss or optimizer; only the encoder.
* ``dense``: our masked-dense baseline (``sparse_mim.bench`` workload, channels_last).
* ``sparse``: our sparse encoder.

All three load the same weights (the replica copies ours) and use the same mask. ``--check`` verifies
that the replica's features equal our masked-dense features (float64): that it is the same
computation, so comparing memory is fair.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_mim.bench.memory import MB, _reset_peak_rss, _status_bytes, cpu_peak_mb_subprocess  # noqa: E402
from sparse_mim.bench.workload import Workload, WorkloadSpec  # noqa: E402


# -- the replica ---------------------------------------------------------------------------------------
class _Mask:
    """The current patch mask (B, 1, h, w), as the official code keeps it in a module-level global."""

    active = None

    @classmethod
    def at(cls, size: int) -> torch.Tensor:
        r = size // cls.active.shape[-1]
        return cls.active.repeat_interleave(r, 2).repeat_interleave(r, 3)

    @classmethod
    def sites(cls, size: int):
        return cls.at(size).squeeze(1).nonzero(as_tuple=True)


class MaskedConv2d(nn.Conv2d):
    def forward(self, x):
        out = super().forward(x)
        out *= _Mask.at(out.shape[2]).to(out.dtype)
        return out


class MaskedMaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        out = super().forward(x)
        out *= _Mask.at(out.shape[2]).to(out.dtype)
        return out


class GatheredBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the active rows, written back into zeros."""

    def forward(self, x):
        sites = _Mask.sites(x.shape[2])
        bhwc = x.permute(0, 2, 3, 1)
        rows = super().forward(bhwc[sites])
        out = torch.zeros_like(bhwc)
        out[sites] = rows
        return out.permute(0, 3, 1, 2)


class GatheredLayerNorm(nn.LayerNorm):
    def __init__(self, dim, eps=1e-6, channels_first=False):
        super().__init__(dim, eps=eps)
        self.channels_first = channels_first

    def forward(self, x):
        bhwc = x.permute(0, 2, 3, 1) if self.channels_first else x
        sites = _Mask.sites(bhwc.shape[1])
        rows = super().forward(bhwc[sites])
        out = torch.zeros_like(bhwc)
        out[sites] = rows
        return out.permute(0, 3, 1, 2) if self.channels_first else out


def _swap_resnet_modules(m: nn.Module) -> nn.Module:
    """The official code's conversion of a dense timm model: Conv2d / MaxPool2d / BatchNorm2d swapped."""
    out = m
    if isinstance(m, nn.Conv2d):
        out = MaskedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                           m.groups, m.bias is not None)
    elif isinstance(m, nn.MaxPool2d):
        out = MaskedMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation)
    elif isinstance(m, nn.BatchNorm2d):
        out = GatheredBatchNorm(m.num_features, m.eps, m.momentum)
    for name, child in m.named_children():
        out.add_module(name, _swap_resnet_modules(child))
    return out


class OfficialResNet(nn.Module):
    def __init__(self, name: str, drop_path_rate: float):
        super().__init__()
        import timm
        self.net = _swap_resnet_modules(timm.create_model(name, num_classes=0, drop_path_rate=drop_path_rate))

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        outs = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class _DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        return x * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep) / keep


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)


class _Block(nn.Module):
    def __init__(self, dim, drop_path):
        super().__init__()
        self.conv_dw = MaskedConv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = GatheredLayerNorm(dim)
        self.mlp = _Mlp(dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = _DropPath(drop_path)

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        y *= _Mask.at(y.shape[2]).to(y.dtype)
        return x + self.drop_path(y)


class OfficialConvNeXt(nn.Module):
    """The official ConvNeXt, parameter names as ours (timm's) so that our weights load."""

    def __init__(self, depths, dims, drop_path_rate: float):
        super().__init__()
        self.stem = nn.Sequential(MaskedConv2d(3, dims[0], 4, 4), GatheredLayerNorm(dims[0], channels_first=True))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages, k = nn.ModuleList(), 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = nn.Identity() if i == 0 else nn.Sequential(
                GatheredLayerNorm(dims[i - 1], channels_first=True), MaskedConv2d(dims[i - 1], dim, 2, 2))
            stage.blocks = nn.Sequential(*[_Block(dim, rates[k + j]) for j in range(depth)])
            k += depth
            self.stages.append(stage)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
            outs.append(x)
        return outs


def build_official(spark) -> nn.Module:
    """The replica for our SparK model ``spark``'s encoder, with its weights."""
    from backbones.convnext import SparseConvNeXt
    enc = spark.encoder
    like = next(enc.parameters())
    rate = max((m.drop_prob for m in enc.modules() if hasattr(m, "drop_prob")), default=0.0)
    if isinstance(enc, SparseConvNeXt):
        depths = [len(s.blocks) for s in enc.stages]
        model = OfficialConvNeXt(depths, enc.feature_channels, rate).to(like)
        model.load_state_dict(enc.state_dict())
    else:
        depths = [len(getattr(enc, f"layer{i}")) for i in range(1, 5)]
        name = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}[tuple(depths)]
        model = OfficialResNet(name, rate).to(like)
        model.net.load_state_dict(enc.state_dict())
    return model.train()


def official_encode(model, images, active):
    _Mask.active = active[:, None].to(images.dtype)
    return model(images * _Mask.at(images.shape[2]))


# -- measurement ---------------------------------------------------------------------------------------
def _child(spec: WorkloadSpec, threads: int) -> None:
    torch.set_num_threads(threads)
    workload = Workload(spec, variants=("sparse",))
    model = build_official(workload.models["sparse"])
    del workload.models["sparse"]
    images = workload.images["sparse"]
    if os.environ.get("OFFICIAL_CHANNELS_LAST") == "1":  # diagnostics: the replica in channels_last memory
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    first, second = workload.masks(2)

    def iteration(active):
        sum(f.sum() for f in official_encode(model, images, active)).backward()

    model.zero_grad(set_to_none=True)
    iteration(first)
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status_bytes("VmRSS")
    if not _reset_peak_rss():
        raise SystemExit("needs Linux /proc/self/clear_refs")
    iteration(second)
    print(json.dumps({"peak_mb": max(0, _status_bytes("VmHWM") - before) / MB}))


def official_peak_mb(spec: WorkloadSpec, threads: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    payload = json.dumps({"spec": dataclasses.asdict(spec), "threads": threads})
    proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def check(models) -> None:
    """The replica computes what our masked-dense encoder computes (float64, batch 2, 128 px)."""
    from sparse_mim.spark import build_spark, random_patch_mask
    for name in models:
        torch.manual_seed(0)
        spark = build_spark(name, drop_path_rate=0.0).double().train()
        for m in spark.encoder.modules():  # non-trivial LayerNorms and layer scale (BatchNorm as built)
            if isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, 0.2), nn.init.normal_(m.bias, 0.0, 0.2)
            if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):
                nn.init.normal_(m.gamma, 0.5, 0.2)
        official = build_official(spark)
        images = torch.randn(2, 3, 128, 128, dtype=torch.float64)
        active = random_patch_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
        ours = spark.encoder(images, active, dense_reference=True)
        theirs = official_encode(official, images, active)
        err = max(float((a.dense_features - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs))
        print(f"{name}: replica vs our masked-dense, max relative difference over the 4 features: {err:.2e}")
        assert err < 1e-9, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per variant; the median is reported")
    p.add_argument("--variants", nargs="+", default=["official", "dense", "sparse"])
    p.add_argument("--check", action="store_true", help="only check the replica against our masked-dense")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        args = json.loads(a.child)
        return _child(WorkloadSpec(**{**args["spec"], "backends": tuple(args["spec"]["backends"])}), args["threads"])
    if a.check:
        return check(a.models)
    print("| model | " + " | ".join(f"{v} MB" for v in a.variants) + " | sparse / dense | sparse / official |")
    print("|---|" + "---|" * (len(a.variants) + 2))
    for model in a.models:
        spec = WorkloadSpec(model=model, mask_ratio=a.mask_ratio, batch_size=a.batch_size, img_size=a.img_size,
                            device="cpu", autocast=False, channels_last=True, execution="auto",
                            decoder_width=768, seed=0)
        peaks = {}
        for v in a.variants:
            runs = [official_peak_mb(spec, a.threads) if v == "official"
                    else cpu_peak_mb_subprocess(spec, v, "encoder", a.threads) for _ in range(a.repeats)]
            peaks[v] = statistics.median(runs)
            print(f"  {model} {v}: {', '.join(f'{r:.0f}' for r in runs)} MB", file=sys.stderr, flush=True)
        ratio = lambda x, y: f"{peaks[x] / peaks[y]:.2f}" if x in peaks and y in peaks else "-"
        print(f"| {model} | " + " | ".join(f"{peaks[v]:.0f}" for v in a.variants)
              + f" | {ratio('sparse', 'dense')} | {ratio('sparse', 'official')} |", flush=True)


if __name__ == "__main__":
    main()
