"""The zygote's protocol with a real zygote process: a create the jail refuses is answered with the
reason, however long, and the zygote goes on serving.

What A (the zygote's fork that builds the sandbox) reports is one atomic pipe write that the zygote
answers as soon as it is read, before A has exited; an error that is not an ``OSError`` must be
reported too, and A must never fall back into the zygote's own loop (it would answer on a socket it
closed, and the runtime would see only "sandbox setup failed")."""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandboxd.runtime import zygote


@pytest.fixture(scope="module")
def zygote_socket() -> Iterator[socket.socket]:
    sock, process = zygote.start()
    try:
        yield sock
    finally:
        sock.close()  # the zygote exits when its end closes
        assert process.wait(timeout=30) == 0


def ask(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    socket.send_fds(sock, [json.dumps(request).encode()], [])
    sock.settimeout(60)  # the first answer waits for the zygote's imports
    answer: dict[str, Any] = json.loads(sock.recv(zygote.MAX_MESSAGE))
    return answer


def refused(sandbox_id: str, tmp: Path) -> dict[str, Any]:
    return {
        "id": sandbox_id,
        "instance": "test-zygote",
        "id_base": 0,
        "template_dirs": [str(tmp / "no-template")],
        "sandbox_dir": str(tmp / "sandbox"),
        "log": str(tmp / "agent.log"),
    }


def test_a_refused_create_is_answered_with_its_reason(zygote_socket: socket.socket, tmp_path: Path) -> None:
    answer = ask(zygote_socket, refused("bad/id", tmp_path))
    assert answer["id"] == "bad/id"
    assert answer["ok"] is False
    assert "must be 1-64 bytes" in answer["error"]  # the jail's own words, not "sandbox setup failed"


def test_a_reason_longer_than_one_pipe_write_is_cut_and_the_zygote_goes_on(
    zygote_socket: socket.socket, tmp_path: Path
) -> None:
    long_id = "x" * (2 * select.PIPE_BUF)
    answer = ask(zygote_socket, refused(long_id, tmp_path))
    assert answer["id"] == long_id and answer["ok"] is False
    assert answer["error"].startswith('id "xxx')
    assert len(answer["error"].encode()) < select.PIPE_BUF
    assert "\n" not in answer["error"]
    # Still serving: the next create is answered too.
    assert ask(zygote_socket, refused("bad/again", tmp_path))["id"] == "bad/again"


def test_volumes_in_a_request_reach_the_jail(zygote_socket: socket.socket, tmp_path: Path) -> None:
    # Targets travel in "volumes", each volume's mount as a descriptor after the disk's; the jail's
    # refusal of the target proves they got there (refused before any cgroup or mount is made).
    request = refused("vol-target", tmp_path) | {"id_base": 0x70000000, "volumes": ["/mnt/../etc"]}
    disk = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    volume = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        socket.send_fds(zygote_socket, [json.dumps(request).encode()], [disk, volume])
    finally:
        os.close(disk)
        os.close(volume)
    zygote_socket.settimeout(60)
    answer = json.loads(zygote_socket.recv(zygote.MAX_MESSAGE))
    assert answer["ok"] is False
    assert 'volume mount path "/mnt/../etc" must be normalised' in answer["error"], answer
