"""The agent's account lookups (``sandboxd.agent.users``): /etc/passwd and /etc/group read by the agent
itself, as the C library's ``files`` source reads them, with the other NSS sources only for a name
the files do not have."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from sandboxd import _core
from sandboxd.agent import users


@pytest.fixture
def databases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    monkeypatch.setattr(users, "DATABASES", (str(passwd), str(group)))
    monkeypatch.setattr(users, "_CACHE", {})
    return passwd, group


def test_every_local_account_resolves_as_the_c_library_resolves_it() -> None:
    names = [fields[0] for fields in users._lines("/etc/passwd") if len(fields) >= 7]
    assert "root" in names
    for name in names:
        entry = pwd.getpwnam(name)
        got = users._lookup(name)
        assert (got.name, got.uid, got.gid, got.home) == (
            entry.pw_name,
            entry.pw_uid,
            entry.pw_gid,
            entry.pw_dir or "/",
        )
        assert got.groups == tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))


def test_entries_read_as_the_files_source_reads_them(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text(
        "# a comment\n"
        "\n"
        "broken:x:notanumber:1::/nowhere:/bin/sh\n"
        "short:x:5:5\n"
        "  alice:x:1001:1001:Alice:/home/alice:/bin/bash\n"
        "alice:x:2002:2002::/second:/bin/sh\n"
        "nohome:x:1003:1003:::/bin/sh\n"
        "+nis\n"
    )
    group.write_text(
        "alice:x:1001:\n"
        "wheel:x:10:root,alice\n"
        "docker:x:999:bob,alicex\n"
        "audio:x:29:alice\n"
        "bad:x:x:alice\n"
        "again:x:10:alice\n"
    )
    alice = users.lookup("alice")
    assert (alice.uid, alice.gid, alice.home) == (1001, 1001, "/home/alice")  # the first well-formed entry wins
    assert alice.groups == (1001, 10, 29)  # primary first, then each listing group once, in file order
    assert users.lookup("nohome").home == "/"
    assert users.lookup("nohome").groups == (1003,)
    with pytest.raises(KeyError):
        users.lookup("broken")
    with pytest.raises(KeyError):
        users.lookup("short")
    with pytest.raises(KeyError):
        users.lookup("+nis")


def test_ids_only_ascii_digits_in_range(databases: tuple[Path, Path]) -> None:
    """``int()`` reads these; the C library does not read them as the same number, so they are
    malformed entries here too (skipped, like one with a word for its uid)."""
    passwd, group = databases
    odd = {"neg": "-1", "plus": "+5", "under": "1_000", "space": " 7", "arabic": "\u0661\u0662", "max": "4294967295"}
    passwd.write_text(
        "".join(f"{name}:x:{uid}:100::/h:/bin/sh\n" for name, uid in odd.items()) + "ok:x:7:100::/h:/bin/sh\n"
    )
    group.write_text("minus:x:-3:ok\nfine:x:12:ok\n")
    for name in odd:
        with pytest.raises(KeyError):
            users.lookup(name)
    assert users.lookup("ok").groups == (100, 12)


def test_a_name_the_files_lack_is_still_looked_up_through_nss(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    root = pwd.getpwnam("root")  # in the host's databases, not in this passwd
    got = users.lookup("root")
    assert (got.uid, got.gid, got.home) == (root.pw_uid, root.pw_gid, root.pw_dir)
    with pytest.raises(KeyError):
        users.lookup("no-such-account-anywhere")


def test_a_database_replaced_by_a_fifo_is_not_waited_on(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    os.mkfifo(group)
    assert users._lines(str(group)) == []  # returns at once; a blocking open would hang here
    assert users._lines(str(passwd)) == [["alice", "x", "1001", "1001", "", "/home/alice", "/bin/sh"]]


def test_looking_up_a_local_account_loads_no_nss_module() -> None:
    """The point of reading the files ourselves: no ``libnss_*`` library (``libnss_systemd`` on Debian,
    0.23 MiB of RSS) mapped into the agent for its whole life by its first lookup."""
    code = (
        "import sys\n"
        "from sandboxd.agent import users\n"
        "users.lookup('root')\n"
        "maps = open('/proc/self/maps').read()\n"
        "sys.exit('libnss_' in maps)\n"
    )
    check = "import os; os.getgrouplist('root', 0); sys.exit('libnss_' not in open('/proc/self/maps').read())"
    if subprocess.run([sys.executable, "-c", "import sys\n" + check]).returncode != 0:
        pytest.skip("this host's nsswitch.conf loads no NSS module for a local account")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------- when a cached account is looked up again
#
# The cache is kept while the tripwire (inotify on the databases and their directories, mounts from
# /proc/self/mountinfo) is quiet; each test changes the databases one way and looks the user up again.


def _write_keeping_mtime(path: Path, text: str) -> None:
    """Rewrites ``path`` in place and sets its mtime back: a change the mtimes alone cannot see
    (as two edits within one coarse timestamp tick look)."""
    before = path.stat()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_edit_in_place_is_seen_even_when_the_mtime_did_not_move(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    assert users.lookup("alice").uid == 1001
    _write_keeping_mtime(passwd, "alice:x:1002:1001::/home/alice:/bin/sh\n")
    assert users.lookup("alice").uid == 1002
    _write_keeping_mtime(group, "wheel:x:10:alice\n")
    assert users.lookup("alice").groups == (1001, 10)


def test_a_rename_over_a_database_and_a_new_one_are_seen(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    assert users.lookup("alice").groups == (1001,)  # no group file yet
    group.write_text("wheel:x:10:alice\n")
    assert users.lookup("alice").groups == (1001, 10)
    staged = passwd.with_name("passwd+")
    staged.write_text("alice:x:1005:1001::/home/alice:/bin/sh\nbob:x:1006:1006::/home/bob:/bin/sh\n")
    os.utime(staged, ns=(passwd.stat().st_atime_ns, passwd.stat().st_mtime_ns))
    staged.rename(passwd)  # as useradd and vipw replace it
    assert users.lookup("alice").uid == 1005
    assert users.lookup("bob").uid == 1006


def test_a_write_through_another_hard_link_is_seen(databases: tuple[Path, Path], tmp_path: Path) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(passwd, elsewhere / "link")
    assert users.lookup("alice").uid == 1001
    _write_keeping_mtime(elsewhere / "link", "alice:x:1007:1001::/home/alice:/bin/sh\n")
    assert users.lookup("alice").uid == 1007


def test_a_quiet_cache_takes_no_stat_and_a_symlinked_database_takes_one_per_lookup(
    databases: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the tripwire: no path walk per RPC while nothing changed. Where it cannot see
    every change (a database that is a symlink: its target's changes are elsewhere) the lookups
    take the stats as before, and see a change that moved the mtime."""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    stats: list[object] = []
    real_stat = os.stat

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        stats.append(args[0])
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    users.lookup("alice")
    monkeypatch.setattr(os, "stat", counting_stat)
    for _ in range(20):
        assert users.lookup("alice").uid == 1001
    assert stats == []

    target = tmp_path / "real-passwd"
    target.write_text("alice:x:2001:1001::/home/alice:/bin/sh\n")
    passwd.unlink()
    passwd.symlink_to(target)
    assert users.lookup("alice").uid == 2001  # the symlink's creation tripped it
    stats.clear()
    for _ in range(5):
        users.lookup("alice")
    assert len(stats) == 5 * 2  # not armed: both databases' stats at each lookup
    target.write_text("alice:x:2002:1001::/home/alice:/bin/sh\n")
    os.utime(target, ns=(0, real_stat(target).st_mtime_ns + 1_000_000))
    assert users.lookup("alice").uid == 2002


def test_a_database_replaced_by_a_fifo_after_a_lookup_leaves_only_root(databases: tuple[Path, Path]) -> None:
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    assert users.lookup("alice").uid == 1001
    group.unlink()
    os.mkfifo(group)
    with pytest.raises(KeyError):
        users.lookup("alice")
    assert users.lookup("root").uid == 0


def test_lookups_from_threads_at_once(databases: tuple[Path, Path]) -> None:
    """Lookups run on the event loop and in worker threads; the tripwire's ``poll`` object refuses
    two ``poll()`` calls at once, so they take a lock."""
    import threading

    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(2000):
                assert users.lookup("alice").uid == 1001
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


BIND_MOUNT = """
import os, subprocess, sys
from sandboxd import _core
from sandboxd.agent import users
passwd, replacement = sys.argv[1], sys.argv[2]
users.DATABASES = (passwd, os.path.join(os.path.dirname(passwd), "group"))
assert users.lookup("alice").uid == 1001
st = os.stat(passwd)
os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
subprocess.run(["mount", "--bind", replacement, passwd], check=True)
print(users.lookup("alice").uid)
"""


def test_a_file_mounted_over_a_database_is_seen(databases: tuple[Path, Path], tmp_path: Path) -> None:
    """A bind mount changes no watched inode: /proc/self/mountinfo reports it (in a mount namespace
    of the test's own, ``unshare -m``, so the host's mounts are not touched)."""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    replacement = tmp_path / "replacement"
    replacement.write_text("alice:x:3003:1001::/home/alice:/bin/sh\n")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace for the test: {probe.stderr.decode().strip()}")
    got = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", BIND_MOUNT, str(passwd), str(replacement)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert got.stdout.strip() == "3003"


FORKED = """
import os, sys
from sandboxd import _core
from sandboxd.agent import users
passwd = sys.argv[1]
users.DATABASES = (passwd, os.path.join(os.path.dirname(passwd), "group"))
assert users.lookup("alice").uid == 1001
assert users._TRIPWIRE.armed_for is users.DATABASES
pid = os.fork()
if pid == 0:
    fresh = users._TRIPWIRE.armed_for is None  # the parent's descriptors are not the child's to trust
    assert users.lookup("alice").uid == 1001
    with open(passwd, "w") as f:
        f.write("alice:x:1009:1001::/home/alice:/bin/sh\\n")
    os._exit(0 if fresh and users.lookup("alice").uid == 1009 else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), users.lookup("alice").uid)
"""


def test_a_forked_child_arms_a_tripwire_of_its_own(databases: tuple[Path, Path]) -> None:
    """The agent in a sandbox is forked from the zygote: a tripwire armed before the fork would
    watch the parent's files, so the child forgets it (``os.register_at_fork``)."""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    got = subprocess.run([sys.executable, "-c", FORKED, str(passwd)], capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["0", "1009"]  # the child saw its change; the parent sees it too


def _inotify_watches(fd: int) -> list[str]:
    """The watches of the inotify instance behind ``fd`` as the kernel lists them (wd, inode,
    mask): two descriptors of one instance list the same; of two instances, not."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [line.split(" fhandle")[0] for line in f if line.startswith("inotify ")]


def test_a_trip_rearms_the_same_inotify_instance_and_leaves_no_watch_behind(
    databases: tuple[Path, Path], tmp_path: Path
) -> None:
    """Closing an inotify instance that holds watches waits for an SRCU grace period (1-50 ms on the
    CI VM, on the thread that closes it: the event loop's for an RPC's lookup), so a trip re-arms the
    instance it has. A database replaced again and again, its old inodes kept alive by hard links
    (as a hostile root can keep them), leaves no watch on them behind."""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    assert users.lookup("alice").uid == 1001
    ours = os.dup(users._TRIPWIRE.fileno())  # keeps the first instance open, whatever happens to it
    try:
        keep = tmp_path / "keep"
        keep.mkdir()
        for uid in range(1002, 1008):
            os.link(passwd, keep / str(uid))
            staged = passwd.with_name("passwd+")
            staged.write_text(f"alice:x:{uid}:1001::/home/alice:/bin/sh\n")
            staged.rename(passwd)
            assert users.lookup("alice").uid == uid
            watches = _inotify_watches(users._TRIPWIRE.fileno())
            assert _inotify_watches(ours) == watches, "a new instance was made"
        paths = {os.path.dirname(str(passwd))} | {str(passwd), str(group)}
        directory = os.path.dirname(str(passwd))
        while directory != "/":
            directory = os.path.dirname(directory)
            paths.add(directory)
        assert len(watches) == len(paths)
        _write_keeping_mtime(passwd, "alice:x:1100:1001::/home/alice:/bin/sh\n")
        assert users.lookup("alice").uid == 1100
    finally:
        os.close(ours)


def test_a_symlink_swapped_in_while_the_tripwire_is_armed_is_seen(
    databases: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile root can swap the database for a symlink after the check for one and before the
    watches are in place: nothing trips then, and the watch lands on the symlink, not on the file
    the lookups read. The check is made again once the watches are in place. (The swap is made at
    that moment by a wrapper around the real constructor: a race a loop would win only by chance.)"""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    (tmp_path / "elsewhere").mkdir()  # not in the watched directory, whose watch sees its files
    target = tmp_path / "elsewhere" / "passwd"
    target.write_text("alice:x:4004:1001::/home/alice:/bin/sh\n")
    real = _core.Tripwire
    swapped: list[bool] = []

    def swapping(paths: list[str]) -> _core.Tripwire:
        if not swapped:
            swapped.append(True)
            passwd.unlink()
            passwd.symlink_to(target)
        return real(paths)

    monkeypatch.setattr(_core, "Tripwire", swapping)
    users._TRIPWIRE.forget()  # disarmed: the next lookup arms a new one
    assert users.lookup("alice").uid == 4004
    assert swapped
    target.write_text("alice:x:4005:1001::/home/alice:/bin/sh\n")
    os.utime(target, ns=(0, target.stat().st_mtime_ns + 1_000_000))
    assert users.lookup("alice").uid == 4005


def test_a_database_flipped_between_a_symlink_and_a_file_keeps_one_instance(
    databases: tuple[Path, Path], tmp_path: Path
) -> None:
    """A tripwire that cannot be armed (a symlinked database) is kept, not closed: a hostile root
    flipping /etc/passwd between a file and a symlink would otherwise make every lookup after a
    flip close one and wait for an RCU grace period."""
    passwd, group = databases
    passwd.write_text("alice:x:1001:1001::/home/alice:/bin/sh\n")
    group.write_text("")
    assert users.lookup("alice").uid == 1001
    ours = os.dup(users._TRIPWIRE.fileno())
    try:
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / "elsewhere" / "passwd"
        for uid in range(2001, 2004):
            target.write_text(f"alice:x:{uid}:1001::/home/alice:/bin/sh\n")
            passwd.unlink()
            passwd.symlink_to(target)
            assert users.lookup("alice").uid == uid
            assert users._TRIPWIRE.armed_for is None
            passwd.unlink()
            passwd.write_text(f"alice:x:{uid + 100}:1001::/home/alice:/bin/sh\n")
            assert users.lookup("alice").uid == uid + 100
            assert users._TRIPWIRE.armed_for is users.DATABASES
            assert _inotify_watches(ours) == _inotify_watches(users._TRIPWIRE.fileno()), "a new instance"
    finally:
        os.close(ours)
