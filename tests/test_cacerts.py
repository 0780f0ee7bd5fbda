"""``POST /init``'s ``caBundle`` install (:mod:`sandboxd.agent.cacerts`), on real files."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest
from sandboxd.agent import cacerts

PEM = "-----BEGIN CERTIFICATE-----\nMIIBsandboxdtest\n-----END CERTIFICATE-----"


def test_adds_the_certificate_once_keeping_the_bundle_byte_for_byte(tmp_path: Path) -> None:
    bundle = tmp_path / "certs" / "ca-certificates.crt"
    bundle.parent.mkdir()
    original = "# Ä comment in UTF-8\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".encode()
    bundle.write_bytes(original)
    bundle.chmod(0o644)
    extra = tmp_path / "local" / "sandboxd-egress.crt"
    cacerts.install(PEM, str(bundle), str(extra))
    cacerts.install(PEM + "\n", str(bundle), str(extra))  # a second /init (a resume) adds nothing
    assert bundle.read_bytes() == original + b"\n" + PEM.encode() + b"\n"
    assert bundle.stat().st_mode & 0o7777 == 0o644
    assert extra.read_bytes() == PEM.encode() + b"\n"
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["ca-certificates.crt"]  # no temp file left


def test_replaces_a_symlinked_bundles_target_and_creates_a_missing_one(tmp_path: Path) -> None:
    real = tmp_path / "pki" / "tls-ca-bundle.pem"
    real.parent.mkdir()
    real.write_bytes(b"")
    link = tmp_path / "ca-certificates.crt"
    link.symlink_to(real)
    cacerts.install(PEM, str(link), str(tmp_path / "extra.crt"))
    assert link.is_symlink() and real.read_bytes() == PEM.encode() + b"\n"
    missing = tmp_path / "new" / "bundle.crt"
    cacerts.install(PEM, str(missing), str(tmp_path / "extra.crt"))
    assert missing.read_bytes() == PEM.encode() + b"\n"
    assert os.stat(missing).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("pem", ["not a certificate", "-----BEGIN CERTIFICATE-----\nÄ\n-----END CERTIFICATE-----"])
def test_refuses_what_is_not_an_ascii_pem_certificate(tmp_path: Path, pem: str) -> None:
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(b"keep\n")
    with pytest.raises(ValueError):
        cacerts.install(pem, str(bundle), str(tmp_path / "extra.crt"))
    assert bundle.read_bytes() == b"keep\n"


def test_a_link_planted_under_a_temporary_name_is_not_written_through(tmp_path: Path) -> None:
    """Root in a sandbox could leave links in the bundle's directory before a resume's ``/init``: the
    new bundle is written to a file made then (``O_EXCL``), never through a name known before."""
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    for name in ("ca-certificates.crt.sandboxd-new", ".sandboxd-ca-", "ca-certificates.crt.tmp"):
        os.link(victim, tmp_path / name)
    cacerts.install(PEM, str(bundle), str(tmp_path / "extra.crt"))
    assert victim.read_text() == "keep me\n"
    assert PEM in bundle.read_text()


def test_a_large_bundle_is_searched_across_its_pieces_and_copied_whole(tmp_path: Path) -> None:
    # The certificate straddles the boundary between two pieces of the search: found, nothing added.
    bundle = tmp_path / "ca-certificates.crt"
    head = b"x" * (cacerts.CHUNK - 10)
    bundle.write_bytes(head + PEM.encode() + b"\n" + b"y" * cacerts.CHUNK)
    before = bundle.read_bytes()
    cacerts.install(PEM, str(bundle), str(tmp_path / "extra.crt"))
    assert bundle.read_bytes() == before
    # Not there: the whole old bundle (several pieces) is kept, byte for byte, and the PEM follows.
    other = "-----BEGIN CERTIFICATE-----\nMIIBother\n-----END CERTIFICATE-----"
    cacerts.install(other, str(bundle), str(tmp_path / "extra.crt"))
    assert bundle.read_bytes() == before + b"\n" + other.encode() + b"\n"


def test_refuses_a_bundle_that_is_not_a_regular_file_or_too_large(tmp_path: Path) -> None:
    # A sandbox could leave these at the bundle's path before a resume: a FIFO would block the read
    # for ever, a sparse file of gigabytes would be copied whole.
    fifo = tmp_path / "fifo.crt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        cacerts.install(PEM, str(fifo), str(tmp_path / "extra.crt"))
    huge = tmp_path / "huge.crt"
    with huge.open("wb") as f:
        f.truncate(cacerts.MAX_BUNDLE + 1)
    with pytest.raises(ValueError, match="larger than"):
        cacerts.install(PEM, str(huge), str(tmp_path / "extra.crt"))
    assert huge.stat().st_size == cacerts.MAX_BUNDLE + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.crt", "huge.crt"]  # no temp file left


def test_where_the_kernel_cannot_copy_the_bundle_it_is_read_and_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # copy_file_range refuses some pairs of file systems (EXDEV, EINVAL); the fallback copies the same.
    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    bundle = tmp_path / "ca-certificates.crt"
    old = bytes(range(256)) * (3 * cacerts.CHUNK // 256 + 7)
    bundle.write_bytes(old)
    cacerts.install(PEM, str(bundle), str(tmp_path / "extra.crt"))
    assert bundle.read_bytes() == old + b"\n" + PEM.encode() + b"\n"


def test_a_bundle_linked_through_a_proc_fd_link_is_refused_and_nothing_made(tmp_path: Path) -> None:
    """``/proc/self/fd/N`` is a magic link: the kernel follows it to the open file, while its text
    names that file as its opener's root sees it. In a sandbox, a trust store linked to
    ``/proc/self/fd/1`` (the host's log) reads as a host path that does not exist inside, and the
    install created it there. Here the open file is deleted, so its text ("... (deleted)") names no
    file either: the install must refuse, making nothing and writing through to nothing."""
    victim = tmp_path / "host" / "agent.log"
    victim.parent.mkdir()
    victim.write_bytes(b"host log\n")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    with victim.open("rb") as held:
        victim.unlink()
        bundle = sandbox / "ca-certificates.crt"
        bundle.symlink_to(f"/proc/self/fd/{held.fileno()}")
        with pytest.raises(ValueError, match="links outside the sandbox's files") as refused:
            cacerts.install(PEM, str(bundle), str(tmp_path / "extra.crt"))
        assert str(tmp_path / "host") not in str(refused.value)
        assert os.pread(held.fileno(), 100, 0) == b"host log\n"
    assert sorted(p.name for p in (tmp_path / "host").iterdir()) == []
    assert sorted(p.name for p in sandbox.iterdir()) == ["ca-certificates.crt"]


def test_the_kept_copy_is_not_written_through_a_link(tmp_path: Path) -> None:
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    extra = tmp_path / "local" / "sandboxd-egress.crt"
    extra.parent.mkdir()
    extra.symlink_to(victim)
    cacerts.install(PEM, str(bundle), str(extra))
    assert victim.read_text() == "keep me\n"
    assert bundle.read_bytes() == PEM.encode() + b"\n"


def test_a_fifo_or_hard_link_at_the_kept_copy_neither_hangs_nor_is_written_through(tmp_path: Path) -> None:
    """Root in a sandbox can leave a FIFO at the kept copy's path before a pause: opening it to
    write blocked until a reader came, so the resume's install (before the agent starts) hung for
    ever. A hard link there to another file had that file truncated and overwritten. The copy is
    now a new file renamed over whatever is there."""
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("")
    extra = tmp_path / "local" / "sandboxd-egress.crt"
    extra.parent.mkdir()
    os.mkfifo(extra)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (cacerts.install(PEM, str(bundle), str(extra)), done.set()), daemon=True)
    worker.start()
    worker.join(5)
    hung = worker.is_alive()
    if hung:  # let the blocked open go, so the thread ends
        with contextlib.suppress(OSError):
            os.close(os.open(extra, os.O_RDONLY | os.O_NONBLOCK))
        worker.join(5)
    assert not hung, "the install blocked opening a FIFO at the kept copy"
    assert done.is_set()
    assert extra.read_bytes() == PEM.encode() + b"\n"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    extra.unlink()
    os.link(victim, extra)
    cacerts.install(PEM, str(bundle), str(extra))
    assert victim.read_text() == "keep me\n"
    assert extra.read_bytes() == PEM.encode() + b"\n"
    assert sorted(p.name for p in extra.parent.iterdir()) == ["sandboxd-egress.crt"]  # no temp file left


@pytest.mark.timeout(60)
def test_refuses_a_bundle_linked_to_a_proc_file_that_reads_for_ever(tmp_path: Path) -> None:
    # /proc/self/pagemap is a regular file whose size says 0 and which reads 8 bytes a page of the
    # whole address space (256 GiB); pieces a multiple of 8 long (a PEM of 8n+1 bytes) are read.
    pem = "-----BEGIN CERTIFICATE-----\nMIIB" + "x" * 7 + "\n-----END CERTIFICATE-----"
    assert (len(pem) - 1) % 8 == 0
    bundle = tmp_path / "ca-certificates.crt"
    bundle.symlink_to("/proc/self/pagemap")
    assert os.stat(bundle).st_size == 0
    with pytest.raises(ValueError, match="longer than"):
        cacerts.install(pem, str(bundle), str(tmp_path / "extra.crt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca-certificates.crt"]  # nothing written
