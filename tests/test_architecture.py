"""The import contracts in ``.importlinter`` (layers, and no cycle inside a subpackage) hold: the same
check as ``lint-imports`` in CI, one test per contract, so the README's test command fails too when
an import breaks the architecture."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"
PREFIX = "importlinter:contract:"


def _contract_ids():
    parser = configparser.ConfigParser()
    parser.read(CONFIG, encoding="utf-8")
    return [section[len(PREFIX):] for section in parser.sections() if section.startswith(PREFIX)]


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, *args, "--no-cache", "--no-logo"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("contract", _contract_ids())
def test_import_contract_is_kept(contract):
    done = _lint_imports("--contract", contract)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_layer_order_fails_the_check(tmp_path):
    """The check can fail: the real layers upside down (the engine above the CLI) are reported broken."""
    upside_down = tmp_path / "upside_down.ini"
    upside_down.write_text("[importlinter]\nroot_packages =\n    sparse_mim\n    backbones\n\n"
                           "[importlinter:contract:upside-down]\nname = upside down\ntype = layers\n"
                           "layers =\n    sparse_mim.engine\n    sparse_mim.cli\n", encoding="utf-8")
    done = _lint_imports("--config", str(upside_down))
    assert done.returncode != 0 and "BROKEN" in done.stdout
