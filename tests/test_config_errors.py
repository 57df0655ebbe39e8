"""Every kind of bad setting, for every command, as a user meets it on the command line: an unknown
key, a value of the wrong type, a value out of range and two settings that do not go together each
end the command with exit code 2 and one line that names the key and what to write instead.

The schema (sparse_mim.config_schema) and the rules (sparse_mim.config_rules) are exercised through
``sparse_mim.cli.main``, the function behind the ``sparse-mim`` command."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sparse_mim.cli import main
from sparse_mim.config_schema import setting_errors
from sparse_mim.configs import compose

CASES = {
    "unknown key": {
        "pretrain": (["train.epoch=3"], ["train.epoch", "did you mean train.epochs?"]),
        "finetune": (["augment.mix_up=0.2"], ["augment.mix_up", "did you mean augment.mixup?"]),
        "bench": (["repeat=3"], ["repeat", "did you mean repeats?"]),
    },
    "wrong type": {
        "pretrain": (["train.epochs=many"], ["train.epochs must be an integer >= 1, got 'many'"]),
        "finetune": (["train.sync_bn=maybe"], ["train.sync_bn must be true or false, got 'maybe'"]),
        "bench": (["threads=two"], ["threads must be null or an integer >= 1, got 'two'"]),
    },
    "out of range": {
        "pretrain": (["data.wait_warning=1.5"], ["data.wait_warning must be null or a share in (0, 1), got 1.5",
                                                 "e.g. data.wait_warning=0.2"]),
        "finetune": (["data.label_fraction=0"], ["data.label_fraction must lie in (0, 1], got 0.0",
                                                 "e.g. data.label_fraction=0.1"]),
        "bench": (["decoder_width=48"], ["decoder_width must be an integer >= 1 and a multiple of 32, got 48"]),
    },
    "settings that do not go together": {
        "pretrain": (["train.epochs=2", "train.warmup_epochs=3"],
                     ["train.warmup_epochs must lie in [0, train.epochs=2], got 3"]),
        "finetune": (["augment.crop_scale=[0.9,0.5]"], ["augment.crop_scale must be [low, high] with low <= high",
                                                        "e.g. augment.crop_scale=[0.2,1.0]"]),
        "bench": (["what=[loader,encoder]", "data_path=."], ["what=loader runs alone"]),
    },
}
REQUIRED = {"pretrain": [], "finetune": ["data.path=."], "bench": ["device=cpu"]}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "bench"])
@pytest.mark.parametrize("kind", list(CASES))
def test_a_bad_setting_is_one_line_naming_the_key_and_the_fix(capsys, tmp_path, kind, command):
    overrides, expected = CASES[kind][command]
    code = main([command, *REQUIRED[command], f"output_dir={tmp_path / 'out'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"sparse-mim {command}: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune", "bench"])
def test_several_bad_settings_are_listed_together(capsys, tmp_path, command):
    bad = {"pretrain": ["train.log_every=0", "train.keep_checkpoints=0"],
           "finetune": ["train.eval_every=0", "knn.k=0"],
           "bench": ["repeats=0", "loader_batches=0"]}[command]
    assert main([command, *REQUIRED[command], f"output_dir={tmp_path / 'out'}", *bad]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("config:") and len(lines) == 3
    assert all(f"{override.split('=')[0]} must be an integer >= 1, got 0" in line
               for override, line in zip(bad, lines[1:]))


@pytest.mark.parametrize("command", ["pretrain", "finetune", "bench"])
def test_every_key_of_the_schema_has_its_value_in_the_yaml(command):
    """A key only in the YAML fails to compose; one only in the schema would stay ``???`` (required)."""
    cfg = OmegaConf.to_container(compose(command, [], ValueError, ""), resolve=False)
    required = {"finetune": ["data.path"]}.get(command, [])
    assert [key for key, value in _flat(cfg).items() if value == "???"] == required


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("preset", ["imagenet", "imagenet_384", "fcmae_imagenet"])
def test_every_preset_is_within_the_schema(preset):
    assert setting_errors("pretrain", compose("pretrain", [f"preset={preset}"], ValueError, "")) == []
