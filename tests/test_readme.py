"""The README's Python examples run against a real runtime, so the README stays true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import Runtime

README = Path(__file__).parent.parent / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_examples_run(runtime: Runtime) -> None:
    blocks = code_blocks("python")
    assert blocks, "the README has no Python example"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], env=runtime.env(), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "hello from sandboxd" in result.stdout


def test_readme_names_the_commands_that_exist() -> None:
    from sandboxd.cli import build_parser

    help_text = build_parser().format_help()
    for command in ("serve", "agent", "template"):
        assert command in help_text
    assert "pip install . && sandboxd serve" in README.read_text()
    assert "make test" in README.read_text()
