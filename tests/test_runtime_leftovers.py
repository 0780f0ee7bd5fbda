"""What a runtime killed outright leaves on the host (its nftables table, its cgroup instance group) is
removed by the next runtime that starts there, unless a sandbox of it still runs; and a second runtime
on a data dir in use is refused. Real runtimes, real SIGKILL, real locks, nftables and cgroups."""

from __future__ import annotations

import fcntl
import json
import os
import signal
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
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    third = start_runtime("--warm-sandboxes", "0")
    assert third.process.poll() is None
    assert table in _tables(), "the table of a runtime whose sandbox still runs was removed"
    assert _mark(killed.data_dir).exists()
    killed.restart()  # adopts its sandbox; the fixture stops it and kills the sandbox


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
