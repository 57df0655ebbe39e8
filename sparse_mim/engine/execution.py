"""Which execution path a windowed op (convolution, max / average pooling) takes on a SparseTensor.

Paths (``ops.window`` implements the first three, ``kernels`` the fourth):

* ``tiles``  (patch managers): each tile with its halo as a padded batch, the dense op VALID on it.
* ``gather`` (any manager): kernel map (N_out, K) -> gathered (N_out, K, C) -> reduce / GEMM.
* ``canvas`` (any manager): rows scattered into a dense canvas, the dense op, active rows read back.
* ``implicit_gemm``: the fused gather-GEMM kernel through the kernel map (Triton on CUDA).

``auto`` is the measured choice (``auto_path``); ``EngineSettings.execution`` (and its depthwise and
small-tile overrides) force a path, for tests and benchmarks.
"""
from __future__ import annotations

__all__ = ["PATHS", "check_path", "choose_path", "auto_path"]

#: Every path a setting may name; ``auto`` leaves the choice to ``auto_path``.
PATHS = ("auto", "tiles", "gather", "canvas", "implicit_gemm")


def check_path(path: str, setting: str) -> str:
    if path not in PATHS:
        raise ValueError(f"{setting}: unknown execution path {path!r}; choose one of {', '.join(PATHS)}")
    return path


def choose_path(settings, x, geom, depthwise: bool = False) -> str:
    """The path for one windowed op on SparseTensor ``x`` (``WindowGeometry`` ``geom``) under
    ``settings`` (an ``EngineSettings``): a forced path where the settings name one, else ``auto_path``."""
    small = settings.execution_small_tiles
    if small not in (None, "auto") and x.manager.tiled and x.manager.tile_side(x.stride) < 4:
        return small
    path = settings.execution_depthwise if depthwise and settings.execution_depthwise else settings.execution
    if path == "tiles" and not x.manager.tiled:
        return "gather"
    if path != "auto":
        return path
    tile = x.manager.tile_side(x.stride) if x.manager.tiled else 0
    return auto_path(geom, depthwise, tile, cuda=x.features.is_cuda and _triton_ready())


def auto_path(geom, depthwise: bool, tile_side: int, cuda: bool) -> str:
    """The measured choice (benchmarks/RESULTS.md); ``tile_side`` is 0 for non-patch managers."""
    square = geom.kernel[0] == geom.kernel[1]
    if cuda:
        # cuDNN on halo tiles wins for overlapping square convs on tiles of >= 4x4 sites; on 2x2 / 1x1
        # tiles (a halo is several times the rows), for depthwise convs and for non-overlapping
        # windows (ConvNeXt stem / downsampling) the Triton kernel wins (docs/notes.md, "GPU execution rules")
        overlapping = geom.kernel[0] > geom.stride or geom.pad_lo != (0, 0)
        big_tiles = tile_side >= 4
        return "tiles" if overlapping and big_tiles and square and not depthwise else "implicit_gemm"
    # CPU: halo tiles win while tiles are large (t >= 4, little halo overhead); on 2x2 / 1x1 tiles a
    # kxk halo copies many times the rows, so dense convs gather their neighbours into one GEMM and
    # depthwise convs run on the (small) dense canvas instead (benchmarks/RESULTS.md)
    if tile_side >= 4 and square:
        return "tiles"
    return "canvas" if depthwise else "gather"


def _triton_ready() -> bool:
    from ..kernels import triton_available
    return triton_available()
