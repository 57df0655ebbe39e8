"""sparsify()'s dry run: unsupported glue is refused at sparsify() time (every place at once), the
head is what runs after the last feature map (execution order), a sparse encoder that differs from
the dense model is refused, and torchvision models need no feature_modules."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from backbones import sparsify
from sparse_mim.engine import UnsupportedLayerError, UnsupportedOperationError
from sparse_mim.engine.errors import SparsifyMismatchError

from conftest import assert_close, patch_mask
from test_backbones import randomize
from test_sparsify import dense_features

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Stage(nn.Module):
    """conv (stride 2) -> BN -> the model's shared activation, given at call time."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x, act):
        return act(self.bn(self.conv(x)))


class LateActNet(nn.Module):
    """A user's CNN whose activation and a mid-network norm are registered LAST, after the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stages = nn.ModuleList([Stage(8, 16), Stage(16, 24), Stage(24, 32), Stage(32, 40)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(40, 10)
        self.act = nn.GELU()            # used by every stage
        self.norm = nn.GroupNorm(4, 24)  # used after the second stage

    def forward(self, x):
        x = self.act(self.stem(x))
        for i, stage in enumerate(self.stages):
            x = stage(x, self.act)
            if i == 1:
                x = self.norm(x)
        return self.fc(self.pool(x).flatten(1))


FEATURES = ["stages.0", "norm", "stages.2", "stages.3"]  # the norm, run last, gives the stride-8 map


def test_a_late_registered_module_used_mid_network_is_kept_and_only_the_head_dropped():
    sparse = sparsify(LateActNet())
    assert sparse.dropped_head == ["pool", "fc"]
    assert isinstance(sparse.act, nn.GELU) and "norm.weight" in sparse.state_dict()
    assert sparse.feature_modules == FEATURES


def test_a_late_registered_layer_without_a_sparse_counterpart_used_mid_network_is_refused_not_dropped():
    model = LateActNet()
    model.norm = nn.InstanceNorm2d(24)
    with pytest.raises(UnsupportedLayerError, match=r"norm \(torch.nn.modules.instancenorm.InstanceNorm2d\)"):
        sparsify(model)
    assert isinstance(model.norm, nn.InstanceNorm2d) and isinstance(model.fc, nn.Linear)  # nothing dropped


def test_late_registered_module_all_visible_equals_the_dense_model_forward_and_gradients():
    dense = LateActNet().to(DT)
    randomize(dense)
    sparse = sparsify(copy.deepcopy(dense))
    dense.train(), sparse.train()
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = sparse(xs), dense_features(dense, FEATURES, xd)
    probes = [torch.randn_like(t) for t in theirs]
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.dense(), b, 1e-10, f"level {level}")
    names = [n for n, _ in sparse.named_parameters()]
    params = dict(dense.named_parameters())
    ga = torch.autograd.grad(sum((o.dense() * p).sum() for o, p in zip(ours, probes)), [xs] + list(sparse.parameters()))
    gb = torch.autograd.grad(sum((o * p).sum() for o, p in zip(theirs, probes)), [xd] + [params[n] for n in names])
    for n, a, b in zip(["input"] + names, ga, gb):
        assert_close(a, b, 1e-10, f"grad {n}")


def test_late_registered_module_masked_equals_the_masked_dense_reference_forward_and_gradients():
    dense = LateActNet().to(DT)
    randomize(dense)
    sparse = sparsify(dense).train()
    mask = patch_mask("random", 2, (2, 3))
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    outs, grads = [], []
    for ref in (False, True):
        xi = x.clone().requires_grad_()
        feats = [f.dense() for f in sparse(xi, mask, dense_reference=ref)]
        outs.append(feats)
        grads.append(torch.autograd.grad(sum((f ** 2).mean() for f in feats), [xi] + list(sparse.parameters())))
    for level, (a, b) in enumerate(zip(*outs)):
        assert_close(a, b, 1e-10, f"level {level}")
    for n, a, b in zip(["input"] + [n for n, _ in sparse.named_parameters()], *grads):
        assert_close(a, b, 1e-10, f"grad {n}")


def test_the_dry_run_leaves_parameters_buffers_modes_and_random_state_as_they_were():
    model = LateActNet()
    model.stages[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    sparse = sparsify(model)
    drawn = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(3))
    after = sparse.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items() if k in after)
    assert sparse.training and model.training and model.stages[0].training and not model.stages[1].bn.training


class Gate(nn.Module):
    """Uses two ops with no sparse meaning: a spatial flip and a spatial softmax."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(x) * torch.flip(x, dims=(3,)).softmax(dim=2)


class TwoBadOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stages = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), Gate(8), nn.Conv2d(8, 8, 3, 2, 1),
                                    nn.Conv2d(8, 8, 3, 2, 1), Gate(8), nn.Conv2d(8, 8, 3, 2, 1))

    def forward(self, x):
        return self.stages(self.stem(x))


def test_every_unsupported_glue_op_is_named_with_its_module_at_sparsify_time():
    with pytest.raises(UnsupportedOperationError) as e:
        sparsify(TwoBadOps(), ["stages.1", "stages.2", "stages.4", "stages.5"])
    assert e.value.layers == [("stages.1", "torch.flip"), ("stages.1", "torch.Tensor.softmax"),
                              ("stages.4", "torch.flip"), ("stages.4", "torch.Tensor.softmax")]
    lines = str(e.value).splitlines()
    assert lines[0] == "4 glue operation(s) in the forward of TwoBadOps cannot run sparsely:"
    assert lines[1].startswith("  stages.1 (Gate): torch.flip: ")
    assert "sparse_mim.engine.dispatch" in lines[-1]


def test_a_sparse_layer_that_computes_something_else_is_refused_naming_the_map_and_module(monkeypatch):
    from sparse_mim.engine import nn as snn
    right = snn.SparseGroupNorm.forward
    monkeypatch.setattr(snn.SparseGroupNorm, "forward", lambda self, x: right(self, x) * 1.01)
    with pytest.raises(SparsifyMismatchError, match=r"feature map 'norm' differs .* first module whose output "
                                                    r"differs is norm \(SparseGroupNorm\)"):
        sparsify(LateActNet())


@pytest.mark.parametrize("name, make, expected", [
    ("resnet18", lambda: torchvision.models.resnet18(), ["layer1", "layer2", "layer3", "layer4"]),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(),
     ["features.1", "features.3", "features.8", "features"]),
    ("regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(),
     ["trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output"]),
])
def test_torchvision_feature_maps_are_found_and_equal_the_dense_model(name, make, expected):
    dense = make().to(DT).eval()
    randomize(dense)
    sparse = sparsify(copy.deepcopy(dense)).eval()
    assert sparse.feature_modules == expected
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    with torch.no_grad():
        for level, (a, b) in enumerate(zip(sparse(x), dense_features(dense, expected, x))):
            assert_close(a.dense(), b, 1e-10, f"{name} level {level}")


def test_a_timm_features_only_model_is_checked_against_its_own_feature_list():
    import timm
    dense = timm.create_model("resnet18", features_only=True).to(DT).eval()
    randomize(dense)
    sparse = sparsify(copy.deepcopy(dense)).eval()
    assert sparse.feature_modules == [] and sparse.dropped_head == []
    x = torch.randn(2, 3, 64, 64, dtype=DT)
    with torch.no_grad():
        for level, (a, b) in enumerate(zip(sparse(x), dense(x)[1:])):
            assert_close(a.dense(), b, 1e-10, f"level {level}")
