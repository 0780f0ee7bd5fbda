"""How a runtime claims its IPv4 block beside other live runtimes on one host.

A live runtime holds an ``flock`` on ``/run/sandboxd/net-<block>.lock`` for its life. Runtimes of
different ``--max-sandboxes`` choose blocks of different sizes, so a claim of ``10.240.0.0/22``
must keep another runtime off ``10.240.0.0/24`` too: the two would give two sandboxes the same
addresses, and the host would route one's replies to the other. "Another runtime" here is a real
second process holding a real lock, as a runtime does; the lock directory is the test's own.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandboxd.runtime.network import addressing
from sandboxd.runtime.network.addressing import choose_v4_block

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(addressing, "LOCK_DIR", tmp_path)
    return tmp_path


@pytest.fixture
def other_runtime(lock_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Start processes that each hold a block's claim, as a live runtime does."""
    holders: list[subprocess.Popen[str]] = []
    yield holders
    for holder in holders:
        holder.kill()
        holder.wait()


def hold(holders: list[subprocess.Popen[str]], lock_dir: Path, block: str) -> subprocess.Popen[str]:
    net = ipaddress.IPv4Network(block)
    return hold_file(holders, lock_dir / f"net-{net.network_address}-{net.prefixlen}.lock")


def hold_file(holders: list[subprocess.Popen[str]], path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    holders.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_smaller_block_is_never_chosen_inside_a_larger_one_another_runtime_holds(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    hold(other_runtime, lock_dir, "10.240.0.0/22")
    hold(other_runtime, lock_dir, "10.240.8.0/24")
    block, lock = choose_v4_block(None, False, 24)
    try:
        assert not block.overlaps(ipaddress.IPv4Network("10.240.0.0/22"))
        assert block != ipaddress.IPv4Network("10.240.8.0/24")
        assert (lock_dir / f"net-{block.network_address}-24.lock").exists()
    finally:
        lock.close()


def test_a_larger_block_is_never_chosen_over_a_smaller_one_another_runtime_holds(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    hold(other_runtime, lock_dir, "10.240.2.0/24")
    block, lock = choose_v4_block(None, False, 22)
    try:
        assert not block.overlaps(ipaddress.IPv4Network("10.240.2.0/24")), block
    finally:
        lock.close()


def test_a_kept_block_that_now_overlaps_a_live_claim_gives_way_and_an_explicit_one_is_refused(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    hold(other_runtime, lock_dir, "10.240.16.0/22")
    kept = ipaddress.IPv4Network("10.240.17.0/24")
    block, lock = choose_v4_block(kept, False, 24)
    try:
        assert not block.overlaps(ipaddress.IPv4Network("10.240.16.0/22"))
    finally:
        lock.close()
    with pytest.raises(OSError, match=r"overlaps 10\.240\.16\.0/22, which another sandboxd runtime"):
        choose_v4_block(kept, True, 24)


def test_a_claim_ends_with_its_runtime_and_only_free_lock_files_are_removed(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    stale = lock_dir / "net-10.240.4.0-24.lock"
    stale.touch()
    holder = hold(other_runtime, lock_dir, "10.240.0.0/22")
    explicit = ipaddress.IPv4Network("10.240.1.0/24")
    with pytest.raises(OSError):
        choose_v4_block(explicit, True, 24)
    assert not stale.exists(), "a lock file nobody holds is left behind"
    assert (lock_dir / "net-10.240.0.0-22.lock").exists(), "a live runtime's claim was removed"

    holder.kill()
    holder.wait()
    block, lock = choose_v4_block(explicit, True, 24)
    try:
        assert block == explicit
        assert sorted(os.listdir(lock_dir)) == ["net-10.240.1.0-24.lock", addressing.CHOOSING_LOCK]
    finally:
        lock.close()


def test_a_held_lock_file_no_runtime_could_have_made_blocks_no_start_and_a_huge_block_only_what_it_uses(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    """A held ``net-0.0.0.0-0.lock`` overlapped every block, so no runtime on the host could start
    (review7). A runtime uses at most a /14 of its block, from its start (its slots): that much of
    a huge block is claimed, no more. A name no runtime writes (a block too small for two /30s, a
    prefix spelled otherwise) claims nothing, held or not; a free one is removed as before."""
    for name in ("net-0.0.0.0-0.lock", "net-10.0.0.0-8.lock", "net-10.240.0.0-31.lock", "net-10.240.0.0-024.lock"):
        hold_file(other_runtime, lock_dir / name)
    (lock_dir / "net-10.240.0.0-12.lock").touch()  # free: removed
    block, lock = choose_v4_block(None, False, 24)
    try:
        assert block == ipaddress.IPv4Network("10.240.0.0/24")
        assert not (lock_dir / "net-10.240.0.0-12.lock").exists()
    finally:
        lock.close()

    # A held 10.240.0.0/12 (a runtime's explicit choice) uses its first /14: the next block is free,
    # and an explicit choice inside the /14 is refused as before.
    hold(other_runtime, lock_dir, "10.240.0.0/12")
    block, lock = choose_v4_block(None, False, 24)
    try:
        assert block == ipaddress.IPv4Network("10.244.0.0/24")
    finally:
        lock.close()
    with pytest.raises(OSError, match=r"overlaps 10\.240\.0\.0/14, which another sandboxd runtime"):
        choose_v4_block(ipaddress.IPv4Network("10.243.255.0/24"), True, 24)


CHOOSE = """
import ipaddress, sys
from pathlib import Path
from sandboxd.runtime.network import addressing
addressing.LOCK_DIR = Path(sys.argv[1])
sys.stdin.readline()  # all start choosing at once
block, lock = addressing.choose_v4_block(None, False, int(sys.argv[2]))
print(block, flush=True)
sys.stdin.read()
"""


def test_runtimes_that_start_at_once_beside_odd_files_choose_blocks_that_never_overlap(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]]
) -> None:
    # Real processes, released together, of two block sizes (a /22 holds four /24s), among what a
    # host's /run/sandboxd may hold besides claims: a directory and a symlink with a claim's name
    # (neither can be a runtime's lock: both stay taken, and neither is followed or removed), and
    # 2,000 lock files of runtimes long gone (removed by the first that chooses).
    (lock_dir / "net-10.240.0.0-24.lock").mkdir()
    target = lock_dir.parent / f"{lock_dir.name}-target"
    target.write_text("not a lock")
    (lock_dir / "net-10.240.1.0-24.lock").symlink_to(target)
    for n in range(2000):
        (lock_dir / f"net-10.{241 + n // 256}.{n % 256}.0-24.lock").touch()
    choosers = [
        subprocess.Popen(
            [sys.executable, "-c", CHOOSE, str(lock_dir), str(prefix)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for prefix in (24, 22, 24, 22, 24, 24)
    ]
    other_runtime.extend(choosers)
    for chooser in choosers:
        assert chooser.stdin is not None
        chooser.stdin.write("go\n")
        chooser.stdin.flush()
    blocks = []
    for chooser in choosers:
        assert chooser.stdout is not None
        chosen = chooser.stdout.readline().strip()
        assert chosen, "a runtime could not choose a block (see its stderr above)"
        blocks.append(ipaddress.IPv4Network(chosen))
    for n, block in enumerate(blocks):
        assert not block.overlaps(ipaddress.IPv4Network("10.240.0.0/23")), blocks
        for other in blocks[n + 1 :]:
            assert not block.overlaps(other), blocks
    assert target.read_text() == "not a lock"
    assert (lock_dir / "net-10.240.0.0-24.lock").is_dir()
    assert (lock_dir / "net-10.240.1.0-24.lock").is_symlink()
    assert len(os.listdir(lock_dir)) == 2 + 1 + len(blocks), "lock files nobody holds are left behind"
    target.unlink()


def test_a_start_behind_a_stopped_chooser_fails_with_a_reason_instead_of_hanging(
    lock_dir: Path, other_runtime: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A runtime stopped (SIGSTOP, a frozen cgroup) while it holds the choosing lock: every other
    # start waited on it without a word, for as long as it stayed stopped.
    import threading

    monkeypatch.setattr(addressing, "CHOOSING_WAIT_S", 0.5, raising=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_dir / addressing.CHOOSING_LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    other_runtime.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    outcome: list[BaseException | ipaddress.IPv4Network] = []

    def choose() -> None:
        try:
            block, lock = choose_v4_block(None, False, 24)
            lock.close()
            outcome.append(block)
        except OSError as exc:
            outcome.append(exc)

    chooser = threading.Thread(target=choose, daemon=True)
    chooser.start()
    chooser.join(10)
    assert not chooser.is_alive(), "the start still waits on the choosing lock"
    assert isinstance(outcome[0], OSError) and "net-choosing for 0.5 s" in str(outcome[0]), outcome
    holder.kill()
    holder.wait()
    _, lock = choose_v4_block(None, False, 24)
    lock.close()
