"""`sparse-mim convert <checkpoint> --to timm|torchvision|detectron2|minkowski [--arch NAME] --out FILE`.

The source's layout is detected: sparse-mim and official-SparK checkpoints, timm/official ConvNeXt
names, ConvNeXt V2 FCMAE checkpoints and MinkowskiEngine-layout weights (see `reader.py`).
`--arch` defaults to the arch the checkpoint records; given, it must agree with it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparse_mim.runtime.atomic import atomic_write

from .archs import ARCHS, get_arch
from .errors import ConversionError
from .layouts.fcmae import FCMAE_DECODER_GROUPS
from .reader import SPARSE_MIM, read
from .targets.detectron2 import DETECTRON2_ARCHS, detectron2_config_hints, detectron2_notes, to_detectron2
from .targets.minkowski import official_fcmae_decoder, to_minkowski
from .targets.timm import to_timm
from .targets.torchvision import TORCHVISION_ARCHS, to_torchvision, torchvision_classifier_keys
from .timm_keys import timm_classifier_keys
from .writers import STATE_DICT_SUFFIXES, save_state_dict

_SUFFIXES = {"timm": STATE_DICT_SUFFIXES, "torchvision": STATE_DICT_SUFFIXES, "detectron2": (".pkl",),
             "minkowski": (".pth", ".pt")}
_ARCHS = {"timm": tuple(ARCHS), "torchvision": TORCHVISION_ARCHS, "detectron2": DETECTRON2_ARCHS,
          "minkowski": tuple(ARCHS)}


def _supported(to: str) -> tuple[str, ...] | None:
    """The archs `--to` accepts; None for timm, which takes any timm model name (sparsified encoders)."""
    return None if to == "timm" else _ARCHS[to]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-mim convert",
        description="Export the pretrained encoder of a sparse-mim checkpoint for fine-tuning. Sources may "
        "also be official-SparK or ConvNeXt V2 FCMAE checkpoints and MinkowskiEngine-layout weights "
        "(detected). --to minkowski writes MinkowskiEngine's layout (FCMAE's for ConvNeXt V2).",
    )
    parser.add_argument("checkpoint", help="pretraining checkpoint or encoder state_dict "
                        "(.pth, .pt or .safetensors)")
    parser.add_argument("--to", required=True, choices=tuple(_SUFFIXES), help="target naming / layout")
    parser.add_argument("--arch", metavar="NAME",
                        help="timm name of the backbone; default: the arch the checkpoint records (an --arch "
                        "that contradicts it is an error). "
                        + "; ".join(f"--to {to}: {', '.join(archs)}" for to, archs in _ARCHS.items())
                        + " (--to timm also takes any timm model name pretrained through sparsify)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output file: .pth/.pt/.safetensors (timm, torchvision), .pkl "
                        "(detectron2) or .pth/.pt (minkowski)")
    return parser


def _convert(args: argparse.Namespace) -> None:
    # refuse what cannot work before reading a possibly large checkpoint
    if args.arch is not None:
        get_arch(args.arch, target=args.to, supported=_supported(args.to))
    suffixes = _SUFFIXES[args.to]
    if args.out.suffix not in suffixes:
        raise ConversionError(
            f"--to {args.to} writes {' or '.join(suffixes)} files, got --out {args.out}"
        )
    ckpt = read(args.checkpoint, args.arch)
    if ckpt.arch is None:
        raise ConversionError(f"{args.checkpoint} does not record its architecture; pass --arch NAME "
                              f"(--to {args.to}: {', '.join(_ARCHS[args.to])})")
    args.arch = get_arch(ckpt.arch, target=args.to, supported=_supported(args.to)).name
    state_dict, dropped = ckpt.encoder, ckpt.dropped

    if args.to == "detectron2":
        written = to_detectron2(state_dict, args.arch, args.out)["model"]
        left_to_target = []
    elif args.to == "minkowski":
        written = to_minkowski(state_dict, args.arch)
        if ckpt.source == SPARSE_MIM and ckpt.method == "fcmae":  # our FCMAE run is written whole
            written.update(official_fcmae_decoder(ckpt.weights))
            dropped = {g: n for g, n in dropped.items() if g not in FCMAE_DECODER_GROUPS}
        atomic_write(args.out, lambda tmp: torch.save({"model": written, "arch": args.arch}, tmp))
        left_to_target = timm_classifier_keys(args.arch)
    else:
        convert = to_timm if args.to == "timm" else to_torchvision
        written = convert(state_dict, args.arch)
        save_state_dict(written, args.out, metadata={"arch": args.arch, "key_names": args.to})
        classifier_keys = timm_classifier_keys if args.to == "timm" else torchvision_classifier_keys
        left_to_target = classifier_keys(args.arch)

    described = "MinkowskiEngine layout" if args.to == "minkowski" else f"{args.to} names"
    print(f"wrote {len(written)} tensors ({described}, {args.arch}) to {args.out}")
    if dropped:
        groups = (f"{group} ({n} tensor{'' if n == 1 else 's'})" for group, n in dropped.items())
        print("dropped: " + ", ".join(groups))
    if left_to_target:
        print(f"not included, the target model initialises them: {', '.join(left_to_target)}")
    if args.to == "detectron2":
        print("matching Detectron2 config:")
        for key, value in detectron2_config_hints(args.arch).items():
            print(f"  {key}: {value}")
        print(f"  MODEL.WEIGHTS: {args.out.resolve()}")
        for note in detectron2_notes(args.arch):
            print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the exit code (0 ok, 2 for any error, reported on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error (or --help)
        return int(e.code or 0)
    try:
        _convert(args)
    except (ConversionError, OSError) as e:
        print(f"sparse-mim convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
