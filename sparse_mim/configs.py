"""Where the Hydra configs live and how every command composes them.

The repository's top-level ``configs/`` folder is the source of truth. A development (editable)
install reads it in place; a regular install ships it as ``sparse_mim/_configs`` (see setup.py).
Every command (``sparse-mim <name>`` reads ``configs/<name>.yaml``) composes through ``compose``,
which refuses keys the YAML does not have and values of the wrong type (the YAML's first default is
its schema: sparse_mim.config_schema), and prints ``--help`` through ``help_text``, which shows
each key with the YAML comment that explains it.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Type

from omegaconf import DictConfig, OmegaConf

from .config_schema import SCHEMAS, describe, field_of, message, register

__all__ = ["ConfigError", "config_dir", "compose", "help_text", "to_plain", "yaml_comments"]


class ConfigError(ValueError):
    """The config cannot work; raised before any training starts."""


def to_plain(cfg: DictConfig) -> Dict[str, Any]:
    """``cfg`` as plain dicts and lists, interpolations resolved (what checkpoints and config.yaml record)."""
    return OmegaConf.to_container(cfg, resolve=True)


def config_dir() -> Path:
    repo = Path(__file__).resolve().parents[1] / "configs"
    return repo if repo.is_dir() else Path(__file__).resolve().parent / "_configs"


def compose(config_name: str, overrides: Sequence[str], error: Type[Exception], hint: str) -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra ``key=value`` overrides; failures raise ``error``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = config_dir()
    if not (folder / f"{config_name}.yaml").is_file():
        raise error(f"no config {config_name!r} in {folder}")
    register()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name=f"sparse-mim-{config_name}"):
            unknown = _unknown_keys(config_name, list(overrides), folder, hydra_compose)
            if unknown:
                raise error(unknown)
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        wrong_type = _wrong_type(config_name, e, overrides)
        if wrong_type:
            raise error(wrong_type) from None
        raise error(f"{e}\n(overrides are key=value with keys from {folder / config_name}.yaml{hint})") from None


def _wrong_type(config_name: str, e: Exception, overrides: Sequence[str]) -> str:
    """The one-line error for a value the schema's type refuses (``train.epochs=abc``), or ''."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import ValidationError

    while e is not None and not isinstance(e, ValidationError):
        e = e.__cause__
    key = getattr(e, "full_key", None)
    found = field_of(config_name, key) if key and config_name in SCHEMAS else None
    if found is None:
        return ""
    given = [o.value() for o in OverridesParser.create().parse_overrides(list(overrides)) if o.key_or_group == key]
    if given:
        return message(key, *found, given[-1])
    return f"{key} must be {describe(*found)}, but configs/{config_name}.yaml or its preset sets another value"


def _groups(path: Path) -> Dict[str, object]:
    """The config groups of a config's ``defaults`` list, with their defaults: ``{"preset": None}``."""
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    return {g: d for entry in defaults if isinstance(entry, dict) for g, d in entry.items()}


def _known_keys(tree, prefix: str = "") -> List[str]:
    """Every key path of a (plain) config tree, inner nodes included: ``train``, ``train.epochs``."""
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _known_keys(value, f"{prefix}{key}.")
    return keys


def _unknown_keys(config_name: str, overrides: List[str], folder: Path, hydra_compose) -> str:
    """The error for overrides whose key is not in the config ('' when all are known).

    Hydra would accept ``+new.key=value`` (and suggests it for a typo), silently training with the
    default of the key that was meant; a key must therefore already exist, with or without ``+``.
    Config groups (``preset=imagenet``: a folder of configs/) and ``hydra.*`` keys are Hydra's own.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    is_group = [(folder / o.key_or_group.replace(".", "/")).is_dir() for o in parsed]
    keys = [o for o, group in zip(parsed, is_group) if not group and o.key_or_group.split(".")[0] != "hydra"]
    if not keys:
        return ""
    groups = [text for text, group in zip(overrides, is_group) if group]
    base = OmegaConf.to_container(hydra_compose(config_name=config_name, overrides=groups), resolve=False)
    known = _known_keys(base)
    candidates = known + list(_groups(folder / f"{config_name}.yaml"))
    problems = []
    for o in keys:
        if o.key_or_group in known:
            continue
        close = difflib.get_close_matches(o.key_or_group, candidates, n=1, cutoff=0.6)
        problems.append(f"{o.key_or_group}" + (f" (did you mean {close[0]}?)" if close else ""))
    if not problems:
        return ""
    return (f"unknown setting{'s' if len(problems) > 1 else ''} {', '.join(problems)}: every key must be one "
            f"of {folder / config_name}.yaml, with or without a leading '+' (`sparse-mim {config_name} --help` "
            f"lists them)")


# -- --help: every key with the comment that explains it in the YAML --------------------------------
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w-]*)\s*:(.*)$")
_TRAILING_COMMENT = re.compile(r"\s#\s?(.*)$")


def yaml_comments(path: str | Path) -> Dict[str, str]:
    """``{"train.epochs": "comment", ...}`` from a config file: the text after `` #`` on a key's line,
    continued by comment-only lines indented deeper than the key (as in configs/pretrain.yaml)."""
    comments: Dict[str, str] = {}
    stack: List[tuple] = []  # (indent, key) of the enclosing keys
    current, current_indent = None, 0
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if current is not None and indent > current_indent:
                text = stripped.lstrip("#").strip()
                comments[current] = f"{comments.get(current, '')} {text}".strip()
            else:
                current = None
            continue
        match = _KEY_LINE.match(line)
        if not match:
            current = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match[2]])
        stack.append((indent, match[2]))
        current, current_indent = key, indent
        trailing = _TRAILING_COMMENT.search(match[3])
        if trailing:
            comments[key] = trailing[1].strip()
    return comments


def _header(path: Path) -> List[str]:
    """The comment block a config file starts with (without Hydra's ``@package`` line)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].removeprefix(" ")
        if not text.startswith("@package"):
            lines.append(text)
    return lines


def _as_override(value) -> str:
    """A value the way it is typed on the command line (``null``, ``true``, ``[a,b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    return str(value)


def help_text(config_name: str, cfg: DictConfig, usage: str) -> str:
    """``--help`` of the command reading ``configs/<config_name>.yaml``: its header, every key as
    ``key=value`` (the values of ``cfg``, i.e. after the given overrides) with its comment, and the
    config groups of its ``defaults`` list with their options."""
    path = config_dir() / f"{config_name}.yaml"
    comments = yaml_comments(path)
    flat: Dict[str, object] = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=False))
    settings = [f"{k}={_as_override(v)}" for k, v in flat.items()]
    width = min(max(map(len, settings), default=0), 44)
    lines = [usage, "", *_header(path), "", f"settings (key=value; defaults from {path}):"]
    for (key, _), setting in zip(flat.items(), settings):
        comment = comments.get(key, "")
        lines.append(f"  {setting:<{width}}  {comment}".rstrip() if len(setting) <= width or not comment
                     else f"  {setting}\n  {'':<{width}}  {comment}")
    for group, default in _groups(path).items():
        lines += ["", f"{group}=NAME (configs/{group}/NAME.yaml; default: {_as_override(default)}):"]
        for option in sorted((config_dir() / group).glob("*.yaml")):
            header = [t.strip() for t in _header(option)]
            start = next((i for i, t in enumerate(header) if t), len(header))
            end = next((i for i in range(start, len(header)) if not header[i]), len(header))
            first = " ".join(header[start:end])  # the first paragraph
            lines.append(f"  {group}={option.stem:<{max(width - len(group) - 1, 0)}}  {first}".rstrip())
    return "\n".join(lines) + "\n"
