"""Helpers the standalone agent uses instead of modules that would stay loaded for its life (issue 16,
``rss8``): the watcher ids drawn from ``os.urandom`` rather than ``secrets``, and an upload's
``Content-Type`` read without python-multipart when it is a bare ``application/octet-stream``."""

from __future__ import annotations

import collections
import string

import pytest
from python_multipart.multipart import parse_options_header
from sandboxd.agent.files import _content_type
from sandboxd.agent.rpc import Method
from sandboxd.agent.services.watch import new_watcher_id


def test_watcher_ids_are_w_and_20_letters_or_digits_spread_over_all_36() -> None:
    ids = [new_watcher_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    alphabet = set(string.ascii_lowercase + string.digits)
    assert all(i[0] == "w" and len(i) == 21 and set(i[1:]) <= alphabet for i in ids)
    counts = collections.Counter("".join(i[1:] for i in ids))
    # 40,000 characters over 36: each expected ~1,111 times; a byte taken modulo 36 without the
    # rejection of 252..255 would give the first four ~1,250 (8 in 256 more), still inside these
    # bounds, so the check is for a character missing or grossly favoured, not for that bias.
    assert set(counts) == alphabet
    assert max(counts.values()) < 1.25 * min(counts.values())


@pytest.mark.parametrize(
    "value",
    [
        "application/octet-stream",
        "Application/Octet-Stream",
        " application/octet-stream\t",
        "application/octet-stream; charset=binary",
        "multipart/form-data; boundary=abc",
        'multipart/form-data; boundary="a b"',
        "MULTIPART/FORM-DATA;BOUNDARY=x",
        "text/plain",
        "",
        "application/octet-streamx",
    ],
)
def test_an_uploads_content_type_is_read_as_python_multipart_reads_it(value: str) -> None:
    assert _content_type(value) == parse_options_header(value)


def test_methods_built_on_first_use_are_built_once_by_a_path_under_their_prefix() -> None:
    from sandboxd.agent.connect import ConnectTransport
    from sandboxd.agent.methods import FILESYSTEM_PREFIX, filesystem_methods, process_methods
    from sandboxd.agent.state import AgentState

    state = AgentState(default_user="root")
    built: list[int] = []

    def later() -> list[Method]:
        built.append(1)
        return filesystem_methods(state)

    transport = ConnectTransport(process_methods(state), state, later=(FILESYSTEM_PREFIX, later))
    assert "/process.Process/Start" in transport.routes
    assert transport.route_later("/process.Process/Nope") is None
    assert transport.route_later("/files") is None
    assert built == []
    stat = transport.route_later("/filesystem.Filesystem/Stat")
    assert stat is not None and stat.name == "Stat" and built == [1]
    assert transport.routes["/filesystem.Filesystem/CreateWatcher"].name == "CreateWatcher"  # the watch service's
    assert transport.route_later("/filesystem.Filesystem/Nope") is None
    assert built == [1]
