"""What every command shares through sparse_mim.configs: unknown keys are errors (with a
suggestion), --help shows each key with its YAML comment, and a closed pipe ends output quietly."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.runs import REPO, env

from sparse_mim.bench.config import BenchConfigError, compose_bench_config
from sparse_mim.cli import main
from sparse_mim.configs import yaml_comments
from sparse_mim.train import ConfigError, compose_config, validate_config


@pytest.mark.parametrize("override", ["train.batchsize=8", "+train.batchsize=8", "++train.batchsize=8"])
def test_a_typo_in_a_pretrain_key_is_an_error_with_or_without_plus_and_names_the_key_meant(override):
    with pytest.raises(ConfigError, match=r"unknown setting train\.batchsize \(did you mean train\.batch_size\?\)"):
        compose_config([override])


def test_a_typo_in_a_bench_key_is_an_error_naming_the_key_meant():
    with pytest.raises(BenchConfigError, match=r"unknown setting batchsize \(did you mean batch_size\?\)"):
        compose_bench_config(["+batchsize=3"])


def test_known_keys_and_config_groups_still_compose():
    cfg = compose_config(["preset=imagenet", "train.batch_size=8", "model=resnet50"])
    assert cfg.train.batch_size == 8 and cfg.train.epochs == 1600 and cfg.model == "resnet50"
    assert compose_bench_config(["batch_size=2", "models=[resnet18]"]).batch_size == 2
    with pytest.raises(ConfigError, match=r"presets \(did you mean preset\?\)"):
        compose_config(["presets=imagenet"])


@pytest.mark.parametrize("command, setting, comment", [
    ("pretrain", "train.batch_size=16", "global batch over all processes"),
    ("pretrain", "train.max_steps=null", "warmup takes the share warmup_epochs / epochs"),
    ("pretrain", "preset=imagenet", "SparK's ImageNet-1k pretraining recipe"),
    ("bench", "repeats=5", "timed iterations per variant"),
])
def test_help_prints_each_key_with_the_comment_of_its_yaml(capsys, command, setting, comment):
    assert main([command, "--help"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(setting))
    assert comment in line


def test_yaml_comments_follow_nesting_and_continuation_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1   # first\n          # and more\nb:\n  c: x  # nested\n  d: 2\n# section\ne: 3\n")
    assert yaml_comments(path) == {"a": "first and more", "b.c": "nested"}


def test_help_piped_into_a_reader_that_stops_ends_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "sparse_mim", "pretrain", "--help"], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` having exited before the help is written
    stderr = proc.communicate(timeout=600)[1].decode()
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


def test_image_size_of_one_patch_gets_advice_that_can_be_followed():
    with pytest.raises(ConfigError) as e:
        validate_config(compose_config(["data.img_size=32"]))
    assert "data.img_size=64 or larger" in str(e.value) and "at most 0" not in str(e.value)
    with pytest.raises(ConfigError, match=r"mask_ratio <= 0\.75, or data\.img_size=96 or larger"):
        validate_config(compose_config(["mask_ratio=0.9"]))
