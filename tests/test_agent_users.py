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
