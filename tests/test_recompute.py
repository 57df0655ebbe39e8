"""BatchNorm -> ReLU outputs rebuilt in backward (engine.recompute) in a sparsified model: its own
``nn.ReLU`` takes the same path as a hand-tuned backbone's activation, changes no value, and frees
the activation (float64, CPU)."""
import pytest
import timm
import torch
import torch.nn as nn

from backbones import sparsify
from sparse_mim.engine import recompute, use_settings

from conftest import patch_mask

DT = torch.float64


@pytest.fixture(scope="module")
def encoder():
    """timm's ResNet-18, sparsified, float64, training mode (the recompute path is a training one)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # no zero-initialised last norms: every branch carries signal
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return sparsify(model).train()


def run(encoder, enabled: bool):
    """Feature maps and the gradients of input and weights, with recompute on or off."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96, dtype=DT, requires_grad=True)
    mask = patch_mask("random", 2, (2, 3), torch.Generator().manual_seed(2))
    with use_settings(recompute=enabled):
        feats = [f.dense() for f in encoder(x, mask)]
    probes = [torch.randn_like(f) for f in feats]
    grads = torch.autograd.grad(sum((f * p).sum() for f, p in zip(feats, probes)), [x] + list(encoder.parameters()))
    return feats, grads


def test_recompute_in_a_sparsified_model_changes_no_output_or_gradient(encoder):
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    on = run(encoder, True)
    encoder.load_state_dict(state)  # the same running statistics for the second run
    off = run(encoder, False)
    for a, b in zip(on[0], off[0]):
        assert torch.equal(a, b)
    for name, a, b in zip(["input"] + [n for n, _ in encoder.named_parameters()], on[1], off[1]):
        assert torch.equal(a, b), name


def _saved_bytes(encoder, enabled: bool, monkeypatch) -> int:
    """Bytes of the distinct storages kept for backward by one forward (recipes keep none of their own)."""
    kept = {}

    def note(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t):
        packed = plain_pack(t)
        if not isinstance(packed, recompute._Recipe):
            note(t)
        return packed

    plain_pack = recompute._pack
    monkeypatch.setattr(recompute, "_pack", pack)
    x = torch.randn(2, 3, 64, 96, dtype=DT)
    mask = patch_mask("random", 2, (2, 3), torch.Generator().manual_seed(2))
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: note(t) or t, lambda t: t)
    with use_settings(recompute=enabled), (hooks if not enabled else torch.enable_grad()):
        # off: autograd's own saving, counted by hooks of ours
        feats = encoder(x, mask)
    del feats
    return sum(kept.values())


def test_recompute_frees_every_relu_output_of_a_batch_norm_in_a_sparsified_model(encoder, monkeypatch):
    # timm's ResNet: the stem's act1 and each block's act1 follow a BatchNorm (act2 follows the residual add)
    relu_bytes = []
    hooks = [m.register_forward_hook(lambda mod, i, out: relu_bytes.append(out.data.untyped_storage().nbytes()))
             for name, m in encoder.named_modules() if isinstance(m, nn.ReLU) and name.split(".")[-1] == "act1"]
    off = _saved_bytes(encoder, False, monkeypatch)
    for h in hooks:
        h.remove()
    on = _saved_bytes(encoder, True, monkeypatch)
    assert len(relu_bytes) == 9
    assert on == off - sum(relu_bytes)
