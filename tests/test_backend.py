"""The backend switch itself (no MinkowskiEngine needed): clear errors, no import-time shims, and the
native default untouched."""
import subprocess
import sys

import pytest

from backbones import create_backbone
from sparse_mim.engine import backend as backend_module
from sparse_mim.engine import current_backend, use_backend


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'mink'; choose one of native, minkowski"):
        create_backbone("resnet18", backend="mink")


def test_minkowski_without_minkowskiengine_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(backend_module, "_ME", None)
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    with pytest.raises(backend_module.MinkowskiUnavailableError) as e:
        create_backbone("resnet18", backend="minkowski")
    msg = str(e.value)
    assert "libopenblas-dev" in msg and "pip install --no-build-isolation MinkowskiEngine==0.5.4" in msg
    assert current_backend() == "native"


def test_importing_the_package_patches_nothing_in_collections():
    code = ("import collections, sparse_mim, backbones, sparse_mim.engine, sparse_mim.convert; "
            "print(hasattr(collections, 'Sequence'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_native_is_the_default_and_use_backend_restores_it():
    assert create_backbone("resnet18").backend == "native"
    assert current_backend() == "native"
    with use_backend("native"):
        assert current_backend() == "native"
    assert current_backend() == "native"


def test_pretrain_and_bench_configs_reject_an_unknown_backend():
    from sparse_mim.bench.config import BenchConfigError, compose_bench_config, resolve
    from sparse_mim.train.config import ConfigError, compose_config, validate_config

    with pytest.raises(ConfigError, match="backend must be one of native, minkowski, got 'tpu'"):
        validate_config(compose_config(["backend=tpu"]))
    with pytest.raises(BenchConfigError, match="backend must be one of native, minkowski"):
        resolve(compose_bench_config(["backend=[native,tpu]", "device=cpu"]))
    assert resolve(compose_bench_config(["device=cpu"])).backends == ("native",)
