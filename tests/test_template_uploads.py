"""``<store>/uploads`` collection: an upload no build holds and nobody asked for in an hour goes, one a
build in flight holds stays, and the SDK uploads it again when a later build needs it."""

from __future__ import annotations

import os
import secrets
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import TEMPLATE_STORE, Runtime
from e2b import Sandbox, SandboxQuery, Template
from sandboxd.runtime import template_uploads
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.template_uploads import UPLOAD_TTL_S, Uploads

HOUR_AGO = time.time() - UPLOAD_TTL_S - 60


def _age(path: Path) -> None:
    os.utime(path, (HOUR_AGO, HOUR_AGO))


def test_collect_removes_only_old_unheld_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uploads = Uploads(tmp_path / "uploads")
    old, fresh, held, asked = (secrets.token_hex(32) for _ in range(4))
    for name in (old, fresh, held, asked):
        uploads.path(name).write_bytes(b"tar")
    for name in (old, held, asked):
        _age(uploads.path(name))
    (uploads.directory / f"{old}.tar.1-ab.part").write_bytes(b"half")
    _age(uploads.directory / f"{old}.tar.1-ab.part")
    (uploads.directory / "unrelated.txt").write_bytes(b"x")
    _age(uploads.directory / "unrelated.txt")
    build = uploads.hold([held, held])
    assert uploads.refresh(asked) and not uploads.refresh(secrets.token_hex(32))

    removed = uploads.collect()
    assert sorted(removed) == sorted([f"{old}.tar", f"{old}.tar.1-ab.part"])
    assert {p.name for p in uploads.directory.iterdir()} == {f"{n}.tar" for n in (fresh, held, asked)} | {
        "unrelated.txt"
    }
    # The build reads what it holds; once it ends, its upload goes at the next pass.
    assert os.pread(build.fd(held), 3, 0) == b"tar"
    build.close()
    assert uploads.collect() == [f"{held}.tar"]

    with pytest.raises(ApiError, match="were not uploaded"):
        uploads.hold([old])
    with pytest.raises(ApiError, match="sha256"):
        uploads.path("../../etc/passwd")

    # Bounded: a pass removes at most MAX_REMOVALS; the next goes on.
    monkeypatch.setattr(template_uploads, "MAX_REMOVALS", 2)
    many = [secrets.token_hex(32) for _ in range(5)]
    for name in many:
        uploads.path(name).write_bytes(b"tar")
        _age(uploads.path(name))
    assert len(uploads.collect()) == 2 and len(uploads.collect()) == 2 and len(uploads.collect()) == 1


def _uploads_of(marker: str) -> list[Path]:
    """The uploads (in the shared store) whose archive holds the file named ``marker``."""
    found = []
    for path in (TEMPLATE_STORE / "uploads").glob("*.tar"):
        try:
            with tarfile.open(path) as tar:
                if any(name.endswith(marker) for name in tar.getnames()):
                    found.append(path)
        except (tarfile.TarError, OSError):
            continue
    return found


def test_a_build_collects_stale_uploads_and_the_sdk_uploads_them_again(
    e2b_env: Runtime, base_template: bool, tmp_path: Path
) -> None:
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine (see the session's first lines)")
    stale, busy = secrets.token_hex(8), secrets.token_hex(8)
    for marker in (stale, busy):
        (tmp_path / marker).mkdir()
        (tmp_path / marker / marker).write_text(marker)

    def copying(marker: str) -> Template:
        return Template(file_context_path=str(tmp_path)).from_template("base").copy(marker, f"/opt/{marker}")

    Template.build(copying(stale), f"up-{stale}")
    (stale_upload,) = _uploads_of(stale)
    # A build in flight holds its upload: it waits on a gate before its COPY step.
    gate = f"/tmp/gate-{busy}"
    waiting = (
        Template(file_context_path=str(tmp_path))
        .from_template("base")
        .run_cmd(f"for i in $(seq 600); do [ -e {gate} ] && exit 0; sleep 0.1; done; exit 1")
        .copy(busy, f"/opt/{busy}")
    )
    info = Template.build_in_background(waiting, f"up-{busy}")
    (busy_upload,) = _uploads_of(busy)
    _age(stale_upload)
    _age(busy_upload)

    # Any build's end collects: the stale upload goes, the held one stays.
    Template.build(Template().from_template("base").run_cmd(f"echo {stale}-{busy} > /tmp/x"), f"up-other-{busy}")
    assert not stale_upload.exists() and busy_upload.exists()

    query = SandboxQuery(metadata={"sandboxd.template-build": info.build_id})
    (build_sandbox,) = Sandbox.list(query=query).next_items()
    Sandbox.connect(build_sandbox.sandbox_id).files.write(gate, "")
    deadline = time.monotonic() + 60
    while (status := Template.get_build_status(info)).status.value == "building":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status.status.value == "ready", status

    # The stale files are asked for again (present: false) and uploaded again.
    headers = {"X-API-KEY": e2b_env.api_key}
    with httpx.Client(base_url=e2b_env.url, headers=headers) as client:
        link = client.get(f"/templates/x/files/{stale_upload.stem}").json()
        assert link["present"] is False
    Template.build(copying(stale).run_cmd("true"), f"up-{stale}-again")
    assert len(_uploads_of(stale)) == 1
    sandbox = Sandbox.create(f"up-{stale}-again", timeout=60)
    try:
        assert sandbox.commands.run(f"cat /opt/{stale}/{stale}").stdout == stale
    finally:
        sandbox.kill()
