"""The ``base`` template's login shell (``bash -l -c``, how the agent runs every SDK command): it
starts no process, and it leaves exactly the environment Debian's own ``/etc/profile`` leaves.

The template writes its own ``/etc/profile`` over Debian's (``sandboxd.runtime.debian.PROFILE``);
Debian's stays in ``/usr/share/base-files/profile``. These tests run both in the same sandbox and
compare."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import pytest
from conftest import Runtime
from e2b import Sandbox

FORK_COUNTER = r"""
/* Loaded into every program the login shell runs (LD_PRELOAD is inherited): the constructor notes
   each program started, fork() each process bash makes (command substitutions, subshells). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <stdio.h>
#include <unistd.h>

static void note(const char *what) {
    const char *log = getenv("FORK_LOG");
    char exe[512] = "?";
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) exe[n] = 0;
    int fd = log ? open(log, O_WRONLY | O_APPEND | O_CREAT, 0666) : -1;
    if (fd < 0) return;
    dprintf(fd, "%s %s\n", what, exe);
    close(fd);
}

__attribute__((constructor)) static void started(void) { note("exec"); }

pid_t fork(void) {
    pid_t (*real)(void) = (pid_t (*)(void))dlsym(RTLD_NEXT, "fork");
    note("fork");
    return real();
}
"""

VOLATILE = (
    *("_", "BASHPID", "BASH_ARGC", "BASH_ARGV", "BASH_COMMAND", "BASH_LINENO", "BASH_SOURCE", "FUNCNAME"),
    *("EPOCHREALTIME", "EPOCHSECONDS", "LINENO", "PIPESTATUS", "RANDOM", "SECONDS", "SRANDOM"),
)
"""bash's variables that differ between any two shells (or two lines of one)."""

# Everything a login shell's files can change, read by builtins first (so the hash table is the
# profile's, not the dump's), then the environment as programs see it.
DUMP_BASH = (
    r"""hash 2>&1; echo "-: $-"; umask; umask -S; set -o; shopt; alias; trap -p; declare -f; """
    rf"""declare -p | grep -Ev '^declare -[^ ]* ({"|".join(VOLATILE)})(=|$)'; """
    r"""env -0 | sort -z | tr '\0' '\n'"""
)

DUMP_DASH = r"""echo "-: $-"; umask; umask -S; set -o; alias; trap; set; export -p; env -0 | sort -z | tr '\0' '\n'"""

# /etc/profile.d entries that run-parts' regex and file checks tell apart: each one sourced adds
# its name to $seen, so the order and the set are compared, and the rest must be skipped.
PROFILE_D = r"""set -e
cd /etc/profile.d
for name in zz-last.sh a_first.sh _under.sh 9nine.sh Upper.sh dots.in.name.sh; do
  printf 'seen="${seen-} %s"\n' "$name" > "$name"
done
printf 'seen="${seen-} linked"\n' > /etc/sandboxd-linked
ln -s /etc/sandboxd-linked link.sh
ln -s /nonexistent broken.sh
mkdir dir.sh
for name in -dash.sh .hidden.sh 'sp ace.sh' upper.SH plus+.sh x.sh.dpkg-old tilde.sh~ 'star*.sh'; do
  printf 'seen="${seen-} WRONG:%s"\n' "$name" > "$name"
done
printf 'seen="${seen-} unreadable"\n' > unreadable.sh
chmod 0600 unreadable.sh
"""


@pytest.fixture(scope="module")
def sbx(runtime: Runtime, base_template: bool) -> Iterator[Sandbox]:
    """One sandbox for the module: the tests compile and rewrite files in it."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine (see the session's first lines)")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in runtime.env().items():
            patch.setenv(name, value)
        patch.delenv("E2B_DEBUG", raising=False)
        sandbox = Sandbox.create(timeout=300)
        try:
            yield sandbox
        finally:
            sandbox.kill()


@pytest.mark.parametrize("user", ["user", "root"])
def test_login_shell_starts_no_process(sbx: Sandbox, user: str) -> None:
    """On main this lists ``id`` and ``run-parts`` (each after a fork)."""
    sbx.files.write("/tmp/forks.c", FORK_COUNTER)
    sbx.commands.run("test -e /tmp/forks.so || gcc -shared -fPIC -O -o /tmp/forks.so /tmp/forks.c", timeout=60)
    log = f"/tmp/forks-{user}.log"
    sbx.commands.run("true", user=user, envs={"LD_PRELOAD": "/tmp/forks.so", "FORK_LOG": log})
    started = sbx.files.read(log, user="root").splitlines()
    assert started == ["exec /usr/bin/bash"], started
    # and the counter counts: a command substitution of a program is a fork and a start
    log = f"/tmp/forks-{user}-check.log"
    sbx.commands.run("x=$(id -u)", user=user, envs={"LD_PRELOAD": "/tmp/forks.so", "FORK_LOG": log})
    started = sbx.files.read(log, user="root").splitlines()
    assert started == ["exec /usr/bin/bash", "fork /usr/bin/bash", "exec /usr/bin/id"], started


SHELLS = {
    "bash -l": DUMP_BASH,  # what the agent runs: bash -l -c <cmd>
    "bash -l, EUID=0 given": DUMP_BASH,  # bash takes EUID from the environment: `id -u` does not
    "bash -i -l": DUMP_BASH,  # interactive: the PS1 branch, bash.bashrc
    "sh -l": DUMP_DASH,  # dash: no EUID, no BASH
    "sh -i -l": DUMP_DASH,  # dash interactive: PS1 chosen by the effective uid
    # noglob (-f; bash also takes it from SHELLOPTS in the environment): run-parts needs no glob,
    # and Debian's sources /etc/profile.d under it; a glob left unexpanded sourced none
    "bash -f -l": DUMP_BASH,
    "sh -f -l": DUMP_DASH,
}


def _dump(sbx: Sandbox, user: str, shell: str) -> tuple[str, str, int]:
    """The dump from ``shell`` run as the agent runs commands (``bash -l -c``, outer) or directly."""
    if shell.startswith("bash -l"):
        command = SHELLS[shell]
    else:
        # env -i, with what the agent gives a login shell: the outer login must not leave its own
        # variables for the inner one to inherit.
        command = (
            f'exec env -i HOME="$HOME" USER="$USER" LOGNAME="$LOGNAME" PATH=/usr/bin:/bin LANG=C.UTF-8 '
            f"{shell} -c {shlex.quote(SHELLS[shell])}"
        )
    result = sbx.commands.run(command, user=user, envs={"EUID": "0"} if "EUID=0" in shell else None)
    return result.stdout, result.stderr, result.exit_code


def test_login_environment_is_debians(sbx: Sandbox) -> None:
    """Each shell, as user and as root, with sandboxd's /etc/profile and then with Debian's (swapped
    in for the second dump), over a profile.d of names run-parts' regex tells apart."""
    sbx.commands.run(PROFILE_D, user="root")
    differs = sbx.commands.run("cmp -s /etc/profile /usr/share/base-files/profile || echo differs", user="root")
    assert differs.stdout == "differs\n"
    ours: dict[tuple[str, str], tuple[str, str, int]] = {}
    debians: dict[tuple[str, str], tuple[str, str, int]] = {}
    for shell in SHELLS:
        for user in ("user", "root"):
            ours[shell, user] = _dump(sbx, user, shell)
    debian_in = "cp -p /etc/profile /tmp/profile.ours && cp /usr/share/base-files/profile /etc/profile"
    sbx.commands.run(debian_in, user="root")
    try:
        for shell in SHELLS:
            for user in ("user", "root"):
                debians[shell, user] = _dump(sbx, user, shell)
    finally:
        sbx.commands.run("cp -p /tmp/profile.ours /etc/profile", user="root")
    for key, debian in debians.items():
        assert ours[key] == debian, key
    # what the comparison covered: both PATHs, both PS1s of dash, run-parts' choice and order
    assert "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games\n" in ours["bash -l", "user"][0]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" in ours["bash -l", "root"][0]
    assert "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games\n" in ours["bash -l, EUID=0 given", "user"][0]
    assert "PS1='$ '" in ours["sh -i -l", "user"][0] and "PS1='# '" in ours["sh -i -l", "root"][0]
    seen = "9nine.sh Upper.sh _under.sh a_first.sh dots.in.name.sh linked{} zz-last.sh"
    assert f'declare -- seen=" {seen.format("")}"\n' in ours["bash -l", "user"][0]
    assert f'declare -- seen=" {seen.format(" unreadable")}"\n' in ours["bash -l", "root"][0]
    assert f'declare -- seen=" {seen.format("")}"\n' in ours["bash -f -l", "user"][0]
    assert f"seen=' {seen.format('')}'\n" in ours["sh -f -l", "user"][0]


def test_base_files_upgrade_keeps_it(sbx: Sandbox) -> None:
    """base-files' postinst, as an upgrade runs it (``configure <old version>``), replaces
    ``/etc/profile`` only when it is one of Debian's defaults: ours stays, and nothing asks."""
    before = sbx.commands.run("sha256sum /etc/profile", user="root").stdout
    result = sbx.commands.run(
        "sh -e /var/lib/dpkg/info/base-files.postinst configure 13.8 </dev/null", user="root", timeout=60
    )
    assert result.stderr == ""
    assert sbx.commands.run("sha256sum /etc/profile", user="root").stdout == before
