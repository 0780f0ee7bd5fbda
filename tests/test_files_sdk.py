"""The official E2B Python SDK's files API against a real ``sandboxd agent`` (debug mode)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from e2b import FileType
from e2b.exceptions import FileNotFoundException, InvalidArgumentException
from e2b.sandbox.filesystem.filesystem import WriteEntry


def test_write_then_read_text_bytes_and_stream(sandbox: Any, workdir: Path) -> None:
    target = str(workdir / "hello.txt")
    info = sandbox.files.write(target, "hello, sandboxd\n")
    assert info.path == target
    assert info.name == "hello.txt"
    assert (workdir / "hello.txt").read_text() == "hello, sandboxd\n"
    assert sandbox.files.read(target) == "hello, sandboxd\n"
    assert bytes(sandbox.files.read(target, format="bytes")) == b"hello, sandboxd\n"
    assert b"".join(sandbox.files.read(target, format="stream")) == b"hello, sandboxd\n"


def test_write_replaces_existing_file_and_keeps_its_mode(sandbox: Any, workdir: Path) -> None:
    target = workdir / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    sandbox.files.write(str(target), "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750


def test_write_files_sends_many_files_in_one_request(sandbox: Any, workdir: Path) -> None:
    entries = [
        WriteEntry(path=str(workdir / "a.txt"), data="A"),
        WriteEntry(path=str(workdir / "nested" / "deeper" / "b.bin"), data=b"\x00\x01\x02"),
        WriteEntry(path=str(workdir / "c.txt"), data="C" * 100_000),
    ]
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [e["path"] for e in entries]
    assert (workdir / "a.txt").read_text() == "A"
    assert (workdir / "nested" / "deeper" / "b.bin").read_bytes() == b"\x00\x01\x02"
    assert (workdir / "c.txt").read_text() == "C" * 100_000


def test_write_files_of_several_mib_arrive_byte_exact(sandbox: Any, workdir: Path) -> None:
    """Bodies past 1 MiB are read from the socket by a worker thread (test_files_multipart_body):
    the SDK's own multipart encoding, several files and metadata, byte for byte."""
    first, second = os.urandom(3 << 20), os.urandom((2 << 20) + 17)
    entries = [
        WriteEntry(path=str(workdir / "one.bin"), data=first),
        WriteEntry(path=str(workdir / "two" / "two.bin"), data=second),
    ]
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [e["path"] for e in entries]
    assert (workdir / "one.bin").read_bytes() == first
    assert (workdir / "two" / "two.bin").read_bytes() == second
    sandbox.files.write(str(workdir / "one.bin"), second, metadata={"k": "v"})
    assert (workdir / "one.bin").read_bytes() == second
    assert sandbox.files.get_info(str(workdir / "one.bin")).metadata == {"k": "v"}


def test_octet_stream_and_gzip_uploads(sandbox: Any, workdir: Path) -> None:
    sandbox.files.write(str(workdir / "raw.bin"), b"raw" * 1000, use_octet_stream=True)
    assert (workdir / "raw.bin").read_bytes() == b"raw" * 1000
    sandbox.files.write(str(workdir / "gz.txt"), "zipped " * 1000, gzip=True)
    assert (workdir / "gz.txt").read_text() == "zipped " * 1000
    assert sandbox.files.read(str(workdir / "gz.txt"), gzip=True) == "zipped " * 1000


def test_upload_metadata_round_trips_through_get_info(sandbox: Any, workdir: Path) -> None:
    target = str(workdir / "tagged.txt")
    sandbox.files.write(target, "x", metadata={"Owner": "me", "purpose": "test"})
    info = sandbox.files.get_info(target)
    assert info.metadata == {"owner": "me", "purpose": "test"}


def test_missing_file_raises_file_not_found(sandbox: Any, workdir: Path) -> None:
    with pytest.raises(FileNotFoundException) as caught:
        sandbox.files.read(str(workdir / "missing.txt"))
    assert "does not exist" in str(caught.value)
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(str(workdir / "missing.txt"))
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(str(workdir / "missing-dir"))


def test_exists_and_make_dir_return_what_the_sdk_expects(sandbox: Any, workdir: Path) -> None:
    assert sandbox.files.exists(str(workdir)) is True
    assert sandbox.files.exists(str(workdir / "nope")) is False
    assert sandbox.files.make_dir(str(workdir / "x" / "y")) is True
    assert (workdir / "x" / "y").is_dir()
    assert sandbox.files.make_dir(str(workdir / "x" / "y")) is False


def test_list_get_info_rename_remove(sandbox: Any, workdir: Path) -> None:
    (workdir / "dir" / "sub").mkdir(parents=True)
    (workdir / "dir" / "f.txt").write_text("12345")
    (workdir / "dir" / "sub" / "g.txt").write_text("g")
    os.symlink(workdir / "dir" / "f.txt", workdir / "dir" / "link")

    names = [e.name for e in sandbox.files.list(str(workdir / "dir"))]
    assert names == ["f.txt", "link", "sub"]
    deep = [e.path for e in sandbox.files.list(str(workdir / "dir"), depth=2)]
    assert str(workdir / "dir" / "sub" / "g.txt") in deep

    info = sandbox.files.get_info(str(workdir / "dir" / "f.txt"))
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.permissions.startswith("-rw")
    assert info.modified_time is not None
    link = sandbox.files.get_info(str(workdir / "dir" / "link"))
    assert link.symlink_target == str(workdir / "dir" / "f.txt")

    moved = sandbox.files.rename(str(workdir / "dir" / "f.txt"), str(workdir / "other" / "f2.txt"))
    assert moved.path == str(workdir / "other" / "f2.txt")
    assert (workdir / "other" / "f2.txt").read_text() == "12345"

    sandbox.files.remove(str(workdir / "dir"))
    assert not (workdir / "dir").exists()
    sandbox.files.remove(str(workdir / "dir"))  # a missing path is not an error, as in envd


def test_list_of_a_file_is_invalid_argument(sandbox: Any, workdir: Path) -> None:
    (workdir / "f").write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(str(workdir / "f"))


def test_relative_paths_resolve_against_the_users_home(sandbox: Any) -> None:
    home = Path(os.path.expanduser("~"))
    name = f"sandboxd-test-{os.getpid()}.txt"
    try:
        sandbox.files.write(name, "home")
        assert (home / name).read_text() == "home"
        assert sandbox.files.read(f"~/{name}") == "home"
    finally:
        (home / name).unlink(missing_ok=True)


def test_256_mib_round_trip_is_byte_exact(sandbox: Any, workdir: Path) -> None:
    data = os.urandom(1 << 20) * 256
    digest = hashlib.sha256(data).hexdigest()
    target = str(workdir / "big.bin")
    sandbox.files.write(target, data)
    del data
    assert hashlib.sha256((workdir / "big.bin").read_bytes()).hexdigest() == digest
    h = hashlib.sha256()
    size = 0
    for chunk in sandbox.files.read(target, format="stream"):
        h.update(chunk)
        size += len(chunk)
    assert size == 256 << 20
    assert h.hexdigest() == digest


def test_dot_dot_and_tilde_resolve_as_envd_does(sandbox: Any, workdir: Path) -> None:
    (workdir / "sub").mkdir()
    sandbox.files.write(str(workdir / "sub" / ".." / "up.txt"), "climbed")
    assert (workdir / "up.txt").read_text() == "climbed"
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("~someoneelse/file")
