"""The backend switch itself (no MinkowskiEngine needed): clear errors, no import-time shims, and the
native default untouched."""
import subprocess
import sys

import pytest

from backbones import create_backbone
from sparse_mim.engine import BackendError, check_backend_usable, current_settings, minkowski, use_settings


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match="backend must be one of native, minkowski, got 'mink'"):
        create_backbone("resnet18", backend="mink")
    with pytest.raises(BackendError, match="backend must be one of native, minkowski, got 'mink'"):
        with use_settings(backend="mink"):
            pass


def test_minkowski_without_minkowskiengine_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(minkowski, "_ME", None)
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    with pytest.raises(minkowski.MinkowskiUnavailableError) as e:
        create_backbone("resnet18", backend="minkowski")
    msg = str(e.value)
    assert "libopenblas-dev" in msg and "pip install --no-build-isolation MinkowskiEngine==0.5.4" in msg
    assert isinstance(e.value, ImportError) and isinstance(e.value, BackendError)
    assert current_settings().backend == "native"


def test_minkowski_refuses_cuda_and_cuda_graphs_with_the_fix():
    with pytest.raises(BackendError, match="backend=minkowski runs on the CPU build of MinkowskiEngine, but a cuda "
                                           "device would be used; use device=cpu or backend=native"):
        check_backend_usable("minkowski", device="cuda")
    with pytest.raises(BackendError, match="cuda_graph=true captures our own engine; it cannot run with "
                                           "backend=minkowski"):
        check_backend_usable("minkowski", cuda_graph=True)
    assert check_backend_usable("native", device="cuda", cuda_graph=True) == "native"


def test_importing_the_package_patches_nothing_in_collections():
    code = ("import collections, sparse_mim, backbones, sparse_mim.engine, sparse_mim.convert; "
            "print(hasattr(collections, 'Sequence'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_native_is_the_default_and_use_settings_restores_it():
    assert create_backbone("resnet18").backend == "native"
    assert current_settings().backend == "native"
    with use_settings(backend="native"):
        assert current_settings().backend == "native"
    assert current_settings().backend == "native"


def test_pretrain_and_bench_configs_reject_an_unknown_backend():
    from sparse_mim.bench.config import BenchConfigError, compose_bench_config, resolve
    from sparse_mim.train.config import ConfigError, compose_config, validate_config

    with pytest.raises(ConfigError, match="backend must be one of native, minkowski, got 'tpu'"):
        validate_config(compose_config(["backend=tpu"]))
    with pytest.raises(BenchConfigError, match="backend must be one of native, minkowski, got 'tpu'"):
        resolve(compose_bench_config(["backend=[native,tpu]", "device=cpu"]))
    assert resolve(compose_bench_config(["device=cpu"])).backends == ("native",)


def test_an_unknown_backend_found_by_two_checks_is_reported_once():
    """The schema's choices and the engine's backend check both refuse it: one line, not two."""
    from sparse_mim.train.config import ConfigError, compose_config, validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(compose_config(["backend=tpu"]))
    assert str(e.value) == "invalid config: backend must be one of native, minkowski, got 'tpu'"


def test_a_backend_computes_the_ops_in_its_table_and_our_engine_the_rest(monkeypatch):
    import torch

    from sparse_mim.engine import PatchCoordinateManager, SparseConv2d, SparseLayerNorm, SparseTensor
    from sparse_mim.engine import backend

    calls = []

    def conv2d(x, weight, bias, geom, groups):
        calls.append("conv2d")
        return NotImplemented  # these arguments: our engine's

    monkeypatch.setitem(backend._BACKENDS, "probe", backend.Backend("probe", ops={"conv2d": conv2d}))
    manager = PatchCoordinateManager(torch.ones(1, 1, 2, dtype=torch.bool), 32)
    x = SparseTensor(torch.randn(manager.num_rows(4), 3, dtype=torch.float64), manager=manager, stride=4)
    conv, norm = SparseConv2d(3, 3, 3, padding=1).double(), SparseLayerNorm(3).double()
    want = norm(conv(x)).features
    with use_settings(backend="probe"):
        got = norm(conv(x)).features
    assert calls == ["conv2d"]
    assert torch.equal(got, want)
