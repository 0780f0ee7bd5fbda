"""Volumes through the official SDK (``from e2b import Volume``) against a real runtime: the control
plane, the content API (``$E2B_VOLUME_API_URL``), and the hostile-input rules of
python/sandboxd/runtime/volumes.py. Volumes are real ext4 images, mounted by the runtime."""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import Runtime


@pytest.fixture
def volume(e2b_env: Runtime) -> Iterator[object]:
    from e2b import Volume

    made = Volume.create(f"test-{uuid.uuid4().hex[:12]}")
    yield made
    Volume.destroy(made.volume_id)


def test_a_volume_is_created_listed_written_read_and_destroyed(e2b_env: Runtime) -> None:
    from e2b import Volume
    from e2b.exceptions import NotFoundException

    name = f"test-{uuid.uuid4().hex[:12]}"
    volume = Volume.create(name)
    try:
        assert volume.name == name and volume.token
        assert (volume.volume_id, name) in [(v.volume_id, v.name) for v in Volume.list()]
        assert volume.list("/") == []  # empty: no lost+found or disk-format leftovers

        entry = volume.write_file("/notes/day1/hello.txt", "hello, volume")
        assert (entry.name, entry.path, entry.size, entry.uid, entry.gid) == (
            "hello.txt",
            "/notes/day1/hello.txt",
            13,
            1000,
            1000,
        )
        assert entry.mode == 0o644
        assert volume.read_file("/notes/day1/hello.txt") == "hello, volume"
        assert volume.get_info("/notes").type.value == "directory"
        assert [e.path for e in volume.list("/notes", depth=2)] == ["/notes/day1", "/notes/day1/hello.txt"]

        payload = os.urandom(3 << 20)
        volume.write_file("blob.bin", io.BytesIO(payload), uid=0, gid=0, mode=0o600)  # streamed
        assert volume.read_file("/blob.bin", format="bytes") == payload
        assert b"".join(volume.read_file("/blob.bin", format="stream")) == payload
        info = volume.get_info("/blob.bin")
        assert (info.uid, info.gid, info.mode) == (0, 0, 0o600)

        made = volume.make_dir("/a/b/c", force=True, mode=0o750)
        assert made.type.value == "directory" and made.mode == 0o750
        changed = volume.update_metadata("/a/b/c", uid=1234, mode=0o700)
        assert (changed.uid, changed.gid, changed.mode) == (1234, 1000, 0o700)

        volume.remove("/notes")
        assert not volume.exists("/notes/day1/hello.txt")
        assert sorted(e.name for e in volume.list("/")) == ["a", "blob.bin"]

        again = Volume.connect(volume.volume_id)  # by id, from "elsewhere": name and token come back
        assert again.name == name and again.read_file("/blob.bin", format="bytes") == payload
    finally:
        assert Volume.destroy(volume.volume_id) is True
    assert Volume.destroy(volume.volume_id) is False
    with pytest.raises(NotFoundException):
        Volume.get_info(volume.volume_id)


def test_bad_volume_requests_get_a_4xx_and_change_nothing(e2b_env: Runtime, volume: object) -> None:
    from e2b import Volume
    from e2b.exceptions import NotFoundException, VolumeException

    vol: Volume = volume  # type: ignore[assignment]
    with pytest.raises(VolumeException, match="409"):
        Volume.create(vol.name)  # names are unique: sandboxes mount volumes by name
    with pytest.raises(VolumeException, match="400"):
        Volume.create("../escape")
    vol.write_file("/keep.txt", "kept")
    with pytest.raises(NotFoundException):
        vol.read_file("/missing.txt")
    with pytest.raises(VolumeException, match="400"):
        vol.read_file("/")  # a directory
    with pytest.raises(VolumeException, match="409"):
        vol.make_dir("/keep.txt")
    with pytest.raises(NotFoundException):
        vol.make_dir("/no/parent")  # without force, parents must exist
    with pytest.raises(VolumeException, match="400"):
        vol.write_file("/owned.txt", "x", uid=70000)  # not an id any sandbox has

    url = f"{e2b_env.url}/volumecontent/{vol.volume_id}"
    token = {"Authorization": f"Bearer {vol.token}"}
    for params, status in (
        ({"path": "/../../etc/passwd"}, 400),
        ({"path": "a/../../x"}, 400),
        ({"path": "x\0y"}, 400),
        ({"path": "/", "depth": "17"}, 400),
        ({}, 400),
    ):
        answer = httpx.get(f"{url}/dir", params=params, headers=token)
        assert answer.status_code == status, (params, answer.text)
        assert answer.json()["message"]
    assert httpx.get(f"{url}/path", params={"path": "/keep.txt"}).status_code == 401
    wrong = {"Authorization": "Bearer no"}
    assert httpx.get(f"{url}/path", params={"path": "/keep.txt"}, headers=wrong).status_code == 401
    other = httpx.get(f"{e2b_env.url}/volumecontent/{uuid.uuid4()}/path", params={"path": "/"}, headers=token)
    assert other.status_code == 404  # another volume's id with this volume's token: nothing to find
    assert httpx.get(f"{e2b_env.url}/volumes").status_code == 401  # the control plane needs the API key
    setuid = httpx.put(f"{url}/file", params={"path": "/s", "mode": str(0o4755)}, headers=token, content=b"#!")
    assert setuid.status_code == 201 and setuid.json()["mode"] == 0o755  # no setuid bits through the API
    assert vol.read_file("/keep.txt") == "kept"


def test_an_upload_cut_short_leaves_the_old_file_whole(e2b_env: Runtime, volume: object) -> None:
    from e2b import Volume

    vol: Volume = volume  # type: ignore[assignment]
    vol.write_file("/doc.txt", "the old version")
    head = (
        f"PUT /volumecontent/{vol.volume_id}/file?path=/doc.txt HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {vol.token}\r\nContent-Length: {10 << 20}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", e2b_env.port)) as sock:
        sock.sendall(head + b"n" * (3 << 20))  # 3 of the 10 MiB it announced, then gone
    assert vol.read_file("/doc.txt") == "the old version"
    deadline = time.monotonic() + 10  # the runtime sees the disconnect on its own time
    while (names := [e.name for e in vol.list("/")]) != ["doc.txt"]:
        assert time.monotonic() < deadline, f"the cut-short upload left {names}"  # no temporary file stays
        time.sleep(0.05)
    assert vol.read_file("/doc.txt") == "the old version"


def test_a_full_volume_answers_507_and_the_host_disk_is_untouched(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Volume
    from e2b.exceptions import VolumeException

    runtime = start_runtime("--sandbox-disk-mb", "64")  # volumes are as large as a sandbox's disk
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    volume = Volume.create("small")
    try:
        volume.write_file("/first.bin", b"1" * (1 << 20))
        with pytest.raises(VolumeException, match="507"):
            volume.write_file("/huge.bin", io.BytesIO(b"\0" * (100 << 20)))
        assert volume.read_file("/first.bin", format="bytes") == b"1" * (1 << 20)
        assert [e.name for e in volume.list("/")] == ["first.bin"]
        image = runtime.data_dir / "volumes" / volume.volume_id / "volume.img"
        assert image.stat().st_blocks * 512 < 80 << 20  # sparse, and bounded by its size
        assert oct((runtime.data_dir / "volumes").stat().st_mode & 0o777) == "0o700"
    finally:
        Volume.destroy(volume.volume_id)


def test_a_mounted_volume_is_shared_between_sandboxes_and_survives_them(e2b_env: Runtime, volume: object) -> None:
    from e2b import Sandbox, Volume

    vol: Volume = volume  # type: ignore[assignment]
    vol.write_file("/from-api.txt", "api")
    first = Sandbox.create(volume_mounts={"/mnt/data": vol})
    second = Sandbox.create(volume_mounts={"/home/user/shared": vol.name})
    try:
        out = first.commands.run("cat /mnt/data/from-api.txt; echo; id -u; echo one > /mnt/data/from-first.txt")
        assert out.stdout.startswith("api\n1000\n")
        assert second.files.read("/home/user/shared/from-first.txt") == "one\n"  # the same file system
        second.commands.run("mkdir /home/user/shared/dir && echo two > /home/user/shared/dir/f")
        info = vol.get_info("/dir/f")
        assert (info.uid, info.gid) == (1000, 1000)  # canonical owners: the sandbox's user is 1000 here too
        detail = httpx.get(f"{e2b_env.url}/sandboxes/{first.sandbox_id}", headers={"X-API-KEY": e2b_env.api_key}).json()
        assert detail["volumeMounts"] == [{"name": vol.name, "path": "/mnt/data"}]
        with pytest.raises(Exception, match="409"):
            Volume.destroy(vol.volume_id)  # mounted by live sandboxes
        first.pause()
        first.connect()
        assert first.files.read("/mnt/data/dir/f") == "two\n"  # kept through pause and resume
    finally:
        first.kill()
        second.kill()
    assert vol.read_file("/from-first.txt") == "one\n"  # outlives the sandboxes


def test_attack_symlinks_a_sandbox_leaves_in_a_volume_are_never_followed_by_the_runtime(
    e2b_env: Runtime, volume: object
) -> None:
    """Root in a sandbox plants symlinks to host paths in a volume; the file API, which runs on the
    host as root, reports them and refuses to go through them, so it never reads or writes host files."""
    from e2b import Sandbox, Volume
    from e2b.exceptions import VolumeException

    vol: Volume = volume  # type: ignore[assignment]
    sandbox = Sandbox.create(volume_mounts={"/mnt/v": vol})
    try:
        sandbox.commands.run(
            "ln -s /etc/shadow /mnt/v/shadow && ln -s / /mnt/v/hostroot && ln -s /tmp /mnt/v/tmp", user="root"
        )
    finally:
        sandbox.kill()
    shadow = next(e for e in vol.list("/") if e.name == "shadow")
    assert shadow.type.value == "symlink" and shadow.target == "/etc/shadow"
    for read in ("/shadow", "/hostroot/etc/passwd"):
        with pytest.raises(VolumeException, match="400"):
            vol.read_file(read)
    marker = f"sandboxd-volume-attack-{uuid.uuid4().hex}"
    with pytest.raises(VolumeException, match="400"):
        vol.write_file(f"/tmp/{marker}", "pwned")
    with pytest.raises(VolumeException, match="400"):
        vol.make_dir(f"/hostroot/tmp/{marker}", force=True)
    assert not os.path.exists(f"/tmp/{marker}")
    before = os.stat("/etc/shadow")
    vol.update_metadata("/shadow", uid=0, gid=0)  # the link itself (lchown), never its target
    with pytest.raises(VolumeException, match="400"):
        vol.update_metadata("/shadow", mode=0o777)
    after = os.stat("/etc/shadow")
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    vol.remove("/hostroot")  # the link goes, never what it points at
    assert os.path.isdir("/etc") and not vol.exists("/hostroot")


def test_attack_a_sandbox_filling_a_volume_fills_only_the_volume(
    start_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Sandbox, Volume

    runtime = start_runtime("--sandbox-disk-mb", "64")
    for name, value in runtime.env().items():
        monkeypatch.setenv(name, value)
    volume = Volume.create("fill-me")
    sandbox = Sandbox.create(volume_mounts={"/mnt/v": volume})
    try:
        out = sandbox.commands.run("dd if=/dev/zero of=/mnt/v/fill bs=1M count=200 2>&1; echo exit=$?", user="root")
        assert "No space left on device" in out.stdout and "exit=1" in out.stdout
        image = runtime.data_dir / "volumes" / volume.volume_id / "volume.img"
        assert image.stat().st_blocks * 512 <= 70 << 20
    finally:
        sandbox.kill()
        Volume.destroy(volume.volume_id)


def test_bad_volume_mounts_get_a_400_and_no_sandbox(e2b_env: Runtime, volume: object) -> None:
    from e2b import Volume

    vol: Volume = volume  # type: ignore[assignment]
    api = httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key})
    before = len(api.get("/v2/sandboxes").json())
    for mounts in (
        [{"name": vol.name, "path": "/"}],
        [{"name": vol.name, "path": "relative/path"}],
        [{"name": vol.name, "path": "/proc/self"}],
        [{"name": vol.name, "path": "/mnt/a/../b"}],
        [{"name": vol.name, "path": "/mnt/a"}, {"name": vol.name, "path": "/mnt/a/b"}],
        [{"name": "no-such-volume", "path": "/mnt/x"}],
        [{"name": vol.name}],
        [{"name": vol.name, "path": f"/mnt/{i}"} for i in range(17)],
        "not a list",
    ):
        answer = api.post("/v2/sandboxes", json={"templateID": "base", "volumeMounts": mounts})
        assert answer.status_code == 400, (mounts, answer.text)
        assert answer.json()["message"]
    assert len(api.get("/v2/sandboxes").json()) == before


def test_long_non_ascii_mount_paths_start_the_sandbox_and_leave_the_zygote_up(e2b_env: Runtime, volume: object) -> None:
    # The API's most: 16 mounts, each path 1,024 characters. Not ASCII, they were sent to the zygote
    # as \u escapes (~98 kB), past the 64 KiB it reads a request: it stopped, failing this create and
    # every other one in flight, and was restarted. They go as UTF-8 now (~33 kB).
    from e2b import Sandbox, Volume

    vol: Volume = volume  # type: ignore[assignment]
    api = httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key})
    restarts = api.get("/status").json()["zygote"]["restarts"]
    component = "\u00e9" * 127  # 254 bytes: a file name's most is 255
    paths = [f"/{i:x}/" + "/".join([component] * 7) + "/" + "\u00e9" * 125 for i in range(16)]
    assert all(len(p) == 1024 for p in paths)
    sandbox = Sandbox.create(volume_mounts={p: vol for p in paths}, timeout=60)
    try:
        vol.write_file("/hello.txt", "hi")
        assert sandbox.files.read(paths[15] + "/hello.txt") == "hi"
    finally:
        sandbox.kill()
    assert api.get("/status").json()["zygote"]["restarts"] == restarts
