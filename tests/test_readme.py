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


def test_readme_is_the_short_path_with_one_copy_of_each_section() -> None:
    text = README.read_text()
    headings = re.findall(r"^#+ .+$", text, flags=re.MULTILINE)
    assert len(headings) == len(set(headings)), (
        f"repeated headings: {sorted(h for h in headings if headings.count(h) > 1)}"
    )
    assert text.count("| scenario |") == 0, "the benchmark table lives in docs/benchmarks.md, not in the README"
    performance = text.split("## Performance", 1)[1].split("\n## ", 1)[0]
    bullets = [line for line in performance.splitlines() if line.startswith("* ")]
    assert 1 <= len(bullets) <= 5 and "docs/benchmarks.md" in performance
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (README.parent / link).is_file(), f"the README links to {link}, which does not exist"


def test_readme_flags_are_the_clis() -> None:
    from sandboxd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("serve", "agent"):
        block = re.search(rf"```\nsandboxd {command} (.*?)```", README.read_text(), flags=re.DOTALL)
        assert block is not None, f"the README shows no `sandboxd {command}` usage"
        known = {flag for action in commands[command]._actions for flag in action.option_strings}
        usage = block.group(1).split("\nsandboxd ")[0]  # up to the next command shown in the same block
        for flag in re.findall(r"--[a-z-]+", usage):
            assert flag in known, f"the README shows `sandboxd {command} {flag}`, which the CLI does not take"
