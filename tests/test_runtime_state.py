"""The runtime's state as a create and a kill use it, without a sandbox: the id of a new sandbox, the
network rows kept in memory beside their table, a new sandbox's row and first event in one transaction,
the firewall elements of settings, and the metrics history's forget. Real SQLite files, no server."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sandboxd import _core
from sandboxd.runtime import disks
from sandboxd.runtime.disks import REFILL_NICE, DiskPool
from sandboxd.runtime.inputs import SANDBOX_ID
from sandboxd.runtime.manager import new_id
from sandboxd.runtime.metrics import MetricsHistory, MetricsSample
from sandboxd.runtime.network import SandboxNetworks
from sandboxd.runtime.network.firewall import SandboxRules
from sandboxd.runtime.network.policy import NetworkConfig, compile_egress
from sandboxd.runtime.network.state import NetworkRow, NetworkStore, SlotReader
from sandboxd.runtime.store import SandboxRow, Store


def test_new_ids_are_e2b_shaped_and_use_every_character() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and SANDBOX_ID.fullmatch(i) for i in ids)
    seen = "".join(ids)
    assert set(seen) == set(string.ascii_lowercase + string.digits)
    # 100,000 draws over 36 characters: ~2,778 each (standard deviation ~52). A mapping that favoured
    # some (b % 36 over all 256 byte values gives the first 4 characters 8 chances in 256, not 7)
    # shows as ~3,125 for those.
    counts = [seen.count(c) for c in set(seen)]
    assert max(counts) < 3000 and min(counts) > 2550, sorted(counts)


def _row(sandbox_id: str, slot: int | None = 3, config: NetworkConfig | None = None) -> NetworkRow:
    return NetworkRow(sandbox_id, slot, config or NetworkConfig(allow_internet_access=True), "tok")


def test_network_rows_read_from_memory_are_the_table(tmp_path: Path) -> None:
    """Every write reaches the table (the helper process reads it) and the copy in memory alike."""
    store = Store(tmp_path / "sandboxd.db")
    rows = NetworkStore(store.db)
    helper = SlotReader(tmp_path / "sandboxd.db")  # the network helper's read-only view
    rows.put(_row("a"))
    assert helper.at(3) == ("a", NetworkConfig(allow_internet_access=True).to_json())
    assert rows.get("a") == _row("a")
    denied = NetworkConfig(allow_internet_access=False)
    rows.set_config("a", denied)
    assert rows.get("a") == _row("a", config=denied)
    assert helper.at(3) == ("a", denied.to_json())
    rows.set_slot("a", None)
    assert rows.get("a") == _row("a", slot=None, config=denied)
    assert helper.at(3) is None
    rows.delete("a")
    assert rows.get("a") is None
    assert store.db.execute("SELECT COUNT(*) FROM sandbox_networks").fetchone()[0] == 0
    # A row not found is not remembered as missing: a runtime restarted on the same database (a new
    # NetworkStore) and rows it has not read yet are found in the table.
    assert rows.get("b") is None
    NetworkStore(store.db).put(_row("b", slot=4))
    assert rows.get("b") == _row("b", slot=4)
    # A row put on another's slot replaces that one in the table (INSERT OR REPLACE, slot UNIQUE):
    # in memory too.
    rows.put(_row("c", slot=4))
    assert rows.get("c") == _row("c", slot=4)
    assert rows.get("b") is None
    assert helper.at(4) == ("c", NetworkConfig(allow_internet_access=True).to_json())


def test_a_new_sandbox_and_its_first_event_are_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "sandboxd.db")
    now = time.time()
    row = SandboxRow("s" * 20, "base", None, "running", now, now + 300, "t" * 32, 1, 1024, 10240)
    store.insert(row, ("created", "template base, timeout 300s"))
    assert store.get(row.id) == row
    assert [kind for _, kind, _ in store.events(row.id)] == ["created"]
    with pytest.raises(sqlite3.IntegrityError):  # the same id again: neither its row nor its event
        store.insert(row, ("created", "a second time"))
    assert [reason for _, _, reason in store.events(row.id)] == ["template base, timeout 300s"]
    assert not store.db.in_transaction
    # Committed: another connection (a runtime restarted after a crash) sees both.
    other = Store(tmp_path / "sandboxd.db")
    assert other.get(row.id) == row and len(other.events(row.id)) == 1


def test_what_the_proxy_reads_of_a_sandbox_per_request_is_its_rows_state(tmp_path: Path) -> None:
    """``Store.reach``, the proxy's per-request question, answers as the whole row does."""
    store = Store(tmp_path / "sandboxd.db")
    now = time.time()
    store.insert(SandboxRow("r" * 20, "base", None, "running", now, now + 300, "t" * 32, 1, 1024, 10240))
    store.insert(SandboxRow("p" * 20, "base", None, "paused", now, now + 300, "t" * 32, 1, 1024, 10240))
    store.update("p" * 20, auto_resume=True)
    store.insert(SandboxRow("e" * 20, "base", None, "running", now, now + 300, "t" * 32, 1, 1024, 10240))
    store.update("e" * 20, state="ended", ended_reason="killed by the API")
    for sandbox_id in ("r" * 20, "p" * 20, "e" * 20):
        row = store.get(sandbox_id)
        assert row is not None
        assert store.reach(sandbox_id) == (row.state, row.ended_reason, row.auto_resume)
    assert store.reach("p" * 20) == ("paused", None, True)
    assert store.reach("e" * 20) == ("ended", "killed by the API", False)
    assert store.reach("x" * 20) is None
    store.close()


def test_the_reapers_query_finds_what_the_live_rows_say_has_expired_and_decodes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Store.expired``, the reaper's question four times a second, answers as the old loop over
    every live row did (running, its end at or before now, oldest first), without decoding a row."""
    store = Store(tmp_path / "sandboxd.db")
    now = time.time()
    rows = [  # (id, started, end, state): out of start order, so the order is the query's
        ("c" * 20, now - 30, now - 1, "running"),
        ("a" * 20, now - 50, now - 5, "running"),
        ("n" * 20, now - 40, now, "running"),  # ends exactly now: expired, as `end_at > now` skipped it not
        ("f" * 20, now - 60, now + 300, "running"),  # not yet
        ("p" * 20, now - 70, now - 9, "paused"),  # a paused one is not reaped
        ("e" * 20, now - 80, now - 9, "running"),  # ended below
    ]
    for sandbox_id, started, end, state in rows:
        store.insert(SandboxRow(sandbox_id, "base", None, state, started, end, "t" * 32, 1, 1024, 10240))
    store.update("e" * 20, state="ended", ended_reason="killed by the API")
    oracle = [r.id for r in store.live() if r.state == "running" and r.end_at <= now]

    def no_decode(row: tuple[object, ...]) -> SandboxRow:
        raise AssertionError("the reaper's query decoded a row")

    monkeypatch.setattr(Store, "_decode", staticmethod(no_decode))
    assert store.expired(now) == oracle == ["a" * 20, "n" * 20, "c" * 20]
    assert store.expired(now - 100) == []
    store.close()


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(),
        NetworkConfig(allow_internet_access=True),
        NetworkConfig(allow_internet_access=False),
        NetworkConfig(allow_out=("1.1.1.1", "example.com"), deny_out=("0.0.0.0/0",)),
        NetworkConfig(deny_out=("10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32")),
        NetworkConfig(allow_out=("example.com",), rules={"example.com": ({"x-a": "b"},)}),
    ],
)
def test_firewall_elements_of_settings_compiled_once_are_the_same(config: NetworkConfig) -> None:
    fresh = SandboxRules.of(compile_egress(config))
    assert SandboxNetworks._rules(config) == fresh
    assert SandboxNetworks._rules(config) == fresh  # again, from the cache where the settings are hashable
    # "none" (no transaction at attach and detach) exactly when there are no elements to add.
    assert fresh.none == (fresh.elements("inet t", "veth", "add") == [])


def test_the_metrics_history_forgets_only_what_it_may_hold(tmp_path: Path) -> None:
    async def run() -> None:
        history = MetricsHistory(tmp_path / "metrics.db")
        await history.open(["kept"])
        sample = MetricsSample(time.time(), 1, 0.0, 1, 2, 3, 4)
        await history.record([("kept", sample), ("new", sample)])
        db = sqlite3.connect(tmp_path / "metrics.db")

        def ids() -> list[str]:
            return [r[0] for r in db.execute("SELECT sandbox_id FROM samples ORDER BY sandbox_id")]

        assert ids() == ["kept", "new"]
        await history.forget("never-sampled")  # nothing of it: no work at all
        await history.forget("new")
        assert ids() == ["kept"]
        await history.close()
        # Rows of a sandbox the runtime re-adopted after a restart ("kept", live at open) are forgotten too.
        again = MetricsHistory(tmp_path / "metrics.db")
        await again.open(["kept"])
        await again.forget("kept")
        await again.close()
        assert ids() == []

    asyncio.run(run())


def test_the_disk_pool_refills_at_a_lower_priority_and_makes_disks_on_demand_at_the_default(tmp_path: Path) -> None:
    """Refills start as a create takes a disk, beside its sandbox's start-up: niced, they take what that
    leaves. A disk made on demand (the pool empty) is on a create's path: the default priority."""
    if os.geteuid() != 0:
        pytest.skip("mounting disks needs root")

    async def run() -> None:
        pool = DiskPool(tmp_path, 16, target=1)
        await pool.start()
        try:
            deadline = time.monotonic() + 60
            while not pool._ready:
                assert time.monotonic() < deadline, "the pool was not filled"
                await asyncio.sleep(0.05)
            refillers = list(pool._refiller._threads)
            assert len(refillers) == 1
            assert _nice(refillers[0]) == REFILL_NICE
            first = await pool.take(tmp_path / "a.img")  # from the pool
            second = await pool.take(tmp_path / "b.img")  # made now, unless the refill was done already
            os.close(first)
            os.close(second)
            on_demand = list(pool._threads._threads)
            assert on_demand, "the second disk was made on demand"
            assert all(_nice(t) == 0 for t in on_demand)
        finally:
            await pool.stop()

    asyncio.run(run())


def test_the_disk_pool_refills_a_while_after_a_take_and_at_once_when_empty(tmp_path: Path) -> None:
    """A create takes its disk a few ms in, and its sandbox's start and first command follow: the
    refill waits ``refill_delay`` after the last take (here 30 s) while a disk is left, and starts at
    once when none is."""
    if os.geteuid() != 0:
        pytest.skip("mounting disks needs root")

    async def filled(pool: DiskPool, n: int) -> None:
        deadline = time.monotonic() + 20  # well within the delay: not the delay's refill
        while len(pool._ready) < n:
            assert time.monotonic() < deadline, f"{len(pool._ready)} of {n} disks ready"
            await asyncio.sleep(0.02)

    async def run() -> None:
        pool = DiskPool(tmp_path, 16, target=2, refill_delay=30.0)
        await pool.start()
        try:
            await filled(pool, 2)  # the first fill does not wait
            os.close(await pool.take(tmp_path / "a.img"))
            await asyncio.sleep(1.0)
            assert len(pool._ready) == 1, "refilled within the delay while a disk was left"
            os.close(await pool.take(tmp_path / "b.img"))
            await filled(pool, 1)  # empty: at once
            await asyncio.sleep(0.5)
            assert len(pool._ready) == 1, "the second refill did not wait for the delay"
        finally:
            await pool.stop()

    asyncio.run(run())


def _nice(thread: threading.Thread) -> int:
    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def test_the_disk_template_holds_the_layer_directories_and_an_earlier_format_is_removed(tmp_path: Path) -> None:
    """The writable layer's ``upper`` and ``work`` are made once, in the template image (by
    ``debugfs``, nothing of the host's filesystem in them): no copy's mount allocates a directory
    block for them on the create path. A template of an earlier format (made without them) is not
    reused, and goes at the start."""
    if os.geteuid() != 0:
        pytest.skip("mounting disks needs root")
    if shutil.which("debugfs", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin") is None:
        pytest.skip("no debugfs (e2fsprogs)")
    old = tmp_path / "disks" / "template-v2-16m.img"
    old.parent.mkdir(mode=0o700)
    old.write_bytes(b"an earlier format's template")

    async def run() -> Path:
        pool = DiskPool(tmp_path, 16, target=1)
        await pool.start()
        try:
            assert not old.exists()
            assert pool.template.exists() and pool.template != old
            # A disk copied from it mounts with them, empty.
            fd = await pool.take(tmp_path / "a.img")
            try:
                for name in ("upper", "work"):
                    assert os.listdir(f"/proc/self/fd/{fd}/{name}") == []
            finally:
                os.close(fd)
        finally:
            await pool.stop()
        return pool.template

    template = asyncio.run(run())
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(template)], capture_output=True, text=True, check=True
    ).stdout
    # "<inode> <mode> (<type>) <uid> <gid> <size> <date> <name>"
    entries = {line.split()[-1]: line.split() for line in listing.splitlines() if line.strip()}
    for name in ("upper", "work"):
        assert name in entries, listing
        _, mode, _, uid, gid, *_ = entries[name]
        assert (mode, uid, gid) == ("40755", "0", "0"), listing
        inside = subprocess.run(
            ["debugfs", "-R", f"ls /{name}", str(template)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert [e for e in inside if not e.startswith("(") and not e.isdigit()] == [".", ".."], inside


def _data_extents(path: Path) -> int:
    """The runs of data (not holes) in a sparse file, as ``SEEK_DATA``/``SEEK_HOLE`` find them: what
    ``copy_sparse`` copies one by one and the kernel allocates and writes back one by one."""
    count, pos = 0, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            count += 1
    return count


def test_the_disk_template_is_a_few_runs_of_data_and_its_copies_mount_and_check_clean(tmp_path: Path) -> None:
    """Every sandbox disk is a copy of the template, and binding its loop device writes the copy back
    extent by extent (``LOOP_CONFIGURE`` flushes the image): the template's metadata is packed at its
    start with one backup superblock (``format_disk_image(template=True)``), a few runs of data where
    the layout volumes keep (a backup in each of the groups ``sparse_super`` picks) has three times
    as many. A copy still mounts, takes a file, and checks clean with ``e2fsck``."""
    if os.geteuid() != 0:
        pytest.skip("mounting disks needs root")
    e2fsck = shutil.which("e2fsck", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
    if e2fsck is None:
        pytest.skip("no e2fsck (e2fsprogs)")
    size_mb = 10240  # the default disk: 80 groups
    volume = tmp_path / "volume.img"
    _core.format_disk_image(str(volume), size_mb)

    async def run() -> tuple[Path, int]:
        pool = DiskPool(tmp_path, size_mb, target=1)
        await pool.start()
        try:
            return pool.template, await pool.take(tmp_path / "a.img")
        finally:
            await pool.stop()

    template, fd = asyncio.run(run())
    try:
        os.mkdir(f"/proc/self/fd/{fd}/upper/dir")
        Path(f"/proc/self/fd/{fd}/upper/dir/file").write_bytes(b"x" * 100_000)
    finally:
        os.close(fd)
    assert _data_extents(template) <= 6, _data_extents(template)
    assert _data_extents(volume) >= 3 * _data_extents(template), (_data_extents(volume), _data_extents(template))
    for image in (template, tmp_path / "a.img"):
        deadline = time.monotonic() + 10  # the copy's unmount ends with its last descriptor, at once or nearly
        while (checked := subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)).returncode:
            assert time.monotonic() < deadline, checked.stdout + checked.stderr
            time.sleep(0.1)


def test_waiting_for_a_held_disk_keeps_no_worker_thread(tmp_path: Path) -> None:
    """A resume, a pause to disk and a snapshot of a sandbox whose disk's filesystem lives on (a file
    of it sent out over a unix socket, see ``disks.released``) wait for it, up to
    ``RELEASE_WAIT_S`` each, and how long it lives is the sandbox's owner's choice. The wait held one
    of the event loop's default worker threads throughout (cores + 4: six on two cores), so an owner
    of a few such sandboxes resuming them in a loop kept every other tenant's creates, kills and
    resumes queued behind those threads. It now sleeps on the event loop: a thread only for each scan.
    Here the loop has one worker, the image is backed by a real loop device for the whole wait, and a
    job queued meanwhile must finish before the wait gives up."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a loop device)")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        assert disks.loop_devices_of(image) == [Path(device).name]

        async def scenario() -> list[str]:
            import concurrent.futures

            asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
            order: list[str] = []

            async def wait() -> None:
                released = await disks.released(image, timeout=1.0)
                order.append(f"waited, released={released}")

            async def other() -> None:
                await asyncio.sleep(0.1)  # the wait has begun
                await asyncio.to_thread(lambda: None)
                order.append("other job")

            await asyncio.gather(wait(), other())
            return order

        assert asyncio.run(scenario()) == ["other job", "waited, released=False"]
        # And it scans less and less often: a scan reads every loop device's backing file (~4 ms for
        # 300 devices, on a busy host), and scans 5 ms apart kept about half a core busy per waiting
        # resume (~110 scans a second), as long as the owner kept asking.
        scans = 0
        scan = disks.loop_devices_of

        def counted(image: Path) -> list[str]:
            nonlocal scans
            scans += 1
            return scan(image)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(disks, "loop_devices_of", counted)
            assert asyncio.run(disks.released(image, timeout=1.0)) is False
        assert 2 <= scans <= 20, scans
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    assert asyncio.run(disks.released(image, timeout=1.0)) is True


def test_a_disk_from_the_template_filled_to_its_quota_checks_clean(tmp_path: Path) -> None:
    """A sandbox that fills its disk: the copy of the packed template (its metadata at the start, one
    backup superblock, ``format_disk_image(template=True)``) takes data until ENOSPC and files until
    its inodes run out, then checks clean with ``e2fsck``: the packed layout leaves block and inode
    accounting as the kernel expects when every group is in use (``review7``)."""
    if os.geteuid() != 0:
        pytest.skip("mounting disks needs root")
    e2fsck = shutil.which("e2fsck", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
    if e2fsck is None:
        pytest.skip("no e2fsck (e2fsprogs)")
    size_mb = 400  # 4 groups: the backup superblock (group 1) and the last group both in use

    async def run() -> int:
        pool = DiskPool(tmp_path, size_mb, target=1)
        await pool.start()
        try:
            return await pool.take(tmp_path / "full.img")
        finally:
            await pool.stop()

    fd = asyncio.run(run())
    try:
        top = Path(f"/proc/self/fd/{fd}/upper")
        chunk = b"\xa5" * (1 << 20)
        written = 0
        with pytest.raises(OSError, match="No space left"), open(top / "fill", "wb", buffering=0) as f:
            while True:
                written += f.write(chunk)
        assert written > (size_mb - 40) << 20, written  # (~10 MB of metadata, in 4 groups)
        (top / "fill").unlink()
        made = 0
        with pytest.raises(OSError, match="No space left"):
            for batch in range(1 << 20):
                (top / f"d{batch}").mkdir()
                for n in range(1000):
                    (top / f"d{batch}" / str(n)).write_bytes(b"x" * 100)
                    made += 1
        assert made > 10_000, made
        statvfs = os.statvfs(top)
        assert statvfs.f_ffree == 0 or statvfs.f_bavail == 0, statvfs
    finally:
        os.close(fd)
    image = tmp_path / "full.img"
    deadline = time.monotonic() + 10  # the copy's unmount ends with its last descriptor, at once or nearly
    while (checked := subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)).returncode:
        assert time.monotonic() < deadline, checked.stdout + checked.stderr
        time.sleep(0.1)


_CONNECTS = """
import asyncio, os, socket, sys, uvloop
from sandboxd.runtime import manager

class Handle:  # a sandbox's handle as _connect uses it: a new non-blocking socket (here the host's)
    def socket(self):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK).detach()

async def main():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    for _ in range(3):
        sock = await manager._connect(Handle(), port)
        assert sock.getpeername() == ("127.0.0.1", port) and sock.getblocking() is False
        server.accept()[0].close()
        sock.close()
    server.close()
    try:
        await manager._connect(Handle(), port)
    except ConnectionRefusedError:
        print("refused", len(os.listdir("/proc/self/task")))

uvloop.run(main())
"""


def test_a_connect_into_a_sandbox_takes_no_thread_and_a_refusal_is_at_once() -> None:
    # The runtime connects into a sandbox on its event loop: /init (and its retries before the agent
    # listens), and the proxy's new connections. uvloop's sock_connect resolved even 127.0.0.1 with
    # getaddrinfo in libuv's thread pool first: a worker thread's start, then a thread hop per connect
    # (a wait for a CPU on a busy host, ~2.6 ms of a cold create's /init connect). Run in a process of
    # its own on uvloop, the runtime's loop: connected, refused when nothing listens, and the process
    # still has its one thread (with sock_connect: five, libuv's four workers).
    out = subprocess.run([sys.executable, "-c", _CONNECTS], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["refused", "1"], (out.stdout, out.stderr)
