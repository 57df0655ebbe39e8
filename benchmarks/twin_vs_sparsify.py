"""Hand-tuned ResNet-50 twin vs `sparsify(timm resnet50)`, each with BatchNorm -> ReLU outputs rebuilt
in backward (`sparse_mim.engine.recompute`) on and off: encoder forward+backward, CPU, batch 8, 224 px,
mask 0.6, same weights and mask, the four variants interleaved per repeat (median of 7 after 2 warm-ups).

    python benchmarks/twin_vs_sparsify.py            # prints one line per variant
"""
import time, statistics, torch, timm
from backbones import create_backbone
from sparse_mim.engine import use_settings
from sparse_mim.spark import random_patch_mask
torch.set_num_threads(2); torch.manual_seed(0)
twin = create_backbone("resnet50"); gen = create_backbone("sparsify:resnet50")
gen.load_state_dict(twin.state_dict())  # same keys: the twin keeps timm's names
x = torch.randn(8, 3, 224, 224)
def step(m):
    active = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(1))
    m.zero_grad(set_to_none=True)
    t = time.perf_counter()
    out = m(x, active)
    sum(o.features.sum() for o in out).backward()
    return (time.perf_counter() - t) * 1e3
variants = {"twin recompute on": (twin, True), "twin recompute off": (twin, False),
            "sparsify recompute on": (gen, True), "sparsify recompute off": (gen, False)}
times = {k: [] for k in variants}
for r in range(9):
    for k, (m, on) in variants.items():
        with use_settings(recompute=on):
            ms = step(m)
        if r >= 2: times[k].append(ms)
for k, v in times.items():
    print(f"{k}: median {statistics.median(v):.0f} ms  ({', '.join(f'{t:.0f}' for t in v)})")
