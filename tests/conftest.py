"""Shared test helpers: float64 comparisons of sparse runs against the masked-dense reference."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small float64 workloads on one thread: on a busy machine two threads wait on each other (grouped and
    depthwise convolutions ran up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MASKS = ("random", "single", "all", "corners")


def patch_mask(kind: str, batch: int, grid, generator=None) -> torch.Tensor:
    """Patch masks that exercise borders: random, one visible patch, all visible, the four corners."""
    h, w = grid
    if kind == "random":
        m = torch.rand(batch, h, w, generator=generator) < 0.5
        m[:, 0, 0] = True
        return m
    if kind == "single":
        m = torch.zeros(batch, h, w, dtype=torch.bool)
        m[:, h - 1, w // 2] = True
        return m
    if kind == "all":
        return torch.ones(batch, h, w, dtype=torch.bool)
    m = torch.zeros(batch, h, w, dtype=torch.bool)
    m[:, 0, 0] = m[:, 0, -1] = m[:, -1, 0] = m[:, -1, -1] = True
    return m


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10, what: str = "") -> None:
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max abs error {err:.3e} (scale {scale:.3e})"


def shared_fixture(name: str, probe: str):
    """(folder, searched): ``shared/fixtures/<name>`` beside the repository or beside any folder above
    it (CI clones with ``shared/`` next to the checkout; worktrees sit one level deeper)."""
    root = Path(__file__).resolve().parents[1]
    searched = [root / "shared"] + [p / "shared" for p in root.parents]
    for shared in searched:
        if (shared / "fixtures" / name / probe).is_file():
            return shared / "fixtures" / name, [str(s) for s in searched]
    return None, [str(s) for s in searched]

