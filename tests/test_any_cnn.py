"""The coverage table's verdicts, re-checked on a quick subset (one model per family) by the same function
the sweep (benchmarks/any_cnn.py) uses: float64, all visible vs the dense model and masked vs the
masked-dense reference, forward and gradients."""
import math

import pytest
import torch.nn as nn

from sparse_mim.bench import coverage


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", coverage.TESTED)
def test_listed_architecture_runs_exactly(key):
    result = coverage.check(coverage.find_arch(key))
    assert result.status == "exact", f"{key}: {result.status} ({result.stage} {result.module}) {result.detail}"
    assert all(e <= coverage.TOLERANCE for e in result.errors), result.errors


def test_tested_subset_is_part_of_the_sweep_and_spans_families():
    archs = [coverage.find_arch(k) for k in coverage.TESTED]
    assert all(a in coverage.ARCHS for a in archs)
    assert len({a.family for a in archs}) == len(archs)
    assert {a.source for a in archs} == {"timm", "torchvision"}


def test_a_model_that_differs_from_its_dense_self_is_reported_wrong(monkeypatch):
    """The verdict can fail: a last map off by 1e-8 (below what sparsify's own dry run refuses) is not exact."""
    from backbones import sparsified

    original = sparsified.SparsifiedBackbone.forward_features

    def off_by_a_little(self, x):
        outs = original(self, x)
        return outs[:-1] + [outs[-1] * (1 + 1e-8)]

    monkeypatch.setattr(sparsified.SparsifiedBackbone, "forward_features", off_by_a_little)
    result = coverage.check(coverage.find_arch("timm:regnetx_002"))
    assert result.status == "wrong"
    assert coverage.TOLERANCE < result.visible_error < 1e-7


def test_an_unsupported_layer_is_reported_refused_with_its_path(monkeypatch):
    real = coverage.build_dense

    def with_instance_norm(arch, dtype, seed=0):
        model = real(arch, dtype, seed)
        model.layer1[0].bn1 = nn.InstanceNorm2d(64)
        return model

    monkeypatch.setattr(coverage, "build_dense", with_instance_norm)
    result = coverage.check(coverage.find_arch("timm:resnet10t"))
    assert result.status == "refused" and result.stage == "sparsify"
    assert "layer1.0.bn1" in result.detail
    assert all(math.isnan(e) for e in result.errors)
