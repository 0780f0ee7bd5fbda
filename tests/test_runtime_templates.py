"""Templates other than the built-in one (a rootfs directory and a tarball), and limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox


def _minimal_rootfs(root: Path, marker: str) -> None:
    """bash, the libraries it links, and an /etc: the smallest root a command can run in."""
    bash = Path(shutil.which("bash") or "/bin/bash").resolve()
    libs = [line.split()[-2] if "=>" in line else line.split()[0] for line in _ldd(bash)]
    for path in [str(bash), *libs]:
        if not path.startswith("/"):
            continue
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    (root / "bin").mkdir(exist_ok=True)
    if not (root / "bin" / "bash").exists():
        os.symlink(str(bash), root / "bin" / "bash")
    for name in ("etc", "tmp", "root", "home/user", "proc", "dev", "sys", "usr"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    (root / "etc" / "marker").write_text(marker)
    os.chown(root / "home" / "user", 1000, 1000)


def _ldd(binary: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "/" in line]


def _template_add(runtime: Runtime, name: str, rootfs: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "template",
            "add",
            name,
            "--rootfs",
            str(rootfs),
            "--data-dir",
            str(runtime.data_dir),
        ],
        check=True,
        capture_output=True,
    )


def test_rootfs_directory_and_tarball_templates(e2b_env: Runtime, tmp_path: Path) -> None:
    if shutil.which("ldd") is None:
        pytest.skip("needs ldd to assemble a minimal root filesystem")
    directory = tmp_path / "rootfs-dir"
    _minimal_rootfs(directory, "from a directory")
    _template_add(e2b_env, "mini-dir", directory)

    staged = tmp_path / "rootfs-tar"
    _minimal_rootfs(staged, "from a tarball")
    tarball = tmp_path / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(staged, arcname=".")
    _template_add(e2b_env, "mini-tar", tarball)

    for template, marker in (("mini-dir", "from a directory"), ("mini-tar", "from a tarball")):
        sbx = Sandbox.create(template=template)
        try:
            assert sbx.commands.run('read -r line < /etc/marker; echo "$line"').stdout == marker + "\n"
            assert sbx.get_info().template_id == template
        finally:
            sbx.kill()


def test_template_add_rejects_what_is_not_a_root_filesystem(runtime: Runtime, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "template",
            "add",
            "empty",
            "--rootfs",
            str(tmp_path),
            "--data-dir",
            str(runtime.data_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "does not look like a root filesystem" in result.stderr


def test_the_sandbox_limit_is_a_clear_4xx(start_runtime: Callable[..., Runtime]) -> None:
    runtime = start_runtime("--max-sandboxes", "1")
    api = httpx.Client(base_url=runtime.url, headers={"X-API-KEY": runtime.api_key}, timeout=30)
    first = api.post("/v2/sandboxes", json={"templateID": "base"})
    assert first.status_code == 201
    second = api.post("/v2/sandboxes", json={"templateID": "base"})
    assert second.status_code == 403
    assert "--max-sandboxes" in second.json()["message"]
    api.delete(f"/sandboxes/{first.json()['sandboxID']}")
