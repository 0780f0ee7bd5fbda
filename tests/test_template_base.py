"""The Debian ``base`` template through the official SDK: what a user of E2B's base expects to find."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterator

import pytest
from conftest import TEMPLATE_STORE, Runtime
from e2b import CommandExitException, Sandbox


@pytest.fixture
def sbx(e2b_env: Runtime, base_template: bool) -> Iterator[Sandbox]:
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine (see the session's first lines)")
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_base_is_the_debian_build(sbx: Sandbox) -> None:
    assert sbx.get_info().template_id == "base"
    os_release = sbx.commands.run("cat /etc/os-release").stdout
    assert "ID=debian" in os_release
    assert "trixie" in os_release


def test_user_has_passwordless_sudo(sbx: Sandbox) -> None:
    result = sbx.commands.run("sudo echo ok", user="user")
    assert result.stdout == "ok\n"
    assert sbx.commands.run("sudo id -u", user="user").stdout == "0\n"
    whoami = sbx.commands.run("id -un; id -u; echo $HOME; pwd", user="user").stdout.split()
    assert whoami == ["user", "1000", "/home/user", "/home/user"]


def test_python_node_git_and_tools(sbx: Sandbox) -> None:
    assert sbx.commands.run("python --version", user="user").stdout.startswith("Python 3.")
    assert sbx.commands.run("python3 --version", user="user").stdout.startswith("Python 3.")
    assert sbx.commands.run("pip --version", user="user").stdout.startswith("pip ")
    node = sbx.commands.run("node --version", user="user").stdout
    assert node.startswith("v") and int(node[1:].split(".")[0]) >= 20, node
    assert sbx.commands.run("npm --version", user="user").exit_code == 0
    assert sbx.commands.run("git --version", user="user").stdout.startswith("git version ")
    for tool in ("curl", "wget", "jq", "less", "socat", "ip", "ping", "gcc", "make", "unzip", "ps"):
        assert sbx.commands.run(f"command -v {tool}", user="user").exit_code == 0, tool
    assert sbx.commands.run("test -s /etc/ssl/certs/ca-certificates.crt").exit_code == 0


def _wheel(name: str, version: str, module: str, value: str) -> tuple[str, bytes]:
    """A pure-Python wheel built by hand (PEP 427): a module, METADATA, WHEEL and RECORD."""
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": f"VALUE = {value!r}\n".encode(),
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: sandboxd-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return f"{dist}-py3-none-any.whl", out.getvalue()


def test_pip_install_as_user_from_a_loopback_index(sbx: Sandbox) -> None:
    """A package index on the sandbox's own loopback (sandboxes have no network yet: issue 13), served
    by ``python -m http.server`` from a directory listing, with a wheel this test built."""
    filename, wheel = _wheel("sandboxd-probe", "1.0", "sandboxd_probe", "from the loopback index")
    sbx.files.write(f"/tmp/index/simple/sandboxd-probe/{filename}", wheel, user="user")
    server = sbx.commands.run(
        "python -m http.server 8765 --bind 127.0.0.1 --directory /tmp/index", background=True, user="user"
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sbx.commands.run("curl -sf http://127.0.0.1:8765/simple/ >/dev/null", user="user")
                break
            except CommandExitException:
                assert time.monotonic() < deadline, "the index did not start"
                time.sleep(0.2)
        result = sbx.commands.run(
            "pip install --index-url http://127.0.0.1:8765/simple/ sandboxd-probe",
            user="user",
            envs={"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            timeout=120,
        )
        assert "Successfully installed sandboxd-probe-1.0" in result.stdout, result.stdout + result.stderr
        assert "externally-managed" not in result.stderr
        imported = sbx.commands.run("python -c 'import sandboxd_probe; print(sandboxd_probe.VALUE)'", user="user")
        assert imported.stdout == "from the loopback index\n"
    finally:
        server.kill()


def test_base_layer_is_canonically_owned_on_disk(e2b_env: Runtime, base_template: bool) -> None:
    """The layer is never chowned for a sandbox: root's files are uid 0 and user's home uid 1000 on
    the host, so the isolation work can mount it idmapped."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    from sandboxd.runtime import debian
    from sandboxd.runtime.layers import LayerStore, hex_of

    store = LayerStore(TEMPLATE_STORE)
    record = store.cached(debian.Recipe(mirror=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or debian.DEFAULT_MIRROR).key())
    assert record is not None
    root = TEMPLATE_STORE / "layers" / hex_of(record["layers"][0])
    assert (root / "usr" / "bin" / "sudo").stat().st_uid == 0
    assert (root / "usr" / "bin" / "sudo").stat().st_mode & 0o4000  # setuid, kept
    assert (root / "home" / "user").stat().st_uid == 1000
    assert (root / "etc" / "sudoers.d" / "user").read_text() == "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    packages = (TEMPLATE_STORE / "layers" / f"{hex_of(record['layers'][0])}.packages.tsv").read_text()
    assert any(line.startswith("nodejs\t") for line in packages.splitlines())
    info = json.loads((TEMPLATE_STORE / "layers" / f"{hex_of(record['layers'][0])}.json").read_text())
    assert info["kind"] == "build"


def test_aliases_resolve_to_base(e2b_env: Runtime, base_template: bool) -> None:
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    sandbox = Sandbox.create(template="desktop")
    try:
        assert sandbox.get_info().template_id == "base"
        assert sandbox.commands.run("command -v node").exit_code == 0
    finally:
        sandbox.kill()


def test_host_template_is_still_there(e2b_env: Runtime) -> None:
    """Today's host-/usr template, for machines with no archive in reach."""
    sandbox = Sandbox.create(template="host")
    try:
        assert sandbox.get_info().template_id == "host"
        assert sandbox.commands.run("echo ok").stdout == "ok\n"
    finally:
        sandbox.kill()
