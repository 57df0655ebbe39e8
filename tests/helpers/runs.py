"""Tiny image folders and ``sparse-mim`` subprocesses for the pretraining tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

#: A run that takes seconds on one CPU thread: 8 images, 2 steps of 4 per epoch, a narrow decoder.
TINY = ("model=resnet18", "data.img_size=64", "decoder_width=64", "train.batch_size=4", "train.warmup_epochs=1",
        "train.base_lr=0.05", "data.num_workers=0", "train.vis_images=2")


def make_images(folder: Path, count: int, size: int = 80, ext: str = ".png", seed: int = 0) -> List[Path]:
    """``count`` smooth random RGB images (``size`` px) written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        path = folder / f"img_{i:03d}{ext}"
        image.save(path)
        paths.append(path)
    return paths


def env(threads: int = 1) -> Dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    out.pop("WORLD_SIZE", None)
    out.pop("RANK", None)
    return out


def console_script() -> str:
    """The installed ``sparse-mim`` command of this Python environment."""
    return str(Path(sys.executable).with_name("sparse-mim"))


def pretrain_cmd(*overrides: str) -> List[str]:
    return [sys.executable, "-m", "sparse_mim", "pretrain", *overrides]


def run(cmd: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(output_dir: Path) -> List[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
