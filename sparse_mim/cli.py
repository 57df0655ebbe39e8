"""The ``sparse-mim`` command (also ``python -m sparse_mim``).

    sparse-mim pretrain [key=value ...]     SparK pretraining (configs/pretrain.yaml; torchrun for several GPUs)
    sparse-mim finetune [key=value ...]     fine-tune / linear-probe / kNN-evaluate weights (configs/finetune.yaml)
    sparse-mim convert CHECKPOINT --to ...  export the pretrained encoder for timm/torchvision/Detectron2
    sparse-mim bench [key=value ...]        sparse vs masked-dense encoder speed
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Dict, List, Optional, Sequence

USAGE = """usage: sparse-mim <command> [arguments]

commands:
  pretrain [key=value ...]   SparK pretraining with a sparse CNN encoder. Settings and their defaults:
                             configs/pretrain.yaml (`sparse-mim pretrain --help` prints them).
                             Rerunning with the same output_dir resumes. Several processes/GPUs:
                             torchrun --nproc_per_node N -m sparse_mim pretrain ...
  finetune [key=value ...]   fine-tune (mode=finetune), linear-probe (mode=linear) or kNN-evaluate
                             (mode=knn) pretrained or random weights on train/ and val/ class folders;
                             `sparse-mim finetune --help` prints the settings
  convert CHECKPOINT ...     export a pretrained encoder (timm, torchvision or Detectron2 names);
                             `sparse-mim convert --help` for the options
  bench [key=value ...]      benchmark the sparse encoder against SparK's masked-dense reference

examples:
  sparse-mim pretrain                                   # 180 steps on built-in demo images, ~3-4 min on 2 CPU cores
  sparse-mim pretrain data.path=/data/photos data.img_size=128 train.epochs=50
  sparse-mim pretrain preset=imagenet data.path=/data/imagenet model=resnet50
  sparse-mim finetune data.path=/data/imagenette weights=outputs/pretrain/resnet18/checkpoint.pth
  sparse-mim convert outputs/pretrain/resnet18/checkpoint.pth --to timm --arch resnet18 --out r18.safetensors
"""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _error(command: str, message: object, code: int) -> int:
    if _is_main_process():
        print(f"sparse-mim {command}: error: {message}", file=sys.stderr)
    return code


def _training_command(command: str, argv: Sequence[str], compose: Callable, load: Callable, usage: str) -> int:
    """A command configured by ``configs/<command>.yaml``: ``--help``, key=value overrides, one-line
    errors (bad input exit 2, a non-finite loss exit 1) and 128 + signal when a signal stopped it.

    ``--help`` and config composition errors answer before ``load()`` imports the run (torch, timm):
    it returns ``(run, exceptions that are bad input)``."""
    from sparse_mim.configs import help_text
    from sparse_mim.configs import ConfigError

    if any(a in ("-h", "--help") for a in argv):
        try:
            cfg = compose([a for a in argv if a not in ("-h", "--help")])
        except ConfigError as e:
            return _error(command, e, 2)
        print(help_text(command, cfg, usage), end="")
        return 0
    options = [a for a in argv if a.startswith("-")]
    if options:
        return _error(command, f"unknown option(s) {' '.join(options)}; settings are given as key=value "
                      f"(see sparse-mim {command} --help)", 2)
    try:
        cfg = compose(argv)
    except ConfigError as e:
        return _error(command, e, 2)
    run, bad_input = load()
    from sparse_mim.runtime.step import NonFiniteLossError

    try:
        result = run(cfg)
    except (ConfigError, *bad_input) as e:
        return _error(command, e, 2)
    except NonFiniteLossError as e:
        return _error(command, e, 1)
    if result.stopped_by is not None:
        return 128 + result.stopped_by
    return 0


def _load_pretrain():
    from sparse_mim.data import DataError
    from sparse_mim.engine import UnsupportedLayerError  # a model sparsify refuses (every layer / op listed)
    from sparse_mim.train.trainer import pretrain as run_pretrain

    return run_pretrain, (DataError, UnsupportedLayerError)


def _load_finetune():
    from sparse_mim.convert import ConversionError
    from sparse_mim.data import DataError
    from sparse_mim.finetune.run import finetune as run_finetune

    return run_finetune, (DataError, ConversionError)


def pretrain(argv: Sequence[str]) -> int:
    from sparse_mim.train.config import compose_config

    return _training_command("pretrain", argv, compose_config, _load_pretrain,
                             "usage: sparse-mim pretrain [key=value ...]   (Hydra overrides; "
                             "preset=imagenet for SparK's ImageNet recipe)")


def finetune(argv: Sequence[str]) -> int:
    from sparse_mim.finetune.config import compose_finetune_config

    return _training_command("finetune", argv, compose_finetune_config, _load_finetune,
                             "usage: sparse-mim finetune [key=value ...]   (Hydra overrides)")


def convert(argv: Sequence[str]) -> int:
    from sparse_mim.convert.cli import main as convert_main

    return convert_main(list(argv))


def bench(argv: Sequence[str]) -> int:
    try:
        from sparse_mim.bench import main as bench_main
    except ModuleNotFoundError as e:
        if e.name not in ("sparse_mim.bench",):
            raise
        return _error("bench", "the benchmark (sparse_mim.bench) is not part of this installation", 2)
    code = bench_main(list(argv))
    return int(code or 0)


COMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {"pretrain": pretrain, "finetune": finetune,
                                                        "convert": convert, "bench": bench}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``sparse-mim`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return _error(command, f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}", 2)
    try:
        code = COMMANDS[command](rest)
        sys.stdout.flush()
    except KeyboardInterrupt:
        # the run's own handler (first Ctrl-C: stop after this step and save) is installed only once
        # training starts; before that, or after a second Ctrl-C, one line instead of a traceback
        from sparse_mim.runtime.run_folder import run_started

        if run_started():
            message = "aborted by a second Ctrl-C; rerun with the same output_dir to continue from its last checkpoint"
        elif command in ("pretrain", "finetune"):
            message = "interrupted during start-up (Ctrl-C); nothing was written"
        else:  # bench and convert write their files at the end (convert atomically)
            message = "interrupted (Ctrl-C); nothing was written"
        return _error(command, message, 128 + signal.SIGINT)
    except BrokenPipeError:
        # the reader went away (`sparse-mim pretrain --help | head`): stop quietly like other Unix
        # tools; stdout goes to devnull so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
