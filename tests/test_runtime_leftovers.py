"""What a runtime killed outright leaves on the host (its nftables table, its cgroup instance group) is
removed by the next runtime that starts there, unless a sandbox of it still runs; and a second runtime
on a data dir in use is refused. Real runtimes, real SIGKILL, real locks, nftables and cgroups."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Runtime, free_port
from sandboxd.runtime import leftovers
from sandboxd.runtime.host import instance_name
from sandboxd.runtime.network.addressing import tag_for


def _tables() -> set[str]:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in listed.splitlines() if line.startswith("table inet sandboxd_")}


def _instance_groups(data_dir: Path) -> list[str]:
    instance = instance_name(data_dir)
    root = Path("/sys/fs/cgroup")
    return [str(p) for base in (root, *root.iterdir()) if (p := base / "sandboxd" / instance).is_dir()]


def _mark(data_dir: Path) -> Path:
    return leftovers.MARK_DIR / f"runtime-{instance_name(data_dir)}.lock"


def _write_mark(mark_dir: Path, instance: str, tag: str) -> Path:
    path = mark_dir / f"runtime-{instance}.lock"
    path.write_text(json.dumps({"instance": instance, "table": f"inet sandboxd_{tag}", "link_prefix": f"sd{tag}h"}))
    return path


def test_the_sweep_removes_only_what_a_gone_runtime_left(tmp_path: Path) -> None:
    """Marks in a directory of the test's own: one held by a live process (kept, nothing removed), one
    free (its table and instance removed, the mark gone), one free whose runtime still has a link (a
    sandbox runs: its table is kept, and so is the mark), one with names no runtime writes (ignored)."""
    removed_tables: list[str] = []
    removed_instances: list[str] = []
    held = _write_mark(tmp_path, "d-" + "1" * 16, "aaaaaa")
    gone = _write_mark(tmp_path, "d-" + "2" * 16, "bbbbbb")
    linked = _write_mark(tmp_path, "d-" + "3" * 16, "cccccc")
    hostile = tmp_path / "runtime-x.lock"
    hostile.write_text(json.dumps({"instance": "../../etc", "table": "inet filter; flush ruleset", "link_prefix": ""}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(held)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        swept = leftovers.sweep(
            removed_tables.append, removed_instances.append, tmp_path, links=lambda: ["lo", "eth0", "sdcccccch4"]
        )
    finally:
        holder.kill()
        holder.wait()
    assert swept == ["d-" + "2" * 16]
    assert removed_tables == ["inet sandboxd_bbbbbb"]
    assert removed_instances == ["d-" + "2" * 16]
    assert held.exists() and linked.exists() and hostile.exists()
    assert not gone.exists()
    # Its holder gone, the first mark is swept too; the linked one waits for its sandboxes.
    assert leftovers.sweep(removed_tables.append, removed_instances.append, tmp_path, links=lambda: ["sdcccccch4"]) == [
        "d-" + "1" * 16
    ]
    assert linked.exists() and not held.exists()


class _Sandboxes:
    """Sandboxes of each instance as the sweep sees them: listed, and killed (recorded)."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.groups = groups
        self.killed: list[tuple[str, str]] = []

    def ids(self, instance: str) -> list[str]:
        return list(self.groups.get(instance, []))

    def kill(self, instance: str, sandbox_id: str) -> None:
        self.killed.append((instance, sandbox_id))
        self.groups[instance].remove(sandbox_id)


def _write_mark_of(mark_dir: Path, directory: Path, tag: str, **fields: object) -> tuple[Path, str]:
    """A mark as a runtime on ``directory`` writes it (its data dir recorded, and where it is), ``fields``
    over it. A ``directory`` that does not exist is one deleted since: made for the record, then removed."""
    instance = instance_name(directory)
    path = mark_dir / f"runtime-{instance}.lock"
    mark = {"instance": instance, "table": f"inet sandboxd_{tag}", "link_prefix": f"sd{tag}h"}
    made = not directory.exists()
    directory.mkdir(exist_ok=True)
    where = leftovers.filesystem_of(directory)
    if made:
        directory.rmdir()
    path.write_text(json.dumps({**mark, "data_dir": str(directory.resolve()), "data_fs": where, **fields}))
    return path, instance


def _database(data_dir: Path, rows: dict[str, str], booting: set[str] | None = None) -> None:
    """A data dir's database with these sandboxes (id: state); with a ``booting`` column (a runtime
    that answers creates early) when ``booting`` is given: those ids' boots never finished."""
    data_dir.mkdir(exist_ok=True)
    db = sqlite3.connect(data_dir / "sandboxd.db")
    if booting is None:  # an older runtime's
        db.execute("CREATE TABLE sandboxes (id TEXT PRIMARY KEY, state TEXT NOT NULL)")
        db.executemany("INSERT INTO sandboxes VALUES (?, ?)", rows.items())
    else:
        db.execute("CREATE TABLE sandboxes (id TEXT PRIMARY KEY, state TEXT NOT NULL, booting INTEGER NOT NULL)")
        db.executemany("INSERT INTO sandboxes VALUES (?, ?, ?)", [(k, v, k in booting) for k, v in rows.items()])
    db.commit()
    db.close()


def test_the_sweep_kills_the_sandboxes_nobody_can_adopt(tmp_path: Path) -> None:
    """Marks of gone runtimes, their sandboxes listed: the data dir gone, all are killed (then the
    table and mark go); the data dir there, only those without a running or paused row (warm ones,
    unfinished creates) or whose row says its boot never finished (a create answered early) are,
    and the table and mark stay for the rest's links; a mark that records no data dir (older
    runtimes), or one that is not its instance's, or whose database cannot be read: none is killed.
    A runtime without links (``--no-network``) whose sandbox is left keeps its mark."""
    marks = tmp_path / "marks"
    marks.mkdir()
    removed_tables: list[str] = []
    dirs = (tmp_path / n for n in ("gone", "kept", "old", "odd", "torn", "unlinked"))
    gone_dir, kept_dir, old_dir, odd_dir, torn_dir, unlinked_dir = dirs
    kept_rows = {"claimed": "running", "paused": "paused", "ended": "killed", "halfway": "running"}
    _database(kept_dir, kept_rows, booting={"halfway"})
    _database(unlinked_dir, {"claimed": "running"})
    torn_dir.mkdir()
    (torn_dir / "sandboxd.db").write_bytes(b"not a database, but long enough for sqlite to say so" * 20)
    gone_mark, gone = _write_mark_of(marks, gone_dir, "aaaaaa")
    kept_mark, kept = _write_mark_of(marks, kept_dir, "bbbbbb")
    old_mark, old = _write_mark_of(marks, old_dir, "cccccc")
    old_mark.write_text(json.dumps({k: v for k, v in json.loads(old_mark.read_text()).items() if k != "data_dir"}))
    odd_mark, odd = _write_mark_of(marks, odd_dir, "dddddd", data_dir=str(gone_dir.resolve()))
    torn_mark, torn = _write_mark_of(marks, torn_dir, "eeeeee")
    unlinked_mark, unlinked = _write_mark_of(marks, unlinked_dir, "ffffff")
    sandboxes = _Sandboxes({
        gone: ["w1", "claimed"],
        kept: ["claimed", "paused", "ended", "warm", "halfway"],
        old: ["w2"],
        odd: ["w3"],
        torn: ["w4"],
        unlinked: ["claimed", "w5"],
    })  # fmt: skip

    def links() -> list[str]:  # each runtime's sandboxes have links; the gone dir's go once it has none
        return ["lo", "sdbbbbbbh1", "sdcccccch1", "sdddddddh1", "sdeeeeeeh1"] + ["sdaaaaaah1"] * bool(
            sandboxes.groups[gone]
        )

    swept = leftovers.sweep(removed_tables.append, lambda _: None, marks, links=links, sandboxes=sandboxes)
    killed = [(gone, "w1"), (gone, "claimed"), (kept, "ended"), (kept, "warm"), (kept, "halfway"), (unlinked, "w5")]
    assert sorted(sandboxes.killed) == sorted(killed)
    assert swept == [gone] and sorted(removed_tables) == ["inet sandboxd_aaaaaa", "inet sandboxd_ffffff"]
    assert not gone_mark.exists() and kept_mark.exists() and old_mark.exists() and odd_mark.exists()
    assert torn_mark.exists() and unlinked_mark.exists()
    assert sandboxes.groups[kept] == ["claimed", "paused"] and sandboxes.groups[unlinked] == ["claimed"]


def test_a_mark_whose_names_do_not_belong_together_is_left_alone(tmp_path: Path) -> None:
    """A mark no runtime writes: its table another tag's than its links (whose absence would remove a
    table whose own sandboxes still run: the links checked are not that table's), or its file another
    instance's than its contents (whose groups would be emptied). Nothing is removed; the marks stay."""
    removed_tables: list[str] = []
    removed_instances: list[str] = []
    crossed = tmp_path / f"runtime-d-{'5' * 16}.lock"
    crossed.write_text(
        json.dumps({"instance": "d-" + "5" * 16, "table": "inet sandboxd_eeeeee", "link_prefix": "sdffffffh"})
    )
    renamed = tmp_path / f"runtime-d-{'6' * 16}.lock"
    renamed.write_text(
        json.dumps({"instance": "d-" + "7" * 16, "table": "inet sandboxd_aaaaaa", "link_prefix": "sdaaaaaah"})
    )
    # The live runtime of tag eeeeee has a sandbox (its link); the crossed mark's own tag has none.
    swept = leftovers.sweep(removed_tables.append, removed_instances.append, tmp_path, links=lambda: ["sdeeeeeeh1"])
    assert swept == [] and removed_tables == [] and removed_instances == []
    assert crossed.exists() and renamed.exists()


def test_a_mark_unlinked_before_the_sweep_locks_it_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep opens a mark; before it locks it, the runtime that held it stops cleanly (its mark
    unlinked and released) and starts again (a new mark at the path; its table, of the same name,
    made again). The lock the sweep then gets is on the old, unlinked file, which names the live
    runtime's table: nothing may be removed. The interleaving is forced at the sweep's flock."""
    removed_tables: list[str] = []
    removed_instances: list[str] = []
    instance = "d-" + "8" * 16
    first = leftovers.RuntimeMark(instance, "inet sandboxd_999999", "sd999999h", tmp_path)
    real_flock = fcntl.flock
    restarted: list[leftovers.RuntimeMark] = []

    def flock_after_a_restart(fd: int, operation: int) -> None:
        if not restarted and fd != first.fd:
            first.close()
            restarted.append(leftovers.RuntimeMark(instance, "inet sandboxd_999999", "sd999999h", tmp_path))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_restart)
    swept = leftovers.sweep(removed_tables.append, removed_instances.append, tmp_path, links=lambda: [])
    monkeypatch.undo()
    assert restarted, "the interleaving was not forced"
    assert swept == [] and removed_tables == [] and removed_instances == []
    assert restarted[0].path.exists()
    restarted[0].close()


def test_a_gone_runtimes_table_that_a_live_runtime_also_names_is_kept(tmp_path: Path) -> None:
    """Two data dirs whose 24-bit tags collide name one table: the gone one's mark must not remove the
    live one's table, even with no link of that tag (the live runtime has no sandbox yet)."""
    removed_tables: list[str] = []
    live = leftovers.RuntimeMark("d-" + "5" * 16, "inet sandboxd_eeeeee", "sdeeeeeeh", tmp_path)
    try:
        gone = _write_mark(tmp_path, "d-" + "6" * 16, "eeeeee")
        assert leftovers.sweep(removed_tables.append, lambda _: None, tmp_path, links=lambda: []) == []
        assert removed_tables == [] and gone.exists()
    finally:
        live.close()
    # The live one stopped: now the table is the gone one's alone.
    assert leftovers.sweep(removed_tables.append, lambda _: None, tmp_path, links=lambda: []) == ["d-" + "6" * 16]
    assert removed_tables == ["inet sandboxd_eeeeee"]


def test_a_mark_torn_by_its_runtimes_death_is_removed(tmp_path: Path) -> None:
    """A runtime killed while it wrote its mark leaves it empty or cut short: nobody holds it and it
    names nothing, so the sweep removes it (it used to skip it for ever). Anything else it cannot read
    is not its to remove."""
    empty = tmp_path / f"runtime-d-{'7' * 16}.lock"
    empty.write_bytes(b"")
    torn = tmp_path / f"runtime-d-{'8' * 16}.lock"
    torn.write_bytes(b'{"instance": "d-88')
    other = tmp_path / f"runtime-d-{'9' * 16}.lock"
    other.write_bytes(b"not a mark")
    assert leftovers.sweep(lambda _: None, lambda _: None, tmp_path, links=lambda: []) == []
    assert not empty.exists() and not torn.exists() and other.exists()


def test_a_mark_nested_past_jsons_depth_stops_no_start(tmp_path: Path) -> None:
    """``json.loads`` raises ``RecursionError`` (not ``ValueError``) for arrays nested past its depth:
    such a mark, free or held, must not make every later runtime's start fail."""
    deep = b"[" * 4000
    free = tmp_path / f"runtime-d-{'a' * 16}.lock"
    free.write_bytes(deep)
    held = tmp_path / f"runtime-d-{'b' * 16}.lock"
    held.write_bytes(deep)
    fd = os.open(held, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert leftovers.sweep(lambda _: None, lambda _: None, tmp_path, links=lambda: []) == []
    finally:
        os.close(fd)
    assert free.exists() and held.exists()  # not a torn mark of ours: not ours to remove


def test_a_mark_is_held_once(tmp_path: Path) -> None:
    """A second mark for the same instance (a second runtime on one data dir) is refused, with a
    message naming the cause; once the first is closed, it can be taken."""
    first = leftovers.RuntimeMark("d-" + "4" * 16, "inet sandboxd_dddddd", "sdddddddh", tmp_path)
    with pytest.raises(leftovers.MarkHeld, match="another sandboxd runtime is running on this data dir"):
        leftovers.RuntimeMark("d-" + "4" * 16, "inet sandboxd_dddddd", "sdddddddh", tmp_path)
    first.close()
    assert not first.path.exists()
    again = leftovers.RuntimeMark("d-" + "4" * 16, "inet sandboxd_dddddd", "sdddddddh", tmp_path)
    fd = os.open(again.path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        again.close()


def test_a_runtime_killed_outright_is_cleaned_up_by_the_next_one(start_runtime: Callable[..., Runtime]) -> None:
    """SIGKILL leaves a runtime's table (whose input chain drops outside packets to its two ports) and
    its instance group; the next runtime that starts on the host, on another data dir, removes both and
    the mark. A runtime whose sandbox still runs keeps its table. Without the sweep, all stayed for good."""
    killed = start_runtime("--warm-sandboxes", "0")
    table = f"sandboxd_{tag_for(killed.data_dir)}"
    assert table in _tables() and _instance_groups(killed.data_dir) and _mark(killed.data_dir).exists()
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    time.sleep(0.5)  # its zygote and network helper see it gone and exit
    assert table in _tables(), "a killed runtime's table stayed before this change: the test would prove nothing"

    after = start_runtime("--warm-sandboxes", "0")
    assert table not in _tables()
    assert _instance_groups(killed.data_dir) == []
    assert not _mark(killed.data_dir).exists()
    assert f"sandboxd_{tag_for(after.data_dir)}" in _tables()

    # The same runtime again: it serves, and a sandbox of it keeps its table when it is killed again.
    killed.restart()
    import httpx

    created = httpx.post(
        f"{killed.url}/sandboxes", headers={"X-API-KEY": killed.api_key}, json={"templateID": "base"}, timeout=60
    )
    assert created.status_code == 201, created.text
    killed.booted(created.json()["sandboxID"])  # else it is killed half-booted: nobody's to adopt
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    third = start_runtime("--warm-sandboxes", "0")
    assert third.process.poll() is None
    assert table in _tables(), "the table of a runtime whose sandbox still runs was removed"
    assert _mark(killed.data_dir).exists()
    killed.restart()  # adopts its sandbox; the fixture stops it and kills the sandbox


def _sandbox_procs(data_dir: Path) -> dict[str, set[int]]:
    """Each sandbox group of the runtime's instance, in every hierarchy, with the sandbox's processes
    in it: those in a pid namespace of their own. Not the zygote's "A", which joins the group to make
    the sandbox and exits once it has reported, possibly after the create is answered (on a busy host
    it was still there, then gone, and read as a sandbox process a clean stop had killed)."""
    instance = instance_name(data_dir)
    root = Path("/sys/fs/cgroup")
    host_pid_ns = os.readlink("/proc/self/ns/pid")
    found: dict[str, set[int]] = {}
    for base in (root, *root.iterdir()):
        group = base / "sandboxd" / instance
        if not group.is_dir():
            continue
        for sandbox in group.iterdir():
            if sandbox.is_dir() and not sandbox.name.startswith("."):
                procs = found.setdefault(sandbox.name, set())
                with contextlib.suppress(OSError):
                    procs.update(int(p) for p in (sandbox / "cgroup.procs").read_text().split())
    return {name: {pid for pid in procs if _pid_ns(pid) not in (host_pid_ns, None)} for name, procs in found.items()}


def _pid_ns(pid: int) -> str | None:
    """The pid namespace of ``pid``; None once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for PID 1 to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _links_of(data_dir: Path) -> list[str]:
    return [n for n in os.listdir("/sys/class/net") if n.startswith(f"sd{tag_for(data_dir)}h")]


def _loop_devices_of(data_dir: Path) -> list[str]:
    """The loop devices whose backing file is (or was, before its unlink) in the data dir."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().startswith(f"{data_dir}/"):
                found.append(backing.parent.parent.name)
    return found


def _eventually(done: Callable[[], bool], what: str) -> None:
    """A killed sandbox's link goes with its network namespace, and its loop device with its disk's
    last mount: the kernel finishes both a moment after its processes are gone."""
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _id_claims_of(data_dir: Path) -> list[tuple[int, str]]:
    from sandboxd import _core

    return list(_core.IdRegistry(_core.DEFAULT_ID_REGISTRY).claims_of(str(data_dir)))


def _with_a_claimed_and_two_warm_sandboxes(runtime: Runtime) -> tuple[str, dict[str, set[int]]]:
    """Claim a sandbox (from the pool of two), and wait until the pool is full again and every
    sandbox has processes and a link: its id, and every sandbox's processes."""
    import httpx

    created = httpx.post(
        f"{runtime.url}/sandboxes", headers={"X-API-KEY": runtime.api_key}, json={"templateID": "host"}, timeout=60
    )
    assert created.status_code == 201, created.text
    claimed = str(created.json()["sandboxID"])
    # A claim is answered before its /init and rules: killed sooner, its row says it never finished
    # booting, and the next runtime's sweep kills it as nobody's to adopt.
    runtime.booted(claimed)
    deadline = time.monotonic() + 120
    while True:
        procs = _sandbox_procs(runtime.data_dir)
        if len(procs) == 3 and all(procs.values()) and len(_links_of(runtime.data_dir)) == 3:
            return claimed, procs
        assert time.monotonic() < deadline, f"no 3 sandboxes after 120 s: {procs}\n{runtime.log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_a_gone_runtime_whose_data_dir_is_gone_has_its_sandboxes_killed_by_the_next_one(
    start_runtime: Callable[..., Runtime],
) -> None:
    """A runtime with a claimed sandbox and two warm ones is SIGKILLed and its data dir removed (as the
    tests' harnesses do): nobody can adopt those sandboxes any more. The next runtime that starts on
    the host kills them and releases what they held: their processes and groups, their links and the
    runtime's table, their disks' loop devices, their id ranges, and the mark. Before this change all
    of it stayed on the host for good."""
    killed = start_runtime("--warm-sandboxes", "2", "--warm-template", "host")
    _, procs = _with_a_claimed_and_two_warm_sandboxes(killed)
    data_dir, table = killed.data_dir, f"sandboxd_{tag_for(killed.data_dir)}"
    assert _loop_devices_of(data_dir) and len(_id_claims_of(data_dir)) >= 3
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    shutil.rmtree(data_dir)
    assert _mark(data_dir).exists() and table in _tables()

    start_runtime("--warm-sandboxes", "0")
    assert _sandbox_procs(data_dir) == {} and _instance_groups(data_dir) == []
    assert not [pid for pids in procs.values() for pid in pids if _alive(pid)]
    assert _links_of(data_dir) == [] and table not in _tables()
    _eventually(lambda: _loop_devices_of(data_dir) == [], f"loop devices left: {_loop_devices_of(data_dir)}")
    assert _id_claims_of(data_dir) == []
    assert not _mark(data_dir).exists()


def test_a_gone_runtime_whose_data_dir_remains_has_only_its_warm_sandboxes_killed(
    start_runtime: Callable[..., Runtime],
) -> None:
    """A runtime with a claimed sandbox and two warm ones is SIGKILLed; its data dir stays. The next
    runtime that starts on the host (on another data dir) kills the warm ones, which have no row and
    so are never adopted (before this change they stayed until their own runtime restarted, for good
    if it never did), and leaves the claimed one running, with its link, its runtime's table and the
    mark: that runtime adopts it when it restarts."""
    import httpx

    killed = start_runtime("--warm-sandboxes", "2", "--warm-template", "host")
    claimed, procs = _with_a_claimed_and_two_warm_sandboxes(killed)
    warm = set(procs) - {claimed}
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()

    start_runtime("--warm-sandboxes", "0")
    assert set(_sandbox_procs(killed.data_dir)) == {claimed}
    assert all(_alive(pid) for pid in procs[claimed])
    assert not [pid for sandbox in warm for pid in procs[sandbox] if _alive(pid)]
    _eventually(lambda: len(_links_of(killed.data_dir)) == 1, f"links: {_links_of(killed.data_dir)}")
    assert f"sandboxd_{tag_for(killed.data_dir)}" in _tables()
    assert _mark(killed.data_dir).exists()

    killed.restart()
    got = httpx.get(f"{killed.url}/sandboxes/{claimed}", headers={"X-API-KEY": killed.api_key}, timeout=30)
    assert got.status_code == 200, got.text
    assert all(_alive(pid) for pid in procs[claimed])


def _colliding_data_dirs(parent: Path) -> tuple[Path, Path]:
    """Two data dirs under ``parent`` whose 24-bit network tags are one (a birthday search: ~5,000
    names)."""
    seen: dict[str, Path] = {}
    for i in range(1 << 16):
        path = parent / f"d{i}"
        tag = tag_for(path)
        if tag in seen:
            return seen[tag], path
        seen[tag] = path
    raise AssertionError("no two of 65,536 names share a tag")


def test_a_runtime_whose_tag_a_live_runtime_holds_is_refused(tmp_path: Path) -> None:
    """Two live runtimes on data dirs whose tags collide would share one table and one link prefix:
    the later one is refused, naming the other's data dir, and leaves no mark; the earlier one's
    mark stays held. Once the earlier is gone, the later starts."""
    first_dir, second_dir = _colliding_data_dirs(tmp_path)
    tag = tag_for(first_dir)
    table, links = f"inet sandboxd_{tag}", f"sd{tag}h"
    first = leftovers.RuntimeMark(instance_name(first_dir), table, links, tmp_path, str(first_dir))
    try:
        with pytest.raises(leftovers.MarkHeld, match=f"the runtime on {first_dir} uses the same network tag"):
            leftovers.RuntimeMark(instance_name(second_dir), table, links, tmp_path, str(second_dir))
        assert not (tmp_path / f"runtime-{instance_name(second_dir)}.lock").exists()
        with pytest.raises(BlockingIOError):
            fcntl.flock(os.open(first.path, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        first.release()  # gone, as a runtime killed outright: its mark stays, free
    second = leftovers.RuntimeMark(instance_name(second_dir), table, links, tmp_path, str(second_dir))
    second.close()


def test_serve_refuses_a_data_dir_whose_tag_a_live_runtime_holds(tmp_path: Path) -> None:
    """The same through ``sandboxd serve``: it exits with the message, before it makes anything
    (no database in its data dir). This test's process holds the other runtime's mark, in the
    host's mark directory, as that runtime would."""
    if os.geteuid() != 0:
        pytest.skip("the runtime needs root")
    first_dir, second_dir = _colliding_data_dirs(tmp_path)
    tag = tag_for(first_dir)
    first = leftovers.RuntimeMark(
        instance_name(first_dir), f"inet sandboxd_{tag}", f"sd{tag}h", data_dir=str(first_dir.resolve())
    )
    try:
        second = subprocess.run(
            [sys.executable, "-m", "sandboxd", "serve", "--port", str(free_port()), "--data-dir", str(second_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        first.close()
    assert second.returncode != 0
    assert "uses the same network tag as this data dir" in second.stderr, second.stderr
    assert not (second_dir / "sandboxd.db").exists()


def test_serve_refuses_a_data_dir_with_a_newline(tmp_path: Path) -> None:
    """The id registry records a data dir on one line: such a runtime would start, and every create
    would then fail at its id claim (review8). It is refused at start, before it makes the dir."""
    if os.geteuid() != 0:
        pytest.skip("the runtime needs root")
    data_dir = tmp_path / "two\nlines"
    refused = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--port", str(free_port()), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "--data-dir must not contain a newline" in refused.stderr, refused.stderr
    assert not data_dir.exists()


def test_a_second_runtime_on_a_data_dir_in_use_is_refused(start_runtime: Callable[..., Runtime]) -> None:
    """It exits with a message naming the cause, and the first runtime keeps serving."""
    import httpx

    first = start_runtime("--warm-sandboxes", "0")
    second = subprocess.run(
        [sys.executable, "-m", "sandboxd", "serve", "--port", str(free_port()), "--data-dir", str(first.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "another sandboxd runtime is running on this data dir" in second.stderr, second.stderr
    assert httpx.get(f"{first.url}/health", timeout=10).status_code in (200, 204)


def test_sandboxes_a_clean_stop_leaves_running_are_killed_once_their_data_dir_is_gone(
    start_runtime: Callable[..., Runtime],
) -> None:
    """A clean stop (SIGTERM) leaves a claimed sandbox running, for the next runtime on that data dir
    to adopt, and a stop with none left removes its mark. The mark of the first stays: once the data
    dir is removed (Ctrl-C, then ``rm -rf`` of a scratch dir), the next runtime on the host kills the
    sandbox by it. Before, a clean stop removed the mark whatever it left, and such a sandbox's
    processes, groups, disk and id range stayed on the host for good."""
    import httpx

    stopped = start_runtime("--warm-sandboxes", "0")
    created = httpx.post(
        f"{stopped.url}/sandboxes", headers={"X-API-KEY": stopped.api_key}, json={"templateID": "host"}, timeout=60
    )
    assert created.status_code == 201, created.text
    procs = _sandbox_procs(stopped.data_dir)
    assert len(procs) == 1 and all(procs.values())
    stopped.process.terminate()
    assert stopped.process.wait(30) == 0
    assert all(_alive(pid) for pids in procs.values() for pid in pids), "a clean stop killed its sandbox"
    assert _mark(stopped.data_dir).exists()

    empty = start_runtime("--warm-sandboxes", "0")
    empty.process.terminate()
    assert empty.process.wait(30) == 0
    assert not _mark(empty.data_dir).exists(), "a clean stop that leaves nothing left its mark"
    assert all(_alive(pid) for pids in procs.values() for pid in pids), "a sweep killed an adoptable sandbox"

    shutil.rmtree(stopped.data_dir)
    start_runtime("--warm-sandboxes", "0")
    assert _sandbox_procs(stopped.data_dir) == {} and _instance_groups(stopped.data_dir) == []
    assert not [pid for pids in procs.values() for pid in pids if _alive(pid)]
    _eventually(lambda: _loop_devices_of(stopped.data_dir) == [], f"loop devices: {_loop_devices_of(stopped.data_dir)}")
    assert _id_claims_of(stopped.data_dir) == []
    assert not _mark(stopped.data_dir).exists()


def _stopped_cleanly_with_a_sandbox_left(marks: Path, data_dir: Path) -> str:
    """The mark a runtime on ``data_dir`` leaves when it stops cleanly with its sandbox ``claimed``
    running (released, not removed); its instance."""
    _database(data_dir, {"claimed": "running"})
    instance = instance_name(data_dir)
    leftovers.RuntimeMark(instance, "inet sandboxd_abcdef", "sdabcdefh", marks, str(data_dir.resolve())).release()
    return instance


def test_a_clean_stops_mark_spares_its_sandboxes_while_its_data_dir_is_there_without_a_database(
    tmp_path: Path,
) -> None:
    """A runtime stopped cleanly with a sandbox left (its mark released, not removed); its data dir
    then found without its database (a volume unmounted at its mount point, a restore under way):
    the sandbox is left alone, as one whose database cannot be read, not killed as one of a runtime
    that died before it made a database. Once the data dir itself is gone it is killed."""
    marks = tmp_path / "marks"
    data_dir = tmp_path / "volume"
    instance = _stopped_cleanly_with_a_sandbox_left(marks, data_dir)
    (data_dir / "sandboxd.db").unlink()  # the volume's mount point, empty for now
    sandboxes = _Sandboxes({instance: ["claimed"]})
    assert leftovers.sweep(lambda _: None, lambda _: None, marks, links=lambda: [], sandboxes=sandboxes) == []
    assert sandboxes.killed == [] and (marks / f"runtime-{instance}.lock").exists()

    data_dir.rmdir()
    assert leftovers.sweep(lambda _: None, lambda _: None, marks, links=lambda: [], sandboxes=sandboxes) == [instance]
    assert sandboxes.killed == [(instance, "claimed")]


class _Mounts:
    """The mounts a test makes, by a list (not ``os.path.ismount``: a bind mount of the same file
    system is not one to it); whatever is still mounted is unmounted at the ``with``'s end."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True)
        self.mounted.append(Path(args[-1]))

    def umount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=True)
        self.mounted.remove(path)

    def __enter__(self) -> _Mounts:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", str(path)], check=False)


def test_a_data_dir_on_a_volume_unmounted_for_now_is_not_taken_for_deleted(tmp_path: Path) -> None:
    """Runtimes killed outright, their data dirs on volumes unmounted since: one inside a volume (a bind
    mount of a directory on the same file system: its path is missing, its mount point's directory
    there), one at a volume's root (a tmpfs: its path is an empty directory). Neither was deleted, so
    none of their sandboxes is killed: before, a data dir not found was taken for deleted (every
    sandbox killed), and one found without a database for a runtime that died before it made one
    (the same). Once the volume is back, only the warm sandbox goes; once the data dir inside the
    mounted volume is really deleted, all of it. The volume comes back with a mount id of its own
    (the kernel hands out the lowest free one: two placeholder mounts take the ids the unmounts
    freed), as it would once anything else mounted meanwhile: before, the data dir deleted from it
    then was not taken for deleted (seen as a flake, when the kernel happened to give it its old
    id back). Meanwhile another directory of the same file system bound at the volume's mount point
    (the same device and mount point, another root) is not the volume either."""
    marks, backing, volume, root, hold = (tmp_path / n for n in ("marks", "backing", "volume", "root", "hold"))
    for directory in (backing, volume, root, hold / "1", hold / "2"):
        directory.mkdir(parents=True)
    below = volume / "data"
    with _Mounts() as mounts:
        mount, umount = mounts.mount, mounts.umount
        mount("--bind", str(backing), str(volume))
        mount("-t", "tmpfs", "-o", "size=1m", "sandboxd-test", str(root))
        instances = []
        for data_dir, tag in ((below, "a1a1a1"), (root, "b2b2b2")):
            _database(data_dir, {"claimed": "running"})
            instance = instance_name(data_dir)
            mark = leftovers.RuntimeMark(instance, f"inet sandboxd_{tag}", f"sd{tag}h", marks, str(data_dir.resolve()))
            os.close(mark.fd)  # killed outright: its mark left, free
            instances.append(instance)
        below_instance, root_instance = instances
        sandboxes = _Sandboxes({below_instance: ["claimed", "warm"], root_instance: ["claimed", "warm"]})
        umount(root)
        umount(volume)
        assert not below.exists() and volume.is_dir() and not (root / "sandboxd.db").exists()
        assert leftovers.sweep(lambda _: None, lambda _: None, marks, links=list, sandboxes=sandboxes) == []
        assert sandboxes.killed == []

        # Another directory of the same file system bound at the volume's mount point: the same
        # device and mount point, another root. The data dir is not deleted, it is not there.
        mount("--bind", str(hold), str(volume))
        assert leftovers.sweep(lambda _: None, lambda _: None, marks, links=list, sandboxes=sandboxes) == []
        assert sandboxes.killed == []
        umount(volume)

        mount("-t", "tmpfs", "-o", "size=1m", "sandboxd-test", str(hold / "1"))
        mount("-t", "tmpfs", "-o", "size=1m", "sandboxd-test", str(hold / "2"))
        mount("--bind", str(backing), str(volume))
        recorded = json.loads((marks / f"runtime-{below_instance}.lock").read_text())["data_fs"]
        assert leftovers.filesystem_of(volume)[2] != recorded[2], "the volume is back with its old mount id"
        leftovers.sweep(lambda _: None, lambda _: None, marks, links=list, sandboxes=sandboxes)
        assert sandboxes.killed == [(below_instance, "warm")]

        shutil.rmtree(below)
        assert leftovers.sweep(lambda _: None, lambda _: None, marks, links=list, sandboxes=sandboxes) == [
            below_instance
        ]
        assert sandboxes.killed == [(below_instance, "warm"), (below_instance, "claimed")]
        assert sandboxes.groups[root_instance] == ["claimed", "warm"]


def test_an_id_range_stays_claimed_while_its_data_dirs_volume_is_unmounted(tmp_path: Path) -> None:
    """The host's id registry, as a runtime's start reclaims it: a claim whose data dir is on a volume
    unmounted for now (inside a bind mount of the same file system: its mount point's directory is
    there; at a tmpfs's root: its mount point's directory gone too) is kept, since the sandbox's files,
    owned by the range, come back with the volume, and the range must still be its alone. Before,
    a data dir not found was taken for deleted and its range handed to the next sandbox (fixes35).
    A data dir deleted inside the mounted volume, and one deleted with the whole tree it was in
    (what test suites do with their temporary directories), are freed."""
    from sandboxd import _core

    registry = _core.IdRegistry(_core.DEFAULT_ID_REGISTRY)
    backing, volume, root, tree = (tmp_path / n for n in ("backing", "volume", "root", "tree"))
    for directory in (backing, volume, root):
        directory.mkdir()
    below, deep = volume / "data", tree / "a" / "data"
    claims: list[tuple[int, Path, str]] = []
    mounts = _Mounts()
    mount, umount = mounts.mount, mounts.umount
    try:
        mount("--bind", str(backing), str(volume))
        mount("-t", "tmpfs", "-o", "size=1m", "sandboxd-test", str(root))
        below.mkdir()
        deep.mkdir(parents=True)
        for data_dir, sandbox in ((below, "below"), (root, "root"), (deep, "deep")):
            claims.append((registry.claim(str(data_dir), sandbox), data_dir, sandbox))
        (below_base, _, _), (root_base, _, _), (deep_base, _, _) = claims
        umount(root)
        umount(volume)
        root.rmdir()
        shutil.rmtree(tree)

        freed = registry.reclaim_stale()
        assert deep_base in freed
        assert below_base not in freed and root_base not in freed
        assert _id_claims_of(below) == [(below_base, "below")]
        assert _id_claims_of(root) == [(root_base, "root")]

        mount("--bind", str(backing), str(volume))
        assert below_base not in registry.reclaim_stale()
        shutil.rmtree(below)
        assert below_base in registry.reclaim_stale()
        assert _id_claims_of(below) == []
    finally:
        mounts.__exit__()
        for base, data_dir, sandbox in claims:
            registry.release(base, str(data_dir), sandbox)


def test_a_runtime_restarting_on_its_data_dir_does_not_wait_for_a_sweep_of_other_marks(tmp_path: Path) -> None:
    """A runtime stopped cleanly with a sandbox left (its mark kept, free) and restarted, while
    another runtime's start sweeps: that sweep takes every free mark's lock first, this one's
    included. It holds each only while that mark is swept, not until the sweep is done: killing a
    gone runtime's sandboxes (and waiting up to 5 s for their links) can take longer than the 10 s a
    restarting runtime waits for its mark before it says another runtime runs on its data dir."""
    import threading

    marks = tmp_path / "marks"
    restarted_dir = tmp_path / "restarted"
    restarted = _stopped_cleanly_with_a_sandbox_left(marks, restarted_dir)
    gone_dir = next(p for n in range(100) if instance_name(p := tmp_path / f"gone{n}") > restarted)  # swept after it
    _, gone = _write_mark_of(marks, gone_dir, "fedcba")
    killing, adopted = threading.Event(), threading.Event()

    class Slow(_Sandboxes):
        def kill(self, instance: str, sandbox_id: str) -> None:
            killing.set()
            adopted.wait(15)
            super().kill(instance, sandbox_id)

    sandboxes = Slow({restarted: ["claimed"], gone: ["w1"]})
    sweeping = threading.Thread(
        target=leftovers.sweep,
        args=(lambda _: None, lambda _: None, marks),
        kwargs={"links": list, "sandboxes": sandboxes},
    )
    sweeping.start()
    try:
        assert killing.wait(15)
        again = leftovers.RuntimeMark(
            restarted, "inet sandboxd_abcdef", "sdabcdefh", marks, str(restarted_dir.resolve())
        )
        assert sweeping.is_alive(), "the sweep was done before the mark was taken: nothing tested"
        adopted.set()
        again.close()
    finally:
        adopted.set()
        sweeping.join(30)
    assert sandboxes.killed == [(gone, "w1")]


def test_a_mark_is_held_to_the_sweeps_end_when_a_later_one_names_its_table(tmp_path: Path) -> None:
    """Two data dirs whose tags collide (24 bits of a hash) name one table. A runtime restarting on
    the first while the second's sandboxes are killed would be live with that table, which the
    sweep read as nobody's before it began: it would remove it once the second's links were gone.
    So the first's lock is let go early only when no later mark names its table."""
    marks = tmp_path / "marks"
    marks.mkdir()
    first_dir = tmp_path / "first"
    _database(first_dir, {"claimed": "running"})
    first_mark, first = _write_mark_of(marks, first_dir, "abcdef")
    later_dir = next(p for n in range(100) if instance_name(p := tmp_path / f"later{n}") > first)
    _, later = _write_mark_of(marks, later_dir, "abcdef")
    held: list[bool] = []

    class Probing(_Sandboxes):
        def kill(self, instance: str, sandbox_id: str) -> None:
            fd = os.open(first_mark, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            super().kill(instance, sandbox_id)

    sandboxes = Probing({first: ["claimed"], later: ["w1"]})
    leftovers.sweep(lambda _: None, lambda _: None, marks, links=list, sandboxes=sandboxes)
    assert held == [True], "the first mark was let go while a mark naming its table was being swept"


def test_a_mount_point_with_escaped_bytes_is_read_as_its_path(tmp_path: Path) -> None:
    """``/proc/self/mountinfo`` escapes a mount point's space, tab, newline and backslash as octal:
    a data dir under a tmpfs mounted at a path with all of them (and a literal ``\\040``) is recorded
    under that mount point as the path spells it, through the mark's JSON, and its volume unmounted
    is not taken for deleted (review8)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    odd = tmp_path / "a b\tc\nd\\040e\\134"
    odd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sandboxd-test", str(odd)], check=True)
    try:
        data_dir = odd / "data"
        data_dir.mkdir()
        where = leftovers.filesystem_of(data_dir)
        assert where[1] == str(odd)
        recorded = json.loads(json.dumps(where))
        assert recorded == where
    finally:
        subprocess.run(["umount", str(odd)], check=True)
    assert not data_dir.exists()
    assert not leftovers._deleted(data_dir, recorded)
