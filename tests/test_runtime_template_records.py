"""A built-in template's build cache record as every create reads it: parsed again only when its
file changed, and its layers looked for each time. A real store directory and SQLite file, no server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sandboxd.runtime.store import Store
from sandboxd.runtime.templates import BASE, Templates

_opened: list[str] = []
_watched: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    # Audit hooks cannot be removed: this one only records opens of the paths a test watches.
    if event == "open" and _watched and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]) in _watched:
        _opened.append(os.fspath(args[0]))


sys.addaudithook(_audit)


def test_a_built_in_templates_record_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    templates = Templates(Store(tmp_path / "db.sqlite3"), tmp_path / "store")
    layers = templates.layers

    def layer(hex_digest: str) -> str:
        (layers.layers / hex_digest).mkdir()
        (layers.layers / f"{hex_digest}.json").write_text("{}")
        return f"sha256:{hex_digest}"

    first, second = layer("a" * 64), layer("b" * 64)
    key = templates._key(BASE)
    layers.cache_put(key, {"layers": [first], "config": {}})
    record = os.fspath(layers.cache / layers.cache_record_name(key))
    _watched[:] = [record]
    try:
        assert asyncio.run(templates.prepare(BASE)).layers == (layers.path(first),)
        assert _opened == [record]
        for _ in range(3):  # the creates that follow: the record unchanged, not opened
            assert asyncio.run(templates.prepare(BASE)).layers == (layers.path(first),)
        assert _opened == [record]

        # A record replaced (as a build replaces it: a new file renamed over it) is read again.
        layers.cache_put(key, {"layers": [second], "config": {"user": "user"}})
        template = asyncio.run(templates.prepare(BASE))
        assert template.layers == (layers.path(second),) and template.config == {"user": "user"}
        assert _opened == [record, record]
        assert templates.db.template(BASE) is not None and templates.db.template(BASE).layers == [second]

        # Its layer collected by another process: the record no longer makes the template ready.
        (layers.layers / f"{'b' * 64}.json").unlink()
        assert templates._ready(BASE) is None
        (layers.layers / f"{'b' * 64}.json").write_text("{}")
        assert templates._ready(BASE) is not None
        # And a record removed is not served from memory.
        os.unlink(record)
        assert templates._cached_record(key) is None
    finally:
        _watched.clear()
        _opened.clear()
