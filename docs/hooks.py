"""mkdocs hooks: the tables that must not drift from the code are written at build time.

A page asks for one with an HTML comment on a line of its own:

    <!-- gen:settings pretrain -->      every key of configs/pretrain.yaml, its default and its comment
                                        (the same source as `sparse-mim pretrain --help`)
    <!-- gen:supported-layers -->       the dense layer types `sparsify` swaps for sparse counterparts
    <!-- gen:errors -->                 every public exception class of the package, with its docstring
    <!-- gen:include PATH -->           a repository file (e.g. benchmarks/RESULTS.md), links adapted

Anything that cannot be generated is logged as a warning, which fails `mkdocs build --strict`.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
log = logging.getLogger("mkdocs.plugins.sparse_mim")
_MARKER = re.compile(r"^<!-- gen:([\w-]+)\s*([^\s>]*)\s*-->$", re.MULTILINE)
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _cell(text: str) -> str:
    """Plain text as one markdown table cell: no HTML tags, emphasis or column breaks by accident."""
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("|", "\\|")):
        text = text.replace(char, escaped)
    return text.replace("\n", " ")


def settings_table(config_name: str) -> str:
    """Key | default | meaning for ``configs/<config_name>.yaml``, from the same composed config and YAML
    comments that ``sparse-mim <config_name> --help`` prints; then the config groups (presets)."""
    from omegaconf import OmegaConf

    from sparse_mim import configs

    path = configs.config_dir() / f"{config_name}.yaml"
    cfg = configs.compose(config_name, [], ValueError, "")
    comments = configs.yaml_comments(path)
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                rows.append(f"| `{prefix}{key}` | `{configs._as_override(value).replace('|', chr(92) + '|')}` | "
                            f"{_cell(comments.get(prefix + key, ''))} |")

    walk(OmegaConf.to_container(cfg, resolve=False))
    out = "\n".join(rows)
    for group, default in configs._groups(path).items():
        options = sorted((configs.config_dir() / group).glob("*.yaml"))
        lines = [f"\n\n`{group}=NAME` selects `configs/{group}/NAME.yaml` (default: "
                 f"`{configs._as_override(default)}`):\n", f"| {group} | what it sets |", "|---|---|"]
        for option in options:
            header = " ".join(t.strip() for t in configs._header(option)).strip()
            lines.append(f"| `{option.stem}` | {_cell(header)} |")
        out += "\n".join(lines)
    return out


def supported_layers_table() -> str:
    """The dense layer types ``sparsify`` swaps, grouped by the library that defines them."""
    from sparse_mim.engine import supported_layer_types

    by_origin: dict = {}
    for name in supported_layer_types():
        origin, cls = name.split(".", 1)
        by_origin.setdefault(origin, []).append(f"`{cls}`")
    rows = ["| defined in | layer types with a sparse counterpart |", "|---|---|"]
    rows += [f"| {origin} | {', '.join(names)} |" for origin, names in by_origin.items()]
    return "\n".join(rows)


def error_classes() -> list:
    """Every public exception class defined in ``sparse_mim`` or ``backbones``: (name, module, docstring)."""
    found = {}
    for package_name in ("sparse_mim", "backbones"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:  # an optional dependency missing: that module's errors cannot be listed
                continue
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, Exception) and not name.startswith("_")
                        and obj.__module__ == info.name):
                    found[name] = (name, info.name, inspect.cleandoc(obj.__dict__.get("__doc__") or ""))
    return sorted(found.values())


def errors_table(page_markdown: str) -> str:
    rows = ["| error | raised by | what it means |", "|---|---|---|"]
    for name, module, doc in error_classes():
        if not re.search(rf"^### `?{name}`?\s*$", page_markdown, re.MULTILINE):
            log.warning(f"troubleshooting: no '### {name}' section for the exception class {module}.{name}")
        rows.append(f"| [`{name}`](#{name.lower()}) | `{module}` | {_cell(doc.split(chr(10) + chr(10))[0])} |")
    return "\n".join(rows)


def include(relative: str, page_file: str) -> str:
    """A repository file's markdown; links that point to pages or assets of the site are rewritten,
    others become plain text naming the repository path."""
    source = ROOT / relative
    if not source.is_file():
        log.warning(f"{page_file}: gen:include of a missing file {relative}")
        return ""
    page_dir = (DOCS / page_file).parent

    def rewrite(match):
        bang, text, target = match.groups()
        if re.match(r"^[a-z]+://|^#", target):
            return match.group(0)
        resolved = (source.parent / target.split("#")[0]).resolve()
        try:
            in_docs = resolved.relative_to(DOCS)
        except ValueError:
            shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else target
            return f"{text} (`{shown}`)"
        rel = Path(*([".."] * len(page_dir.relative_to(DOCS).parts)), in_docs).as_posix()
        return f"{bang}[{text}]({rel})"

    return _LINK.sub(rewrite, source.read_text())


def on_page_markdown(markdown, page, config, files):
    def generate(match):
        what, argument = match.group(1), match.group(2)
        try:
            if what == "settings":
                return settings_table(argument)
            if what == "supported-layers":
                return supported_layers_table()
            if what == "errors":
                return errors_table(markdown)
            if what == "include":
                return include(argument, page.file.src_path)
        except Exception as e:  # a generator that fails must fail the strict build, with the reason
            log.warning(f"{page.file.src_path}: gen:{what} {argument} failed: {type(e).__name__}: {e}")
            return ""
        log.warning(f"{page.file.src_path}: unknown generator gen:{what}")
        return ""

    return _MARKER.sub(generate, markdown)
