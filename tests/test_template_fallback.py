"""Built-in templates before they are built: a create waiting for the build says so instead of timing
out, and where Debian's archive (or the package index) cannot be reached the runtime falls back, with a
message: ``base`` to ``host``, ``code-interpreter-v1`` to ``base``.

Each runtime here has a template store of its own (empty: nothing built) and a mirror on loopback
that the test controls: a closed port (unreachable), or a server that answers the reachability
probe and then never sends a package list (a build that does not finish). The package index test
uses the shared store, where ``base`` is built, and a closed port for the index."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import Runtime, free_port, sandboxd_template
from e2b import Sandbox, ServiceBusyException


def _create(runtime: Runtime, **kwargs: object) -> Sandbox:
    return Sandbox.create(api_key=runtime.api_key, api_url=runtime.url, sandbox_url=runtime.url, **kwargs)  # type: ignore[arg-type]


def test_base_falls_back_to_host_when_the_archive_is_unreachable(
    start_runtime: Callable[..., Runtime], tmp_path: Path
) -> None:
    mirror = f"http://127.0.0.1:{free_port()}/debian"
    runtime = start_runtime("--template-store", str(tmp_path / "store"), "--debian-mirror", mirror)
    started = time.monotonic()
    sbx = _create(runtime)
    try:
        assert time.monotonic() - started < 20
        assert sbx.get_info().template_id == "host"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()
    # code-interpreter-v1 is built on base: without the archive, it falls back to host as well
    interpreter = _create(runtime, template="code-interpreter-v1")
    try:
        assert interpreter.get_info().template_id == "host"
    finally:
        interpreter.kill()
    log = runtime.log.read_text()
    assert f"Debian's archive at {mirror} cannot be reached" in log
    assert "get 'host'" in log
    listed = sandboxd_template(runtime, "list").stdout
    assert "not built" in listed
    built = sandboxd_template(runtime, "build", "base", "--debian-mirror", mirror, check=False)
    assert built.returncode != 0 and "cannot be reached" in built.stderr


def test_code_interpreter_falls_back_to_base_when_the_package_index_is_unreachable(
    start_runtime: Callable[..., Runtime], base_template: bool
) -> None:
    """The shared store has base: only the index is missing. Sandboxes asking for the code interpreter's
    template get base (without an interpreter), and the log says why."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    index = f"http://127.0.0.1:{free_port()}/simple"
    runtime = start_runtime("--pypi-index", index)
    started = time.monotonic()
    sbx = _create(runtime, template="code-interpreter-v1")
    try:
        assert time.monotonic() - started < 20
        assert sbx.get_info().template_id == "base"
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()
    log = runtime.log.read_text()
    assert f"the Python package index at {index} cannot be reached" in log
    assert "sandboxes asking for 'code-interpreter-v1' get 'base'" in log


class _StallingMirror(http.server.BaseHTTPRequestHandler):
    """Answers the runtime's HEAD probe, then holds every GET open: a build that never finishes."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        time.sleep(120)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stalling_mirror() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingMirror)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="stalling-mirror", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian"
    finally:
        server.shutdown()
        server.server_close()


def _builders(store: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("mmdebstrap" in part for part in cmdline[:2]) and any(str(store) in part for part in cmdline):
            found.append(process)
    return found


def test_a_create_waiting_for_the_base_build_says_so(
    start_runtime: Callable[..., Runtime], stalling_mirror: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    runtime = start_runtime("--template-store", str(store), "--debian-mirror", stalling_mirror)
    started = time.monotonic()
    with pytest.raises(ServiceBusyException) as raised:
        _create(runtime)
    waited = time.monotonic() - started
    assert waited < 60, "the SDK's own request timeout would have fired first"
    message = str(raised.value)
    assert "template 'base' is being built from Debian's archive" in message, message
    assert "so far" in message
    assert "building Debian trixie" in runtime.log.read_text()
    assert _builders(store), "no mmdebstrap was running for this store"
    runtime.process.terminate()
    runtime.process.wait(30)
    deadline = time.monotonic() + 20
    while _builders(store):
        assert time.monotonic() < deadline, "the runtime left its base build running"
        time.sleep(0.2)
