"""The agent works in any template, whatever it contains: the runtime provides it from the host (forked
from the zygote, which preloaded it), so a template needs no Python, no bash, nothing of ours.

Templates assembled here: ``tiny`` (busybox from Debian's busybox-static, no bash, no Python) and
``noshell`` (no shell at all, like a distroless image). In a template without ``/bin/bash``,
``commands.run`` (which starts ``/bin/bash -l -c``) runs ``/bin/sh -l -c`` instead; without any shell
it fails with a message saying so, and files and watches still work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_TOOLS, Runtime, require, sandboxd_template
from e2b import CommandExitException, FilesystemEventType, InvalidArgumentException, Sandbox

BUSYBOX = TEST_TOOLS / "busybox-static" / "bin" / "busybox"


def _skeleton(root: Path) -> None:
    for name, mode in (("tmp", 0o1777), ("root", 0o700), ("home/user", 0o755), ("proc", 0o555), ("dev", 0o755)):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.chmod(root / name, mode)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    os.chown(root / "home" / "user", 1000, 1000)


def busybox_rootfs(root: Path) -> None:
    """/bin/busybox and a link per applet (sh included); no bash, no Python."""
    busybox = require(BUSYBOX, "the busybox template")
    _skeleton(root)
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)


def noshell_rootfs(root: Path) -> None:
    """A root with one static program and no shell at all."""
    busybox = require(BUSYBOX, "the no-shell template")
    _skeleton(root)
    (root / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "usr" / "bin" / "static-tool")
    (root / "etc" / "motd").write_text("no shell here\n")


@pytest.fixture(scope="module")
def tiny(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    busybox_rootfs(root)
    sandboxd_template(runtime, "add", "tiny", "--rootfs", str(root))
    return "tiny"


@pytest.fixture(scope="module")
def noshell(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("noshell")
    noshell_rootfs(root)
    sandboxd_template(runtime, "add", "noshell", "--rootfs", str(root))
    return "noshell"


@pytest.fixture
def tiny_sbx(e2b_env: Runtime, tiny: str) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(template=tiny)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _watch_sees(sbx: Sandbox, directory: str, name: str, user: str = "user") -> None:
    handle = sbx.files.watch_dir(directory, user=user)
    try:
        sbx.files.write(f"{directory}/{name}", "watched", user=user)
        deadline = time.monotonic() + 10
        seen: set[tuple[str, FilesystemEventType]] = set()
        while (name, FilesystemEventType.CREATE) not in seen:
            assert time.monotonic() < deadline, f"no CREATE for {name}: {seen}"
            seen |= {(e.name, e.type) for e in handle.get_new_events()}
            time.sleep(0.05)
    finally:
        handle.stop()


def test_busybox_template_without_bash_or_python(tiny_sbx: Sandbox) -> None:
    sbx = tiny_sbx
    # commands.run asks for /bin/bash; the template has only busybox's sh, which runs it
    result = sbx.commands.run("echo hello from $(readlink /proc/$$/exe); id -u")
    assert result.stdout == "hello from /bin/busybox\n1000\n"
    assert sbx.commands.run("id -un", user="root").stdout == "root\n"
    with pytest.raises(CommandExitException):
        sbx.commands.run("command -v bash || command -v python3 || command -v python")
    assert not sbx.files.exists("/usr/bin/python3")


def test_busybox_template_files_and_watch(tiny_sbx: Sandbox) -> None:
    sbx = tiny_sbx
    sbx.files.write("/home/user/notes/a.txt", "written by the agent")
    assert sbx.files.read("/home/user/notes/a.txt") == "written by the agent"
    assert sbx.commands.run("cat /home/user/notes/a.txt; stat -c %u /home/user/notes/a.txt").stdout == (
        "written by the agent1000\n"
    )
    assert [e.name for e in sbx.files.list("/home/user/notes")] == ["a.txt"]
    sbx.files.remove("/home/user/notes/a.txt")
    assert not sbx.files.exists("/home/user/notes/a.txt")
    _watch_sees(sbx, "/home/user", "w.txt")


def test_template_without_any_shell(e2b_env: Runtime, noshell: str) -> None:
    sbx = Sandbox.create(template=noshell)
    try:
        with pytest.raises(InvalidArgumentException) as raised:
            sbx.commands.run("echo hi")
        assert "neither /bin/bash nor /bin/sh" in str(raised.value)
        assert sbx.files.read("/etc/motd", user="root") == "no shell here\n"
        sbx.files.write("/tmp/x", "y", user="root")
        assert sbx.files.get_info("/tmp/x").size == 1
        _watch_sees(sbx, "/tmp", "seen.txt", user="root")
    finally:
        sbx.kill()
